"""layer_norm2d / simple_gate: every backend against the float64 spec and plain
PyTorch, the blocks.py modules, autograd, autocast, compile, errors.

On a CPU machine the fast backend is Triton under TRITON_INTERPRET=1; on a GPU
machine Triton (and CUDA once built) run on the device and bf16 is added.
"""
from __future__ import annotations

import pytest
import torch

from restorenet.models.blocks import LayerNorm2d, SimpleGate
from restorenet.ops import _backend, available_backends
from restorenet.ops.naf_elementwise import (layer_norm2d, layer_norm2d_reference, simple_gate,
                                            simple_gate_reference)
from restorenet.testing import assert_within_baseline_error

from _cuda_helpers import assert_cuda_needs_symbols

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST_BACKENDS = [b for b in available_backends(DEVICE, "layer_norm2d_forward") if b != "reference"]
BACKENDS = ["reference"] + FAST_BACKENDS
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# (N, C, H, W, channels_last): odd C, batch 1, 1x1 maps, C over one 64-wide block.
LN_SHAPES = [(3, 5, 9, 11, False), (2, 7, 5, 3, True), (1, 3, 1, 1, False), (1, 70, 3, 5, True),
             (2, 1, 4, 3, False)]
# SimpleGate needs an even C: a half of 1 channel, odd halves, one over 64 channels.
SG_SHAPES = [(3, 2, 9, 11, False), (2, 6, 5, 3, True), (1, 10, 1, 1, False), (1, 140, 3, 5, True)]


def layout(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def make(shape, channels_last=False, dtype=torch.float64, offset=0.0):
    t = (torch.randn(*shape, dtype=torch.float64, device=DEVICE) + offset).to(dtype)
    return t.contiguous(memory_format=layout(channels_last))


def leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_()


def plain_layer_norm2d(x, weight, bias, eps=1e-6):
    """blocks.LayerNorm2d's math at whatever dtype the inputs have."""
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return (x - mu) * torch.rsqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def plain_simple_gate(x):
    a, b = x.chunk(2, dim=1)
    return a * b


# ------------------------------------------------------------------ layer_norm2d
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,h,w,channels_last", LN_SHAPES)
def test_layer_norm2d_matches_float64_truth(backend, dtype, n, c, h, w, channels_last):
    # A mean offset makes the centring matter; inputs rounded to dtype first,
    # so every path sees the same values.
    x0 = make((n, c, h, w), channels_last, offset=1.5).to(dtype).double()
    w0 = (1 + 0.5 * torch.randn(c, dtype=torch.float64, device=DEVICE)).to(dtype).double()
    b0 = (0.5 * torch.randn(c, dtype=torch.float64, device=DEVICE)).to(dtype).double()
    grad = make((n, c, h, w), channels_last, dtype=dtype)

    truth = [leaf(t, torch.float64) for t in (x0, w0, b0)]
    plain_layer_norm2d(*truth).backward(grad.double())
    base = [leaf(t, dtype) for t in (x0, w0, b0)]
    plain_layer_norm2d(*base).backward(grad)  # plain PyTorch at dtype
    fast = [leaf(t, dtype) for t in (x0, w0, b0)]
    y = layer_norm2d(*fast, backend=backend)
    y.backward(grad)

    y_true = plain_layer_norm2d(*(t.detach() for t in truth))
    y_base = plain_layer_norm2d(*(t.detach() for t in base))
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("y", y, y_true, y_base, dtype)
    for name, t, b, f in zip(("x", "weight", "bias"), truth, base, fast):
        assert f.grad.dtype == dtype
        assert_within_baseline_error(f"d{name}", f.grad, t.grad, b.grad, dtype)
    assert fast[0].grad.is_contiguous(memory_format=layout(channels_last))


def test_layer_norm2d_module_equals_reference():
    """blocks.LayerNorm2d (the model's module) is the spec, at eps=1e-6."""
    module = LayerNorm2d(6).double()
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x = make((2, 6, 5, 4), offset=3.0)
    expected = module(x)
    torch.testing.assert_close(layer_norm2d_reference(x, module.weight, module.bias, module.eps), expected)
    torch.testing.assert_close(layer_norm2d(x, module.weight, module.bias, module.eps, backend="reference"),
                               expected)


def test_layer_norm2d_reference_gradcheck_float64():
    x = make((2, 3, 4, 5), offset=1.0).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, device=DEVICE).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(layer_norm2d_reference, (x, w, b))
    # The registered op's reference backend has its own closed-form backward.
    assert torch.autograd.gradcheck(lambda *a: layer_norm2d(*a, backend="reference"), (x, w, b))
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: layer_norm2d(*a, backend="reference"), (cl, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm2d_fp32_parameters_with_half_input(backend):
    """fp32 master weights with an fp16 activation: used as they are, grads in fp32."""
    x = leaf(make((2, 4, 3, 5)), torch.float16)
    w = (1 + torch.randn(4, device=DEVICE)).requires_grad_()
    b = torch.randn(4, device=DEVICE).requires_grad_()
    y = layer_norm2d(x, w, b, backend=backend)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.float16
    torch.testing.assert_close(y, layer_norm2d_reference(x.float(), w, b).half())
    torch.testing.assert_close(b.grad, torch.full_like(b, 30.0))  # sum of ones over N*H*W


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm2d_only_requested_gradients(backend):
    x = leaf(make((2, 4, 3, 5)), torch.float32)
    w, b = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)  # constants
    layer_norm2d(x, w, b, backend=backend).pow(2).sum().backward()
    assert x.grad is not None and w.grad is None and b.grad is None


def test_layer_norm2d_autocast_keeps_input_dtype():
    device = DEVICE.type
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    backend = "reference" if device == "cpu" else None  # the interpreter has no bf16
    w = (1 + torch.randn(4, device=DEVICE)).requires_grad_()
    b = torch.randn(4, device=DEVICE).requires_grad_()
    x32 = make((2, 4, 3, 3), dtype=torch.float32)
    with torch.autocast(device, dtype=dtype):
        y32 = layer_norm2d(x32, w, b, backend=backend)  # fp32 in: fp32 out, as F.layer_norm
        y_low = layer_norm2d(x32.to(dtype), w, b, backend=backend)  # low in: low out, fp32 stats
    assert y32.dtype == torch.float32 and y_low.dtype == dtype
    torch.testing.assert_close(y32, layer_norm2d_reference(x32, w, b))
    torch.testing.assert_close(y_low, layer_norm2d_reference(x32.to(dtype).float(), w, b).to(dtype))
    y_low.float().sum().backward()
    assert w.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm2d_is_deterministic(backend):
    x = make((4, 3, 17, 19), dtype=torch.float32)
    w, b = (torch.randn(3, device=DEVICE).requires_grad_() for _ in range(2))
    grads = []
    for _ in range(2):
        xl = leaf(x, torch.float32)
        grads.append(torch.autograd.grad(layer_norm2d(xl, w, b, backend=backend), (xl, w, b),
                                         torch.ones_like(x)))
    for a, c in zip(*grads):
        assert torch.equal(a, c)


@pytest.mark.skipif("triton" not in FAST_BACKENDS or not _backend.triton_interpreting(),
                    reason="the GPU tiling already runs on a GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_gpu_tiling_under_the_interpreter(monkeypatch, channels_last):
    """The interpreter normally gets a few big tiles; force the GPU tiling
    (several loop iterations per program, partial-sum rows) and, with a tiny
    channel block, the wide-C path that loops over channel blocks."""
    kernels = pytest.importorskip("restorenet_kernels.naf_elementwise")
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "MAX_PROGRAMS", 5)
    monkeypatch.setattr(kernels, "TILE", 64)
    x = make((2, 11, 7, 9), channels_last, dtype=torch.float32, offset=1.0)
    w, b = torch.randn(11, device=DEVICE), torch.randn(11, device=DEVICE)
    grad = torch.randn_like(x)
    for max_block_c in (1024, 4):
        monkeypatch.setattr(kernels, "MAX_BLOCK_C", max_block_c)
        grid, iters, blocks = kernels._norm_geometry(x)
        assert grid[0] > 1 and iters > 1 and (blocks["C_BLOCKS"] > 1) == (max_block_c == 4)
        out = []
        for backend in ("triton", "reference"):
            xs, ws, bs = leaf(x, torch.float32), w.clone().requires_grad_(), b.clone().requires_grad_()
            y = layer_norm2d(xs, ws, bs, backend=backend)
            out.append((y, *torch.autograd.grad(y, (xs, ws, bs), grad)))
        for o, r in zip(*out):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)
    xg = leaf(make((2, 140, 5, 3), channels_last, dtype=torch.float32), torch.float32)
    y = simple_gate(xg, backend="triton")
    torch.testing.assert_close(y, plain_simple_gate(xg))
    gy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, xg, gy)[0],
                               torch.autograd.grad(plain_simple_gate(xg), xg, gy)[0])


# ------------------------------------------------------------------- simple_gate
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,h,w,channels_last", SG_SHAPES)
def test_simple_gate_matches_float64_truth(backend, dtype, n, c, h, w, channels_last):
    x0 = make((n, c, h, w), channels_last).to(dtype).double()
    grad = make((n, c // 2, h, w), channels_last, dtype=dtype)
    truth, base, fast = leaf(x0, torch.float64), leaf(x0, dtype), leaf(x0, dtype)
    y_true = plain_simple_gate(truth)
    y_true.backward(grad.double())
    y_base = plain_simple_gate(base)
    y_base.backward(grad)
    y = simple_gate(fast, backend=backend)
    y.backward(grad)
    assert y.dtype == dtype and y.shape == (n, c // 2, h, w)
    assert y.is_contiguous(memory_format=layout(channels_last))
    assert fast.grad.is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("y", y, y_true, y_base, dtype)
    assert_within_baseline_error("dx", fast.grad, truth.grad, base.grad, dtype)


def test_simple_gate_module_equals_reference():
    x = make((2, 8, 3, 5))
    torch.testing.assert_close(simple_gate_reference(x), SimpleGate()(x))
    torch.testing.assert_close(simple_gate(x, backend="reference"), SimpleGate()(x))


def test_simple_gate_reference_gradcheck_float64():
    x = make((2, 6, 3, 4)).requires_grad_()
    assert torch.autograd.gradcheck(simple_gate_reference, (x,))
    assert torch.autograd.gradcheck(lambda t: simple_gate(t, backend="reference"), (x,))
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: simple_gate(t, backend="reference"), (cl,))


def test_simple_gate_autocast_keeps_input_dtype():
    device = DEVICE.type
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x = make((1, 4, 2, 3), dtype=torch.float32)
    with torch.autocast(device, dtype=dtype):
        assert simple_gate(x).dtype == torch.float32
        assert simple_gate(x.to(dtype)).dtype == dtype


# ------------------------------------------------------------------ both ops
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = leaf(make((0, 4, 3, 5)), torch.float32)
    w, b = (torch.randn(4, device=DEVICE).requires_grad_() for _ in range(2))
    y = layer_norm2d(x, w, b, backend=backend)
    assert y.shape == (0, 4, 3, 5)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(4, device=DEVICE)) and x.grad.shape == x.shape
    g = simple_gate(x, backend=backend)
    assert g.shape == (0, 2, 3, 5)
    g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, channels_last):
    x = make((2, 4, 3, 5), channels_last, dtype=torch.float32)
    w, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    ops = torch.ops.restorenet
    y, mean, rstd = ops.layer_norm2d(x, w, b, 1e-6, backend)
    torch.library.opcheck(ops.layer_norm2d.default,
                          (x.clone().requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-6, backend))
    torch.library.opcheck(ops.layer_norm2d_backward.default,
                          (torch.randn_like(y), x, w.detach(), mean, rstd, backend))
    torch.library.opcheck(ops.simple_gate.default, (x.clone().requires_grad_(), backend))
    torch.library.opcheck(ops.simple_gate_backward.default,
                          (torch.randn_like(x[:, :2]).contiguous(memory_format=layout(channels_last)), x,
                           backend))


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_torch_compile_fullgraph(backend):
    x = leaf(make((2, 6, 4, 4)), torch.float32)
    w, b = (torch.randn(6, device=DEVICE).requires_grad_() for _ in range(2))

    def stage(x, w, b):  # LN -> SG, as in NAFBlock's channel MLP (without the convs)
        return simple_gate(torch.relu(layer_norm2d(x, w, b, backend=backend)), backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(stage, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b)
    grads = torch.autograd.grad(out.sum(), (x, w, b))
    eager = stage(x, w, b)
    torch.testing.assert_close(out, eager)
    for a, e in zip(grads, torch.autograd.grad(eager.sum(), (x, w, b))):
        torch.testing.assert_close(a, e)


def test_profiler_ranges_are_named():
    x = leaf(make((1, 4, 3, 3)), torch.float32)
    w, b = (torch.randn(4, device=DEVICE).requires_grad_() for _ in range(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        simple_gate(layer_norm2d(x, w, b, backend="reference"), backend="reference").sum().backward()
    names = [e.name for e in prof.events()]
    for op in ("layer_norm2d", "simple_gate"):
        for phase in ("fwd", "bwd"):
            assert names.count(f"restorenet::{op}::{phase}") == 1, (op, phase)


def test_cuda_backend_needs_the_kernels(monkeypatch):
    x = make((1, 4, 3, 3), dtype=torch.float32)
    w, b = torch.ones(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="cuda"):
        layer_norm2d(x.cpu(), w, b, backend="cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        simple_gate(x.cpu(), backend="cuda")
    # A built extension without these kernels: auto-selection skips cuda,
    # asking for it names the missing symbol.
    assert_cuda_needs_symbols(monkeypatch, ("layer_norm2d_forward", "simple_gate_forward"))


# -------------------------------------------------------------------- bad input
def _good():
    return dict(x=make((2, 3, 4, 5), dtype=torch.float32), weight=torch.ones(3, device=DEVICE),
                bias=torch.zeros(3, device=DEVICE), eps=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(3, 4, 5)), "x must be 4-D"),
    (dict(x=torch.randint(0, 3, (2, 3, 4, 5))), "x must have dtype"),
    (dict(x=torch.randn(2, 0, 4, 5)), "x must have at least one channel"),
    (dict(x="x"), "x must be a torch.Tensor"),
    (dict(weight=torch.ones(4)), "weight must have shape \\[C\\] = \\[3\\]"),
    (dict(weight=torch.ones(1, 3, 1, 1)), "weight must be 1-D"),
    (dict(weight=torch.ones(3, dtype=torch.float64)), "weight must have dtype"),
    (dict(bias=torch.zeros(2)), "bias must have shape \\[C\\] = \\[3\\]"),
    (dict(bias=torch.zeros(3, dtype=torch.float16)), "bias must have dtype"),
    (dict(eps=-1.0), "eps must be"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(eps="1e-6"), "eps must be"),
])
def test_layer_norm2d_bad_input_names_the_argument(change, match):
    args = {**_good(), **change}
    with pytest.raises((TypeError, ValueError), match=match):
        layer_norm2d(args["x"], args["weight"], args["bias"], args["eps"], backend="reference")


def test_layer_norm2d_half_parameters_need_half_input():
    args = _good()
    with pytest.raises(TypeError, match="weight must have dtype"):
        layer_norm2d(args["x"], args["weight"].half(), args["bias"].half())


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 5, 3, 3), "x must have an even number of channels"),
    (torch.randn(2, 0, 3, 3), "x must have an even number of channels"),
    (torch.randn(5, 3, 3), "x must be 4-D"),
    (torch.randint(0, 3, (2, 4, 3, 3)), "x must have dtype"),
])
def test_simple_gate_bad_input_names_the_argument(x, match):
    with pytest.raises((TypeError, ValueError), match=match):
        simple_gate(x, backend="reference")
