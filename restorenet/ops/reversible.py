"""rev_coupling: the memory-bound pieces of AdaRevD's reversible coupling, fused.

AdaRevD updates each decoder level as ``c' = a * c + f`` with a per-channel
alpha ``a`` (kept at ``|a| >= 1e-3`` by ``signed_clamp``) and ``f = L(...)``
computed elsewhere. Its memory-efficient backward walks the columns in reverse
and, at every level, needs three things that each read the whole state::

    c       = (c' - f) / a                      rebuild the old state
    grad_c  = a * grad_c'                       propagate through the coupling
    grad_a  = sum_{n,h,w} grad_c' * c           alpha's gradient, per channel

``rev_coupling_invert`` does all three in ONE pass over memory (read c', f,
grad_c'; write c, grad_c). ``rev_coupling_forward`` is the forward update in one
pass, differentiable (its backward is the same fused kernel without the rebuild).

Numerics. Arithmetic is fp32 whatever the storage (fp64 for fp64 tensors);
alpha is taken in fp32. The alpha reduction accumulates in fp32 per program and
adds the per-program partial sums in a fixed order (no atomics): results are
deterministic run to run. In fp16/bf16 storage the rebuilt state is rounded to
the storage dtype at every inversion, so a state rebuilt through K levels or
columns drifts from the one the forward saw (bf16: ~8 bits of mantissa, the
error grows with K and with 1/|a|). Callers that need an exact replay should
keep the coupling states in fp32; whether AdaRevD does is the model's choice.

Checks are on shapes, dtypes, devices and layouts only: ``|a| >= 1e-3`` is the
caller's contract (checking it would read alpha on the host and break graphs).

Pattern as in ``restorenet.ops.hyper_conv2d``: the spec (``*_reference``), the
public functions, custom ops ``torch.ops.restorenet.rev_coupling_forward``
(+ ``_backward``) and ``rev_coupling_invert`` with fake implementations, and
the backends: reference, ``restorenet_kernels.reversible`` (Triton) and
``restorenet._C`` (CUDA: ``csrc/reversible.cu``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from restorenet._checks import check_tensor
from restorenet.ops._backend import cuda_extension, resolve_backend
from restorenet.ops._common import in_working_layout, like_layout, output_memory_format
from restorenet.ops._nvtx import nvtx_range

OP = "rev_coupling"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ALPHA_DTYPES = (torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(alpha: Tensor, dtype: torch.dtype) -> Tensor:
    return alpha.to(dtype).view(1, -1, 1, 1)


# --------------------------------------------------------------------------- spec
def rev_coupling_forward_reference(c: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
    """``c' = alpha[None, :, None, None] * c + f``, computed in fp32 (fp64 for
    fp64 inputs) and rounded once to the dtype of ``c``."""
    cd = _compute_dtype(c.dtype)
    return (_per_channel(alpha, cd) * c.to(cd) + f.to(cd)).to(c.dtype)


def rev_coupling_invert_reference(c_new: Tensor, f: Tensor, alpha: Tensor,
                                  grad_c_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``c = (c' - f) / a``, ``grad_c = a * grad_c'``, ``grad_a = sum_{n,h,w} grad_c' * c``,
    computed in fp32 (fp64 for fp64 inputs). ``grad_a`` is summed from the unrounded
    c and returned in the dtype of ``alpha``; c and grad_c in the dtype of ``c_new``."""
    cd = _compute_dtype(c_new.dtype)
    a = _per_channel(alpha, cd)
    c = (c_new.to(cd) - f.to(cd)) / a
    g = grad_c_new.to(cd)
    grad_alpha = (g * c).sum((0, 2, 3))
    return c.to(c_new.dtype), (a * g).to(grad_c_new.dtype), grad_alpha.to(alpha.dtype)


# ----------------------------------------------------------------- public functions
def rev_coupling_forward(c: Tensor, f: Tensor, alpha: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """One coupling update ``c' = a * c + f`` in one pass over memory.

    Args:
        c, f: [N, C, H, W], one dtype (float16/bfloat16/float32/float64), one device;
            contiguous or channels_last (``f`` is brought to the layout of ``c``).
        alpha: [C], float32 (or float64 with float64 ``c``); must satisfy
            ``|alpha| >= 1e-3`` (not checked, see the module docstring).
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None for the
            process-wide choice (see ``restorenet.ops.use_backend``).
    Returns:
        c' in the dtype and layout of ``c``. Differentiable in c, f and alpha:
        ``dc = a * dc'``, ``df = dc'``, ``dalpha = sum_{n,h,w} dc' * c``.
    """
    _check_pair("c", c, "f", f)
    _check_alpha(alpha, c)
    name = resolve_backend(backend, c.device, OP, cuda_symbol="rev_coupling_forward")
    return torch.ops.restorenet.rev_coupling_forward(c, like_layout(f, c), alpha, name)


def rev_coupling_invert(c_new: Tensor, f: Tensor, alpha: Tensor, grad_c_new: Tensor, *,
                        backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One backward step of the reversible walk, in one pass over memory.

    Args:
        c_new: the state after the update, [N, C, H, W] (any float dtype of
            ``rev_coupling_forward``), contiguous or channels_last.
        f: the recomputed update term ``L(...)``, like ``c_new``.
        alpha: [C], float32 (or float64 with float64 ``c_new``), ``|alpha| >= 1e-3``.
        grad_c_new: the gradient on ``c_new``, like ``c_new``.
    Returns:
        ``(c, grad_c, grad_alpha)``: the rebuilt state ``(c_new - f) / a`` and
        ``a * grad_c_new`` in the dtype and layout of ``c_new``, and
        ``sum_{n,h,w} grad_c_new * c`` [C] in the dtype of ``alpha`` (fp32
        accumulation, deterministic). Not differentiable: it is a backward step.
    """
    _check_pair("c_new", c_new, "f", f)
    _check_pair("c_new", c_new, "grad_c_new", grad_c_new)
    _check_alpha(alpha, c_new)
    name = resolve_backend(backend, c_new.device, OP, cuda_symbol="rev_coupling_invert")
    c, grad_c, grad_alpha = torch.ops.restorenet.rev_coupling_invert(
        c_new, like_layout(f, c_new), alpha, like_layout(grad_c_new, c_new), name)
    return c, grad_c, grad_alpha


def _check_pair(ref_name: str, ref: Tensor, name: str, t: Tensor) -> None:
    check_tensor(ref_name, ref, ndim=4, dtypes=DTYPES)
    check_tensor(name, t, ndim=4, dtypes=(ref.dtype,), device=ref.device)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(t.shape)}")


def _check_alpha(alpha: Tensor, ref: Tensor) -> None:
    dtypes = ALPHA_DTYPES if ref.dtype == torch.float64 else (torch.float32,)
    check_tensor("alpha", alpha, ndim=1, dtypes=dtypes, device=ref.device)
    if alpha.shape[0] != ref.shape[1]:
        raise ValueError(f"alpha must have shape [C] = [{ref.shape[1]}] (one value per channel), "
                         f"got {tuple(alpha.shape)}")


# ------------------------------------------------------------------- custom ops
@torch.library.custom_op("restorenet::rev_coupling_forward", mutates_args=())
def _forward_op(c: Tensor, f: Tensor, alpha: Tensor, backend: str) -> Tensor:
    fmt, (c, f) = in_working_layout(c, f)
    with nvtx_range(OP, "fwd", c.device):
        out = _FORWARD[backend](c, f, alpha, fmt == torch.channels_last)
    return out.contiguous(memory_format=fmt)


@_forward_op.register_fake
def _(c, f, alpha, backend):
    return torch.empty_like(c, memory_format=output_memory_format(c))


# Returns (grad_c, grad_alpha) for grad_c_new: the coupling's backward with c known.
@torch.library.custom_op("restorenet::rev_coupling_backward", mutates_args=())
def _backward_op(grad_c_new: Tensor, c: Tensor, alpha: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    fmt, (c, g) = in_working_layout(c, grad_c_new)
    with nvtx_range(OP, "bwd", c.device):
        grad_c, grad_alpha = _BACKWARD[backend](g, c, alpha, fmt == torch.channels_last)
    return grad_c.contiguous(memory_format=fmt), grad_alpha.to(alpha.dtype)


@_backward_op.register_fake
def _(grad_c_new, c, alpha, backend):
    return torch.empty_like(c, memory_format=output_memory_format(c)), alpha.new_empty(alpha.shape)


def _setup_context(ctx, inputs, output):
    c, f, alpha, backend = inputs
    ctx.save_for_backward(c, alpha)
    ctx.backend = backend


def _autograd_backward(ctx, grad_c_new):
    c, alpha = ctx.saved_tensors
    need_c, need_f, need_alpha = ctx.needs_input_grad[:3]
    grad_c = grad_alpha = None
    if need_c or need_alpha:
        grad_c, grad_alpha = torch.ops.restorenet.rev_coupling_backward(
            grad_c_new, c, alpha, ctx.backend)
    return (grad_c if need_c else None, grad_c_new if need_f else None,
            grad_alpha if need_alpha else None, None)


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("restorenet::rev_coupling_invert", mutates_args=())
def _invert_op(c_new: Tensor, f: Tensor, alpha: Tensor, grad_c_new: Tensor,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    fmt, (x, f, g) = in_working_layout(c_new, f, grad_c_new)
    with nvtx_range(OP, "bwd", x.device):
        c, grad_c, grad_alpha = _INVERT[backend](x, f, alpha, g, fmt == torch.channels_last)
    return (c.contiguous(memory_format=fmt), grad_c.contiguous(memory_format=fmt),
            grad_alpha.to(alpha.dtype))


@_invert_op.register_fake
def _(c_new, f, alpha, grad_c_new, backend):
    fmt = output_memory_format(c_new)
    return (torch.empty_like(c_new, memory_format=fmt), torch.empty_like(c_new, memory_format=fmt),
            alpha.new_empty(alpha.shape))


# ------------------------------------------------------------ backend: reference
def _reference_forward(c, f, alpha, channels_last):
    return rev_coupling_forward_reference(c, f, alpha)


def _reference_backward(g, c, alpha, channels_last):
    cd = _compute_dtype(c.dtype)
    g32 = g.to(cd)
    return (_per_channel(alpha, cd) * g32).to(g.dtype), (g32 * c.to(cd)).sum((0, 2, 3))


def _reference_invert(c_new, f, alpha, g, channels_last):
    return rev_coupling_invert_reference(c_new, f, alpha, g)


# --------------------------------------------------------------- backend: triton
def _triton_forward(c, f, alpha, channels_last):
    from restorenet_kernels import reversible as kernels

    return kernels.forward(c, f, alpha, channels_last)


def _triton_backward(g, c, alpha, channels_last):
    from restorenet_kernels import reversible as kernels

    _, grad_c, grad_alpha = kernels.invert(c, None, alpha, g, channels_last)
    return grad_c, grad_alpha


def _triton_invert(c_new, f, alpha, g, channels_last):
    from restorenet_kernels import reversible as kernels

    return kernels.invert(c_new, f, alpha, g, channels_last)


# ----------------------------------------------------------------- backend: cuda
# csrc/reversible.cu through csrc/binding/reversible.cpp. The kernels take
# strides (no copies for either layout) and alpha in the compute dtype; the
# binding converts alpha and returns grad_alpha in the compute dtype (the op
# casts it to alpha's dtype).
def _cuda_forward(c, f, alpha, channels_last):
    return cuda_extension().rev_coupling_forward(c, f, alpha)


def _cuda_backward(g, c, alpha, channels_last):
    return cuda_extension().rev_coupling_backward(g, c, alpha)


def _cuda_invert(c_new, f, alpha, g, channels_last):
    return cuda_extension().rev_coupling_invert(c_new, f, alpha, g)


_FORWARD = {"reference": _reference_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {"reference": _reference_backward, "triton": _triton_backward, "cuda": _cuda_backward}
_INVERT = {"reference": _reference_invert, "triton": _triton_invert, "cuda": _cuda_invert}
