"""Plumbing shared by the ops: output shape and layout, the working layout of
the memory-bound ops (``channel_attention``, ``rev_coupling``, ``layer_norm2d``,
...), autocast, the stride/padding checks of the convolution ops
(``hyper_conv2d``, ``slim_conv2d``), and the shaping of a backward op's
gradient list."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def output_shape(x: Tensor, weight: Tensor, stride: int, padding: int) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    return n, weight.shape[0], (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def output_memory_format(x: Tensor) -> torch.memory_format:
    """Outputs follow the input's layout, as ``F.conv2d`` does."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def like_layout(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` dense in the layout an op works in for ``ref`` (``output_memory_format(ref)``);
    no copy when it already is."""
    return t.contiguous(memory_format=output_memory_format(ref))


def in_working_layout(*tensors: Tensor) -> tuple[torch.memory_format, tuple[Tensor, ...]]:
    """``(fmt, tensors)``: the layout a memory-bound op works in -- the first
    tensor's, as ``output_memory_format`` picks it -- and every tensor made dense
    in it. The kernels then address all operands with one set of strides and take
    one flag, ``fmt == torch.channels_last``; a tensor already dense in ``fmt`` is
    not copied."""
    fmt = output_memory_format(tensors[0])
    return fmt, tuple(t.contiguous(memory_format=fmt) for t in tensors)


def autocast_inputs(x: Tensor, *params: Optional[Tensor]) -> tuple:
    """Custom ops are invisible to autocast; cast here so the op sees one dtype,
    the way F.conv2d would run under autocast."""
    dtype = autocast_dtype(x.device)
    if dtype is None:
        return (x, *params)
    return tuple(t if t is None else t.to(dtype) for t in (x, *params))


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device``, or None where it is off (or the
    device has no autocast: meta, for shape propagation, cannot even be asked)."""
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def can_read_values(t: Tensor) -> bool:
    """Whether a value check may read ``t`` back to the host: not under torch.compile
    (a read breaks the graph), not on meta (no values), not when there is nothing to read.
    Where it may not, only the metadata is checked."""
    return t.numel() > 0 and t.device.type != "meta" and not torch.compiler.is_compiling()


def check_conv_geometry(x: Tensor, weight: Tensor, stride, padding) -> None:
    """Stride, padding and sizes of a conv op. Every dimension but the batch must be
    >= 1: a conv over no input channels or no pixels would be the bias alone (or
    padding alone), which F.conv2d itself gets wrong or rejects and no model needs,
    so it is rejected here, once, for every backend."""
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"x must have C_in, H, W >= 1 (only the batch may be empty), "
                         f"got shape {tuple(x.shape)}")
    if min(weight.shape) < 1:
        raise ValueError(f"weight must have C_out, C_in, kh, kw >= 1, got shape {tuple(weight.shape)}")
    kh, kw = weight.shape[-2:]
    if x.shape[2] + 2 * padding < kh or x.shape[3] + 2 * padding < kw:
        raise ValueError(f"x is too small: spatial size {tuple(x.shape[2:])} with padding "
                         f"{padding} is smaller than the kernel {kh}x{kw}")


def shape_grads(grads: Sequence[Optional[Tensor]], inputs: Sequence[Optional[Tensor]],
                needs_grad: Sequence[bool]) -> list[Tensor]:
    """A backward op's return value: each gradient in its input's dtype (the
    first input's in its layout); an empty tensor where no gradient is wanted
    (custom ops cannot return None in a list)."""
    out = []
    for g, t, need in zip(grads, inputs, needs_grad):
        if t is None or not need or g is None:
            out.append(inputs[0].new_empty(0))
        elif t is inputs[0]:
            out.append(g.to(t.dtype).contiguous(memory_format=output_memory_format(t)))
        else:
            out.append(g.to(t.dtype).contiguous())
    return out
