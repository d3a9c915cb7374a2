"""slim_conv2d's CUDA backend (restorenet._C, csrc/slim_conv2d.cu on the
implicit-GEMM core csrc/conv_core.cuh) on a GPU.

The shared backend test (test_slim_conv2d.py) runs the cuda backend through
its general cases; this file covers the CUDA kernels' own axes as a full cross
product (dtype x layout x kernel x stride x padding x odd sizes, batch 1) at
mixed widths, multi-tile shapes, the binding's contract (no host sync on the
widths) and 64-bit indexing. The acceptance rule is restorenet.testing's: the
error against a float64 truth may be at most twice plain PyTorch's at the same
precision, plus a floor.

Skipped without a CUDA device or without the compiled extension. The kernels'
indexing, bounds and work skipping are also tested on CPU
(tests/csrc/test_slim_conv2d_emulated.py).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from restorenet.ops import slim_conv2d, slim_conv2d_reference
from restorenet.ops._backend import cuda_extension

from _cuda_helpers import (as_leaves, assert_output_and_grads, assert_runs_equal, cuda_backend_marks,
                           huge_fp16_input, spoiled)

pytestmark = cuda_backend_marks("slim_conv2d_forward", "slim_conv2d")

NAMES = ("x", "weight", "bias")


def make_inputs(n, c_in, c_out, h, w, k, bias=True, seed=0):
    """float64 tensors on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, device="cuda", generator=g)
    weight = torch.randn(c_out, c_in, k, k, dtype=torch.float64, device="cuda", generator=g) / (c_in * k * k) ** 0.5
    b = torch.randn(c_out, dtype=torch.float64, device="cuda", generator=g) if bias else None
    return [x, weight, b]


def mixed_widths(n, c_in, c_out):
    """Every sample different, including width 1 and the full width."""
    ins = [c_in, 1, max(1, c_in // 2), max(1, c_in - 3)][:n]
    outs = [1, c_out, max(1, c_out - 5), max(1, c_out // 3)][:n]
    return (torch.tensor(ins, dtype=torch.int32, device="cuda"), torch.tensor(outs, dtype=torch.int32, device="cuda"))


def as_dtype(inputs, dtype, channels_last=False):
    return as_leaves(inputs, NAMES, dtype, channels_last)


def run(inputs, in_w, out_w, grad_out, stride, padding, backend):
    y = slim_conv2d(*inputs, in_w, out_w, stride, padding, backend=backend)
    y.backward(grad_out.to(y.dtype))
    return y, [t.grad if t is not None else None for t in inputs]


def check_against_truth(inputs, in_w, out_w, dtype, channels_last, stride, padding):
    truth_in = as_dtype(inputs, torch.float64)
    y_true = slim_conv2d_reference(*truth_in, in_w, out_w, stride, padding)
    grad_out = torch.randn_like(y_true)
    y_true.backward(grad_out)
    y_base, g_base = run(as_dtype(inputs, dtype, channels_last), in_w, out_w, grad_out, stride, padding, "reference")
    y_cuda, g_cuda = run(as_dtype(inputs, dtype, channels_last), in_w, out_w, grad_out, stride, padding, "cuda")
    assert_output_and_grads(NAMES, inputs, dtype, channels_last, y_cuda, g_cuda, y_true, truth_in, y_base, g_base)
    for n, m in enumerate(out_w.tolist()):
        assert torch.equal(y_cuda[n, m:], torch.zeros_like(y_cuda[n, m:])), "inactive outputs must be exact zeros"


# dtype x layout x kernel x stride x padding x (batch, odd H, odd W)
AXES = list(itertools.product(
    [torch.float32, torch.float16, torch.bfloat16], [False, True], [1, 3], [1, 2], [0, 1],
    [(3, 9, 11), (1, 7, 5)]))


@pytest.mark.parametrize("dtype,channels_last,k,stride,padding,nhw", AXES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_float64_truth(dtype, channels_last, k, stride, padding, nhw):
    n, h, w = nhw
    inputs = make_inputs(n, 5, 6, h, w, k)
    check_against_truth(inputs, *mixed_widths(n, 5, 6), dtype, channels_last, stride, padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [
    (4, 70, 67, 21, 19, 3, 1, 1),    # two channel tiles each way, several pixel tiles and chunks
    (4, 64, 64, 32, 32, 3, 1, 1),    # DDS-Net-like layer (widths below: 16/32/48/64 mixed)
    (2, 3, 64, 17, 16, 3, 2, 1),     # RGB head, stride 2
    (2, 64, 3, 16, 16, 1, 1, 0),     # 1x1 tail
], ids=lambda s: "x".join(map(str, s)))
def test_multi_tile_shapes(dtype, shape):
    n, c_in, c_out, h, w, k, stride, padding = shape
    inputs = make_inputs(n, c_in, c_out, h, w, k, seed=1)
    in_w, out_w = mixed_widths(n, c_in, c_out)
    if (c_in, c_out) == (64, 64):
        in_w = torch.tensor([16, 64, 32, 48], dtype=torch.int32, device="cuda")
        out_w = torch.tensor([64, 16, 48, 32], dtype=torch.int32, device="cuda")
    for channels_last in (False, True):
        check_against_truth(inputs, in_w, out_w, dtype, channels_last, stride, padding)


def test_all_samples_at_one_width_match_a_sliced_conv():
    x, weight, b = as_dtype(make_inputs(3, 24, 32, 15, 13, 3, seed=3), torch.float32)
    y = slim_conv2d(x, weight, b, 16, 8, 1, 1, backend="cuda")
    expected = F.conv2d(x[:, :16], weight[:8, :16], b[:8], 1, 1)
    torch.testing.assert_close(y[:, :8], expected, rtol=2e-3, atol=2e-3)  # TF32-level tolerance
    assert torch.equal(y[:, 8:], torch.zeros_like(y[:, 8:]))


def test_results_are_deterministic():
    """No atomics: two runs give bitwise-equal outputs and gradients."""
    inputs = make_inputs(4, 40, 48, 33, 31, 3, seed=2)
    in_w, out_w = mixed_widths(4, 40, 48)
    grad_out = torch.randn(4, 48, 33, 31, device="cuda")
    first = run(as_dtype(inputs, torch.float32), in_w, out_w, grad_out, 1, 1, "cuda")
    second = run(as_dtype(inputs, torch.float32), in_w, out_w, grad_out, 1, 1, "cuda")
    assert_runs_equal(first, second)


# ------------------------------------------------------------------ the binding
def _args():
    x, weight, b = [t.detach() for t in as_dtype(make_inputs(2, 5, 4, 6, 5, 3), torch.float32)]
    in_w, out_w = mixed_widths(2, 5, 4)
    return dict(x=x, weight=weight, bias=b, in_width=in_w, out_width=out_w)


def test_binding_never_syncs_on_the_widths():
    """The widths stay on the device: no host read, so no synchronisation."""
    a = _args()
    dy = torch.randn(2, 4, 6, 5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_extension().slim_conv2d_forward(*a.values(), 1, 1)
        cuda_extension().slim_conv2d_backward(dy, *a.values(), 1, 1, [True, True, True])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_binding_returns_none_for_unneeded_and_missing_grads():
    a = _args()
    a["bias"] = None
    dy = torch.randn(2, 4, 6, 5, device="cuda")
    grads = cuda_extension().slim_conv2d_backward(dy, *a.values(), 1, 1, [False, True, True])
    assert len(grads) == 3 and grads[0] is None and grads[2] is None
    assert grads[1].shape == a["weight"].shape


def test_binding_accepts_non_contiguous_inputs():
    a = _args()
    a["x"] = torch.randn(2, 5, 6, 10, device="cuda")[..., ::2]  # neither contiguous nor channels_last
    a["in_width"] = torch.tensor(3, dtype=torch.int32, device="cuda").expand(2)  # stride 0
    y = cuda_extension().slim_conv2d_forward(*a.values(), 1, 1)
    expected = slim_conv2d_reference(a["x"], a["weight"], a["bias"], 3, a["out_width"], 1, 1)
    torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("change,error,match", [
    (dict(x="cpu"), ValueError, "x must be a CUDA tensor"),
    (dict(weight="half"), TypeError, "weight must have dtype"),
    (dict(in_width="int64"), TypeError, "in_width must have dtype"),
    (dict(out_width="cpu"), ValueError, "out_width must be on"),
    (dict(out_width="short"), ValueError, "out_width must have shape"),
    (dict(bias="short"), ValueError, "bias must have shape"),
])
def test_binding_rejects_bad_arguments(change, error, match):
    a = spoiled(_args(), change)
    with pytest.raises(error, match=match):
        cuda_extension().slim_conv2d_forward(*a.values(), 1, 1)


def test_runs_on_the_current_stream():
    a = _args()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = cuda_extension().slim_conv2d_forward(*a.values(), 1, 1)
    stream.synchronize()
    expected = slim_conv2d_reference(a["x"], a["weight"], a["bias"], a["in_width"], a["out_width"], 1, 1)
    torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """Offsets are 64-bit: float16 tensors of 2^31 + 65536 elements per channel pair."""
    x = huge_fp16_input(24)
    weight = torch.tensor([0.5, 0.25], dtype=torch.float16, device="cuda").view(2, 1, 1, 1)
    in_w = torch.tensor([1, 1], dtype=torch.int32, device="cuda")
    out_w = torch.tensor([2, 1], dtype=torch.int32, device="cuda")
    y = cuda_extension().slim_conv2d_forward(x, weight, None, in_w, out_w, 1, 0)
    assert y.shape == (2, 2, 32768, 32769)
    tail = x[1:, :, -4:].float()
    torch.testing.assert_close(y[1:, :1, -4:].float(), 0.5 * tail, rtol=1e-3, atol=1e-3)
    assert not y[1:, 1:, -4:].any()  # sample 1 has one output channel: the second is zero
    torch.testing.assert_close(y[:1, 1:, -4:].float(), 0.25 * x[:1, :, -4:].float(), rtol=1e-3, atol=1e-3)
    dx = cuda_extension().slim_conv2d_backward(y, x, weight, None, in_w, out_w, 1, 0, [True, False, False])[0]
    torch.testing.assert_close(dx[1:, :, -4:].float(), 0.25 * tail, rtol=1e-3, atol=1e-3)  # 0.5 * (0.5 x)
