"""slim_conv2d: every backend against the float64 spec, forward and every gradient,
plus the registration (opcheck, torch.compile), errors and DDS-Net end to end.

On a CPU machine the fast backend is Triton under TRITON_INTERPRET=1 (slow:
shapes are tiny); on a GPU machine Triton and CUDA run on the device and bf16 is added.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from restorenet.ops import available_backends, slim_conv2d, slim_conv2d_reference, use_backend
from restorenet.ops.slim_conv2d import SlimWidths, check_widths, widths_from_choices
from restorenet.testing import assert_within_baseline_error

from _host_reads import count_host_reads, sync_free_slim_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST_BACKENDS = [b for b in available_backends(DEVICE, "slim_conv2d_forward") if b != "reference"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
INPUT_NAMES = ("x", "weight", "bias")
C_IN, C_OUT = 36, 40  # several channel tiles each way and a partial one (Triton tiles are 16 wide)


def widths(mode: str, n: int):
    """(in_width, out_width) for a batch of n: ints or int tensors [N]."""
    if mode == "mixed":  # every sample different, crossing tile boundaries both ways
        ins, outs = [36, 5, 17, 33][:n], [1, 40, 33, 16][:n]
        return torch.tensor(ins, device=DEVICE), torch.tensor(outs, device=DEVICE, dtype=torch.int32)
    return {"same": (20, 7), "max": (C_IN, C_OUT), "one": (1, 1)}[mode]


def as_list(width, n):
    return width.tolist() if isinstance(width, torch.Tensor) else [width] * n


def make_inputs(n, k, channels_last=False, bias=True, c_in=C_IN, c_out=C_OUT, h=5, w=6):
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, dtype=torch.float64, device=DEVICE) / (c_in * k * k) ** 0.5
    b = torch.randn(c_out, dtype=torch.float64, device=DEVICE) if bias else None
    return [x, weight, b]


def cast(inputs, dtype):
    return [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs]


def run(inputs, in_w, out_w, grad_out, stride, padding, backend):
    y = slim_conv2d(*inputs, in_w, out_w, stride, padding, backend=backend)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), [t.grad if t is not None else None for t in inputs]


# Each axis covered at least once without a full cross product (the interpreter is slow):
# (k, stride, padding, channels_last, batch, widths, bias)
CASES = [
    (3, 1, 1, False, 3, "mixed", True),
    (3, 2, 1, True, 4, "mixed", False),
    (1, 1, 0, False, 2, "same", True),
    (3, 2, 0, False, 1, "max", True),
    (1, 2, 1, True, 2, "one", True),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride,padding,channels_last,n,mode,bias", CASES)
def test_matches_float64_truth(backend, dtype, k, stride, padding, channels_last, n, mode, bias):
    inputs = make_inputs(n, k, channels_last, bias)
    in_w, out_w = widths(mode, n)
    truth_in = cast(inputs, torch.float64)
    y_true = slim_conv2d_reference(*truth_in, in_w, out_w, stride, padding)
    grad_out = torch.randn_like(y_true)  # nonzero on inactive channels too: they must not leak
    y_true.backward(grad_out)

    y_base, g_base = run(cast(inputs, dtype), in_w, out_w, grad_out, stride, padding, "reference")
    y_fast, g_fast = run(cast(inputs, dtype), in_w, out_w, grad_out, stride, padding, backend)

    assert y_fast.dtype == dtype
    assert y_fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_within_baseline_error("y", y_fast, y_true, y_base, dtype)
    for name, t_true, gb, gf in zip(INPUT_NAMES, truth_in, g_base, g_fast):
        if t_true is None:
            assert gf is None
            continue
        assert gf is not None and gf.dtype == gb.dtype, name
        assert_within_baseline_error(f"d{name}", gf, t_true.grad, gb, dtype)
    # Inactive channels: exactly zero, in the output and in dx; unused weight rows/columns get 0.
    ins, outs = as_list(in_w, n), as_list(out_w, n)
    for i in range(n):
        assert torch.all(y_fast[i, outs[i]:] == 0) and torch.all(g_fast[0][i, ins[i]:] == 0)
    assert torch.all(g_fast[1][max(outs):] == 0) and torch.all(g_fast[1][:, max(ins):] == 0)
    if bias:
        assert torch.all(g_fast[2][max(outs):] == 0)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inactive_inputs_are_never_read(backend, dtype):
    """Garbage (even NaN) beyond in_width in x, or beyond out_width in dy, must not
    reach the output or the gradients. In 16-bit the Triton kernels read the channel
    tails as whole vectors (past the width) and zero them in registers."""
    x, weight, b = cast(make_inputs(2, 3, c_in=20, c_out=18, h=4, w=4), dtype)
    x = x.detach().clone().requires_grad_()
    with torch.no_grad():
        x[0, 3:] = float("nan")
    out_width = torch.tensor([18, 5])
    y = slim_conv2d(x, weight, b, torch.tensor([3, 20]), out_width, 1, 1, backend=backend)
    want = slim_conv2d_reference(x[:, :3].double(), weight[:, :3].double(), b.double(), 3, 18, 1, 1)
    assert torch.isfinite(y).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y[0].double(), want[0], rtol=tol, atol=tol)
    grad_out = torch.ones_like(y)
    grad_out[1, 5:] = float("nan")  # sample 1's inactive outputs: y is 0 there whatever dy is
    y.backward(grad_out)
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all() and torch.isfinite(b.grad).all()


def _triton_macs(monkeypatch, widths, c=48, n_pix=3):
    """Multiply-accumulates the Triton kernels issue (every tl.dot under the
    interpreter: M * N * K) for one forward and backward at ``widths`` [N]."""
    from triton.runtime.interpreter import InterpreterBuilder

    macs = []
    create_dot = InterpreterBuilder.create_dot

    def counted(self, a, b, *args, **kwargs):
        macs.append(a.data.shape[0] * a.data.shape[1] * b.data.shape[1])
        return create_dot(self, a, b, *args, **kwargs)

    torch.manual_seed(0)
    x, weight, bias = cast(make_inputs(len(widths), 3, c_in=c, c_out=c, h=n_pix, w=n_pix), torch.float32)
    w = torch.tensor(widths, dtype=torch.int32)
    with monkeypatch.context() as m:
        m.setattr(InterpreterBuilder, "create_dot", counted)
        slim_conv2d(x, weight, bias, w, w, 1, 1, backend="triton").sum().backward()
    return sum(macs)


@pytest.mark.skipif(DEVICE.type == "cuda" or "triton" not in FAST_BACKENDS,
                    reason="counts tl.dot calls in Triton's CPU interpreter")
def test_triton_work_follows_widths_at_16_channel_granularity(monkeypatch):
    """DDS-Net's widths (16/32/48 of a 48-channel layer): the forward, input- and
    weight-gradient GEMMs cost in proportion to in_width * out_width (tiles of 16
    channels), and each sample of a mixed batch costs what it costs alone."""
    per_image = {k: _triton_macs(monkeypatch, [k]) for k in (16, 32)}
    assert per_image[16] > 0 and per_image[32] == 4 * per_image[16], per_image
    assert _triton_macs(monkeypatch, [16, 48, 32]) == 14 * per_image[16]  # 1 + 9 + 4


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_only_requested_gradients_and_empty_batch(backend):
    x, weight, b = cast(make_inputs(2, 3, c_in=4, c_out=5, h=4, w=4), torch.float32)
    weight.requires_grad_(False)
    slim_conv2d(x, weight, b, 2, 3, 1, 1, backend=backend).sum().backward()
    assert x.grad is not None and b.grad is not None and weight.grad is None

    x, weight, b = cast(make_inputs(0, 3, c_in=4, c_out=5, h=4, w=4), torch.float32)
    y = slim_conv2d(x, weight, b, torch.zeros(0, dtype=torch.int64), 3, 1, 1, backend=backend)
    assert y.shape == (0, 5, 4, 4)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_reference_backend_gradcheck_float64():
    """The registered op's closed-form reference backward against finite differences."""
    x, weight, b = cast(make_inputs(3, 2, c_in=3, c_out=3, h=3, w=3), torch.float64)
    in_w, out_w = torch.tensor([1, 3, 2]), torch.tensor([3, 1, 2])
    for stride, padding in ((1, 1), (2, 0)):
        assert torch.autograd.gradcheck(
            lambda *a: slim_conv2d(*a, in_w, out_w, stride, padding, backend="reference"), (x, weight, b))


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, channels_last):
    x, weight, b = cast(make_inputs(2, 3, channels_last, c_in=3, c_out=4, h=5, w=4), torch.float32)
    in_w = torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)
    out_w = torch.tensor([4, 2], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.restorenet.slim_conv2d.default,
                          (x, weight, b, in_w, out_w, 2, 1, backend))


def test_torch_compile_fullgraph():
    """No graph break through the public function and the custom ops. aot_eager
    traces forward and backward as inductor would, without its (slow) codegen."""
    x, weight, b = cast(make_inputs(2, 3, c_in=4, c_out=5, h=6, w=6), torch.float32)
    in_w = torch.tensor([2, 4], device=DEVICE)

    def layer(x, in_w):
        return F.relu(slim_conv2d(x, weight, b, in_w, 3, padding=1, backend="reference"))

    torch._dynamo.reset()
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, in_w)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    grad_w = weight.grad.clone()
    weight.grad = None
    y2 = layer(x2, in_w)
    y2.sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(grad_w, weight.grad)


def test_profiler_sees_the_named_ranges():
    x, weight, b = cast(make_inputs(2, 3, c_in=4, c_out=5, h=4, w=4), torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        slim_conv2d(x, weight, b, 2, 3, padding=1, backend="reference").sum().backward()
    names = {e.name for e in prof.events()}
    assert {"restorenet::slim_conv2d::fwd", "restorenet::slim_conv2d::bwd"} <= names


def test_flop_counter_counts_active_channels():
    from torch.utils.flop_counter import FlopCounterMode

    x, weight, b = cast(make_inputs(2, 3, c_in=4, c_out=5, h=4, w=4), torch.float32)
    with FlopCounterMode(display=False) as counter:
        slim_conv2d(x, weight, b, torch.tensor([1, 4]), torch.tensor([5, 2]), padding=1,
                    backend="reference").sum().backward()
    fwd = 2 * 9 * 16 * (1 * 5 + 4 * 2)
    assert counter.get_total_flops() == 3 * fwd  # forward, dx, dW


@pytest.mark.skipif(not FAST_BACKENDS, reason="no fast backend on this machine")
def test_use_backend_switches_the_op(monkeypatch):
    calls = []
    op = importlib.import_module("restorenet.ops.slim_conv2d")
    monkeypatch.setitem(op._FORWARD, FAST_BACKENDS[0], lambda *a: calls.append(1) or op._reference_forward(*a))
    x, weight, _ = cast(make_inputs(1, 1, c_in=4, c_out=5, h=3, w=3), torch.float32)
    with use_backend(FAST_BACKENDS[0]):
        slim_conv2d(x, weight, None, 2, 2)
    assert calls == [1]


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change,exc,match", [
    (dict(in_width=0), ValueError, "in_width must lie in 1..4"),
    (dict(out_width=6), ValueError, "out_width must lie in 1..5"),
    (dict(in_width=torch.tensor([1, 5])), ValueError, "in_width must lie"),
    (dict(out_width=torch.tensor([1, 2, 3])), ValueError, "out_width must be .* shape \\[N\\] = \\[2\\]"),
    (dict(out_width=torch.tensor([1.0, 2.0])), TypeError, "out_width must be an int or an integer tensor"),
    (dict(in_width=2.5), TypeError, "in_width must be an int"),
    (dict(weight=torch.randn(5, 3, 3, 3)), ValueError, "weight must have Cin_max"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
    (dict(x=torch.randn(2, 4, 5)), ValueError, "x must be 4-D"),
    (dict(stride=0), ValueError, "stride must be"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(change, exc, match):
    _assert_rejected(change, exc, match)


def _assert_rejected(change, exc, match):
    """A good call of slim_conv2d with ``change`` applied raises ``exc`` matching ``match``."""
    args = dict(x=torch.randn(2, 4, 5, 5), weight=torch.randn(5, 4, 3, 3), bias=torch.randn(5),
                in_width=2, out_width=3, stride=1, padding=1, backend="reference")
    args.update(change)
    with pytest.raises(exc, match=match):
        slim_conv2d(**args)


def _widths(values, lo, hi, dtype=torch.int32):
    return SlimWidths(torch.tensor(values, dtype=dtype), lo, hi)


@pytest.mark.parametrize("change,exc,match", [
    (dict(in_width=torch.tensor([0, 2])), ValueError, "in_width must lie in 1..4"),
    (dict(out_width=torch.tensor([6, 2], dtype=torch.uint8)), ValueError, "out_width must lie in 1..5"),
    (dict(in_width=torch.tensor([True, True])), TypeError, "in_width must be an int or an integer tensor"),
    (dict(in_width=_widths([1, 2], 0, 2)), ValueError, "in_width must lie in 1..4"),
    (dict(out_width=_widths([1, 6], 1, 6)), ValueError, "out_width must lie in 1..5"),
    (dict(in_width=_widths([1, 2], 1, 2, torch.int64)), TypeError, "in_width must be an int32 tensor"),
    (dict(out_width=_widths([1, 2, 3], 1, 3)), ValueError, "out_width must be .* shape \\[N\\] = \\[2\\]"),
    (dict(out_width=_widths(2, 2, 2)), ValueError, "out_width must be .* shape \\[N\\]"),
])
def test_bad_widths_name_the_argument(change, exc, match):
    """Plain tensors and SlimWidths: width 0, width > max, wrong length, wrong dtype."""
    _assert_rejected(change, exc, match)


@pytest.mark.parametrize("width,kwargs,exc,match", [
    (torch.tensor([0, 3]), {}, ValueError, "width must lie >= 1, got values in 0..3"),
    (torch.tensor([2, 9]), dict(max_width=8), ValueError, "width must lie in 1..8"),
    (9, dict(max_width=8), ValueError, "width must lie in 1..8"),
    (torch.tensor([1, 2, 3]), {}, ValueError, "width must be .* shape \\[N\\] = \\[2\\]"),
    (torch.tensor([1.0, 2.0]), {}, TypeError, "width must be an int or an integer tensor"),
    (True, {}, TypeError, "width must be an int"),
    (torch.tensor([1, 0]), dict(name="in_width"), ValueError, "^in_width must lie"),
])
def test_check_widths_rejects_bad_widths(width, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        check_widths(width, 2, "cpu", **kwargs)


def test_checked_widths_are_range_checked_without_a_host_read(monkeypatch):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 6, 5, 5), torch.randn(7, 6, 3, 3), torch.randn(7)
    in_w, out_w = torch.tensor([6, 1, 3]), torch.tensor([2, 7, 7])
    want = slim_conv2d(x, weight, bias, in_w, out_w, 1, 1, backend="reference")
    checked_in, reads = count_host_reads(monkeypatch, lambda: check_widths(in_w, 3, x.device, 6))
    assert reads == 1 and (checked_in.lo, checked_in.hi) == (1, 6)
    assert checked_in.values.dtype == torch.int32 and checked_in.values.tolist() == [6, 1, 3]
    checked_out = check_widths(out_w, 3, x.device, name="out_width")
    sync_free_slim_reference(monkeypatch)
    got, reads = count_host_reads(monkeypatch, lambda: slim_conv2d(
        x, weight, bias, checked_in, checked_out, 1, 1, backend="reference"))
    assert reads == 0
    torch.testing.assert_close(got, want)
    _, reads = count_host_reads(monkeypatch, lambda: slim_conv2d(
        x, weight, bias, in_w, out_w, 1, 1, backend="reference"))
    assert reads == 2  # a plain tensor width costs one read per argument


def test_widths_from_choices_needs_no_host_read(monkeypatch):
    index = torch.tensor([2, 0, 1, 2])
    widths, reads = count_host_reads(monkeypatch, lambda: widths_from_choices([8, 16, 24], index))
    assert reads == 0
    assert widths.values.dtype == torch.int32 and widths.values.tolist() == [24, 8, 16, 24]
    assert (widths.lo, widths.hi) == (8, 24)
    with pytest.raises(ValueError, match="^choices"):
        widths_from_choices([0, 8], index)
    with pytest.raises(TypeError, match="^index"):
        widths_from_choices([8, 16], index.float())


def test_widths_from_choices_uses_a_table_the_caller_keeps():
    index = torch.tensor([1, 0, 1])
    table = torch.tensor([8, 16], dtype=torch.int32)
    widths = widths_from_choices([8, 16], index, table=table)
    assert widths.values.tolist() == [16, 8, 16] and (widths.lo, widths.hi) == (8, 16)
    for bad in (table.long(), table[:1], torch.tensor([8, 16, 24], dtype=torch.int32)):
        with pytest.raises(ValueError, match="^table"):
            widths_from_choices([8, 16], index, table=bad)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_width_sequences_are_accepted_like_tensors(monkeypatch, backend):
    """A host list of widths is checked on the host: same result as a tensor, no read."""
    x, weight, bias = torch.randn(3, 6, 5, 5), torch.randn(7, 6, 3, 3), torch.randn(7)
    want = slim_conv2d(x, weight, bias, torch.tensor([6, 1, 3]), torch.tensor([2, 7, 7]), 1, 1,
                       backend="reference")
    got = slim_conv2d(x, weight, bias, [6, 1, 3], (2, 7, 7), 1, 1, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with monkeypatch.context() as m:  # the checks alone: the reference loop reads widths to slice
        sync_free_slim_reference(m)
        _, reads = count_host_reads(m, lambda: slim_conv2d(x, weight, bias, [6, 1, 3], (2, 7, 7), 1, 1,
                                                           backend="reference"))
    assert reads == 0
    with pytest.raises(ValueError, match="^in_width must lie in 1..6"):
        slim_conv2d(x, weight, bias, [6, 0, 3], 2, 1, 1, backend=backend)
    with pytest.raises(ValueError, match="^out_width must hold N = 3"):
        slim_conv2d(x, weight, bias, 2, [1, 2], 1, 1, backend=backend)
    with pytest.raises(TypeError, match="^in_width must be"):
        slim_conv2d(x, weight, bias, [True, 1, 1], 2, 1, 1, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_unchecked_slim_widths_are_checked_before_any_backend(backend):
    """SlimWidths made without a range (lo = hi = None) are read and checked once in the
    shared layer, so every backend raises the same error (the kernels would clamp)."""
    x, weight = torch.randn(2, 4, 5, 5), torch.randn(5, 4, 3, 3)
    unchecked = SlimWidths(torch.tensor([1, 9], dtype=torch.int32), None, None)
    with pytest.raises(ValueError, match=r"^out_width must lie in 1..5 \(the channels available\), "
                                         r"got values in 1..9$"):
        slim_conv2d(x, weight, None, 4, unchecked, 1, 1, backend=backend)


def test_trusted_bad_widths_are_clamped_alike_on_every_backend():
    """A SlimWidths whose lo/hi the caller vouched for is not read: every backend clamps
    its values to 0..C the same way (above C: full width; <= 0: no channel)."""
    x, weight, bias = (t.requires_grad_() for t in (torch.randn(3, 4, 5, 5), torch.randn(5, 4, 3, 3),
                                                    torch.randn(5)))
    in_w = SlimWidths(torch.tensor([9, -2, 3], dtype=torch.int32), 1, 4)  # lo/hi claim 1..4
    out_w = SlimWidths(torch.tensor([5, 4, 0], dtype=torch.int32), 1, 5)

    def run(backend):
        y = slim_conv2d(x, weight, bias, in_w, out_w, 1, 1, backend=backend)
        grads = torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y))
        return y, grads

    y_ref, g_ref = run("reference")
    # Clamped: sample 0 runs at full width, sample 1 has no input channel (its first 4
    # outputs are the bias alone), sample 2 no output channel (zeros).
    torch.testing.assert_close(y_ref[:1], F.conv2d(x[:1], weight, bias, 1, 1))
    assert torch.equal(y_ref[1, :4], bias.detach()[:4, None, None].expand(4, 5, 5))
    assert torch.all(y_ref[1, 4:] == 0) and torch.all(y_ref[2] == 0)
    for backend in FAST_BACKENDS:
        y, grads = run(backend)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        for g, gr in zip(grads, g_ref):
            torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", [torch.tensor([0, 3]), torch.tensor([-1, 0]), [0, 3], [-1]])
def test_widths_from_choices_names_an_index_out_of_range(monkeypatch, index):
    """No host read for the range: a CPU lookup's own bounds check raises, named; a
    negative index does not silently count from the end."""
    with pytest.raises(IndexError, match=r"^index must hold choice indices in 0..2"):
        count_host_reads(monkeypatch, lambda: widths_from_choices([8, 16, 24], index))


def test_widths_from_choices_takes_a_list_of_indices(monkeypatch):
    widths, reads = count_host_reads(monkeypatch, lambda: widths_from_choices([8, 16, 24], [2, 0]))
    assert widths.values.tolist() == [24, 8] and (widths.lo, widths.hi) == (8, 24)
    assert reads == 0


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_meta_tensors_propagate_shapes(backend):
    x, weight = torch.randn(2, 4, 5, 5, device="meta"), torch.randn(6, 4, 3, 3, device="meta")
    in_w = torch.tensor([1, 4], device="meta")  # no values: checked for metadata only
    y = slim_conv2d(x, weight, None, in_w, 3, 2, 1, backend=backend)
    assert y.device.type == "meta" and y.shape == (2, 6, 3, 3)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("x,weight", [(torch.randn(2, 0, 5, 5), torch.randn(5, 0, 3, 3)),
                                      (torch.randn(2, 4, 0, 5), torch.randn(5, 4, 3, 3))])
def test_no_input_channels_or_pixels_are_rejected(backend, x, weight):
    with pytest.raises(ValueError, match="^x must have C_in, H, W >= 1"):
        slim_conv2d(x, weight, None, 1, 3, 1, 1, backend=backend)


# ---------------------------------------------------------------------- DDS-Net
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_ddsnet_same_outputs_and_gradients_with_every_backend(backend):
    """One mixed-width training step of a tiny DDS-Net (gate included) in fp32,
    with the reference and with ``backend``, both held to the float64 truth."""
    from restorenet import create_model

    torch.manual_seed(0)
    model = create_model("ddsnet", width=16, depth=1, num_choices=2).to(DEVICE)
    noisy = torch.rand(3, 3, 4, 5, device=DEVICE)
    clean = torch.rand(3, 3, 4, 5, device=DEVICE)

    def step(net, name, dtype):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same Gumbel sample for every run
        with use_backend(name):
            out, used = net(noisy.to(dtype), return_widths=True)
            loss = (out - clean.to(dtype)).abs().mean()
        loss.backward()
        return out.detach(), used, {k: p.grad.clone() for k, p in net.named_parameters()}

    out_true, used_true, grads_true = step(copy.deepcopy(model).double(), "reference", torch.float64)
    out_ref, used_ref, grads_ref = step(model, "reference", torch.float32)
    out_fast, used_fast, grads_fast = step(model, backend, torch.float32)
    assert torch.equal(used_fast, used_ref) and torch.equal(used_ref, used_true)
    assert_within_baseline_error("out", out_fast, out_true, out_ref, torch.float32)
    assert grads_ref.keys() == grads_fast.keys()
    for name in grads_ref:
        assert_within_baseline_error(name, grads_fast[name], grads_true[name], grads_ref[name], torch.float32)

    # A forced mixed-width batch (eval, no gate) runs every width at once.
    model.eval()
    widths = torch.tensor([8, 16, 8], device=DEVICE)
    with use_backend("reference"):
        want = model(noisy, width=widths)
    with use_backend(backend):
        got = model(noisy, width=widths)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
