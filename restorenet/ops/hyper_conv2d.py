"""hyper_conv2d: a convolution whose kernel is generated per sample.

HyperRes makes every kernel of its main network from the degradation level
``c`` of the sample: ``k = c * weight + weight_base``. A training batch mixes
levels, so each sample needs its own kernel::

    y[n] = conv2d(x[n], level[n] * weight + weight_base,
                  level[n] * bias + bias_base, stride, padding)

The fast backends build the kernel tile inside the convolution, so neither the
N per-sample kernels nor their N gradients are ever written to memory.

This file is the pattern every restorenet op follows:

* ``hyper_conv2d_reference`` -- the spec, plain PyTorch, float64-gradcheckable;
* ``hyper_conv2d`` -- the public function: autocast, argument checks, backend choice;
* ``torch.ops.restorenet.hyper_conv2d`` (+ ``_backward``) -- custom ops with fake
  (meta) implementations and an autograd registration, so that
  ``torch.compile(fullgraph=True)`` traces through them without a graph break;
* per-backend implementations: the reference, ``restorenet_kernels.hyper_conv2d``
  (Triton) and ``restorenet._C`` (CUDA, kernels in ``csrc/hyper_conv2d.cu``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from restorenet._checks import check_tensor
from restorenet.ops._backend import cuda_extension, resolve_backend
from restorenet.ops._common import (autocast_inputs, can_read_values, check_conv_geometry,
                                    output_memory_format, output_shape, shape_grads)
from restorenet.ops._nvtx import nvtx_range

OP = "hyper_conv2d"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- spec
def hyper_conv2d_reference(x: Tensor, level: Tensor, weight: Tensor, weight_base: Tensor,
                           bias: Optional[Tensor] = None, bias_base: Optional[Tensor] = None,
                           stride: int = 1, padding: int = 0) -> Tensor:
    """The definition, one sample at a time. ``level`` is a tensor [N].

    The kernel ``level[n] * weight + weight_base`` is formed in the weights'
    dtype, as a user writing this in PyTorch would.
    """
    lv = level.to(weight.dtype)
    out = []
    for n in range(x.shape[0]):
        kernel = lv[n] * weight + weight_base
        b = _generated_bias(lv[n], bias, bias_base)
        out.append(F.conv2d(x[n:n + 1], kernel, b, stride, padding))
    if not out:  # an empty batch still has a well-defined output shape
        return x.new_empty(output_shape(x, weight, stride, padding))
    return torch.cat(out)


def _generated_bias(lv: Tensor, bias: Optional[Tensor], bias_base: Optional[Tensor]) -> Optional[Tensor]:
    if bias is None and bias_base is None:
        return None
    b = 0
    if bias is not None:
        b = lv * bias
    if bias_base is not None:
        b = b + bias_base
    return b


# ----------------------------------------------------------------- public function
def hyper_conv2d(x: Tensor, level, weight: Tensor, weight_base: Tensor,
                 bias: Optional[Tensor] = None, bias_base: Optional[Tensor] = None,
                 stride: int = 1, padding: int = 0, *, allow_nonfinite: bool = False,
                 backend: Optional[str] = None) -> Tensor:
    """Per-sample generated-kernel convolution (see module docstring).

    Args:
        x: [N, Cin, H, W], float16/bfloat16/float32/float64, contiguous or channels_last;
            Cin, H, W >= 1 (N may be 0).
        level: the condition ``c`` of each sample (HyperRes: noise sigma / 255, JPEG
            quality / 255, ...): a number (every sample), a sequence of N numbers, or a
            floating tensor [] or [N] on the device of ``x``. Computed in float32
            (float64 when ``x`` is float64) whatever the input dtype. Levels must be
            finite and >= 0 (a degradation level; a NaN would silently make a NaN
            image). A number or a sequence is checked on the host for free; a tensor
            costs exactly one host read (one sync) -- not made under torch.compile, on
            meta tensors (no values) or for an empty batch, where it is not checked.
        weight, weight_base: [Cout, Cin, kh, kw], the dtype of ``x``, every dim >= 1.
        bias, bias_base: [Cout] or None (None counts as zero).
        allow_nonfinite: skip the level check (no host read): for a caller that checked
            the levels once for many layers (``HyperRes`` does, once per forward), or
            that wants NaN, inf or negative levels to flow through.
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None for the
            process-wide choice (see ``restorenet.ops.use_backend``).
    Returns:
        [N, Cout, Ho, Wo] in the layout of ``x``. Differentiable in every tensor input.
    """
    check_tensor("x", x, ndim=4, dtypes=DTYPES)  # first: the level check needs N
    x, weight, weight_base, bias, bias_base = autocast_inputs(x, weight, weight_base, bias, bias_base)
    read_level = isinstance(level, Tensor) and not allow_nonfinite  # host values: checked on the host
    level = _level_tensor(level, x, check_values=not allow_nonfinite)
    _check_args(x, level, weight, weight_base, bias, bias_base, stride, padding)
    if read_level and can_read_values(level):
        check_levels(level)  # last: every cheap check first, then the one host read
    level = _broadcast_level(level, x)
    name = resolve_backend(backend, x.device, OP, cuda_symbol="hyper_conv2d_forward")
    return torch.ops.restorenet.hyper_conv2d(x, level, weight, weight_base, bias, bias_base,
                                             stride, padding, name)


def _level_tensor(level, x: Tensor, check_values: bool):
    """``level`` as a tensor [] or [N] on x's device; numbers and sequences are
    range-checked here on the host (``check_values``), tensors only for metadata."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if _is_number(level):
        if check_values:
            check_level_value("level", level)
        return torch.full((x.shape[0],), float(level), dtype=dtype, device=x.device)
    if isinstance(level, (list, tuple)):
        return level_from_sequence(level, x, dtype, check_values)
    if not isinstance(level, Tensor):
        raise TypeError(f"level must be a number, a sequence of numbers or a tensor [N], "
                        f"got {type(level).__name__}")
    if not level.is_floating_point():
        raise TypeError(f"level must be a floating-point tensor, got {level.dtype}")
    if level.device != x.device:
        raise ValueError(f"level must be on the device of x ({x.device}), got {level.device}")
    if level.dim() > 1 or (level.dim() == 1 and level.shape[0] != x.shape[0]):
        raise ValueError(f"level must be a float or a tensor of shape [N] = [{x.shape[0]}] "
                         f"(one level per sample of x), got shape {tuple(level.shape)}")
    return level.to(dtype)


def _broadcast_level(level: Tensor, x: Tensor) -> Tensor:
    return level.expand(x.shape[0]) if level.dim() == 0 else level


def level_from_sequence(level, x: Tensor, dtype: torch.dtype, check_values: bool) -> Tensor:
    """A host sequence of N levels as a tensor [N] on x's device, checked on the host
    (finite, >= 0) when ``check_values``: no device read."""
    if len(level) != x.shape[0] or not all(_is_number(v) for v in level):
        raise ValueError(f"level must be a sequence of N = {x.shape[0]} numbers (one per sample "
                         f"of x), got {level!r}")
    if check_values:
        for v in level:
            check_level_value("level", v)
    return torch.tensor([float(v) for v in level], dtype=dtype, device=x.device)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_level_value(name: str, value) -> None:
    """A degradation level given as a Python number: finite and >= 0."""
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite or value < 0:
        raise ValueError(f"{name} must be finite and >= 0 (a degradation level), got {value!r}")


def check_levels(level: Tensor, name: str = "level") -> None:
    """Every value of a level tensor finite and >= 0, in exactly one host read
    (a second one only to word the error)."""
    if bool((torch.isfinite(level) & (level >= 0)).all()):  # the one host read
        return
    bad = level[~(torch.isfinite(level) & (level >= 0))]
    raise ValueError(f"{name} must be finite and >= 0 (a degradation level), got "
                     f"{bad.flatten()[:4].tolist()} among its values")


def _check_args(x, level, weight, weight_base, bias, bias_base, stride, padding) -> None:
    check_tensor("x", x, ndim=4, dtypes=DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=(x.dtype,), device=x.device)
    check_conv_geometry(x, weight, stride, padding)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have Cin = x.shape[1] = {x.shape[1]} input channels "
                         f"(shape [Cout, Cin, kh, kw]), got shape {tuple(weight.shape)}")
    check_tensor("weight_base", weight_base, ndim=4, dtypes=(x.dtype,), device=x.device)
    if weight_base.shape != weight.shape:
        raise ValueError(f"weight_base must have the shape of weight {tuple(weight.shape)}, "
                         f"got {tuple(weight_base.shape)}")
    for name, b in (("bias", bias), ("bias_base", bias_base)):
        if b is not None:
            check_tensor(name, b, ndim=1, dtypes=(x.dtype,), device=x.device)
            if b.shape[0] != weight.shape[0]:
                raise ValueError(f"{name} must have shape [Cout] = [{weight.shape[0]}], "
                                 f"got {tuple(b.shape)}")


# ------------------------------------------------------------------- custom ops
@torch.library.custom_op("restorenet::hyper_conv2d", mutates_args=())
def _hyper_conv2d_op(x: Tensor, level: Tensor, weight: Tensor, weight_base: Tensor,
                     bias: Optional[Tensor], bias_base: Optional[Tensor],
                     stride: int, padding: int, backend: str) -> Tensor:
    with nvtx_range(OP, "fwd", x.device):
        y = _FORWARD[backend](x, level, weight, weight_base, bias, bias_base, stride, padding)
    return y.contiguous(memory_format=output_memory_format(x))


@_hyper_conv2d_op.register_fake
def _(x, level, weight, weight_base, bias, bias_base, stride, padding, backend):
    shape = output_shape(x, weight, stride, padding)
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x))


# Gradients, in input order: x, level, weight, weight_base, bias, bias_base.
# A gradient that is not needed (or whose input is None) comes back empty.
@torch.library.custom_op("restorenet::hyper_conv2d_backward", mutates_args=())
def _hyper_conv2d_backward_op(grad_out: Tensor, x: Tensor, level: Tensor, weight: Tensor,
                              weight_base: Tensor, bias: Optional[Tensor], bias_base: Optional[Tensor],
                              stride: int, padding: int, backend: str,
                              needs_grad: Sequence[bool]) -> list[Tensor]:
    with nvtx_range(OP, "bwd", x.device):
        grads = _BACKWARD[backend](grad_out, x, level, weight, weight_base, bias, bias_base,
                                   stride, padding, list(needs_grad))
    return shape_grads(grads, (x, level, weight, weight_base, bias, bias_base), needs_grad)


@_hyper_conv2d_backward_op.register_fake
def _(grad_out, x, level, weight, weight_base, bias, bias_base, stride, padding, backend, needs_grad):
    grads = [t.new_empty(t.shape) if (t is not None and need) else None
             for t, need in zip((x, level, weight, weight_base, bias, bias_base), needs_grad)]
    return shape_grads(grads, (x, level, weight, weight_base, bias, bias_base), needs_grad)


def _setup_context(ctx, inputs, output):
    x, level, weight, weight_base, bias, bias_base, stride, padding, backend = inputs
    ctx.save_for_backward(x, level, weight, weight_base, bias, bias_base)
    ctx.conf = (stride, padding, backend)


def _backward(ctx, grad_out):
    x, level, weight, weight_base, bias, bias_base = ctx.saved_tensors
    stride, padding, backend = ctx.conf
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = torch.ops.restorenet.hyper_conv2d_backward(
        grad_out.contiguous(memory_format=output_memory_format(x)), x, level, weight, weight_base,
        bias, bias_base, stride, padding, backend, needs)
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, None, None, None)


_hyper_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------ backend: reference
def _reference_forward(x, level, weight, weight_base, bias, bias_base, stride, padding):
    return hyper_conv2d_reference(x, level, weight, weight_base, bias, bias_base, stride, padding)


def _reference_backward(grad_out, x, level, weight, weight_base, bias, bias_base, stride, padding, needs):
    """The backward in closed form, one sample at a time (autograd is not
    reachable from inside a custom op). With K_n = c_n*W + B and
    G_n = corr(dy_n, x_n), the per-sample kernel gradient:

        dx_n = conv_transpose(dy_n, K_n)      dW = sum_n c_n G_n    dB = sum_n G_n
        db_n = sum_pixels dy_n                dbias = sum_n c_n db_n, dbias_base = sum_n db_n
        dc_n = <G_n, W> + <db_n, bias>
    """
    lv = level.to(weight.dtype)
    dx = torch.empty_like(x) if needs[0] else None
    d_level = torch.zeros_like(level)
    dw, dwb = torch.zeros_like(weight), torch.zeros_like(weight_base)
    db = torch.zeros_like(bias) if bias is not None else None
    dbb = torch.zeros_like(bias_base) if bias_base is not None else None
    for n in range(x.shape[0]):
        dy_n, x_n = grad_out[n:n + 1], x[n:n + 1]
        if needs[0]:
            kernel = lv[n] * weight + weight_base
            dx[n:n + 1] = torch.nn.grad.conv2d_input(x_n.shape, kernel, dy_n, stride, padding)
        g_n = torch.nn.grad.conv2d_weight(x_n, weight.shape, dy_n, stride, padding)
        db_n = dy_n.sum((0, 2, 3))
        dw += lv[n] * g_n
        dwb += g_n
        d_level[n] = (g_n * weight).sum() + (0 if bias is None else (db_n * bias).sum())
        if db is not None:
            db += lv[n] * db_n
        if dbb is not None:
            dbb += db_n
    return [dx, d_level, dw, dwb, db, dbb]


# --------------------------------------------------------------- backend: triton
def _triton_forward(*args):
    from restorenet_kernels import hyper_conv2d as kernels

    return kernels.forward(*args)


def _triton_backward(*args):
    from restorenet_kernels import hyper_conv2d as kernels

    return kernels.backward(*args)


# ----------------------------------------------------------------- backend: cuda
def _cuda_forward(x, level, weight, weight_base, bias, bias_base, stride, padding):
    return cuda_extension().hyper_conv2d_forward(x, level, weight, weight_base, bias, bias_base,
                                                 stride, padding)


def _cuda_backward(grad_out, x, level, weight, weight_base, bias, bias_base, stride, padding, needs):
    return cuda_extension().hyper_conv2d_backward(grad_out, x, level, weight, weight_base, bias,
                                                  bias_base, stride, padding, needs)


_FORWARD = {"reference": _reference_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {"reference": _reference_backward, "triton": _triton_backward, "cuda": _cuda_backward}
