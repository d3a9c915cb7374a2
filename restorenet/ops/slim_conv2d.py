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

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from restorenet._checks import check_tensor, is_int
from restorenet.ops._backend import cuda_extension, resolve_backend
from restorenet.ops._common import (autocast_inputs, can_read_values, check_conv_geometry,
                                    output_memory_format, output_shape, shape_grads)
from restorenet.ops._nvtx import nvtx_range

OP = "slim_conv2d"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
INT32_MAX = 2**31 - 1  # widths travel to the kernels as int32



class SlimWidths(NamedTuple):
    """Per-sample widths checked once: ``values`` int32 [N] and their range
    ``lo..hi``, already read back to the host.

    A network of many slim layers passes one of these (from
    :func:`check_widths` or :func:`widths_from_choices`) to every layer:
    ``slim_conv2d`` then compares ``lo``/``hi`` with that layer's channel
    count on the host and reads nothing back from the device -- one host sync
    per forward instead of one per width argument per layer.
    ``lo = hi = None`` means "not range-checked" (made under ``torch.compile``,
    where reading values back would break the graph, or on meta tensors):
    ``slim_conv2d`` then reads the values once to check them where it can
    (eagerly, on a real device), and trusts them where it cannot.

    ``lo``/``hi`` are the caller's word: values outside them are not detected.
    Every backend clamps each width to ``0..C`` the same way (above C: the full
    width; <= 0: no channel, so the bias alone or zeros), so a trusted bad width
    cannot address memory outside the tensors and gives one result on every backend.
    """

    values: Tensor
    lo: Optional[int]
    hi: Optional[int]


Width = Union[int, Sequence[int], Tensor, SlimWidths]


# --------------------------------------------------------------------------- spec
def slim_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          in_width: Width, out_width: Width,
                          stride: int = 1, padding: int = 0) -> Tensor:
    """The definition, one sample at a time (see the module docstring).

    Args:
        x: [N, Cin_max, H, W] floating tensor, Cin_max, H, W >= 1. Channels
            ``x[n, in_width[n]:]`` are ignored (a slimmable net keeps them at zero).
        weight: [Cout_max, Cin_max, kh, kw], dtype and device of ``x``.
        bias: [Cout_max] or None.
        in_width, out_width: an int (every sample), a sequence of N ints, an integer
            tensor [N] or :class:`SlimWidths`, each value in ``1 .. Cin_max`` /
            ``1 .. Cout_max``.
    Returns:
        [N, Cout_max, Ho, Wo]; ``out[n, out_width[n]:]`` is exactly zero.
    """
    in_width, out_width = _check_args(x, weight, bias, in_width, out_width, stride, padding)
    return _per_sample_conv(x, weight, bias, in_width.values.tolist(), out_width.values.tolist(),
                            stride, padding)


def _per_sample_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], k_in: list[int],
                     k_out: list[int], stride: int, padding: int) -> Tensor:
    """The spec's loop, with the widths clamped to ``0..C`` exactly as the kernels
    clamp them (see :class:`SlimWidths`), so every backend agrees even on a trusted
    width the checks could not see."""
    c_in_max, c_out_max = x.shape[1], weight.shape[0]
    out = []
    for n in range(x.shape[0]):
        ki, ko = _clamp(k_in[n], c_in_max), _clamp(k_out[n], c_out_max)
        y = _active_conv(x[n:n + 1, :ki], weight[:ko, :ki], None if bias is None else bias[:ko],
                         stride, padding)
        # Zero channels appended (not masked) so nothing inactive is ever computed.
        out.append(F.pad(y, (0, 0, 0, 0, 0, c_out_max - ko)))
    if not out:  # an empty batch still has a well-defined output shape
        return x.new_zeros(output_shape(x, weight, stride, padding))
    return torch.cat(out)


def _clamp(width: int, max_width: int) -> int:
    return min(max(width, 0), max_width)


def _active_conv(x_n: Tensor, w: Tensor, b: Optional[Tensor], stride: int, padding: int) -> Tensor:
    """F.conv2d of one sample's active channels. With no active input channel the sum is
    empty and the result the bias alone (F.conv2d would return no output channels); with
    no active output channel there is nothing to compute (F.conv2d would raise)."""
    if x_n.shape[1] > 0 and w.shape[0] > 0:
        return F.conv2d(x_n, w, b, stride, padding)
    ho, wo = output_shape(x_n, w, stride, padding)[2:]
    y = x_n.new_zeros((1, w.shape[0], ho, wo))
    return y if b is None else y + b.view(1, -1, 1, 1)


# ------------------------------------------------------------------ argument checks
# The one validation of the widths, run by the public function (and the spec) before
# any backend: backends never check widths, they only clamp them (``SlimWidths``).
def _check_args(x, weight, bias, in_width, out_width, stride, padding) -> tuple[SlimWidths, SlimWidths]:
    """Every argument checked; the widths come back as range-checked :class:`SlimWidths`."""
    check_tensor("x", x, ndim=4, dtypes=DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=(x.dtype,), device=x.device)
    check_conv_geometry(x, weight, stride, padding)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have Cin_max = x.shape[1] = {x.shape[1]} input channels "
                         f"(shape [Cout_max, Cin_max, kh, kw]), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [Cout_max] = [{weight.shape[0]}], "
                             f"got {tuple(bias.shape)}")
    return (_checked_width("in_width", in_width, x.shape[1], x),
            _checked_width("out_width", out_width, weight.shape[0], x))


def _checked_width(name: str, width, max_width: int, x: Tensor) -> SlimWidths:
    """``width`` as :class:`SlimWidths` with values in 1..max_width, one per sample of ``x``.
    A plain tensor is read back to the host (one sync); a :class:`SlimWidths` carries its
    range, so only its metadata and ``lo``/``hi`` are checked (no sync)."""
    if not isinstance(width, SlimWidths):
        return check_widths(width, x.shape[0], x.device, max_width, name=name)
    _check_width_tensor(name, width.values, x.shape[0], x.device, dtypes=(torch.int32,), ndim=1)
    lo, hi = width.lo, width.hi
    if lo is None and hi is None:
        if not can_read_values(width.values):  # torch.compile, meta, empty: trusted (clamped)
            return width
        return check_widths(width.values, x.shape[0], x.device, max_width, name=name)  # one host sync
    if not (is_int(lo) and is_int(hi) and lo <= hi):
        raise ValueError(f"{name} must be SlimWidths with int lo <= hi (or both None), "
                         f"got lo={lo!r}, hi={hi!r}")
    _check_range(name, lo, hi, max_width)
    return width


def _check_range(name: str, lo: int, hi: int, max_width: Optional[int]) -> None:
    # Widths travel as int32: a larger value would wrap around, so it is out of range too.
    top = INT32_MAX if max_width is None else max_width
    if lo < 1 or hi > top:
        allowed = ">= 1" if max_width is None else f"in 1..{max_width} (the channels available)"
        raise ValueError(f"{name} must lie {allowed}, got values in {lo}..{hi}")


def _check_width_tensor(name: str, width: Tensor, batch: int, device: torch.device,
                        dtypes=INT_DTYPES, ndim: Optional[int] = None) -> None:
    """Metadata only (no host read): integer dtype, device, shape [] or [N]."""
    if width.dtype not in dtypes:
        kinds = "an int32 tensor" if dtypes == (torch.int32,) else "an int or an integer tensor [N]"
        raise TypeError(f"{name} must be {kinds}, got dtype {width.dtype}")
    if width.device != device:
        raise ValueError(f"{name} must be on the device of x ({device}), got {width.device}")
    if width.dim() > 1 or (width.dim() == 1 and width.shape[0] != batch) \
            or (ndim is not None and width.dim() != ndim):
        raise ValueError(f"{name} must be an int or a tensor of shape [N] = [{batch}] "
                         f"(one width per sample of x), got shape {tuple(width.shape)}")


def check_widths(width: Union[int, Sequence[int], Tensor], batch: int, device: Union[str, torch.device],
                 max_width: Optional[int] = None, *, name: str = "width") -> SlimWidths:
    """Validate per-sample widths once and return them as :class:`SlimWidths`.

    ``width``: an int (every sample), a sequence of ``batch`` ints, or an integer
    tensor [] or [N] on ``device``. Reads a tensor's min and max back to the host --
    one sync, the only one a network needs per forward when it passes the result to
    all its layers; an int or a sequence is checked on the host (no sync). Values
    must be >= 1 (and <= ``max_width`` when given). Under ``torch.compile`` and on
    meta tensors a tensor's values are not read (``lo = hi = None``).
    Errors start with ``name``.
    """
    device = torch.device(device)
    if isinstance(width, Tensor):
        _check_width_tensor(name, width, batch, device)
        values = width.to(torch.int32).expand(batch).contiguous()
        if not can_read_values(width):
            return SlimWidths(values, None, None)
        lo, hi = torch.stack(torch.aminmax(width.to(torch.int64))).tolist()  # the one host sync
    elif is_int(width):
        _check_range(name, width, width, max_width)  # before the fill: int32 cannot hold a bad value
        return SlimWidths(torch.full((batch,), width, dtype=torch.int32, device=device), width, width)
    elif isinstance(width, (list, tuple)):
        return _widths_from_sequence(name, width, batch, device, max_width)
    else:
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor [N], "
                        f"got {type(width).__name__}")
    _check_range(name, lo, hi, max_width)
    return SlimWidths(values, lo, hi)


def _widths_from_sequence(name: str, width, batch: int, device: torch.device,
                          max_width: Optional[int]) -> SlimWidths:
    """A host list of widths: checked on the host, then copied to ``device`` (no read back)."""
    if not all(is_int(v) for v in width):
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor [N], "
                        f"got {width!r}")
    if len(width) != batch:
        raise ValueError(f"{name} must hold N = {batch} widths (one per sample of x), "
                         f"got {len(width)}")
    if not width:
        return SlimWidths(torch.zeros(0, dtype=torch.int32, device=device), None, None)
    lo, hi = min(width), max(width)
    _check_range(name, lo, hi, max_width)  # before the copy: int32 cannot hold a bad value
    return SlimWidths(torch.tensor(list(width), dtype=torch.int32, device=device), lo, hi)


def widths_from_choices(choices: Sequence[int], index: Union[Tensor, Sequence[int]], *,
                        table: Optional[Tensor] = None) -> SlimWidths:
    """``choices[index[n]]`` per sample, with no host sync: every value is one
    of ``choices`` (positive ints), so the range is ``min..max(choices)``.
    For a gate that picks a choice per image (``index``: integer tensor [N], or a
    sequence of ints, each in ``0..len(choices) - 1``; negative indices do not count
    from the end). An index out of range raises IndexError: on the host for a sequence,
    from the lookup itself for a CPU tensor; on CUDA it is a device-side assert
    (checking it on the host would cost the sync this function exists to avoid).
    ``table``: the choices as an int32 tensor on ``index``'s device, kept by the
    caller (e.g. a module buffer) so that no host-to-device copy is made per call."""
    if (not isinstance(choices, Sequence) or not choices
            or not all(is_int(c) and 1 <= c <= INT32_MAX for c in choices)):
        raise ValueError(f"choices must be a non-empty sequence of ints >= 1, got {choices!r}")
    k = len(choices)
    index = _choice_index(index, k, table)
    if table is None:
        table = torch.tensor(list(choices), dtype=torch.int32, device=index.device)
    elif not isinstance(table, Tensor) or table.dtype != torch.int32 or table.shape != (k,) \
            or table.device != index.device:
        desc = (f"{table.dtype} {tuple(table.shape)} on {table.device}" if isinstance(table, Tensor)
                else type(table).__name__)
        raise ValueError(f"table must be the {k} choices as int32 on {index.device}, got {desc}")
    return SlimWidths(_lookup_choices(table, index, k), min(choices), max(choices))


def _choice_index(index, k: int, table: Optional[Tensor]) -> Tensor:
    """``index`` as an integer tensor [N]; a host sequence is range-checked here."""
    if isinstance(index, (list, tuple)):
        if not all(is_int(i) for i in index):
            raise TypeError(f"index must be an integer tensor [N] or a sequence of ints, got {index!r}")
        if index and not 0 <= min(index) <= max(index) < k:
            raise IndexError(f"index must hold choice indices in 0..{k - 1}, got {list(index)}")
        device = table.device if isinstance(table, Tensor) else "cpu"
        return torch.tensor(list(index), dtype=torch.int64, device=device)
    if not isinstance(index, Tensor) or index.dtype not in INT_DTYPES or index.dim() != 1:
        raise TypeError(f"index must be an integer tensor [N], got "
                        f"{index.dtype if isinstance(index, Tensor) else type(index).__name__}")
    return index


def _lookup_choices(table: Tensor, index: Tensor, k: int) -> Tensor:
    # A negative index would silently count from the end: move it past the end so every
    # index outside 0..k-1 fails the lookup's own bounds check (no host read).
    safe = index.long()
    safe = torch.where(safe < 0, k, safe)
    try:
        return table[safe]
    except IndexError:
        raise IndexError(f"index must hold choice indices in 0..{k - 1} "
                         f"(one of the {k} choices per sample)") from None


# ----------------------------------------------------------------- public function
def slim_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                in_width: Width, out_width: Width, stride: int = 1, padding: int = 0,
                *, backend: Optional[str] = None) -> Tensor:
    """Per-sample channel-width convolution (see the module docstring).

    Same arguments as :func:`slim_conv2d_reference`, plus ``backend``
    (``"reference"``, ``"triton"``, ``"cuda"`` or None for the process-wide
    choice, see ``restorenet.ops.use_backend``). Widths are validated eagerly,
    here, before any backend runs (so every backend raises the same error): a
    tensor width is read back to the host (one sync per tensor argument); an int
    or a sequence of ints is checked on the host; a :class:`SlimWidths`
    (:func:`check_widths`, validated once for a whole network) is range-checked on
    the host with no sync. Under ``torch.compile`` and on meta tensors only type,
    device and shape are checked.

    Returns:
        [N, Cout_max, Ho, Wo] in the layout of ``x``, zero beyond ``out_width[n]``.
        Differentiable in ``x`` (zero gradient beyond ``in_width[n]``), ``weight``, ``bias``.
    """
    check_tensor("x", x, ndim=4, dtypes=DTYPES)  # first: the width checks need N
    x, weight, bias = autocast_inputs(x, weight, bias)
    in_width, out_width = _check_args(x, weight, bias, in_width, out_width, stride, padding)
    name = resolve_backend(backend, x.device, OP, cuda_symbol="slim_conv2d_forward")
    return torch.ops.restorenet.slim_conv2d(x, weight, bias, in_width.values.contiguous(),
                                            out_width.values.contiguous(), stride, padding, name)


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
    # Widths were validated by the public function: the loop only clamps (as the kernels do).
    return _per_sample_conv(x, weight, bias, in_width.tolist(), out_width.tolist(), stride, padding)


def _reference_backward(grad_out, x, weight, bias, in_width, out_width, stride, padding, needs):
    """The backward in closed form, one sample at a time (autograd is not
    reachable from inside a custom op). With k = in_width[n], m = out_width[n]
    (clamped to 0..C as in the forward):

        dx[n, :k] = conv_transpose(dy[n, :m], W[:m, :k]),  dx[n, k:] = 0
        dW[:m, :k] += corr(dy[n, :m], x[n, :k]),           dbias[:m] += sum_pixels dy[n, :m]
    """
    dx = torch.zeros_like(x) if needs[0] else None
    dw = torch.zeros_like(weight)
    db = torch.zeros_like(bias) if bias is not None else None
    k_in, k_out = in_width.tolist(), out_width.tolist()
    for n in range(x.shape[0]):
        ki, ko = _clamp(k_in[n], x.shape[1]), _clamp(k_out[n], weight.shape[0])
        x_n, dy_n = x[n:n + 1, :ki], grad_out[n:n + 1, :ko]
        if ki > 0 and ko > 0:  # otherwise no weight connects them: dx and dW get nothing
            if needs[0]:
                dx[n:n + 1, :ki] = torch.nn.grad.conv2d_input(x_n.shape, weight[:ko, :ki], dy_n,
                                                              stride, padding)
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
# csrc/slim_conv2d.cu on the implicit-GEMM core shared with hyper_conv2d. The
# binding takes int32 widths [N] on x's device and never reads them on the host
# (the kernels clamp them), so these calls do not synchronise.
def _cuda_forward(x, weight, bias, in_width, out_width, stride, padding):
    return cuda_extension().slim_conv2d_forward(x, weight, bias, in_width.to(torch.int32),
                                                out_width.to(torch.int32), stride, padding)


def _cuda_backward(grad_out, x, weight, bias, in_width, out_width, stride, padding, needs):
    return cuda_extension().slim_conv2d_backward(grad_out, x, weight, bias, in_width.to(torch.int32),
                                                 out_width.to(torch.int32), stride, padding, needs)


_FORWARD = {"reference": _reference_forward, "triton": _triton_forward, "cuda": _cuda_forward}
_BACKWARD = {"reference": _reference_backward, "triton": _triton_backward, "cuda": _cuda_backward}
