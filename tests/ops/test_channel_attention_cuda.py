"""channel_attention / scaled_residual's CUDA backend (restorenet._C,
csrc/channel_attention.cu) on a GPU.

The shared backend test (test_channel_attention.py) runs the cuda backend
through its general cases; this file covers the CUDA kernels' own axes as a
cross product (dtype x layout x gated x odd sizes, batch 1), shapes with many
pixel splits and channel tiles, the binding's contract and determinism. The
acceptance rule is restorenet.testing's: the error against a float64 truth may
be at most twice plain PyTorch's at the same precision, plus a floor.

Skipped without a CUDA device or without the compiled extension. The kernels'
indexing is also tested on CPU (tests/csrc/test_channel_attention_emulated.py).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from restorenet.ops import channel_attention, scaled_residual
from restorenet.ops._backend import cuda_extension
from restorenet.testing import assert_within_baseline_error

from _cuda_helpers import cuda_backend_marks, layout

pytestmark = cuda_backend_marks("channel_attention_apply", "channel_attention")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def plain_sca(x, weight, bias, gated):
    if gated:
        a, b = x.chunk(2, dim=1)
        x = a * b
    return x * F.conv2d(F.adaptive_avg_pool2d(x, 1), weight, bias)


def run_three(fn, inputs, activations, dtype, grad, channels_last):
    """(truth, baseline, cuda) outputs and gradients: fp64 PyTorch, PyTorch at dtype, the op at
    dtype. ``activations``: indices of the inputs that take the layout."""
    out = []
    for kind in ("truth", "base", "cuda"):
        d = torch.float64 if kind == "truth" else dtype
        leaves = [t.detach().to(d) for t in inputs]
        leaves = [t.contiguous(memory_format=layout(channels_last)) if i in activations else t
                  for i, t in enumerate(leaves)]
        for t in leaves:
            t.requires_grad_()
        y = fn(kind, *leaves)
        grads = torch.autograd.grad(y, leaves, grad.to(d))
        out.append((y, grads))
    return out


@pytest.mark.parametrize("dtype,channels_last,gated,shape", list(itertools.product(
    DTYPES, [False, True], [True, False], [(1, 2, 1, 1), (3, 10, 7, 9), (2, 70, 33, 17), (1, 64, 128, 96)])))
def test_channel_attention_cuda(dtype, channels_last, gated, shape):
    n, cx, h, w = shape
    c = cx // 2 if gated else cx
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64, device="cuda", generator=g) + 0.5).to(dtype).double()
    wt = (torch.randn(c, c, 1, 1, dtype=torch.float64, device="cuda", generator=g) * c ** -0.5).to(dtype).double()
    b = torch.randn(c, dtype=torch.float64, device="cuda", generator=g).to(dtype).double()
    grad = torch.randn(n, c, h, w, dtype=torch.float64, device="cuda", generator=g).to(dtype)
    grad = grad.contiguous(memory_format=layout(channels_last))

    def fn(kind, x, wt, b):
        if kind == "cuda":
            return channel_attention(x, wt, b, gated=gated, backend="cuda")
        return plain_sca(x, wt, b, gated)

    (yt, gt), (yb, gb), (yc, gc) = run_three(fn, (x, wt, b), (0,), dtype, grad, channels_last)
    assert yc.dtype == dtype and yc.is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("u", yc, yt, yb, dtype)
    for name, t, bb, cc in zip(("x", "weight", "bias"), gt, gb, gc):
        assert_within_baseline_error(f"d{name}", cc, t, bb, dtype)


@pytest.mark.parametrize("dtype,channels_last,shape", list(itertools.product(
    DTYPES, [False, True], [(1, 1, 1, 1), (3, 5, 7, 9), (2, 70, 33, 17), (4, 32, 128, 128)])))
def test_scaled_residual_cuda(dtype, channels_last, shape):
    g = torch.Generator(device="cuda").manual_seed(1)
    inp, z, grad = (torch.randn(shape, dtype=torch.float64, device="cuda", generator=g).to(dtype) for _ in range(3))
    beta = torch.randn(1, shape[1], 1, 1, dtype=torch.float64, device="cuda", generator=g).to(dtype)
    grad = grad.contiguous(memory_format=layout(channels_last))

    def fn(kind, inp, beta, z):
        return scaled_residual(inp, beta, z, backend="cuda") if kind == "cuda" else inp + beta * z

    (yt, gt), (yb, gb), (yc, gc) = run_three(fn, (inp, beta, z), (0, 2), dtype, grad, channels_last)
    assert yc.dtype == dtype and yc.is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("y", yc, yt, yb, dtype)
    for name, t, bb, cc in zip(("inp", "beta", "z"), gt, gb, gc):
        assert_within_baseline_error(f"d{name}", cc, t, bb, dtype)


def test_float64_matches_reference_to_rounding():
    x = torch.randn(2, 12, 19, 23, dtype=torch.float64, device="cuda").contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(6, 6, dtype=torch.float64, device="cuda"), torch.randn(6, dtype=torch.float64, device="cuda")
    beta = torch.randn(6, dtype=torch.float64, device="cuda")
    out = {}
    for backend in ("reference", "cuda"):
        leaves = [t.clone().requires_grad_() for t in (x, wt, b, beta)]
        u = channel_attention(*leaves[:3], gated=True, backend=backend)
        y = scaled_residual(u, leaves[3], u, backend=backend)
        out[backend] = (y, *torch.autograd.grad(y, leaves, torch.ones_like(y)))
    for a, r in zip(out["cuda"], out["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


def test_deterministic_and_fp32_master_parameters():
    x = torch.randn(4, 64, 64, 64, device="cuda", dtype=torch.float16)
    wt = torch.randn(32, 32, 1, 1, device="cuda", requires_grad=True)
    b = torch.randn(32, device="cuda", requires_grad=True)
    beta = torch.randn(1, 32, 1, 1, device="cuda", requires_grad=True)
    runs = []
    for _ in range(2):
        xs = x.clone().requires_grad_()
        u = channel_attention(xs, wt, b, gated=True, backend="cuda")
        y = scaled_residual(u, beta, u, backend="cuda")
        assert y.dtype == torch.float16
        runs.append((y, *torch.autograd.grad(y.float().sum(), (xs, wt, b, beta))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    assert runs[0][2].dtype == torch.float32 and runs[0][4].dtype == torch.float32


def test_empty_batch():
    x = torch.randn(0, 8, 5, 5, device="cuda", requires_grad=True)
    wt = torch.randn(4, 4, device="cuda", requires_grad=True)
    beta = torch.randn(4, device="cuda", requires_grad=True)
    u = channel_attention(x, wt, gated=True, backend="cuda")
    scaled_residual(u, beta, u, backend="cuda").sum().backward()
    assert torch.equal(wt.grad, torch.zeros_like(wt)) and torch.equal(beta.grad, torch.zeros_like(beta))


def test_binding_names_bad_arguments():
    ext = cuda_extension()
    x = torch.randn(1, 5, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="x must have an even number"):
        ext.channel_attention_apply(x, torch.zeros(1, 2, device="cuda"), True)
    with pytest.raises(ValueError, match="scale must have shape"):
        ext.channel_attention_apply(x, torch.zeros(1, 4, device="cuda"), False)
    with pytest.raises(ValueError, match="z must have the shape of inp"):
        ext.scaled_residual_forward(x, torch.zeros(5, device="cuda"), x[:, :4])
    with pytest.raises(TypeError, match="z must have dtype"):
        ext.scaled_residual_forward(x, torch.zeros(5, device="cuda"), x.half())
