"""csrc/hyper_conv2d.cu run on the CPU: the kernels compiled by the host
compiler against a small emulation of CUDA's thread model
(tests/csrc/emu/cuda_emu.h: real threads and barriers per block), called
through their C API with CPU tensors and compared with the reference op.

This checks the kernels' indexing, masking, tiling, split reductions and
launch geometry without a GPU. It cannot check what only hardware shows
(speed, memory coalescing, a compiler's device-code bugs); the GPU test
tests/ops/test_hyper_conv2d_cuda.py does that. Outputs and workspace are
filled with NaN first, so an element a kernel forgets to write fails.

The sanitizer tests (marked slow) build the same sources with
AddressSanitizer (every global load and store stays in bounds) and
ThreadSanitizer (no shared-memory race, i.e. no missing __syncthreads).
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from restorenet.ops.hyper_conv2d import _reference_backward, hyper_conv2d_reference

from emu_build import (CUDA_ERROR_INVALID_VALUE, DTYPE_CODE, EMU, assert_close_to, conv_shape, i64, load_harness, ptr,
                       run_sanitized)

# Max error relative to the largest reference value, for outputs rounded to the dtype.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def lib(tmp_path_factory, cuda_include_dir):
    return load_harness(tmp_path_factory, cuda_include_dir, "harness.cpp")


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))  # keeps t's strides


def emu_forward(lib, x, level, weight, weight_base, bias, bias_base, stride, padding, y=None):
    s = conv_shape(x, weight, stride, padding)
    if y is None:
        fmt = torch.channels_last if x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format
        y = torch.full((s[0], s[4], s[7], s[8]), float("nan"), dtype=x.dtype).contiguous(memory_format=fmt)
    rc = lib.emu_hyper_conv2d_forward(DTYPE_CODE[x.dtype], i64(s), ptr(x), i64(x.stride()), ptr(level),
                                      ptr(weight), ptr(weight_base), ptr(bias), ptr(bias_base), ptr(y),
                                      i64(y.stride()))
    assert rc == 0, f"forward returned CUDA error {rc}"
    return y


def emu_backward(lib, dy, x, level, weight, weight_base, bias, bias_base, stride, padding, needs=(True,) * 6):
    s = conv_shape(x, weight, stride, padding)
    code = DTYPE_CODE[x.dtype]
    grads = [None] * 6
    if needs[0]:
        grads[0] = _nan_like(x)
        rc = lib.emu_hyper_conv2d_backward_input(code, i64(s), ptr(dy), i64(dy.stride()), ptr(level),
                                                 ptr(weight), ptr(weight_base), ptr(grads[0]),
                                                 i64(grads[0].stride()))
        assert rc == 0, f"backward_input returned CUDA error {rc}"
    for i, t in enumerate((level, weight, weight_base, bias, bias_base), start=1):
        if needs[i] and t is not None:
            grads[i] = _nan_like(t)
    if any(g is not None for g in grads[1:]):
        nbytes = ctypes.c_int64()
        rc = lib.emu_hyper_conv2d_backward_params_workspace_size(code, i64(s), *map(ptr, grads[1:]), ptr(bias),
                                                                 ctypes.byref(nbytes))
        assert rc == 0
        workspace = torch.full((nbytes.value,), 0xFF, dtype=torch.uint8)  # NaN in float and double
        rc = lib.emu_hyper_conv2d_backward_params(code, i64(s), ptr(dy), i64(dy.stride()), ptr(x),
                                                  i64(x.stride()), ptr(level), ptr(weight), ptr(bias),
                                                  *map(ptr, grads[1:]), ptr(workspace), nbytes)
        assert rc == 0, f"backward_params returned CUDA error {rc}"
    return grads


def make_inputs(n, c_in, c_out, h, w, kh, kw, dtype, channels_last=False, bias=True, bias_base=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    level_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (0.5 * torch.randn(c_out, c_in, kh, kw, generator=g)).to(dtype)
    weight_base = (0.5 * torch.randn(c_out, c_in, kh, kw, generator=g)).to(dtype)
    b = torch.randn(c_out, generator=g).to(dtype) if bias else None
    bb = torch.randn(c_out, generator=g).to(dtype) if bias_base else None
    level = torch.rand(n, generator=g).to(level_dtype)  # a different level per sample
    return x, level, weight, weight_base, b, bb


def _f64(t):
    return None if t is None else t.double()


def reference(x, level, weight, weight_base, bias, bias_base, stride, padding, dy, needs=(True,) * 6):
    """The op's reference in float64 on the same (already rounded) inputs."""
    args = [_f64(t) for t in (x, level, weight, weight_base, bias, bias_base)]
    y = hyper_conv2d_reference(*args, stride, padding)
    grads = _reference_backward(_f64(dy), *args, stride, padding, list(needs))
    return y, grads


def assert_close(actual, expected, dtype, name):
    assert actual is not None and expected is not None, name
    assert_close_to(actual, expected, TOL[dtype], name)


def check_all(lib, n, c_in, c_out, h, w, kh, kw, stride, padding, dtype=torch.float64, channels_last=False,
              bias=True, bias_base=True, needs=(True,) * 6, seed=0):
    x, level, weight, weight_base, b, bb = make_inputs(n, c_in, c_out, h, w, kh, kw, dtype, channels_last,
                                                       bias, bias_base, seed)
    y = emu_forward(lib, x, level, weight, weight_base, b, bb, stride, padding)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    dy = dy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y_ref, grads_ref = reference(x, level, weight, weight_base, b, bb, stride, padding, dy, needs)
    assert_close(y, y_ref, dtype, "y")
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    grads = emu_backward(lib, dy, x, level, weight, weight_base, b, bb, stride, padding, needs)
    names = ("grad_x", "grad_level", "grad_weight", "grad_weight_base", "grad_bias", "grad_bias_base")
    inputs = (x, level, weight, weight_base, b, bb)
    for name, g, g_ref, t, need in zip(names, grads, grads_ref, inputs, needs):
        if not need or t is None:
            assert g is None, name
            continue
        assert g.dtype == t.dtype, name
        assert_close(g, g_ref, dtype, name)


# (n, c_in, c_out, h, w, kh, kw, stride, padding, channels_last)
GEOMETRIES = [
    (2, 3, 5, 7, 9, 3, 3, 1, 1, False),
    (2, 3, 5, 7, 9, 3, 3, 2, 1, True),
    (1, 70, 67, 5, 4, 1, 1, 1, 0, False),     # two channel tiles each way, 1x1
    (3, 4, 6, 19, 17, 3, 3, 2, 0, True),      # odd sizes, stride 2, no padding
    (2, 2, 3, 13, 11, 2, 3, 3, 2, False),     # non-square kernel, stride 3, padding 2
    (2, 3, 4, 18, 20, 3, 3, 1, 1, True),      # 360 output pixels: 6 pixel tiles, 2 chunks
    (1, 66, 3, 4, 3, 3, 3, 1, 1, True),       # c_in > 64: two tiles in backward-input
    (2, 1, 1, 5, 5, 5, 5, 1, 0, False),       # the kernel covers the image: 1x1 output
    (1, 2, 2, 3, 3, 3, 3, 1, 2, False),       # padding wider than needed: border outputs see only bias
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:9])) + ("-cl" if g[9] else ""))
def test_matches_reference_float64(lib, geometry):
    *sizes, channels_last = geometry
    check_all(lib, *sizes, dtype=torch.float64, channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,tensor_cores", [
    (torch.float32, False),
    (torch.float16, True), (torch.float16, False),
    (torch.bfloat16, True), (torch.bfloat16, False),
], ids=["float32", "float16-wmma", "float16-simt", "bfloat16-wmma", "bfloat16-simt"])
def test_matches_reference_other_dtypes(lib, monkeypatch, dtype, tensor_cores, channels_last):
    """16-bit types run on (emulated) tensor cores by default; RESTORENET_CUDA_TENSOR_CORES=0
    or a pre-Ampere device selects the SIMT kernels."""
    monkeypatch.setenv("RESTORENET_CUDA_TENSOR_CORES", "1" if tensor_cores else "0")
    check_all(lib, 2, 5, 7, 9, 8, 3, 3, 2, 1, dtype=dtype, channels_last=channels_last)


def test_tensor_cores_multi_tile(lib):
    """The WMMA path over two c_out tiles, two column tiles and two pixel chunks."""
    check_all(lib, 2, 9, 67, 18, 17, 3, 3, 1, 1, dtype=torch.float16, channels_last=True)


def test_pre_ampere_device_uses_simt(lib, monkeypatch):
    """bfloat16 WMMA needs sm_80: an sm_75 device must not get the tensor-core
    kernels. (The emulated kernels would run either way, so compare bits with
    the explicit SIMT choice.)"""
    args = make_inputs(2, 5, 7, 9, 8, 3, 3, torch.bfloat16)
    monkeypatch.setenv("RN_EMU_CC_MAJOR", "7")
    old = emu_forward(lib, *args, 1, 1)
    monkeypatch.setenv("RN_EMU_CC_MAJOR", "8")
    monkeypatch.setenv("RESTORENET_CUDA_TENSOR_CORES", "0")
    simt = emu_forward(lib, *args, 1, 1)
    monkeypatch.setenv("RESTORENET_CUDA_TENSOR_CORES", "1")
    wmma = emu_forward(lib, *args, 1, 1)
    assert torch.equal(old, simt)
    assert not torch.equal(old, wmma), "tensor-core and SIMT paths should round the kernel differently"


@pytest.mark.parametrize("bias,bias_base", [(False, False), (True, False), (False, True)])
def test_optional_biases(lib, bias, bias_base):
    check_all(lib, 2, 3, 4, 6, 5, 3, 3, 1, 1, bias=bias, bias_base=bias_base)


@pytest.mark.parametrize("needs", [
    (False, True, False, False, False, False),   # level only: <G, W> + <db, bias> still needs the bias column
    (False, False, False, True, False, False),   # weight_base only
    (True, False, False, False, False, False),   # x only: no parameter pass at all
    (False, False, False, False, True, True),    # biases only
], ids=["level", "weight_base", "x", "biases"])
def test_only_needed_grads(lib, needs):
    check_all(lib, 2, 3, 4, 6, 5, 3, 3, 1, 1, needs=needs)


def test_arbitrary_strides(lib):
    """The kernels index through strides: views need no copy."""
    x, level, weight, weight_base, b, bb = make_inputs(2, 6, 4, 9, 10, 3, 3, torch.float64)
    x_view = x[:, 1:5, ::2, 1:]                 # channel slice, row step 2, column offset
    y_out = torch.full((3, 5, 2, 9, 4), float("nan"), dtype=torch.float64)
    y_view = y_out[1].permute(1, 3, 0, 2)      # [2, 4, 5, 9], n between h and w in memory
    weight, weight_base = weight[:, :4].contiguous(), weight_base[:, :4].contiguous()
    emu_forward(lib, x_view, level, weight, weight_base, b, bb, 1, 1, y=y_view)
    dy = torch.randn(9, 2, 5, 4, dtype=torch.float64).permute(1, 3, 2, 0)  # [2, 4, 5, 9], w outermost
    y_ref, grads_ref = reference(x_view, level, weight, weight_base, b, bb, 1, 1, dy)
    assert_close(y_view, y_ref, torch.float64, "y")
    grads = emu_backward(lib, dy, x_view, level, weight, weight_base, b, bb, 1, 1)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_close(g, g_ref, torch.float64, f"grad {i}")


def test_empty_batch_gives_zero_parameter_grads(lib):
    x, level, weight, weight_base, b, bb = make_inputs(0, 3, 4, 5, 5, 3, 3, torch.float32)
    dy = torch.zeros(0, 4, 5, 5)
    grads = emu_backward(lib, dy, x, level, weight, weight_base, b, bb, 1, 1)
    assert grads[0].shape == x.shape and grads[1].shape == (0,)
    for g in grads[2:]:
        assert torch.equal(g, torch.zeros_like(g))


def test_split_count_changes_only_rounding_and_runs_are_deterministic(lib, monkeypatch):
    """The parameter pass splits its work by the device's SM count; partial sums
    are added in a fixed order, so a given device gives bitwise-equal results."""
    args = make_inputs(3, 4, 5, 17, 16, 3, 3, torch.float32, seed=3)
    dy = torch.randn(3, 5, 17, 16, generator=torch.Generator().manual_seed(4))
    results = {}
    for sms in ("1", "64", "64"):
        monkeypatch.setenv("RN_EMU_SM_COUNT", sms)
        results.setdefault(sms, []).append(emu_backward(lib, dy, *args, 1, 1))
    one, many, again = results["1"][0], results["64"][0], results["64"][1]
    for a, b, c in zip(one[1:], many[1:], again[1:]):
        assert torch.equal(b, c)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert not all(torch.equal(a, b) for a, b in zip(one[1:], many[1:])), "the split count had no effect"


def test_invalid_shapes_are_rejected(lib):
    x, level, weight, weight_base, b, bb = make_inputs(1, 2, 3, 5, 5, 3, 3, torch.float32)
    y = torch.empty(1, 3, 5, 5)
    s = conv_shape(x, weight, 1, 1)
    for bad in ({7: 4}, {9: 0}, {10: -1}, {5: 0}):  # wrong h_out, stride 0, negative padding, kh 0
        t = list(s)
        for i, v in bad.items():
            t[i] = v
        rc = lib.emu_hyper_conv2d_forward(0, i64(t), ptr(x), i64(x.stride()), ptr(level), ptr(weight),
                                          ptr(weight_base), ptr(b), ptr(bb), ptr(y), i64(y.stride()))
        assert rc == CUDA_ERROR_INVALID_VALUE, bad


# ------------------------------------------------------------------ sanitizers
def _sanitized_run(tmp_path, cuda_include_dir, sanitizer: str) -> str:
    return run_sanitized(tmp_path, cuda_include_dir, EMU / "sanitize_check.cpp", sanitizer)


@pytest.mark.slow
def test_no_out_of_bounds_access(tmp_path, cuda_include_dir):
    _sanitized_run(tmp_path, cuda_include_dir, "address")


@pytest.mark.slow
def test_no_shared_memory_race(tmp_path, cuda_include_dir):
    _sanitized_run(tmp_path, cuda_include_dir, "thread")
