"""channel_attention / scaled_residual: every backend against the float64 spec
and plain PyTorch, autograd, gradcheck, opcheck, compile, determinism, errors.

On a CPU machine the fast backend is Triton under TRITON_INTERPRET=1; on a GPU
machine Triton and CUDA run on the device and bf16 is added. The CUDA kernels'
own axes are in test_channel_attention_cuda.py (GPU) and
tests/csrc/test_channel_attention_emulated.py (CPU emulation).
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from restorenet.ops import _backend, available_backends, use_backend
from restorenet.ops.channel_attention import (channel_attention, channel_attention_reference, scaled_residual,
                                              scaled_residual_reference)
from restorenet.testing import assert_within_baseline_error

from _cuda_helpers import assert_cuda_needs_symbols

ca_module = importlib.import_module("restorenet.ops.channel_attention")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST_BACKENDS = [b for b in available_backends(DEVICE, "channel_attention_apply") if b != "reference"]
BACKENDS = ["reference"] + FAST_BACKENDS
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# (N, Cx, H, W, channels_last): odd channel counts and sizes, batch 1, 1x1 maps,
# more than one 64-wide channel block.
CA_SHAPES = [(3, 6, 9, 11, False), (2, 10, 5, 3, True), (1, 2, 1, 1, False), (1, 140, 3, 5, True)]
SR_SHAPES = [(3, 5, 9, 11, False), (2, 7, 5, 3, True), (1, 1, 1, 1, False), (1, 70, 3, 5, True)]


def layout(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def make(shape, channels_last=False, dtype=torch.float64, scale=1.0, offset=0.0):
    t = (scale * torch.randn(*shape, dtype=torch.float64, device=DEVICE) + offset).to(dtype)
    return t.contiguous(memory_format=layout(channels_last)) if t.dim() == 4 else t


def leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_()


def plain_sca(x, weight, bias, gated):
    """blocks.SimpleGate + SimplifiedChannelAttention's textbook formulas at the inputs' dtype."""
    if gated:
        a, b = x.chunk(2, dim=1)
        x = a * b
    return x * F.conv2d(F.adaptive_avg_pool2d(x, 1), weight, bias)


def plain_residual(inp, beta, z):
    return inp + beta * z


# ------------------------------------------------------------- channel_attention
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("n,cx,h,w,channels_last", CA_SHAPES)
def test_channel_attention_matches_float64_truth(backend, dtype, gated, n, cx, h, w, channels_last):
    c = cx // 2 if gated else cx
    # Inputs rounded to dtype first, so every path sees the same values. An
    # offset keeps the pooled means away from zero (the attention matters).
    x0 = make((n, cx, h, w), channels_last, offset=0.5).to(dtype).double()
    w0 = make((c, c, 1, 1), scale=c ** -0.5).to(dtype).double()
    b0 = make((c,)).to(dtype).double()
    grad = make((n, c, h, w), channels_last, dtype=dtype)

    truth = [leaf(t, torch.float64) for t in (x0, w0, b0)]
    y_true = plain_sca(*truth, gated)
    y_true.backward(grad.double())
    base = [leaf(t, dtype) for t in (x0, w0, b0)]
    y_base = plain_sca(*base, gated)
    y_base.backward(grad)
    fast = [leaf(t, dtype) for t in (x0, w0, b0)]
    y = channel_attention(*fast, gated=gated, backend=backend)
    y.backward(grad)

    assert y.dtype == dtype and y.shape == (n, c, h, w)
    assert y.is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("u", y, y_true, y_base, dtype)
    for name, t, b, f in zip(("x", "weight", "bias"), truth, base, fast):
        assert f.grad.dtype == dtype and f.grad.shape == t.shape, name
        assert_within_baseline_error(f"d{name}", f.grad, t.grad, b.grad, dtype)
    assert fast[0].grad.is_contiguous(memory_format=layout(channels_last))


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_channel_attention_spec_is_the_module(gated):
    """The spec equals blocks.SimplifiedChannelAttention(SimpleGate) written out."""
    x = make((2, 8, 5, 4), offset=1.0)
    c = 4 if gated else 8
    w, b = make((c, c, 1, 1)), make((c,))
    torch.testing.assert_close(channel_attention_reference(x, w, b, gated), plain_sca(x, w, b, gated))
    torch.testing.assert_close(channel_attention_reference(x, w.view(c, c), None, gated),
                               plain_sca(x, w, None, gated))


def test_channel_attention_gradcheck_float64():
    x = make((2, 6, 3, 4), offset=0.5).requires_grad_()
    w = make((3, 3, 1, 1)).requires_grad_()
    b = make((3,)).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: channel_attention_reference(*a, gated=True), (x, w, b))
    # The registered op's reference backend has its own closed-form backward.
    for gated, xs, ws in ((True, x, w), (False, x[:, :3].detach().requires_grad_(), w)):
        assert torch.autograd.gradcheck(lambda *a: channel_attention(*a, gated=gated, backend="reference"),
                                        (xs, ws, b))
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: channel_attention(*a, gated=True, backend="reference"), (cl, w, b))
    assert torch.autograd.gradcheck(lambda *a: channel_attention(*a, None, gated=True, backend="reference"),
                                    (cl, w))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_channel_attention_fast_backend_float64_exact(backend, gated):
    """In float64 a fast backend must agree with the reference to rounding."""
    x = leaf(make((2, 6, 7, 5), True, offset=0.3), torch.float64)
    c = 3 if gated else 6
    w, b = leaf(make((c, c)), torch.float64), leaf(make((c,)), torch.float64)
    grad = make((2, c, 7, 5))
    out = {}
    for name in ("reference", backend):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = channel_attention(xs, ws, bs, gated=gated, backend=name)
        out[name] = (y, *torch.autograd.grad(y, (xs, ws, bs), grad))
    for a, r in zip(out[backend], out["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_attention_fp32_parameters_with_half_input(backend):
    """fp32 master weights with an fp16 activation: used as they are, grads in fp32."""
    x = leaf(make((2, 8, 3, 5)), torch.float16)
    w, b = make((4, 4, 1, 1), dtype=torch.float32).requires_grad_(), make((4,), dtype=torch.float32).requires_grad_()
    y = channel_attention(x, w, b, gated=True, backend=backend)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.float16
    torch.testing.assert_close(y, channel_attention_reference(x.float(), w, b, True).half())


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_attention_only_requested_gradients(backend):
    x = leaf(make((2, 4, 3, 5)), torch.float32)
    w, b = make((2, 2, 1, 1), dtype=torch.float32), make((2,), dtype=torch.float32)  # constants
    channel_attention(x, w, b, gated=True, backend=backend).pow(2).sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None
    x = make((2, 4, 3, 5), dtype=torch.float32)  # a constant input, trained weights
    w.requires_grad_()
    channel_attention(x, w, None, gated=True, backend=backend).sum().backward()
    assert w.grad is not None


# --------------------------------------------------------------- scaled_residual
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,h,w,channels_last", SR_SHAPES)
def test_scaled_residual_matches_float64_truth(backend, dtype, n, c, h, w, channels_last):
    inp0 = make((n, c, h, w), channels_last).to(dtype).double()
    z0 = make((n, c, h, w), channels_last).to(dtype).double()
    beta0 = make((1, c, 1, 1)).to(dtype).double()
    grad = make((n, c, h, w), channels_last, dtype=dtype)
    truth = [leaf(t, torch.float64) for t in (inp0, beta0, z0)]
    y_true = plain_residual(*truth)
    y_true.backward(grad.double())
    base = [leaf(t, dtype) for t in (inp0, beta0, z0)]
    y_base = plain_residual(*base)
    y_base.backward(grad)
    fast = [leaf(t, dtype) for t in (inp0, beta0, z0)]
    y = scaled_residual(*fast, backend=backend)
    y.backward(grad)
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("y", y, y_true, y_base, dtype)
    for name, t, b, f in zip(("inp", "beta", "z"), truth, base, fast):
        assert f.grad.dtype == dtype and f.grad.shape == t.shape, name
        assert_within_baseline_error(f"d{name}", f.grad, t.grad, b.grad, dtype)


def test_scaled_residual_gradcheck_float64():
    inp, z = make((2, 3, 4, 5)).requires_grad_(), make((2, 3, 4, 5)).requires_grad_()
    beta = make((3,)).requires_grad_()
    assert torch.autograd.gradcheck(scaled_residual_reference, (inp, beta, z))
    assert torch.autograd.gradcheck(lambda *a: scaled_residual(*a, backend="reference"), (inp, beta, z))
    cl = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (inp, z)]
    beta4 = beta.detach().view(1, 3, 1, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, b, zz: scaled_residual(i, b, zz, backend="reference"),
                                    (cl[0], beta4, cl[1]))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_scaled_residual_fast_backend_float64_exact(backend):
    inp, z, beta = make((2, 5, 6, 7), True), make((2, 5, 6, 7), True), make((1, 5, 1, 1))
    grad = make((2, 5, 6, 7), True)
    out = {}
    for name in ("reference", backend):
        args = [t.clone().requires_grad_() for t in (inp, beta, z)]
        y = scaled_residual(*args, backend=name)
        out[name] = (y, *torch.autograd.grad(y, args, grad))
    for a, r in zip(out[backend], out["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", ["beta", "z", "inp"])
def test_scaled_residual_only_requested_gradients(backend, wanted):
    args = dict(inp=make((2, 3, 4, 5), dtype=torch.float32), beta=make((3,), dtype=torch.float32),
                z=make((2, 3, 4, 5), dtype=torch.float32))
    args[wanted].requires_grad_()
    grad = make((2, 3, 4, 5), dtype=torch.float32)
    scaled_residual(**args, backend=backend).backward(grad)
    expected = {"inp": grad, "beta": (grad * args["z"]).sum((0, 2, 3)), "z": grad * args["beta"].view(1, 3, 1, 1)}
    for name, t in args.items():
        assert (t.grad is not None) == (name == wanted), name
    torch.testing.assert_close(args[wanted].grad, expected[wanted])


# ---------------------------------------------------------------------- both ops
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x = make((3, 8, 17, 19), dtype=torch.float32)
    w, b = make((4, 4, 1, 1), dtype=torch.float32).requires_grad_(), make((4,), dtype=torch.float32).requires_grad_()
    beta = make((4,), dtype=torch.float32).requires_grad_()
    runs = []
    for _ in range(2):
        xs = leaf(x, torch.float32)
        inp = xs[:, :4]
        y = scaled_residual(inp, beta, channel_attention(xs, w, b, gated=True, backend=backend), backend=backend)
        runs.append((y, *torch.autograd.grad(y, (xs, w, b, beta), torch.ones_like(y))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = leaf(make((0, 4, 3, 5)), torch.float32)
    w, b = make((2, 2, 1, 1), dtype=torch.float32).requires_grad_(), make((2,), dtype=torch.float32).requires_grad_()
    u = channel_attention(x, w, b, gated=True, backend=backend)
    assert u.shape == (0, 2, 3, 5)
    beta = make((2,), dtype=torch.float32).requires_grad_()
    y = scaled_residual(u, beta, u, backend=backend)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in (w, b, beta):
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.skipif("triton" not in FAST_BACKENDS or not _backend.triton_interpreting(),
                    reason="the GPU tiling already runs on a GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_gpu_tiling_under_the_interpreter(monkeypatch, channels_last):
    """The interpreter normally gets one big tile per program; force the GPU
    tiling: several pixel splits and iterations per program, partial-sum rows,
    several channel blocks."""
    kernels = pytest.importorskip("restorenet_kernels.channel_attention")
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "MAX_SPLITS", 2)
    monkeypatch.setattr(kernels, "MAX_PROGRAMS", 2)
    monkeypatch.setattr(kernels, "_tile", lambda c, pixels, channels_last: (4, 16) if channels_last else (2, 32))
    n, c, h, w = 2, 5, 9, 11
    x = make((n, 2 * c, h, w), channels_last, dtype=torch.float32, offset=0.5)
    w_, b = make((c, c, 1, 1), dtype=torch.float32), make((c,), dtype=torch.float32)
    grid, splits, iters, _ = kernels._reduce_geometry(n, c, h * w, channels_last)
    assert splits > 1 and iters > 1 and grid == (n * splits, 2 if channels_last else 3)
    inp, beta = make((n, c, h, w), channels_last, dtype=torch.float32), make((c,), dtype=torch.float32)
    out = []
    for backend in ("triton", "reference"):
        xs, ws, bs, bt = (leaf(t, torch.float32) for t in (x, w_, b, beta))
        u = channel_attention(xs, ws, bs, gated=True, backend=backend)
        y = scaled_residual(inp, bt, u, backend=backend)
        out.append((y, *torch.autograd.grad(y, (xs, ws, bs, bt), torch.ones_like(y))))
    for o, r in zip(*out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    channels_last = backend != "reference"  # layouts are covered above; opcheck is slow
    x = make((2, 4, 3, 5), channels_last, dtype=torch.float32)
    w, b = make((2, 2), dtype=torch.float32), make((2,), dtype=torch.float32)
    ops = torch.ops.restorenet
    u, pooled = ops.channel_attention(x, w, b, True, backend)
    torch.library.opcheck(ops.channel_attention.default,
                          (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(),
                           True, backend))
    torch.library.opcheck(ops.channel_attention_backward.default, (torch.randn_like(u), x, w, None, pooled, True,
                                                                   backend))
    z = make((2, 4, 3, 5), channels_last, dtype=torch.float32)
    beta = make((4,), dtype=torch.float32)
    torch.library.opcheck(ops.scaled_residual.default,
                          (x.clone().requires_grad_(), beta.clone().requires_grad_(), z.clone().requires_grad_(),
                           backend))
    torch.library.opcheck(ops.scaled_residual_backward.default, (torch.randn_like(z), beta, z, False, True, backend))


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_torch_compile_fullgraph(backend):
    x = leaf(make((2, 6, 4, 4)), torch.float32)
    w, b = (leaf(make(s), torch.float32) for s in ((3, 3, 1, 1), (3,)))
    beta = leaf(make((1, 3, 1, 1)), torch.float32)

    def mixer(x, w, b, beta):  # SCA(SG(x)) and the scaled residual, as in NAFBlock (without the convs)
        return scaled_residual(x[:, :3], beta, torch.relu(channel_attention(x, w, b, gated=True, backend=backend)),
                               backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(mixer, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, beta)
    grads = torch.autograd.grad(out.sum(), (x, w, b, beta))
    eager = mixer(x, w, b, beta)
    torch.testing.assert_close(out, eager)
    for a, e in zip(grads, torch.autograd.grad(eager.sum(), (x, w, b, beta))):
        torch.testing.assert_close(a, e)


def test_profiler_ranges_are_named():
    x = leaf(make((1, 4, 3, 3)), torch.float32)
    w, b = (leaf(make(s), torch.float32) for s in ((2, 2, 1, 1), (2,)))
    beta = leaf(make((2,)), torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        u = channel_attention(x, w, b, gated=True, backend="reference")
        scaled_residual(u, beta, u, backend="reference").sum().backward()
    names = [e.name for e in prof.events()]
    for op in ("channel_attention", "scaled_residual"):
        for phase in ("fwd", "bwd"):
            assert names.count(f"restorenet::{op}::{phase}") == 1, (op, phase)


def test_use_backend_reaches_the_ops(monkeypatch):
    calls = []
    for table in (ca_module._CA_APPLY, ca_module._SR_FORWARD):
        kernel = table["reference"]
        monkeypatch.setitem(table, "reference", lambda *a, _k=kernel: calls.append(1) or _k(*a))
    x = make((1, 4, 3, 3), dtype=torch.float32)
    with use_backend("reference"):
        u = channel_attention(x, make((2, 2), dtype=torch.float32), gated=True)
        scaled_residual(u, make((2,), dtype=torch.float32), u)
    assert len(calls) == 2


def test_cuda_backend_needs_the_kernels(monkeypatch):
    x = make((1, 4, 3, 3), dtype=torch.float32).cpu()
    with pytest.raises(RuntimeError, match="cuda"):
        channel_attention(x, torch.ones(4, 4), backend="cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        scaled_residual(x, torch.ones(4), x, backend="cuda")
    assert_cuda_needs_symbols(monkeypatch, ("channel_attention_apply", "scaled_residual_forward"))


# -------------------------------------------------------------------- bad input
def _ca_good():
    return dict(x=make((2, 6, 4, 5), dtype=torch.float32), weight=torch.ones(3, 3, 1, 1, device=DEVICE),
                bias=torch.zeros(3, device=DEVICE), gated=True)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(3, 4, 5)), "x must be 4-D"),
    (dict(x="x"), "x must be a torch.Tensor"),
    (dict(x=torch.randint(0, 3, (2, 6, 4, 5))), "x must have dtype"),
    (dict(x=torch.randn(2, 5, 4, 5)), "x must have an even number of channels"),
    (dict(x=torch.randn(2, 6, 0, 5)), "x must have C, H, W >= 1"),
    (dict(gated=1), "gated must be a bool"),
    (dict(weight=torch.ones(4, 4, 1, 1)), "weight must have shape \\[C, C\\] or \\[C, C, 1, 1\\] with C = 3"),
    (dict(weight=torch.ones(3, 3, 3, 3)), "weight must have shape"),
    (dict(weight=torch.ones(3, 3, dtype=torch.float64)), "weight must have dtype"),
    (dict(bias=torch.zeros(2)), "bias must have shape \\[C\\] = \\[3\\]"),
    (dict(bias=torch.zeros(1, 3)), "bias must be 1-D"),
    (dict(bias=torch.zeros(3, dtype=torch.float16)), "bias must have dtype"),
])
def test_channel_attention_bad_input_names_the_argument(change, match):
    args = {**_ca_good(), **change}
    with pytest.raises((TypeError, ValueError), match=match):
        channel_attention(args["x"], args["weight"], args["bias"], gated=args["gated"], backend="reference")


def test_channel_attention_half_parameters_need_half_input():
    args = _ca_good()
    with pytest.raises(TypeError, match="weight must have dtype"):
        channel_attention(args["x"], args["weight"].half(), args["bias"].half(), gated=True)


@pytest.mark.parametrize("change,match", [
    (dict(inp=torch.randn(3, 4, 5)), "inp must be 4-D"),
    (dict(inp=torch.randint(0, 3, (2, 3, 4, 5))), "inp must have dtype"),
    (dict(z=torch.randn(2, 3, 4, 6)), "z must have the shape of inp"),
    (dict(z=torch.randn(2, 3, 4, 5, dtype=torch.float64)), "z must have dtype"),
    (dict(z=None), "z must be a torch.Tensor"),
    (dict(beta=torch.ones(4)), "beta must have shape \\[C\\] or \\[1, C, 1, 1\\] with C = 3"),
    (dict(beta=torch.ones(3, 1, 1)), "beta must have shape"),
    (dict(beta=torch.ones(3, dtype=torch.float64)), "beta must have dtype"),
])
def test_scaled_residual_bad_input_names_the_argument(change, match):
    args = {**dict(inp=torch.randn(2, 3, 4, 5), beta=torch.ones(3), z=torch.randn(2, 3, 4, 5)), **change}
    with pytest.raises((TypeError, ValueError), match=match):
        scaled_residual(args["inp"], args["beta"], args["z"], backend="reference")
