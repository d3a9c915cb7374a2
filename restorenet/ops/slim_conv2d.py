"""slim_conv2d: a convolution that runs each sample at its own channel width.

Slimmable networks (DDS-Net, DS-Net) share one set of weights between
sub-networks of different widths: the sub-network of width ``k`` uses the
*first* ``k`` channels of every layer. A dynamic network picks the width per
image, so one batch mixes widths::

    out[n, :out_width[n]]  = conv2d(x[n, :in_width[n]],
                                    weight[:out_width[n], :in_width[n]],
                                    bias[:out_width[n]], stride, padding)
    out[n, out_width[n]:]  = 0        (exactly: the inactive channels)

Keeping the inactive channels at exactly zero lets consecutive sliced layers
talk through full-size [N, C_max, H, W] tensors without masks: the next layer
reads only ``x[n, :in_width[n]]``, and element-wise ops such as ReLU or a
residual add keep zeros at zero.

The fast backends compute only the active channels (the point of a dynamic
network: a narrow sample costs less) and read the weight slices in place, for
every sample of a mixed batch in one launch -- rather than running full width
and masking, which saves nothing, or copying the sliced weights per call.

This file follows the pattern of ``hyper_conv2d.py``:

* ``slim_conv2d_reference`` -- the spec, plain PyTorch, one sample at a time,
  float64-gradcheckable;
* ``slim_conv2d`` -- the public function: autocast, argument checks, widths to
  int32 tensors [N], backend choice;
* ``torch.ops.restorenet.slim_conv2d`` (+ ``_backward``) -- custom ops with fake
  implementations and an autograd registration (``torch.compile(fullgraph=True)``
  traces through them);
* backends: the reference (closed-form backward), ``restorenet_kernels.slim_conv2d``
  (Triton, on the implicit-GEMM core shared with ``hyper_conv2d``) and
  ``restorenet._C`` (CUDA: ``slim_conv2d_forward`` / ``slim_conv2d_backward``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from restorenet._checks import check_tensor
from restorenet.ops._backend import cuda_extension, resolve_backend
from restorenet.ops._common import (autocast_inputs, check_conv_geometry, output_memory_format,
                                    output_shape, shape_grads)
from restorenet.ops._nvtx import nvtx_range

OP = "slim_conv2d"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

Width = Union[int, Tensor]


# --------------------------------------------------------------------------- spec
def slim_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          in_width: Width, out_width: Width,
                          stride: int = 1, padding: int = 0) -> Tensor:
    """The definition, one sample at a time (see the module docstring).

    Args:
        x: [N, Cin_max, H, W] floating tensor. Channels ``x[n, in_width[n]:]``
            are ignored (a slimmable net keeps them at zero).
        weight: [Cout_max, Cin_max, kh, kw], dtype and device of ``x``.
        bias: [Cout_max] or None.
        in_width, out_width: an int (every sample) or an integer tensor [N],
            each value in ``1 .. Cin_max`` / ``1 .. Cout_max``.
    Returns:
        [N, Cout_max, Ho, Wo]; ``out[n, out_width[n]:]`` is exactly zero.
    """
    _check_args(x, weight, bias, in_width, out_width, stride, padding)
    n_batch, c_out_max = x.shape[0], weight.shape[0]
    k_in = _width_list(in_width, n_batch)
    k_out = _width_list(out_width, n_batch)
    out = []
    for n in range(n_batch):
        ki, ko = k_in[n], k_out[n]
        b = None if bias is None else bias[:ko]
        y = F.conv2d(x[n:n + 1, :ki], weight[:ko, :ki], b, stride, padding)
        # Zero channels appended (not masked) so nothing inactive is ever computed.
        out.append(F.pad(y, (0, 0, 0, 0, 0, c_out_max - ko)))
    if not out:  # an empty batch still has a well-defined output shape
        return x.new_zeros(output_shape(x, weight, stride, padding))
    return torch.cat(out)


def _width_list(width: Width, n: int) -> list[int]:
    if isinstance(width, Tensor):
        if width.dim() == 0:
            return [int(width)] * n
        return [int(v) for v in width.tolist()]
    return [int(width)] * n


# ------------------------------------------------------------------ argument checks
def _check_args(x, weight, bias, in_width, out_width, stride, padding) -> None:
    check_tensor("x", x, ndim=4, dtypes=DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=(x.dtype,), device=x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have Cin_max = x.shape[1] = {x.shape[1]} input channels "
                         f"(shape [Cout_max, Cin_max, kh, kw]), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [Cout_max] = [{weight.shape[0]}], "
                             f"got {tuple(bias.shape)}")
    _check_width("in_width", in_width, x.shape[1], x)
    _check_width("out_width", out_width, weight.shape[0], x)
    check_conv_geometry(x, weight, stride, padding)


def _check_width(name: str, width, max_width: int, x: Tensor) -> None:
    if isinstance(width, Tensor):
        if width.dtype not in INT_DTYPES:
            raise TypeError(f"{name} must be an int or an integer tensor [N], got dtype {width.dtype}")
        if width.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {width.device}")
        if width.dim() > 1 or (width.dim() == 1 and width.shape[0] != x.shape[0]):
            raise ValueError(f"{name} must be an int or a tensor of shape [N] = [{x.shape[0]}] "
                             f"(one width per sample of x), got shape {tuple(width.shape)}")
        if width.numel() == 0 or torch.compiler.is_compiling():
            # Reading the values back would break the graph; a compiled caller
            # is trusted (the kernels clamp widths, so memory stays safe).
            return
        lo, hi = torch.stack(torch.aminmax(width.to(torch.int64))).tolist()  # one host sync
    elif isinstance(width, int) and not isinstance(width, bool):
        lo = hi = width
    else:
        raise TypeError(f"{name} must be an int or an integer tensor [N], got {type(width).__name__}")
    if lo < 1 or hi > max_width:
        raise ValueError(f"{name} must lie in 1..{max_width} (the channels available), "
                         f"got values in {lo}..{hi}")


# ----------------------------------------------------------------- public function
def slim_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                in_width: Width, out_width: Width, stride: int = 1, padding: int = 0,
                *, backend: Optional[str] = None) -> Tensor:
    """Per-sample channel-width convolution (see the module docstring).

    Same arguments as :func:`slim_conv2d_reference`, plus ``backend``
    (``"reference"``, ``"triton"``, ``"cuda"`` or None for the process-wide
    choice, see ``restorenet.ops.use_backend``). Widths are validated eagerly
    (which reads tensor widths back to the host); under ``torch.compile`` only
    their type, device and shape are checked.

    Returns:
        [N, Cout_max, Ho, Wo] in the layout of ``x``, zero beyond ``out_width[n]``.
        Differentiable in ``x`` (zero gradient beyond ``in_width[n]``), ``weight``, ``bias``.
    """
    check_tensor("x", x, ndim=4, dtypes=DTYPES)  # first: the width checks need N
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_args(x, weight, bias, in_width, out_width, stride, padding)
    name = resolve_backend(backend, x.device, OP, cuda_symbol="slim_conv2d_forward")
    return torch.ops.restorenet.slim_conv2d(x, weight, bias, _width_tensor(in_width, x),
                                            _width_tensor(out_width, x), stride, padding, name)


def _width_tensor(width: Width, x: Tensor) -> Tensor:
    """A checked width as the int32 tensor [N] the op takes."""
    if isinstance(width, Tensor):
        return width.to(torch.int32).expand(x.shape[0]).contiguous()
    return torch.full((x.shape[0],), width, dtype=torch.int32, device=x.device)


# ------------------------------------------------------------------- custom ops
@torch.library.custom_op("restorenet::slim_conv2d", mutates_args=())
def _slim_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_width: Tensor,
                    out_width: Tensor, stride: int, padding: int, backend: str) -> Tensor:
    with nvtx_range(OP, "fwd", x.device):
        y = _FORWARD[backend](x, weight, bias, in_width, out_width, stride, padding)
    return y.contiguous(memory_format=output_memory_format(x))


@_slim_conv2d_op.register_fake
def _(x, weight, bias, in_width, out_width, stride, padding, backend):
    shape = output_shape(x, weight, stride, padding)
    return x.new_empty(shape).contiguous(memory_format=output_memory_format(x))


# Gradients for (x, weight, bias); one not needed (or for a None bias) comes back empty.
@torch.library.custom_op("restorenet::slim_conv2d_backward", mutates_args=())
def _slim_conv2d_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             in_width: Tensor, out_width: Tensor, stride: int, padding: int,
                             backend: str, needs_grad: Sequence[bool]) -> list[Tensor]:
    with nvtx_range(OP, "bwd", x.device):
        grads = _BACKWARD[backend](grad_out, x, weight, bias, in_width, out_width,
                                   stride, padding, list(needs_grad))
    return shape_grads(grads, (x, weight, bias), needs_grad)


@_slim_conv2d_backward_op.register_fake
def _(grad_out, x, weight, bias, in_width, out_width, stride, padding, backend, needs_grad):
    grads = [t.new_empty(t.shape) if (t is not None and need) else None
             for t, need in zip((x, weight, bias), needs_grad)]
    return shape_grads(grads, (x, weight, bias), needs_grad)


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_width, out_width, stride, padding, backend = inputs
    ctx.save_for_backward(x, weight, bias, in_width, out_width)
    ctx.conf = (stride, padding, backend)


def _backward(ctx, grad_out):
    x, weight, bias, in_width, out_width = ctx.saved_tensors
    stride, padding, backend = ctx.conf
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = torch.ops.restorenet.slim_conv2d_backward(
        grad_out.contiguous(memory_format=output_memory_format(x)), x, weight, bias,
        in_width, out_width, stride, padding, backend, needs)
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, None, None, None, None, None)


_slim_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------- FLOP counting
# FlopCounterMode cannot see inside a custom op; tell it what the op costs:
# 2 x multiply-adds of the *active* channels, sum_n in_width[n] * out_width[n].
def _active_macs_per_pixel_tap(in_width: Tensor, out_width: Tensor, weight: Tensor) -> int:
    try:
        return int((in_width.to(torch.int64) * out_width.to(torch.int64)).sum().item())
    except (RuntimeError, NotImplementedError):  # meta / fake widths: count full width
        return in_width.shape[0] * weight.shape[0] * weight.shape[1]


@register_flop_formula(torch.ops.restorenet.slim_conv2d, get_raw=True)
def _slim_conv2d_flops(x, weight, bias, in_width, out_width, stride, padding, backend, out_val=None, **_):
    kh, kw = weight.shape[-2:]
    ho, wo = out_val.shape[-2:]
    return 2 * kh * kw * ho * wo * _active_macs_per_pixel_tap(in_width, out_width, weight)


@register_flop_formula(torch.ops.restorenet.slim_conv2d_backward, get_raw=True)
def _slim_conv2d_backward_flops(grad_out, x, weight, bias, in_width, out_width, stride, padding,
                                backend, needs_grad, out_val=None, **_):
    """dx is one such convolution, dW another (dbias is not a convolution)."""
    kh, kw = weight.shape[-2:]
    one = 2 * kh * kw * grad_out.shape[2] * grad_out.shape[3] * _active_macs_per_pixel_tap(
        in_width, out_width, weight)
    return one * (int(bool(needs_grad[0])) + int(bool(needs_grad[1])))


# ------------------------------------------------------------ backend: reference
def _reference_forward(x, weight, bias, in_width, out_width, stride, padding):
    return slim_conv2d_reference(x, weight, bias, in_width, out_width, stride, padding)


def _reference_backward(grad_out, x, weight, bias, in_width, out_width, stride, padding, needs):
    """The backward in closed form, one sample at a time (autograd is not
    reachable from inside a custom op). With k = in_width[n], m = out_width[n]:

        dx[n, :k] = conv_transpose(dy[n, :m], W[:m, :k]),  dx[n, k:] = 0
        dW[:m, :k] += corr(dy[n, :m], x[n, :k]),           dbias[:m] += sum_pixels dy[n, :m]
    """
    dx = torch.zeros_like(x) if needs[0] else None
    dw = torch.zeros_like(weight)
    db = torch.zeros_like(bias) if bias is not None else None
    k_in, k_out = in_width.tolist(), out_width.tolist()
    for n in range(x.shape[0]):
        ki, ko = k_in[n], k_out[n]
        x_n, dy_n = x[n:n + 1, :ki], grad_out[n:n + 1, :ko]
        if needs[0]:
            dx[n:n + 1, :ki] = torch.nn.grad.conv2d_input(x_n.shape, weight[:ko, :ki], dy_n, stride, padding)
        if needs[1]:
            dw[:ko, :ki] += torch.nn.grad.conv2d_weight(x_n, (ko, ki, *weight.shape[2:]), dy_n,
                                                        stride, padding)
        if db is not None:
            db[:ko] += dy_n.sum((0, 2, 3))
    return [dx, dw if needs[1] else None, db]


# --------------------------------------------------------------- backend: triton
def _triton_forward(*args):
    from restorenet_kernels import slim_conv2d as kernels

    return kernels.forward(*args)


def _triton_backward(*args):
    from restorenet_kernels import slim_conv2d as kernels

    return kernels.backward(*args)


# ----------------------------------------------------------------- backend: cuda
def _cuda_forward(x, weight, bias, in_width, out_width, stride, padding):
    return cuda_extension().slim_conv2d_forward(x, weight, bias, in_width, out_width, stride, padding)


def _cuda_backward(grad_out, x, weight, bias, in_width, out_width, stride, padding, needs):
    return cuda_extension().slim_conv2d_backward(grad_out, x, weight, bias, in_width, out_width,
                                                  stride, padding, needs)


_FORWARD = {"reference": _reference_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {"reference": _reference_backward, "triton": _triton_backward, "cuda": _cuda_backward}
