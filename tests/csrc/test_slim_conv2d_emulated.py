"""csrc/slim_conv2d.cu run on the CPU: the kernels (the implicit-GEMM core of
csrc/conv_core.cuh with slim_conv2d's per-sample channel bounds) compiled by
the host compiler against the CUDA emulation in tests/csrc/emu/cuda_emu.h,
called through their C API with CPU tensors and compared with the reference op.

Checked here: values of y, dx, dW, dbias for every dtype and layout at mixed
widths; outputs and workspace NaN-filled first (an element left unwritten
fails); NaN planted in everything past the bounds (inactive input channels,
inactive grad_out channels, weight rows/columns no sample uses), so a kernel
that reads past a bound fails; the emulation's GEMM work counter, so a kernel
that computes inactive tiles and masks them afterwards fails; width clamping;
determinism. Not checked here: speed, coalescing, device-compiler bugs (the
GPU test tests/ops/test_slim_conv2d_cuda.py does that).
"""
from __future__ import annotations

import ctypes
import math

import pytest
import torch

from restorenet.ops.slim_conv2d import _reference_backward, slim_conv2d_reference

from emu_build import DTYPE_CODE, assert_close_to, conv_shape, i64, load_harness, ptr

# Max error relative to the largest reference value, for outputs rounded to the dtype.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TILE, SLICE, STEP, CHUNK = 64, 16, 16, 256  # conv_core.cuh: kTileM = kTileN, kSide, kStepK, kChunk


@pytest.fixture(scope="module")
def lib(tmp_path_factory, cuda_include_dir):
    so = load_harness(tmp_path_factory, cuda_include_dir, "slim_conv2d_harness.cpp")
    so.emu_gemm_work_take.restype = ctypes.c_longlong
    so.emu_async_copies_take.restype = ctypes.c_longlong
    return so


def _layout(t: torch.Tensor) -> torch.memory_format:
    cl = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def emu_forward(lib, x, weight, bias, in_w, out_w, stride, padding):
    s = conv_shape(x, weight, stride, padding)
    y = torch.full((s[0], s[4], s[7], s[8]), float("nan"), dtype=x.dtype).contiguous(memory_format=_layout(x))
    rc = lib.emu_slim_conv2d_forward(DTYPE_CODE[x.dtype], i64(s), ptr(x), i64(x.stride()), ptr(weight),
                                     ptr(bias), ptr(in_w), ptr(out_w), ptr(y), i64(y.stride()))
    assert rc == 0, f"forward returned CUDA error {rc}"
    return y


def emu_backward(lib, dy, x, weight, bias, in_w, out_w, stride, padding, needs=(True, True, True)):
    """[dx, dW, dbias] (None where not needed or bias is None)."""
    s = conv_shape(x, weight, stride, padding)
    code = DTYPE_CODE[x.dtype]
    dx = dw = db = None
    if needs[0]:
        dx = torch.full_like(x, float("nan"))  # keeps x's strides
        rc = lib.emu_slim_conv2d_backward_input(code, i64(s), ptr(dy), i64(dy.stride()), ptr(weight),
                                                ptr(in_w), ptr(out_w), ptr(dx), i64(dx.stride()))
        assert rc == 0, f"backward_input returned CUDA error {rc}"
    if needs[1]:
        dw = torch.full_like(weight, float("nan"))
    if needs[2] and bias is not None:
        db = torch.full_like(bias, float("nan"))
    if dw is not None or db is not None:
        nbytes = ctypes.c_int64()
        assert lib.emu_slim_conv2d_backward_params_workspace_size(code, i64(s), ptr(dw), ptr(db),
                                                                  ctypes.byref(nbytes)) == 0
        workspace = torch.full((nbytes.value,), 0xFF, dtype=torch.uint8)  # NaN in float and double
        rc = lib.emu_slim_conv2d_backward_params(code, i64(s), ptr(dy), i64(dy.stride()), ptr(x),
                                                 i64(x.stride()), ptr(in_w), ptr(out_w), ptr(dw), ptr(db),
                                                 ptr(workspace), nbytes)
        assert rc == 0, f"backward_params returned CUDA error {rc}"
    return [dx, dw, db]


def make_case(n, c_in, c_out, h, w, k, in_w, out_w, dtype, channels_last=False, bias=True, seed=0,
              poison=True):
    """Inputs rounded to ``dtype``; with ``poison``, NaN wherever the op must not
    read: x[n, in_w[n]:], and weight rows / columns that no sample uses."""
    g = torch.Generator().manual_seed(seed)
    in_w = torch.tensor(in_w, dtype=torch.int32)
    out_w = torch.tensor(out_w, dtype=torch.int32)
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype)
    weight = (0.5 * torch.randn(c_out, c_in, k, k, generator=g)).to(dtype)
    b = torch.randn(c_out, generator=g).to(dtype) if bias else None
    if poison:
        for i in range(n):
            x[i, in_w[i]:] = float("nan")
        weight[int(out_w.max()):] = float("nan")
        weight[:, int(in_w.max()):] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight, b, in_w, out_w


def make_grad_out(y, out_w, seed, poison=True):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y.dtype)
    if poison:
        for i in range(y.shape[0]):
            dy[i, out_w[i]:] = float("nan")  # the op ignores grad_out past out_width
    return dy.contiguous(memory_format=_layout(y))


def _clean(t):
    """float64 copy with the poison (never read by the op) replaced by zeros."""
    return None if t is None else torch.nan_to_num(t.double(), nan=0.0)


def assert_close(actual, expected, dtype, name):
    assert_close_to(actual, expected, TOL[dtype], name, nan_means="NaN: an element left unwritten or a bound crossed")


def check_all(lib, n, c_in, c_out, h, w, k, stride, padding, in_w, out_w, dtype=torch.float64,
              channels_last=False, bias=True, needs=(True, True, True), seed=0):
    x, weight, b, iw, ow = make_case(n, c_in, c_out, h, w, k, in_w, out_w, dtype, channels_last, bias, seed)
    y = emu_forward(lib, x, weight, b, iw, ow, stride, padding)
    args64 = (_clean(x), _clean(weight), _clean(b), iw, ow, stride, padding)
    y_ref = slim_conv2d_reference(*args64)
    assert_close(y, y_ref, dtype, "y")
    for i in range(n):
        assert torch.equal(y[i, ow[i]:], torch.zeros_like(y[i, ow[i]:])), "inactive outputs must be exact zeros"
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    dy = make_grad_out(y, ow, seed)
    grads = emu_backward(lib, dy, x, weight, b, iw, ow, stride, padding, needs)
    grads_ref = _reference_backward(_clean(dy), *args64, list(needs))
    for name, g, g_ref, t, need in zip(("dx", "dweight", "dbias"), grads, grads_ref, (x, weight, b), needs):
        if not need or t is None:
            assert g is None, name
            continue
        assert g.dtype == t.dtype, name
        assert_close(g, g_ref, dtype, name)
    if needs[0]:
        for i in range(n):
            assert torch.equal(grads[0][i, iw[i]:], torch.zeros_like(grads[0][i, iw[i]:])), "inactive dx"


# (n, c_in, c_out, h, w, k, stride, padding, in_width, out_width, channels_last)
GEOMETRIES = [
    (3, 5, 6, 7, 9, 3, 1, 1, [1, 5, 3], [6, 1, 4], False),         # mixed widths incl. 1 and max
    (3, 5, 6, 7, 9, 3, 2, 1, [1, 5, 3], [6, 1, 4], True),
    (1, 4, 3, 9, 7, 1, 1, 0, [4], [3], True),                       # batch 1 at full width, 1x1
    (2, 6, 4, 11, 5, 3, 2, 0, [3, 3], [2, 2], False),               # all samples at one width
    (2, 70, 67, 5, 4, 1, 1, 0, [70, 17], [67, 20], False),          # two channel tiles; tiles skipped
    (2, 66, 70, 4, 3, 3, 1, 1, [9, 66], [70, 5], True),             # ... channels_last, 3x3
]


@pytest.mark.parametrize("geometry", GEOMETRIES,
                         ids=lambda g: "x".join(map(str, g[:8])) + ("-cl" if g[10] else ""))
def test_matches_reference_float64(lib, geometry):
    *sizes, in_w, out_w, channels_last = geometry
    check_all(lib, *sizes, in_w, out_w, channels_last=channels_last)


@pytest.mark.parametrize("dtype,tensor_cores,channels_last", [
    (torch.float32, False, False), (torch.float32, False, True),
    (torch.float16, True, False), (torch.float16, True, True), (torch.float16, False, True),
    (torch.bfloat16, True, True), (torch.bfloat16, False, False),
], ids=["float32", "float32-cl", "float16-wmma", "float16-wmma-cl", "float16-simt-cl", "bfloat16-wmma-cl",
        "bfloat16-simt"])
def test_matches_reference_other_dtypes(lib, monkeypatch, dtype, tensor_cores, channels_last):
    """16-bit types run on (emulated) tensor cores by default; RESTORENET_CUDA_TENSOR_CORES=0 selects SIMT."""
    monkeypatch.setenv("RESTORENET_CUDA_TENSOR_CORES", "1" if tensor_cores else "0")
    check_all(lib, 3, 5, 7, 9, 8, 3, 2, 1, [2, 5, 1], [7, 3, 1], dtype=dtype, channels_last=channels_last)


@pytest.mark.parametrize("needs,bias", [((True, False, False), True), ((False, True, False), False),
                                        ((False, False, True), True)], ids=["dx", "dweight-no-bias", "dbias"])
def test_only_needed_grads(lib, needs, bias):
    check_all(lib, 2, 3, 4, 6, 5, 3, 1, 1, [2, 3], [4, 1], bias=bias, needs=needs)


def test_widths_are_clamped(lib):
    """Widths past the channel counts act as the full width, widths <= 0 as an
    empty sample (zeros): a bad width cannot address memory outside the tensors."""
    x, weight, b, _, _ = make_case(2, 4, 5, 6, 6, 3, [4, 4], [5, 5], torch.float64, poison=False)
    wide = emu_forward(lib, x, weight, b, torch.tensor([9, -3], dtype=torch.int32),
                       torch.tensor([99, 5], dtype=torch.int32), 1, 1)
    full = emu_forward(lib, x, weight, b, torch.tensor([4, 4], dtype=torch.int32),
                       torch.tensor([5, 5], dtype=torch.int32), 1, 1)
    assert torch.equal(wide[0], full[0])
    expected = b.double()[:, None, None].expand(5, 6, 6)  # no input channel: the bias alone
    assert torch.equal(wide[1], expected)
    empty = emu_forward(lib, x, weight, b, torch.tensor([4, 4], dtype=torch.int32),
                        torch.tensor([0, -1], dtype=torch.int32), 1, 1)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_runs_are_deterministic_across_split_counts(lib, monkeypatch):
    """The parameter pass splits its work by the SM count; partial sums are added in
    a fixed order, so a given device gives bitwise-equal results run to run."""
    x, weight, b, iw, ow = make_case(3, 4, 5, 17, 16, 3, [4, 2, 3], [5, 3, 1], torch.float32, poison=False)
    dy = torch.randn(3, 5, 17, 16, generator=torch.Generator().manual_seed(4))
    runs = {}
    for sms in ("1", "64", "64"):
        monkeypatch.setenv("RN_EMU_SM_COUNT", sms)
        runs.setdefault(sms, []).append(emu_backward(lib, dy, x, weight, b, iw, ow, 1, 1, (False, True, True)))
    (one,), (many, again) = runs["1"], runs["64"]
    for a, b_, c in zip(one[1:], many[1:], again[1:]):
        assert torch.equal(b_, c)
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------ work follows the widths
def _slices(rows_active: int) -> int:
    return math.ceil(min(rows_active, TILE) / SLICE)


def conv_work(rows, pixels, taps, row_bounds, channel_bounds) -> int:
    """GEMM work (16-row slices x steps) of a forward / input-gradient pass that
    skips tiles past the row bound and stops the reduction at the channel bound."""
    work = 0
    for rows_n, chans_n in zip(row_bounds, channel_bounds):
        for row0 in range(0, rows, TILE):
            if rows_n > row0:
                work += _slices(rows_n - row0) * math.ceil(chans_n * taps / STEP)
    return work * math.ceil(pixels / TILE)


def param_work(c_in, c_out, taps, pixels, in_w, out_w, bias_column) -> int:
    """Same for the parameter pass, NCHW x (channel-major columns): an item runs
    a tile only if it holds an active (co, column) of its sample."""
    cols = c_in * taps + bias_column
    chunks = [min(CHUNK, pixels - p) for p in range(0, pixels, CHUNK)]
    work = 0
    for k_in, k_out in zip(in_w, out_w):
        for co0 in range(0, c_out, TILE):
            for col0 in range(0, cols, TILE):
                holds_bias = bias_column and col0 <= c_in * taps < col0 + TILE
                if k_out > co0 and (col0 < k_in * taps or holds_bias):
                    work += _slices(k_out - co0) * sum(math.ceil(c / STEP) for c in chunks)
    return work


def test_work_is_proportional_to_the_active_channels(lib):
    """Counts the GEMM work the kernels do (conv_core.cuh's emulation counter):
    tiles past a sample's widths run nothing, the reduction stops at its width,
    and 16-row slices past it are skipped. A mixed batch costs the sum of its
    samples' costs at their own widths, far less than at full width."""
    n, c_in, c_out, h, w, k = 2, 80, 72, 6, 5, 3
    in_w, out_w = [16, 80], [24, 8]
    x, weight, b, iw, ow = make_case(n, c_in, c_out, h, w, k, in_w, out_w, torch.float32, poison=False)
    taps, pixels = k * k, h * w
    lib.emu_gemm_work_take()
    y = emu_forward(lib, x, weight, b, iw, ow, 1, 1)
    assert lib.emu_gemm_work_take() == conv_work(c_out, pixels, taps, out_w, in_w)
    dy = torch.randn(y.shape)
    emu_backward(lib, dy, x, weight, b, iw, ow, 1, 1, (True, False, False))
    assert lib.emu_gemm_work_take() == conv_work(c_in, pixels, taps, in_w, out_w)
    emu_backward(lib, dy, x, weight, b, iw, ow, 1, 1, (False, True, True))
    assert lib.emu_gemm_work_take() == param_work(c_in, c_out, taps, pixels, in_w, out_w, True)
    full = conv_work(c_out, pixels, taps, [c_out] * n, [c_in] * n)
    assert conv_work(c_out, pixels, taps, out_w, in_w) < full / 4


# ------------------------------------------------------ the cp.async pipeline
@pytest.mark.parametrize("dtype,channels_last", [(torch.float16, True), (torch.float32, False)],
                         ids=["float16-wmma-cl", "float32-nchw"])
def test_aligned_runs_are_copied_16_bytes_at_a_time(lib, monkeypatch, dtype, channels_last):
    """Where a run of the gathered operand is contiguous and aligned in memory
    (channels_last with widths that are multiples of 8 on tensor cores; NCHW rows
    at stride 1), the core copies it with one 16-byte cp.async; padding runs are
    zero-filled copies. Values as everywhere else; poisoned channels unread."""
    monkeypatch.setenv("RESTORENET_CUDA_TENSOR_CORES", "1")
    for size in (0, 4, 8, 16, 32):
        lib.emu_async_copies_take(size)
    check_all(lib, 2, 24, 16, 6, 12, 3, 1, 1, [16, 24], [8, 16], dtype=dtype, channels_last=channels_last)
    assert lib.emu_async_copies_take(16) > 0
    assert lib.emu_async_copies_take(0) > 0


@pytest.fixture(scope="module")
def lib_waiting_too_little(tmp_path_factory, cuda_include_dir):
    """The core built to let one more cp.async group be in flight than its
    pipeline allows (a missing / short cp.async.wait_group)."""
    return load_harness(tmp_path_factory, cuda_include_dir, "slim_conv2d_harness.cpp",
                        defines=["-DRN_CONV_CORE_TEST_WAIT_SLACK=1"])


@pytest.mark.parametrize("dtype,tensor_cores,channels_last", [
    (torch.float32, False, False), (torch.float16, True, True), (torch.float64, False, True)],
    ids=["float32", "float16-wmma-cl", "float64-cl"])
def test_emulation_catches_a_missing_wait(lib_waiting_too_little, monkeypatch, dtype, tensor_cores, channels_last):
    """The emulation lands a cp.async only at the wait_group that retires it, so
    a core that reads a stage before its group is waited for reads stale shared
    memory: its results are wrong (the same case passes with the real core in
    test_aligned_runs_are_copied_16_bytes_at_a_time / test_matches_reference_*)."""
    monkeypatch.setenv("RESTORENET_CUDA_TENSOR_CORES", "1" if tensor_cores else "0")
    x, weight, b, iw, ow = make_case(2, 24, 16, 6, 12, 3, [16, 24], [8, 16], dtype, channels_last, poison=False)
    y = emu_forward(lib_waiting_too_little, x, weight, b, iw, ow, 1, 1)
    y_ref = slim_conv2d_reference(x.double(), weight.double(), b.double(), iw, ow, 1, 1)
    assert (y.double() - y_ref).abs().max().item() > 0.1 * y_ref.abs().max().item()


def test_invalid_shapes_are_rejected(lib):
    x, weight, b, iw, ow = make_case(1, 2, 3, 5, 5, 3, [2], [3], torch.float32, poison=False)
    y = torch.empty(1, 3, 5, 5)
    s = conv_shape(x, weight, 1, 1)
    for i, v in ((7, 4), (9, 0), (10, -1), (5, 0)):  # wrong h_out, stride 0, negative padding, kh 0
        t = list(s)
        t[i] = v
        rc = lib.emu_slim_conv2d_forward(0, i64(t), ptr(x), i64(x.stride()), ptr(weight), ptr(b),
                                         ptr(iw), ptr(ow), ptr(y), i64(y.stride()))
        assert rc == 1, (i, v)  # cudaErrorInvalidValue
