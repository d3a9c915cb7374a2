"""csrc/channel_attention.cu run on the CPU: the kernels compiled by the host
compiler against the emulation of CUDA's thread model (tests/csrc/emu/cuda_emu.h:
real threads and barriers per block), called through their C API with CPU
tensors and compared with the op's reference primitives in float64.

This checks indexing, masking, the reduction tiles and their fixed-order
shared-memory sums, the pixel splits and the launch geometry without a GPU; it
cannot check speed or coalescing (tests/ops/test_channel_attention_cuda.py does
the GPU side). Outputs and workspaces are filled with NaN first, so an element
a kernel forgets to write fails.
"""
from __future__ import annotations

import ctypes
import importlib

import pytest
import torch

from emu_build import (EMU, DTYPE_CODE, assert_close_to, i64, load_harness, nan_filled, poisoned_workspace, ptr,
                       run_sanitized)

ref = importlib.import_module("restorenet.ops.channel_attention")

# Max error relative to the largest reference value, for outputs rounded to the dtype.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def lib(tmp_path_factory, cuda_include_dir):
    return load_harness(tmp_path_factory, cuda_include_dir, "channel_attention_harness.cpp")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def assert_close(actual, expected, dtype, name):
    assert_close_to(actual, expected, TOL[dtype], name)


# ----------------------------------------------------------- channel attention
def emu_ca_reduce(lib, x, du, gated, c):
    n, _, h, w = x.shape
    shape = i64([n, c, h, w])
    nbytes = ctypes.c_int64()
    assert lib.emu_ca_reduce_workspace_size(DTYPE_CODE[x.dtype], shape, int(gated), ctypes.byref(nbytes)) == 0
    sums = nan_filled((n, c), _acc(x.dtype))
    ws = poisoned_workspace(nbytes.value)
    du_strides = du.stride() if du is not None else (0, 0, 0, 0)
    rc = lib.emu_ca_reduce(DTYPE_CODE[x.dtype], shape, int(gated), ptr(x), i64(x.stride()), ptr(du),
                           i64(du_strides), ptr(sums), ptr(ws), nbytes)
    assert rc == 0, f"reduce returned CUDA error {rc}"
    return sums


def emu_ca_apply(lib, x, scale, gated, channels_last):
    n, cx, h, w = x.shape
    c = cx // 2 if gated else cx
    u = nan_filled((n, c, h, w), x.dtype, channels_last)
    rc = lib.emu_ca_apply(DTYPE_CODE[x.dtype], i64([n, c, h, w]), int(gated), ptr(x), i64(x.stride()),
                          ptr(scale), ptr(u), i64(u.stride()))
    assert rc == 0, f"apply returned CUDA error {rc}"
    return u


def emu_ca_backward_input(lib, du, x, scale, q, gated, channels_last):
    n, c, h, w = du.shape
    dx = nan_filled(tuple(x.shape), x.dtype, channels_last)
    rc = lib.emu_ca_backward_input(DTYPE_CODE[x.dtype], i64([n, c, h, w]), int(gated), ptr(du), i64(du.stride()),
                                   ptr(x), i64(x.stride()), ptr(scale), ptr(q), ptr(dx), i64(dx.stride()))
    assert rc == 0, f"backward_input returned CUDA error {rc}"
    return dx


def check_channel_attention(lib, n, cx, h, w, gated, dtype=torch.float64, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = cx // 2 if gated else cx
    x = _layout((torch.randn(n, cx, h, w, generator=g) + 0.3).to(dtype), channels_last)
    du = _layout(torch.randn(n, c, h, w, generator=g).to(dtype), channels_last)
    acc = _acc(dtype)
    scale = torch.randn(n, c, generator=g).to(acc)
    q = torch.randn(n, c, generator=g).to(acc)
    x64, du64 = x.double(), du.double()
    for grad in (None, du):
        got = emu_ca_reduce(lib, x, grad, gated, c)
        want = ref._reference_ca_reduce(x64, None if grad is None else du64, gated, channels_last)
        assert_close(got, want, dtype, "sums" if grad is None else "grad sums")
    u = emu_ca_apply(lib, x, scale, gated, channels_last)
    assert_close(u, ref._reference_ca_apply(x64, scale.double(), gated, channels_last), dtype, "u")
    assert u.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    dx = emu_ca_backward_input(lib, du, x, scale, q, gated, channels_last)
    want = ref._reference_ca_backward_input(du64, x64, scale.double(), q.double(), gated, channels_last)
    assert_close(dx, want, dtype, "dx")


# (n, cx, h, w, gated, channels_last): odd sizes, batch 1, 1x1 maps, more than
# one 32-channel tile, more pixels than one split.
CA_GEOMETRIES = [
    (2, 6, 5, 7, True, False),
    (2, 6, 5, 7, True, True),
    (1, 3, 1, 1, False, False),
    (3, 70, 3, 4, True, True),     # 35 channels: two 32-wide tiles
    (1, 19, 4, 3, False, True),    # 19 channels in one 32-wide tile, partly masked
    (1, 19, 4, 3, False, False),   # the same in 8-wide tiles (3 tiles)
    (2, 4, 23, 29, True, False),   # 667 pixels: several splits of 32 lanes
    (1, 2, 33, 17, False, True),
]


@pytest.mark.parametrize("geometry", CA_GEOMETRIES, ids=lambda g: "x".join(map(str, g[:4])) +
                         ("-gated" if g[4] else "") + ("-cl" if g[5] else ""))
def test_channel_attention_float64(lib, geometry):
    *sizes, gated, channels_last = geometry
    check_channel_attention(lib, *sizes, gated, torch.float64, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_channel_attention_other_dtypes(lib, dtype, channels_last):
    check_channel_attention(lib, 2, 10, 6, 5, True, dtype, channels_last)


def test_channel_attention_any_strides(lib):
    """The kernels index through strides: a sliced x and a permuted output need no copy."""
    x = torch.randn(2, 9, 7, 8, dtype=torch.float64)[:, 1:7, ::2, 1:]   # [2, 6, 4, 7]
    scale = torch.randn(2, 3, dtype=torch.float64)
    out = torch.full((4, 2, 7, 3), float("nan"), dtype=torch.float64)
    u = out.permute(1, 3, 0, 2)                                          # [2, 3, 4, 7], h outermost in memory
    rc = lib.emu_ca_apply(3, i64([2, 3, 4, 7]), 1, ptr(x), i64(x.stride()), ptr(scale), ptr(u),
                          i64(u.stride()))
    assert rc == 0
    assert_close(u, ref._reference_ca_apply(x, scale, True, False), torch.float64, "u")
    assert_close(emu_ca_reduce(lib, x, None, True, 3), ref._reference_ca_reduce(x, None, True, False),
                 torch.float64, "sums")


# ------------------------------------------------------------- scaled residual
def emu_sr(lib, inp, beta, z, g, need_z=True, need_beta=True):
    code = DTYPE_CODE[inp.dtype]
    shape = i64(list(inp.shape))
    channels_last = inp.dim() == 4 and inp.stride(1) == 1 and inp.shape[1] > 1
    y = nan_filled(tuple(inp.shape), inp.dtype, channels_last)
    rc = lib.emu_sr_forward(code, shape, ptr(inp), i64(inp.stride()), ptr(beta), ptr(z), i64(z.stride()),
                            ptr(y), i64(y.stride()))
    assert rc == 0, f"forward returned CUDA error {rc}"
    nbytes = ctypes.c_int64()
    assert lib.emu_sr_backward_workspace_size(code, shape, ctypes.byref(nbytes)) == 0
    dz = nan_filled(tuple(z.shape), z.dtype, channels_last) if need_z else None
    dbeta = nan_filled((inp.shape[1],), beta.dtype) if need_beta else None
    ws = poisoned_workspace(nbytes.value)
    rc = lib.emu_sr_backward(code, shape, ptr(g), i64(g.stride()), ptr(beta), ptr(z), i64(z.stride()),
                             ptr(dz), i64(dz.stride() if dz is not None else (0, 0, 0, 0)), ptr(dbeta), ptr(ws),
                             nbytes)
    assert rc == 0, f"backward returned CUDA error {rc}"
    return y, dz, dbeta


def check_scaled_residual(lib, n, c, h, w, dtype=torch.float64, channels_last=False, need_z=True, need_beta=True,
                          seed=0):
    gen = torch.Generator().manual_seed(seed)
    inp, z, g = (_layout(torch.randn(n, c, h, w, generator=gen).to(dtype), channels_last) for _ in range(3))
    beta = torch.randn(c, generator=gen).to(_acc(dtype))
    y, dz, dbeta = emu_sr(lib, inp, beta, z, g, need_z, need_beta)
    assert_close(y, ref.scaled_residual_reference(inp.double(), beta.double(), z.double()), dtype, "y")
    dz_ref, dbeta_ref = ref._reference_sr_backward(g.double(), beta.double(), z.double(), True, True, channels_last)
    if need_z:
        assert_close(dz, dz_ref, dtype, "dz")
    if need_beta:
        assert_close(dbeta, dbeta_ref, dtype, "dbeta")


SR_GEOMETRIES = [(2, 5, 7, 9, False), (2, 5, 7, 9, True), (1, 1, 1, 1, False), (3, 40, 5, 3, True),
                 (2, 3, 31, 37, False), (0, 4, 3, 3, False)]


@pytest.mark.parametrize("geometry", SR_GEOMETRIES, ids=lambda g: "x".join(map(str, g[:4])) + ("-cl" if g[4] else ""))
def test_scaled_residual_float64(lib, geometry):
    *sizes, channels_last = geometry
    check_scaled_residual(lib, *sizes, channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_scaled_residual_other_dtypes(lib, dtype, channels_last):
    check_scaled_residual(lib, 2, 12, 5, 6, dtype, channels_last)


@pytest.mark.parametrize("need_z,need_beta", [(True, False), (False, True)])
def test_scaled_residual_only_needed_outputs(lib, need_z, need_beta):
    check_scaled_residual(lib, 2, 5, 6, 7, need_z=need_z, need_beta=need_beta)


def test_split_count_changes_only_rounding_and_runs_are_deterministic(lib, monkeypatch):
    """The reductions split their pixels by the SM count; partial sums are added
    in a fixed order, so a given device gives bitwise-equal results."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 20, 21, generator=gen)
    inp, z, g = (torch.randn(2, 4, 20, 21, generator=gen) for _ in range(3))
    beta = torch.randn(4, generator=gen)
    results = {}
    for sms in ("1", "64", "64"):
        monkeypatch.setenv("RN_EMU_SM_COUNT", sms)
        results.setdefault(sms, []).append((emu_ca_reduce(lib, x, None, True, 4), emu_sr(lib, inp, beta, z, g)[2]))
    one, many, again = results["1"][0], results["64"][0], results["64"][1]
    for a, b, c in zip(one, many, again):
        assert torch.equal(b, c)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert not all(torch.equal(a, b) for a, b in zip(one, many)), "the split count had no effect"


def test_invalid_shapes_are_rejected(lib):
    x = torch.randn(1, 4, 3, 3)
    scale = torch.randn(1, 2)
    u = torch.empty(1, 2, 3, 3)
    for bad in ([1, 0, 3, 3], [1, 2, 0, 3], [-1, 2, 3, 3]):
        rc = lib.emu_ca_apply(0, i64(bad), 1, ptr(x), i64(x.stride()), ptr(scale), ptr(u), i64(u.stride()))
        assert rc == 1, bad  # cudaErrorInvalidValue
    rc = lib.emu_ca_reduce(0, i64([1, 2, 3, 3]), 1, ptr(x), i64(x.stride()), ptr(None), i64([0, 0, 0, 0]),
                           ptr(scale), ptr(None), ctypes.c_int64(0))
    assert rc == 1, "a missing workspace must be refused"


# ------------------------------------------------------------------ sanitizers
@pytest.mark.slow
def test_no_shared_memory_race(tmp_path, cuda_include_dir):
    """The reduction and the scaled residual's beta gradient sum through shared
    memory: built with ThreadSanitizer, the harness's main (both layouts, gated,
    a 16-bit type) runs without a race between the emulated threads of a block."""
    run_sanitized(tmp_path, cuda_include_dir, EMU / "channel_attention_harness.cpp", "thread",
                  defines=["-DRN_SANITIZE_MAIN"])
