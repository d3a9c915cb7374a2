"""hyper_conv2d's CUDA backend (restorenet._C, csrc/hyper_conv2d.cu) on a GPU.

The shared backend test (test_hyper_conv2d.py) runs the cuda backend through
its general cases; this file covers the CUDA kernels' own axes as a full cross
product (dtype x layout x kernel x stride x padding x level x odd sizes, batch
1), multi-tile shapes, the binding's contract and 64-bit indexing. The
acceptance rule is restorenet.testing's: the error against a float64 truth may
be at most twice plain PyTorch's at the same precision, plus a floor.

Skipped without a CUDA device or without the compiled extension. The
kernels' indexing is also tested on CPU (tests/csrc/test_hyper_conv2d_emulated.py).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from restorenet.ops import hyper_conv2d, hyper_conv2d_reference
from restorenet.ops._backend import cuda_extension

from _cuda_helpers import (as_leaves, assert_output_and_grads, assert_runs_equal, cuda_backend_marks,
                           huge_fp16_input, spoiled)

pytestmark = cuda_backend_marks()

NAMES = ("x", "level", "weight", "weight_base", "bias", "bias_base")


def make_inputs(n, c_in, c_out, h, w, k, scalar_level=False, bias=True, seed=0):
    """float64 tensors on the GPU (level: a Python float when ``scalar_level``)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, device="cuda", generator=g)
    level = 0.6 if scalar_level else torch.rand(n, dtype=torch.float64, device="cuda", generator=g)
    weight = 0.2 * torch.randn(c_out, c_in, k, k, dtype=torch.float64, device="cuda", generator=g)
    weight_base = 0.2 * torch.randn(c_out, c_in, k, k, dtype=torch.float64, device="cuda", generator=g)
    b = torch.randn(c_out, dtype=torch.float64, device="cuda", generator=g) if bias else None
    bb = torch.randn(c_out, dtype=torch.float64, device="cuda", generator=g) if bias else None
    return [x, level, weight, weight_base, b, bb]


def as_dtype(inputs, dtype, channels_last=False):
    """Leaves of ``dtype`` (level float32 unless float64; a float level stays a float)."""
    return as_leaves(inputs, NAMES, dtype, channels_last, fp32_names=("level",))


def run(inputs, grad_out, stride, padding, backend):
    y = hyper_conv2d(*inputs, stride=stride, padding=padding, backend=backend)
    y.backward(grad_out.to(y.dtype))
    return y, [t.grad if isinstance(t, torch.Tensor) else None for t in inputs]


def check_against_truth(inputs, dtype, channels_last, stride, padding):
    truth_in = as_dtype(inputs, torch.float64)
    if not isinstance(truth_in[1], torch.Tensor):
        truth_in[1] = torch.full((inputs[0].shape[0],), truth_in[1], dtype=torch.float64, device="cuda")
    y_true = hyper_conv2d_reference(*truth_in, stride=stride, padding=padding)
    grad_out = torch.randn_like(y_true)
    y_true.backward(grad_out)
    y_base, g_base = run(as_dtype(inputs, dtype, channels_last), grad_out, stride, padding, "reference")
    y_cuda, g_cuda = run(as_dtype(inputs, dtype, channels_last), grad_out, stride, padding, "cuda")
    assert_output_and_grads(NAMES, inputs, dtype, channels_last, y_cuda, g_cuda, y_true, truth_in, y_base, g_base)


# dtype x layout x kernel x stride x padding x scalar level x (batch, odd H, odd W)
AXES = list(itertools.product(
    [torch.float32, torch.float16, torch.bfloat16], [False, True], [1, 3], [1, 2], [0, 1], [False, True],
    [(3, 9, 11), (1, 7, 5)]))


@pytest.mark.parametrize("dtype,channels_last,k,stride,padding,scalar_level,nhw", AXES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_matches_float64_truth(dtype, channels_last, k, stride, padding, scalar_level, nhw):
    n, h, w = nhw
    inputs = make_inputs(n, 5, 6, h, w, k, scalar_level)
    check_against_truth(inputs, dtype, channels_last, stride, padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [
    (2, 70, 67, 21, 19, 3, 1, 1),    # two channel tiles each way, 399 pixels: several pixel tiles and chunks
    (4, 64, 64, 32, 32, 3, 1, 1),    # HyperRes-like layer
    (2, 3, 64, 17, 16, 3, 2, 1),     # RGB head, stride 2
    (2, 64, 3, 16, 16, 1, 1, 0),     # 1x1 tail
], ids=lambda s: "x".join(map(str, s)))
def test_multi_tile_shapes(dtype, shape):
    n, c_in, c_out, h, w, k, stride, padding = shape
    inputs = make_inputs(n, c_in, c_out, h, w, k, seed=1)
    for channels_last in (False, True):
        check_against_truth(inputs, dtype, channels_last, stride, padding)


def test_results_are_deterministic():
    """No atomics: two runs give bitwise-equal outputs and gradients."""
    inputs = make_inputs(3, 16, 24, 33, 31, 3, seed=2)
    grad_out = torch.randn(3, 24, 33, 31, device="cuda")
    first = run(as_dtype(inputs, torch.float32), grad_out, 1, 1, "cuda")
    second = run(as_dtype(inputs, torch.float32), grad_out, 1, 1, "cuda")
    assert_runs_equal(first, second)


# ------------------------------------------------------------------ the binding
def _args():
    """Plain float32 arguments of the binding (no autograd)."""
    return [t.detach() for t in as_dtype(make_inputs(2, 3, 4, 6, 5, 3), torch.float32)]


def test_binding_returns_none_for_unneeded_and_missing_grads():
    x, level, weight, weight_base, b, bb = _args()
    dy = torch.randn(2, 4, 6, 5, device="cuda")
    grads = cuda_extension().hyper_conv2d_backward(dy, x, level, weight, weight_base, None, bb, 1, 1,
                                                   [False, True, False, True, True, True])
    assert len(grads) == 6
    assert grads[0] is None and grads[2] is None and grads[4] is None  # not needed / bias is None
    assert grads[1].shape == (2,) and grads[3].shape == weight.shape and grads[5].shape == (4,)


def test_binding_accepts_non_contiguous_inputs():
    x, level, weight, weight_base, b, bb = _args()
    wide = torch.randn(2, 3, 6, 10, device="cuda")[..., ::2]  # neither contiguous nor channels_last
    shared = torch.tensor(0.3, device="cuda").expand(2)     # a broadcast level: stride 0
    weight_t = weight.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    y = cuda_extension().hyper_conv2d_forward(wide, shared, weight_t, weight_base, b, bb, 1, 1)
    assert y.is_contiguous()
    torch.testing.assert_close(y, hyper_conv2d_reference(wide, shared, weight, weight_base, b, bb, 1, 1))


@pytest.mark.parametrize("change,error,match", [
    (dict(x="cpu"), ValueError, "x must be a CUDA tensor"),
    (dict(weight="half"), TypeError, "weight must have dtype"),
    (dict(level="double"), TypeError, "level must have dtype"),
    (dict(level="short"), ValueError, "level must have shape"),
    (dict(bias="short"), ValueError, "bias must have shape"),
])
def test_binding_rejects_bad_arguments(change, error, match):
    args = spoiled(dict(zip(NAMES, _args())), change)
    with pytest.raises(error, match=match):
        cuda_extension().hyper_conv2d_forward(*args.values(), 1, 1)


def test_runs_on_the_current_stream():
    x, level, weight, weight_base, b, bb = _args()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = cuda_extension().hyper_conv2d_forward(x, level, weight, weight_base, b, bb, 1, 1)
    stream.synchronize()
    torch.testing.assert_close(y, hyper_conv2d_reference(x, level, weight, weight_base, b, bb, 1, 1))


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """Offsets are 64-bit: a float16 input of 2^31 + 65536 elements (4 GiB)."""
    x = huge_fp16_input(12)
    weight = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float16, device="cuda")
    weight_base = torch.full_like(weight, 0.25)
    level = torch.tensor([1.0, 2.0], device="cuda")
    y = cuda_extension().hyper_conv2d_forward(x, level, weight, weight_base, None, None, 1, 0)
    expected = F.conv2d(x[1:, :, -4:].float(), (2.0 * 0.5 + 0.25) * torch.ones(1, 1, 1, 1, device="cuda"))
    torch.testing.assert_close(y[1:, :, -4:].float(), expected, rtol=1e-3, atol=1e-3)
    dx = cuda_extension().hyper_conv2d_backward(y, x, level, weight, weight_base, None, None, 1, 0,
                                                [True, False, False, False, False, False])[0]
    torch.testing.assert_close(dx[1:, :, -4:].float(), 1.25 * y[1:, :, -4:].float(), rtol=1e-3, atol=1e-3)
