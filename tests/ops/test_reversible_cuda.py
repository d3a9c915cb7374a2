"""rev_coupling's CUDA backend (restorenet._C, csrc/reversible.cu) on a GPU.

The shared backend test (test_reversible.py) runs the cuda backend through its
general cases; this file covers the kernels' own axes: every dtype (bfloat16
included) x layout x shapes that do and do not allow 16-byte vector access,
agreement with the Triton backend, determinism, the binding's contract. The
acceptance rule is restorenet.testing's (error vs a float64 truth at most
twice plain PyTorch's at the same precision, plus a floor).

Skipped without a CUDA device or without the compiled extension. The kernels'
indexing is also tested on CPU (tests/csrc/test_elementwise_emulated.py).
"""
from __future__ import annotations

import pytest
import torch

from restorenet.ops._backend import cuda_extension, triton_available
from restorenet.ops.reversible import rev_coupling_forward, rev_coupling_invert
from restorenet.testing import assert_within_baseline_error

from _cuda_helpers import cuda_backend_marks, layout, make_cuda

pytestmark = cuda_backend_marks("rev_coupling_invert", "rev_coupling")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd everything; batch 1 1x1; vector-friendly in both layouts; C > 64, not a multiple of 8; a bigger map
SHAPES = [(3, 5, 9, 11), (1, 3, 1, 1), (2, 16, 8, 12), (2, 70, 3, 5), (4, 64, 64, 64)]


def make_alpha(c, seed=9):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mag = 0.25 + 0.75 * torch.rand(c, dtype=torch.float64, device="cuda", generator=g)
    return torch.where(torch.rand(c, device="cuda", generator=g) < 0.5, -mag, mag).float().double()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_truth(shape, dtype, channels_last):
    x, f, g = (make_cuda(shape, channels_last, s).to(dtype).double() for s in range(3))
    alpha = make_alpha(shape[1])
    a = alpha.view(1, -1, 1, 1)
    low = [t.to(dtype).contiguous(memory_format=layout(channels_last)) for t in (x, f, g)]

    out = rev_coupling_forward(low[0], low[1], alpha.float(), backend="cuda")
    assert out.dtype == dtype and out.is_contiguous(memory_format=layout(channels_last))
    base = a.to(dtype) * low[0] + low[1]
    assert_within_baseline_error("forward", out, a * x + f, base, dtype)

    c, gc, ga = rev_coupling_invert(low[0], low[1], alpha.float(), low[2], backend="cuda")
    c_true = (x - f) / a
    c_base = (low[0] - low[1]) / a.to(dtype)
    assert c.is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("c", c, c_true, c_base, dtype)
    assert_within_baseline_error("grad_c", gc, a * g, a.to(dtype) * low[2], dtype)
    assert ga.dtype == torch.float32
    assert_within_baseline_error("grad_alpha", ga, (g * c_true).sum((0, 2, 3)),
                                 (low[2] * c_base).float().sum((0, 2, 3)), dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_float64(channels_last):
    x, f, g = (make_cuda((2, 7, 9, 11), channels_last, s) for s in range(3))
    alpha = make_alpha(7)
    a = alpha.view(1, -1, 1, 1)
    torch.testing.assert_close(rev_coupling_forward(x, f, alpha, backend="cuda"), a * x + f)
    c, gc, ga = rev_coupling_invert(x, f, alpha, g, backend="cuda")
    torch.testing.assert_close(c, (x - f) / a)
    torch.testing.assert_close(gc, a * g)
    torch.testing.assert_close(ga, (g * (x - f) / a).sum((0, 2, 3)))


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_agrees_with_triton(dtype, channels_last):
    x, f, g = (make_cuda((2, 32, 33, 31), channels_last, s).to(dtype) for s in range(3))
    alpha = make_alpha(32).float()
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else {}
    for cuda_t, triton_t in zip(rev_coupling_invert(x, f, alpha, g, backend="cuda"),
                                rev_coupling_invert(x, f, alpha, g, backend="triton")):
        if cuda_t.dtype == torch.float32 and cuda_t.dim() == 1:  # differently split fp32 sums
            torch.testing.assert_close(cuda_t, triton_t, rtol=1e-4, atol=1e-3)
        else:
            torch.testing.assert_close(cuda_t, triton_t, **tol)
    torch.testing.assert_close(rev_coupling_forward(x, f, alpha, backend="cuda"),
                               rev_coupling_forward(x, f, alpha, backend="triton"), rtol=1e-3, atol=1e-3)


def test_autograd_through_cuda_backward():
    x, f = (make_cuda((2, 6, 9, 10), True, s).float().requires_grad_() for s in range(2))
    alpha = make_alpha(6).float().requires_grad_()
    grad = make_cuda((2, 6, 9, 10), True, 5).float()
    rev_coupling_forward(x, f, alpha, backend="cuda").backward(grad)
    assert torch.equal(f.grad, grad)
    torch.testing.assert_close(x.grad, alpha.detach().view(1, -1, 1, 1) * grad)
    torch.testing.assert_close(alpha.grad, (grad * x.detach()).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


def test_results_are_deterministic():
    x, f, g = (make_cuda((4, 48, 65, 63), True, s).float() for s in range(3))
    alpha = make_alpha(48).float()
    first = rev_coupling_invert(x, f, alpha, g, backend="cuda")
    second = rev_coupling_invert(x, f, alpha, g, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_binding_contract():
    ext = cuda_extension()
    x, f, g = (make_cuda((2, 4, 5, 6), False, s).float() for s in range(3))
    alpha = make_alpha(4).float()
    mixed = f.contiguous(memory_format=torch.channels_last)  # another layout: no copy, strided path
    torch.testing.assert_close(ext.rev_coupling_forward(x, mixed, alpha), alpha.view(1, -1, 1, 1) * x + f)
    grad_c, grad_alpha = ext.rev_coupling_backward(g, x, alpha)
    torch.testing.assert_close(grad_c, alpha.view(1, -1, 1, 1) * g)
    with pytest.raises(ValueError, match="c must be a CUDA tensor"):
        ext.rev_coupling_forward(x.cpu(), f, alpha)
    with pytest.raises(TypeError, match="f must have dtype"):
        ext.rev_coupling_forward(x, f.half(), alpha)
    with pytest.raises(ValueError, match="alpha must have shape"):
        ext.rev_coupling_forward(x, f, alpha[:2])
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = ext.rev_coupling_forward(x, f, alpha)
    stream.synchronize()
    torch.testing.assert_close(out, alpha.view(1, -1, 1, 1) * x + f)
