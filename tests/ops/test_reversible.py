"""rev_coupling_forward / rev_coupling_invert: every backend against the float64
spec and plain PyTorch, the inversion round trip, autograd, compile, errors.

On a CPU machine the fast backend is Triton under TRITON_INTERPRET=1; on a GPU
machine Triton (and CUDA once built) run on the device and bf16 is added.
"""
from __future__ import annotations

import pytest
import torch

from restorenet.ops import _backend, available_backends
from restorenet.ops._backend import resolve_backend
from restorenet.ops.reversible import (rev_coupling_forward, rev_coupling_forward_reference,
                                       rev_coupling_invert, rev_coupling_invert_reference)
from restorenet.testing import assert_within_baseline_error, max_error

from _cuda_helpers import assert_cuda_needs_symbols

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST_BACKENDS = [b for b in available_backends(DEVICE, "rev_coupling_forward") if b != "reference"]
BACKENDS = ["reference"] + FAST_BACKENDS
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# (N, C, H, W, channels_last): odd sizes, batch 1, 1x1 maps, more channels than one block.
SHAPES = [(3, 5, 9, 11, False), (2, 7, 5, 3, True), (1, 3, 1, 1, False), (1, 70, 3, 5, True)]


def make_alpha(channels, dtype=torch.float64, device=DEVICE):
    """|a| in [0.25, 1], random signs: around AdaRevD's init (0.5), both signs."""
    mag = 0.25 + 0.75 * torch.rand(channels, dtype=torch.float64, device=device)
    sign = torch.where(torch.rand(channels, device=device) < 0.5, -1.0, 1.0).to(torch.float64)
    return (sign * mag).to(dtype)


def make_states(n, c, h, w, channels_last=False, count=2, dtype=torch.float64):
    out = []
    for _ in range(count):
        t = torch.randn(n, c, h, w, dtype=torch.float64, device=DEVICE).to(dtype)
        out.append(t.contiguous(memory_format=torch.channels_last) if channels_last else t)
    return out


def leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_()


def layout(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,h,w,channels_last", SHAPES)
def test_forward_matches_float64_truth(backend, dtype, n, c, h, w, channels_last):
    c0, f0 = make_states(n, c, h, w, channels_last)
    # Inputs rounded to dtype first: every path sees the same values.
    c0, f0 = c0.to(dtype).double(), f0.to(dtype).double()
    a0 = make_alpha(c).float().double()
    grad = torch.randn(n, c, h, w, dtype=torch.float64, device=DEVICE).to(dtype)

    truth = [leaf(c0, torch.float64), leaf(f0, torch.float64), leaf(a0, torch.float64)]
    y_true = truth[2].view(1, -1, 1, 1) * truth[0] + truth[1]
    y_true.backward(grad.double())

    base = [leaf(c0, dtype), leaf(f0, dtype), leaf(a0, torch.float32)]
    y_base = base[2].to(dtype).view(1, -1, 1, 1) * base[0] + base[1]  # plain PyTorch at dtype
    y_base.backward(grad)

    fast = [leaf(c0, dtype), leaf(f0, dtype), leaf(a0, torch.float32)]
    y = rev_coupling_forward(*fast, backend=backend)
    y.backward(grad)

    assert y.dtype == dtype and y.is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("y", y, y_true, y_base, dtype)
    for name, t, b, tf in zip(("c", "f", "alpha"), truth, base, fast):
        assert tf.grad.dtype == tf.dtype
        assert_within_baseline_error(f"d{name}", tf.grad, t.grad, b.grad, dtype)


def test_reference_gradcheck_float64():
    c, f = make_states(2, 3, 4, 5)
    alpha = make_alpha(3)
    args = tuple(t.requires_grad_() for t in (c, f, alpha))
    assert torch.autograd.gradcheck(rev_coupling_forward_reference, args)
    # The registered op's reference backend has its own closed-form backward.
    assert torch.autograd.gradcheck(lambda *a: rev_coupling_forward(*a, backend="reference"), args)
    cl = tuple(t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (c, f))
    assert torch.autograd.gradcheck(lambda *a: rev_coupling_forward(*a, backend="reference"),
                                    (*cl, alpha))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    c, f = (leaf(t, torch.float32) for t in make_states(2, 4, 3, 5))
    alpha = make_alpha(4, torch.float32)  # a constant: no gradient wanted
    rev_coupling_forward(c, f.detach(), alpha, backend=backend).sum().backward()
    assert c.grad is not None and f.grad is None and alpha.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layouts_follow_c(backend):
    c, f = make_states(2, 6, 4, 5)
    c = c.float().contiguous(memory_format=torch.channels_last)
    alpha = make_alpha(6, torch.float32)
    y = rev_coupling_forward(c, f.float(), alpha, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, alpha.view(1, -1, 1, 1) * c + f.float())
    g = torch.randn_like(c).contiguous()  # a grad in the other layout
    rebuilt, gc, _ = rev_coupling_invert(y, f.float(), alpha, g, backend=backend)
    assert rebuilt.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(rebuilt, c)
    torch.testing.assert_close(gc, alpha.view(1, -1, 1, 1) * g)


# ------------------------------------------------------------------- invert
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,h,w,channels_last", SHAPES)
def test_invert_matches_float64_truth(backend, dtype, n, c, h, w, channels_last):
    c_new, f, g = (t.to(dtype) for t in make_states(n, c, h, w, channels_last, count=3))
    alpha = make_alpha(c, torch.float32)

    truth = rev_coupling_invert_reference(c_new.double(), f.double(), alpha.double(), g.double())
    a_low = alpha.to(dtype).view(1, -1, 1, 1)  # plain PyTorch, everything at dtype
    c_base = (c_new - f) / a_low
    base = (c_base, a_low * g, (g * c_base).sum((0, 2, 3)).float())

    out = rev_coupling_invert(c_new, f, alpha, g, backend=backend)
    for name, o, t, b in zip(("c", "grad_c", "grad_alpha"), out, truth, base):
        assert o.shape == t.shape
        assert_within_baseline_error(name, o, t, b, dtype)
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[2].dtype == torch.float32
    for o in out[:2]:
        assert o.is_contiguous(memory_format=layout(channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_invert_of_forward_rebuilds_c_and_matches_autograd(backend, channels_last):
    """invert(forward(c)) == c in fp32, and its gradients are autograd's of a*c + f."""
    c, f = (leaf(t, torch.float32) for t in make_states(2, 9, 6, 7, channels_last))
    alpha = make_alpha(9, torch.float32).requires_grad_()
    y = rev_coupling_forward(c, f, alpha, backend=backend)
    grad = torch.randn_like(y)
    rebuilt, grad_c, grad_alpha = rev_coupling_invert(y.detach(), f.detach(), alpha.detach(), grad,
                                                      backend=backend)
    rel = max_error(rebuilt, c) / c.abs().max().item()
    assert rel < 2e-6, f"fp32 rebuild relative error {rel:.2e}"

    plain = alpha.view(1, -1, 1, 1) * c + f
    ga, gc = torch.autograd.grad(plain, (alpha, c), grad)
    torch.testing.assert_close(grad_alpha, ga, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_c, gc)
    y.backward(grad)  # the op's own backward agrees too
    torch.testing.assert_close(alpha.grad, ga, rtol=1e-5, atol=1e-5)


def _round_trip_error(dtype, cycles=8, chained=True):
    """Relative max error of c0 rebuilt after ``cycles`` couplings (reference backend).

    chained: forward K levels (each state stored at dtype), then invert all K;
    otherwise K times forward-then-invert of the same state."""
    gen = torch.Generator().manual_seed(1)
    c0 = torch.randn(2, 16, 8, 8, generator=gen).to(dtype)
    fs = [torch.randn(2, 16, 8, 8, generator=gen).to(dtype) for _ in range(cycles)]
    alphas = [0.25 + 0.75 * torch.rand(16, generator=gen) for _ in range(cycles)]
    state, zeros = c0, torch.zeros_like(c0)
    if chained:
        for f, a in zip(fs, alphas):
            state = rev_coupling_forward(state, f, a, backend="reference")
        for f, a in zip(reversed(fs), reversed(alphas)):
            state, _, _ = rev_coupling_invert(state, f, a, zeros, backend="reference")
    else:
        for f, a in zip(fs, alphas):
            state, _, _ = rev_coupling_invert(rev_coupling_forward(state, f, a, backend="reference"),
                                              f, a, zeros, backend="reference")
    return max_error(state, c0) / c0.abs().max().item()


@pytest.mark.parametrize("chained", [False, True], ids=["cycles", "chained"])
def test_round_trip_drift_by_dtype(chained):
    """fp32 replays (almost) exactly; low-precision storage drifts, bf16 most.
    Chained, every rounding is amplified by prod 1/|a| on the way back."""
    err = {d: _round_trip_error(d, chained=chained) for d in (torch.float32, torch.float16, torch.bfloat16)}
    assert err[torch.float32] < (1e-4 if chained else 1e-6)
    assert err[torch.float32] < err[torch.float16] < err[torch.bfloat16]
    if not chained:
        assert err[torch.bfloat16] < 0.05  # drift, not blow-up


@pytest.mark.parametrize("backend", BACKENDS)
def test_invert_is_deterministic(backend):
    c_new, f, g = (t.float() for t in make_states(4, 3, 33, 37, count=3))
    alpha = make_alpha(3, torch.float32)
    first = rev_coupling_invert(c_new, f, alpha, g, backend=backend)
    second = rev_coupling_invert(c_new, f, alpha, g, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif("triton" not in FAST_BACKENDS or not _backend.triton_interpreting(),
                    reason="the GPU tiling already runs on a GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_gpu_tiling_under_the_interpreter(monkeypatch, channels_last):
    """The interpreter normally gets one big tile; force the GPU tiling (several
    channel blocks, chunks and loop iterations per program, partial sums)."""
    kernels = pytest.importorskip("restorenet_kernels.reversible")
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    channels = 70 if channels_last else 5  # more than one channel block either way
    c_new, f, g = (t.float() for t in make_states(2, channels, 40, 41, channels_last, count=3))
    alpha = make_alpha(channels, torch.float32)
    *_, grid, blocks = kernels._geometry(c_new, channels_last)
    assert grid[0] > 1 and grid[1] > 1 and blocks["ITERS"] > 1
    out = rev_coupling_invert(c_new, f, alpha, g, backend="triton")
    ref = rev_coupling_invert(c_new, f, alpha, g, backend="reference")
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)
    y = rev_coupling_forward(c_new, f, alpha, backend="triton")
    torch.testing.assert_close(y, rev_coupling_forward(c_new, f, alpha, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    c, f = (leaf(t, torch.float32) for t in make_states(0, 4, 3, 5))
    alpha = make_alpha(4, torch.float32).requires_grad_()
    y = rev_coupling_forward(c, f, alpha, backend=backend)
    assert y.shape == (0, 4, 3, 5)
    y.sum().backward()
    assert torch.equal(alpha.grad, torch.zeros(4, device=DEVICE)) and c.grad.shape == c.shape
    rebuilt, gc, ga = rev_coupling_invert(y.detach(), f.detach(), alpha.detach(), torch.zeros_like(y),
                                          backend=backend)
    assert rebuilt.shape == gc.shape == (0, 4, 3, 5) and torch.equal(ga, torch.zeros(4, device=DEVICE))


# ---------------------------------------------------------- custom op plumbing
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, channels_last):
    c, f, g = (t.float() for t in make_states(2, 3, 4, 5, channels_last, count=3))
    alpha = make_alpha(3, torch.float32)
    ops = torch.ops.restorenet
    torch.library.opcheck(ops.rev_coupling_forward.default,
                          (c.requires_grad_(), f.requires_grad_(), alpha.requires_grad_(), backend))
    torch.library.opcheck(ops.rev_coupling_backward.default, (g, c.detach(), alpha.detach(), backend))
    torch.library.opcheck(ops.rev_coupling_invert.default,
                          (c.detach(), f.detach(), alpha.detach(), g, backend))


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_torch_compile_fullgraph(backend):
    c, f = (leaf(t, torch.float32) for t in make_states(2, 4, 6, 6))
    alpha = make_alpha(4, torch.float32).requires_grad_()

    def step(c, f, alpha):
        y = torch.relu(rev_coupling_forward(c, f, alpha, backend=backend))
        rebuilt, gc, ga = rev_coupling_invert(y.detach(), f.detach(), alpha.detach(),
                                              torch.ones_like(y), backend=backend)
        return y, rebuilt, gc, ga

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(c, f, alpha)
    out[0].sum().backward()
    grads = [t.grad.clone() for t in (c, f, alpha)]
    for t in (c, f, alpha):
        t.grad = None
    eager = step(c, f, alpha)
    eager[0].sum().backward()
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b)
    for a, t in zip(grads, (c, f, alpha)):
        torch.testing.assert_close(a, t.grad)


def test_profiler_ranges_are_named():
    c, f = (leaf(t, torch.float32) for t in make_states(1, 2, 3, 3))
    alpha = make_alpha(2, torch.float32).requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = rev_coupling_forward(c, f, alpha, backend="reference")
        y.sum().backward()
        rev_coupling_invert(y.detach(), f.detach(), alpha.detach(), torch.ones_like(y), backend="reference")
    names = [e.name for e in prof.events()]
    assert names.count("restorenet::rev_coupling::fwd") == 1
    assert names.count("restorenet::rev_coupling::bwd") == 2  # autograd backward + invert


# -------------------------------------------------------------- backend choice
def test_cuda_backend_needs_the_kernels(monkeypatch):
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_backend("cuda", torch.device("cpu"), "rev_coupling", "rev_coupling_forward")
    # A built extension without this op's kernels: auto-selection skips cuda,
    # asking for it names the missing symbol.
    assert_cuda_needs_symbols(monkeypatch, ("rev_coupling_invert",), op="rev_coupling")
    c, f = (t.float() for t in make_states(1, 2, 3, 3))
    with pytest.raises(RuntimeError, match="cuda"):
        rev_coupling_forward(c, f, make_alpha(2, torch.float32), backend="cuda")


# -------------------------------------------------------------------- bad input
def _good():
    c, f, g = (t.float() for t in make_states(2, 3, 4, 5, count=3))
    return dict(c=c, f=f, alpha=make_alpha(3, torch.float32), grad=g)


@pytest.mark.parametrize("change,match", [
    (dict(c=torch.randn(3, 4, 5)), "c(_new)? must be 4-D"),
    (dict(c=torch.randint(0, 3, (2, 3, 4, 5))), "c(_new)? must have dtype"),
    (dict(f=torch.randn(2, 3, 4, 6)), "f must have the shape of c"),
    (dict(f=torch.randn(2, 3, 4, 5, dtype=torch.float64)), "f must have dtype"),
    (dict(f="f"), "f must be a torch.Tensor"),
    (dict(alpha=torch.rand(4)), "alpha must have shape \\[C\\] = \\[3\\]"),
    (dict(alpha=torch.rand(1, 3, 1, 1)), "alpha must be 1-D"),
    (dict(alpha=torch.rand(3, dtype=torch.float16)), "alpha must have dtype"),
])
@pytest.mark.parametrize("which", ["forward", "invert"])
def test_bad_input_names_the_argument(change, match, which):
    args = {**_good(), **change}
    with pytest.raises((TypeError, ValueError), match=match):
        if which == "forward":
            rev_coupling_forward(args["c"], args["f"], args["alpha"], backend="reference")
        else:
            rev_coupling_invert(args["c"], args["f"], args["alpha"], args["grad"], backend="reference")


def test_bad_grad_names_the_argument():
    args = _good()
    with pytest.raises(ValueError, match="grad_c_new must have the shape"):
        rev_coupling_invert(args["c"], args["f"], args["alpha"], args["grad"][:, :2])
    with pytest.raises(TypeError, match="grad_c_new must have dtype"):
        rev_coupling_invert(args["c"], args["f"], args["alpha"], args["grad"].half())
