"""layer_norm2d / simple_gate: NAFBlock's element-wise stages, fused.

A NAFBlock (``restorenet.models.blocks``) is

    y   = inp + beta  * conv1x1(SCA(SG(dw3x3(conv1x1(LN(inp))))))
    out = y   + gamma * conv1x1(SG(conv1x1(LN(y))))

Its LayerNorm2d and SimpleGate are memory-bound: in plain PyTorch each is
several kernels and several full reads/writes of the activation (LN: mean,
centring, variance, rsqrt, scale, shift). AdaRevD's reversible backward re-runs
every block's forward, so these stages are paid twice per step. Here each is
one pass over memory in each direction:

    layer_norm2d   y = (x - mu) / sqrt(var + eps) * w + b,   mu, var over C per pixel
                   forward: read x, write y and (mu, rstd) per pixel [N, H, W];
                   backward: with xhat = (x - mu) * rstd and g = dy * w,
                       dx = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat))
                       dw = sum_{n,h,w} dy * xhat,   db = sum_{n,h,w} dy
                   in one read of (dy, x) and one write of dx.
    simple_gate    y = x[:, :C/2] * x[:, C/2:]
                   backward: dx = cat(dy * x[:, C/2:], dy * x[:, :C/2]).

Numerics. Arithmetic is fp32 whatever the storage (fp64 for fp64 tensors) and
each output is rounded once to its storage dtype; the LN statistics (mean,
rstd) are fp32 and the variance is two-pass (no E[x^2] - E[x]^2 cancellation).
dw/db accumulate in fp32 per program; the per-program partial sums are added in
a fixed order (no atomics): results are deterministic run to run.

Autocast. Custom ops are invisible to autocast, so the public functions decide,
and both keep the dtype of ``x`` (they do not call ``autocast_inputs``):
``layer_norm2d`` always normalises in fp32 and returns ``x.dtype`` -- an fp16
activation stays fp16 (unlike ``F.layer_norm`` under CUDA autocast, which
returns fp32), and fp32 parameters are used as they are (no rounding of w, b
to fp16; their gradients come back fp32). ``simple_gate`` is a product, which
autocast leaves in the input dtype as well.

Pattern as in ``restorenet.ops.hyper_conv2d``: the specs (``*_reference``),
the public functions, custom ops ``torch.ops.restorenet.layer_norm2d`` (returns
``(y, mean, rstd)``; + ``_backward``) and ``simple_gate`` (+ ``_backward``)
with fake implementations, and the backends: reference,
``restorenet_kernels.naf_elementwise`` (Triton) and ``restorenet._C`` (CUDA:
``csrc/naf_elementwise.cu``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from restorenet._checks import check_tensor
from restorenet.ops._backend import cuda_extension, resolve_backend
from restorenet.ops._common import in_working_layout, output_memory_format
from restorenet.ops._nvtx import nvtx_range

LN_OP = "layer_norm2d"
SG_OP = "simple_gate"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).view(1, -1, 1, 1)


# --------------------------------------------------------------------------- spec
def layer_norm2d_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the channels of each pixel, with a per-channel affine::

        mu = mean_C(x),  var = mean_C((x - mu)^2),  y = (x - mu) / sqrt(var + eps) * w + b

    ``blocks.LayerNorm2d``'s math, computed in fp32 (fp64 for fp64 inputs) and
    rounded once to the dtype of ``x``."""
    y, _, _ = _reference_layer_norm2d(x, weight, bias, eps)
    return y


def simple_gate_reference(x: Tensor) -> Tensor:
    """``x[:, :C/2] * x[:, C/2:]`` (``blocks.SimpleGate``), computed in fp32 (fp64
    for fp64 inputs) and rounded once to the dtype of ``x``."""
    cd = _compute_dtype(x.dtype)
    a, b = x.to(cd).chunk(2, dim=1)
    return (a * b).to(x.dtype)


# ----------------------------------------------------------------- public functions
def layer_norm2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6, *,
                 backend: Optional[str] = None) -> Tensor:
    """NAFNet's LayerNorm2d in one pass over memory (forward and backward).

    Args:
        x: [N, C, H, W], float16/bfloat16/float32/float64, contiguous or
            channels_last (other strides are copied to contiguous), C >= 1.
        weight, bias: [C], one dtype: that of ``x``, or float32 for a
            float16/bfloat16/float32 ``x`` (fp32 master parameters).
        eps: added to the variance, a finite float >= 0 (LayerNorm2d: 1e-6).
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None for the
            process-wide choice (see ``restorenet.ops.use_backend``).
    Returns:
        y in the dtype and layout of ``x`` (also under autocast: statistics are
        always fp32). Differentiable in x, weight and bias.
    """
    _check_layer_norm_args(x, weight, bias, eps)
    name = resolve_backend(backend, x.device, LN_OP, cuda_symbol="layer_norm2d_forward")
    y, _, _ = torch.ops.restorenet.layer_norm2d(x, weight, bias, float(eps), name)
    return y


def simple_gate(x: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """NAFNet's SimpleGate ``x[:, :C/2] * x[:, C/2:]`` in one pass over memory.

    Args:
        x: [N, C, H, W] with C even and >= 2, float16/bfloat16/float32/float64,
            contiguous or channels_last.
        backend: as for ``layer_norm2d``.
    Returns:
        [N, C/2, H, W] in the dtype and layout of ``x``. Differentiable in x.
    """
    check_tensor("x", x, ndim=4, dtypes=DTYPES)
    if x.shape[1] < 2 or x.shape[1] % 2:
        raise ValueError(f"x must have an even number of channels >= 2 (SimpleGate splits them in "
                         f"halves), got shape {tuple(x.shape)}")
    name = resolve_backend(backend, x.device, SG_OP, cuda_symbol="simple_gate_forward")
    return torch.ops.restorenet.simple_gate(x, name)


def _check_layer_norm_args(x: Tensor, weight: Tensor, bias: Tensor, eps) -> None:
    check_tensor("x", x, ndim=4, dtypes=DTYPES)
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    # fp32 master parameters may go with a low-precision x; fp64 x needs fp64 ones.
    param_dtypes = ((torch.float64,) if x.dtype == torch.float64
                    else tuple(dict.fromkeys((x.dtype, torch.float32))))
    check_tensor("weight", weight, ndim=1, dtypes=param_dtypes, device=x.device)
    check_tensor("bias", bias, ndim=1, dtypes=(weight.dtype,), device=x.device)
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape[0] != x.shape[1]:
            raise ValueError(f"{name} must have shape [C] = [{x.shape[1]}] (one value per channel), "
                             f"got {tuple(t.shape)}")
    if (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps)
            or eps < 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")


# ------------------------------------------------------------------- custom ops
# Returns (y, mean, rstd); mean and rstd ([N, H, W], compute dtype) are saved
# for the backward and are not differentiable.
@torch.library.custom_op("restorenet::layer_norm2d", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    fmt, (x,) = in_working_layout(x)
    with nvtx_range(LN_OP, "fwd", x.device):
        y, mean, rstd = _LN_FORWARD[backend](x, weight, bias, eps, fmt == torch.channels_last)
    return y.contiguous(memory_format=fmt), mean.contiguous(), rstd.contiguous()


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, backend):
    n, _, h, w = x.shape
    cd = _compute_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=output_memory_format(x)), x.new_empty((n, h, w), dtype=cd),
            x.new_empty((n, h, w), dtype=cd))


# Returns (grad_x, grad_weight, grad_bias): grad_x in the dtype and layout of x,
# the parameter gradients in the dtype of weight.
@torch.library.custom_op("restorenet::layer_norm2d_backward", mutates_args=())
def _layer_norm_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    fmt, (x, g) = in_working_layout(x, grad_y)
    with nvtx_range(LN_OP, "bwd", x.device):
        dx, dw, db = _LN_BACKWARD[backend](g, x, weight, mean, rstd, fmt == torch.channels_last)
    return dx.to(x.dtype).contiguous(memory_format=fmt), dw.to(weight.dtype), db.to(weight.dtype)


@_layer_norm_backward_op.register_fake
def _(grad_y, x, weight, mean, rstd, backend):
    return (torch.empty_like(x, memory_format=output_memory_format(x)), torch.empty_like(weight),
            torch.empty_like(weight))


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.backend = backend


def _layer_norm_autograd_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None, None, None
    dx, dw, db = torch.ops.restorenet.layer_norm2d_backward(grad_y, x, weight, mean, rstd, ctx.backend)
    return (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None)


_layer_norm_op.register_autograd(_layer_norm_autograd_backward, setup_context=_layer_norm_setup_context)


@torch.library.custom_op("restorenet::simple_gate", mutates_args=())
def _simple_gate_op(x: Tensor, backend: str) -> Tensor:
    fmt, (x,) = in_working_layout(x)
    with nvtx_range(SG_OP, "fwd", x.device):
        y = _SG_FORWARD[backend](x, fmt == torch.channels_last)
    return y.contiguous(memory_format=fmt)


@_simple_gate_op.register_fake
def _(x, backend):
    n, c, h, w = x.shape
    return x.new_empty((n, c // 2, h, w)).contiguous(memory_format=output_memory_format(x))


@torch.library.custom_op("restorenet::simple_gate_backward", mutates_args=())
def _simple_gate_backward_op(grad_y: Tensor, x: Tensor, backend: str) -> Tensor:
    fmt, (x, g) = in_working_layout(x, grad_y)
    with nvtx_range(SG_OP, "bwd", x.device):
        dx = _SG_BACKWARD[backend](g, x, fmt == torch.channels_last)
    return dx.contiguous(memory_format=fmt)


@_simple_gate_backward_op.register_fake
def _(grad_y, x, backend):
    return torch.empty_like(x, memory_format=output_memory_format(x))


def _simple_gate_setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _simple_gate_autograd_backward(ctx, grad_y):
    (x,) = ctx.saved_tensors
    return torch.ops.restorenet.simple_gate_backward(grad_y, x, ctx.backend), None


_simple_gate_op.register_autograd(_simple_gate_autograd_backward, setup_context=_simple_gate_setup_context)


# ------------------------------------------------------------ backend: reference
def _reference_layer_norm2d(x, weight, bias, eps):
    """(y, mean, rstd) from plain PyTorch ops (autograd-friendly: the spec)."""
    cd = _compute_dtype(x.dtype)
    xf = x.to(cd)
    mean = xf.mean(1, keepdim=True)
    centred = xf - mean
    rstd = torch.rsqrt(centred.pow(2).mean(1, keepdim=True) + eps)
    y = centred * rstd * _per_channel(weight, cd) + _per_channel(bias, cd)
    return y.to(x.dtype), mean.squeeze(1), rstd.squeeze(1)


def _reference_ln_forward(x, weight, bias, eps, channels_last):
    return _reference_layer_norm2d(x, weight, bias, eps)


def _reference_ln_backward(g, x, weight, mean, rstd, channels_last):
    """The closed form of the module docstring (autograd is not reachable from
    inside a custom op)."""
    cd = _compute_dtype(x.dtype)
    r = rstd.to(cd).unsqueeze(1)
    xhat = (x.to(cd) - mean.to(cd).unsqueeze(1)) * r
    dy = g.to(cd)
    gw = dy * _per_channel(weight, cd)
    dx = r * (gw - gw.mean(1, keepdim=True) - xhat * (gw * xhat).mean(1, keepdim=True))
    return dx, (dy * xhat).sum((0, 2, 3)), dy.sum((0, 2, 3))


def _reference_sg_forward(x, channels_last):
    return simple_gate_reference(x)


def _reference_sg_backward(g, x, channels_last):
    cd = _compute_dtype(x.dtype)
    a, b = x.to(cd).chunk(2, dim=1)
    dy = g.to(cd)
    return torch.cat((dy * b, dy * a), dim=1).to(x.dtype)


# --------------------------------------------------------------- backend: triton
def _triton_ln_forward(x, weight, bias, eps, channels_last):
    from restorenet_kernels import naf_elementwise as kernels

    return kernels.layer_norm2d_forward(x, weight, bias, eps, channels_last)


def _triton_ln_backward(g, x, weight, mean, rstd, channels_last):
    from restorenet_kernels import naf_elementwise as kernels

    return kernels.layer_norm2d_backward(g, x, weight, mean, rstd, channels_last)


def _triton_sg_forward(x, channels_last):
    from restorenet_kernels import naf_elementwise as kernels

    return kernels.simple_gate_forward(x, channels_last)


def _triton_sg_backward(g, x, channels_last):
    from restorenet_kernels import naf_elementwise as kernels

    return kernels.simple_gate_backward(g, x, channels_last)


# ----------------------------------------------------------------- backend: cuda
# csrc/naf_elementwise.cu through csrc/binding/naf_elementwise.cpp. The
# binding converts weight/bias to the compute dtype and returns mean/rstd and
# the parameter gradients in it (the op casts them to weight's dtype).
def _cuda_ln_forward(x, weight, bias, eps, channels_last):
    return cuda_extension().layer_norm2d_forward(x, weight, bias, eps)


def _cuda_ln_backward(g, x, weight, mean, rstd, channels_last):
    return cuda_extension().layer_norm2d_backward(g, x, weight, mean, rstd)


def _cuda_sg_forward(x, channels_last):
    return cuda_extension().simple_gate_forward(x)


def _cuda_sg_backward(g, x, channels_last):
    return cuda_extension().simple_gate_backward(g, x)


_LN_FORWARD = {"reference": _reference_ln_forward, "triton": _triton_ln_forward, "cuda": _cuda_ln_forward}
_LN_BACKWARD = {"reference": _reference_ln_backward, "triton": _triton_ln_backward, "cuda": _cuda_ln_backward}
_SG_FORWARD = {"reference": _reference_sg_forward, "triton": _triton_sg_forward, "cuda": _cuda_sg_forward}
_SG_BACKWARD = {"reference": _reference_sg_backward, "triton": _triton_sg_backward, "cuda": _cuda_sg_backward}
