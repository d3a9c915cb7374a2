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

A later fused op only needs to compute the active channels (the point of a
dynamic network: a narrow sample costs less) and read the weight slices in
place; the public families of this code run full width and mask, which saves
nothing, and copy the sliced weights on every call.

This file holds:

* ``slim_conv2d_reference`` -- the spec, plain PyTorch, one sample at a time,
  float64-gradcheckable;
* ``slim_conv2d`` -- the public function with the signature the fast backends
  will keep. For now every backend runs the reference; the Triton/CUDA
  kernels and the ``torch.ops.restorenet.slim_conv2d`` registration come later.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from restorenet._checks import check_tensor
from restorenet.ops._backend import resolve_backend

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
        return x.new_zeros(_output_shape(x, weight, stride, padding))
    return torch.cat(out)


def _width_list(width: Width, n: int) -> list[int]:
    if isinstance(width, Tensor):
        if width.dim() == 0:
            return [int(width)] * n
        return [int(v) for v in width.tolist()]
    return [int(width)] * n


def _output_shape(x: Tensor, weight: Tensor, stride: int, padding: int) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    return n, weight.shape[0], (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


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
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    kh, kw = weight.shape[-2:]
    if x.shape[2] + 2 * padding < kh or x.shape[3] + 2 * padding < kw:
        raise ValueError(f"x is too small: spatial size {tuple(x.shape[2:])} with padding "
                         f"{padding} is smaller than the kernel {kh}x{kw}")


def _check_width(name: str, width, max_width: int, x: Tensor) -> None:
    if isinstance(width, Tensor):
        if width.dtype not in INT_DTYPES:
            raise TypeError(f"{name} must be an int or an integer tensor [N], got dtype {width.dtype}")
        if width.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {width.device}")
        if width.dim() > 1 or (width.dim() == 1 and width.shape[0] != x.shape[0]):
            raise ValueError(f"{name} must be an int or a tensor of shape [N] = [{x.shape[0]}] "
                             f"(one width per sample of x), got shape {tuple(width.shape)}")
        if width.numel() == 0:
            return
        lo, hi = int(width.min()), int(width.max())
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
    choice, see ``restorenet.ops.use_backend``). The backend name is validated
    now; until the fused kernels land, every backend computes the reference.
    """
    resolve_backend(backend, x.device if isinstance(x, Tensor) else torch.device("cpu"), OP)
    return slim_conv2d_reference(x, weight, bias, in_width, out_width, stride, padding)
