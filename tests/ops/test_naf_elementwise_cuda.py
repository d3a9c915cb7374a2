"""layer_norm2d / simple_gate's CUDA backend (restorenet._C,
csrc/naf_elementwise.cu) on a GPU.

The shared backend test (test_naf_elementwise.py) runs the cuda backend
through its general cases; this file covers the kernels' own axes: every dtype
(bfloat16 included) x layout x shapes with odd C / odd H*W / batch 1 / many
channels (few pixels per shared-memory tile), agreement with the Triton
backend, determinism of the parameter gradients, the binding's contract.

Skipped without a CUDA device or without the compiled extension. The kernels'
indexing is also tested on CPU (tests/csrc/test_elementwise_emulated.py).
"""
from __future__ import annotations

import pytest
import torch

from restorenet.ops._backend import cuda_extension, triton_available
from restorenet.ops.naf_elementwise import layer_norm2d, simple_gate
from restorenet.testing import assert_within_baseline_error

from _cuda_helpers import cuda_backend_marks, layout, make_cuda

pytestmark = cuda_backend_marks("layer_norm2d_forward", "layer_norm2d")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LN_SHAPES = [(3, 5, 9, 11), (1, 3, 1, 1), (2, 1, 4, 3), (2, 70, 3, 5), (2, 64, 64, 64), (1, 1024, 5, 7)]
SG_SHAPES = [(3, 10, 9, 11), (1, 2, 1, 1), (2, 140, 3, 5), (2, 128, 64, 64)]


def plain_layer_norm2d(x, weight, bias, eps=1e-6):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return (x - mu) * torch.rsqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def run_ln(x, weight, bias, grad, backend):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = plain_layer_norm2d(*leaves) if backend == "plain" else layer_norm2d(*leaves, backend=backend)
    y.backward(grad.to(y.dtype))
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm2d_matches_float64_truth(shape, dtype, channels_last):
    x = make_cuda(shape, channels_last, 0, offset=2.0).to(dtype)
    grad = make_cuda(shape, channels_last, 1).to(dtype)
    weight = (1 + 0.3 * make_cuda((shape[1],), False, 2)).float()
    bias = make_cuda((shape[1],), False, 3).float()
    y_true, g_true = run_ln(x.double(), weight.double(), bias.double(), grad.double(), "plain")
    y_base, g_base = run_ln(x, weight.to(dtype), bias.to(dtype), grad, "plain")
    y, grads = run_ln(x, weight, bias, grad, "cuda")
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("y", y, y_true, y_base, dtype)
    for name, gc, gt, gb in zip(("dx", "dweight", "dbias"), grads, g_true, g_base):
        assert_within_baseline_error(name, gc, gt, gb, dtype)
    assert grads[0].is_contiguous(memory_format=layout(channels_last))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SG_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_simple_gate_matches_float64_truth(shape, dtype, channels_last):
    x = make_cuda(shape, channels_last, 0).to(dtype)
    n, c, h, w = shape
    grad = make_cuda((n, c // 2, h, w), channels_last, 1).to(dtype)
    leaves = {k: x.detach().to(d).requires_grad_() for k, d in (("true", torch.float64), ("base", dtype),
                                                                ("cuda", dtype))}
    outs = {}
    for k, t in leaves.items():
        a, b = t.chunk(2, dim=1)
        y = simple_gate(t, backend="cuda") if k == "cuda" else a * b
        y.backward(grad.to(y.dtype))
        outs[k] = y
    assert outs["cuda"].is_contiguous(memory_format=layout(channels_last))
    assert_within_baseline_error("y", outs["cuda"], outs["true"], outs["base"], dtype)
    assert_within_baseline_error("dx", leaves["cuda"].grad, leaves["true"].grad, leaves["base"].grad, dtype)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_agrees_with_triton(dtype, channels_last):
    x = make_cuda((2, 48, 33, 31), channels_last, 0, offset=1.0).to(dtype)
    grad = make_cuda((2, 48, 33, 31), channels_last, 1).to(dtype)
    weight, bias = 1 + 0.3 * make_cuda((48,), False, 2).float(), make_cuda((48,), False, 3).float()
    y_c, g_c = run_ln(x, weight, bias, grad, "cuda")
    y_t, g_t = run_ln(x, weight, bias, grad, "triton")
    torch.testing.assert_close(y_c, y_t)
    torch.testing.assert_close(g_c[0], g_t[0])
    for a, b in zip(g_c[1:], g_t[1:]):  # fp32 sums split differently
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    xg = make_cuda((2, 64, 33, 31), channels_last, 4).to(dtype)
    torch.testing.assert_close(simple_gate(xg, backend="cuda"), simple_gate(xg, backend="triton"))


def test_parameter_gradients_are_deterministic():
    x = make_cuda((4, 64, 65, 63), True, 0).float()
    grad = make_cuda((4, 64, 65, 63), True, 1).float()
    weight, bias = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    first = run_ln(x, weight, bias, grad, "cuda")[1]
    second = run_ln(x, weight, bias, grad, "cuda")[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_binding_contract():
    ext = cuda_extension()
    x = make_cuda((2, 6, 5, 4), False, 0).float()
    w, b = torch.ones(6, device="cuda"), torch.zeros(6, device="cuda")
    y, mean, rstd = ext.layer_norm2d_forward(x, w.half(), b.half(), 1e-6)  # parameters converted to float32
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (2, 5, 4)
    torch.testing.assert_close(y, plain_layer_norm2d(x, w, b))
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        ext.layer_norm2d_forward(x.cpu(), w, b, 1e-6)
    with pytest.raises(ValueError, match="weight must have shape"):
        ext.layer_norm2d_forward(x, w[:3], b, 1e-6)
    with pytest.raises(ValueError, match="even number of channels"):
        ext.simple_gate_forward(x[:, :5])
    with pytest.raises(ValueError, match="grad_y must have the shape"):
        ext.simple_gate_backward(x, x)
