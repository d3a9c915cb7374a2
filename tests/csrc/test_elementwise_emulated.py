"""csrc/reversible.cu and csrc/naf_elementwise.cu run on the CPU: the kernels
compiled by the host compiler against the CUDA emulation (tests/csrc/emu/
cuda_emu.h: real threads and barriers per block), called through their C API
with CPU tensors and compared with the ops' float64 references.

Covered: float32/float16/bfloat16/float64, NCHW and channels_last, odd C and
odd H*W, batch 1, 1x1 maps, channel counts that are and are not multiples of
the 16-byte vector width, misaligned pointers (vector path off), mixed layouts
and channel-slice views (general strided path), grid-stride loops and
multi-row partial sums (RN_EMU_GRID_CAP lowers the grid caps), determinism.
Outputs and workspaces are NaN-filled first, so a forgotten element fails.
What only hardware shows (speed, coalescing, device-compiler bugs) is left to
tests/ops/test_reversible_cuda.py and tests/ops/test_naf_elementwise_cuda.py.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from restorenet.ops.naf_elementwise import (_reference_layer_norm2d, _reference_ln_backward,
                                            _reference_sg_backward, simple_gate_reference)
from restorenet.ops.reversible import rev_coupling_forward_reference, rev_coupling_invert_reference

from emu_build import (CUDA_ERROR_INVALID_VALUE, DTYPE_CODE, EMU, assert_close_to, i64, load_harness, nan_filled,
                       poisoned_workspace, ptr, run_sanitized)

# Max error relative to max(1, max |reference|), for outputs rounded to the dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-6

# (n, c, h, w): odd everything; batch 1 with a 1x1 map; sizes that allow 16-byte
# packs for every dtype in both layouts; C over 64 and no multiple of 4.
SHAPES = [(3, 5, 9, 11), (1, 3, 1, 1), (2, 16, 4, 6), (2, 70, 3, 5)]
GATE_SHAPES = [(3, 10, 9, 11), (1, 2, 1, 1), (2, 32, 4, 6), (2, 140, 3, 5)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def lib(tmp_path_factory, cuda_include_dir):
    lib = load_harness(tmp_path_factory, cuda_include_dir, "elementwise_harness.cpp")
    lib.emu_rev_coupling_invert_workspace_size.restype = ctypes.c_int64
    lib.emu_layer_norm2d_backward_workspace_size.restype = ctypes.c_int64
    lib.emu_layer_norm2d_forward.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


# ------------------------------------------------------------------ helpers
def _st(t: torch.Tensor | None) -> ctypes.Array:
    return i64(t.stride() if t is not None else (0, 0, 0, 0))


def _compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _workspace(nbytes):
    return poisoned_workspace(nbytes, minimum=16)


def _make(shape, dtype, channels_last=False, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + offset).to(dtype).contiguous(
        memory_format=_layout(channels_last))


def _alpha(c, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    mag = 0.25 + 0.75 * torch.rand(c, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * mag).to(_compute(dtype))


def assert_close(actual, expected, dtype, name):
    assert_close_to(actual, expected, TOL[dtype], name)


# ------------------------------------------------------------------ C API calls
def emu_rev_forward(lib, x, f, alpha, out=None):
    if out is None:
        out = nan_filled(x.shape, x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    rc = lib.emu_rev_coupling_forward(DTYPE_CODE[x.dtype], i64(x.shape), ptr(x), _st(x), ptr(f), _st(f),
                                      ptr(alpha), ptr(out), _st(out))
    assert rc == 0, f"rev_coupling_forward returned CUDA error {rc}"
    return out


def emu_rev_invert(lib, x, f, alpha, g, rebuild=True, outs=None):
    code = DTYPE_CODE[x.dtype]
    fmt_cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    c_out, grad_c = outs if outs is not None else (
        nan_filled(x.shape, x.dtype, fmt_cl) if rebuild else None, nan_filled(x.shape, x.dtype, fmt_cl))
    grad_alpha = torch.full((x.shape[1],), float("nan"), dtype=_compute(x.dtype))
    ws = _workspace(lib.emu_rev_coupling_invert_workspace_size(code, x.shape[1]))
    rc = lib.emu_rev_coupling_invert(code, i64(x.shape), ptr(x), _st(x), ptr(f if rebuild else None),
                                     _st(f if rebuild else None), ptr(alpha), ptr(g), _st(g), ptr(c_out),
                                     _st(c_out), ptr(grad_c), _st(grad_c), ptr(grad_alpha), ptr(ws),
                                     ctypes.c_int64(ws.numel()))
    assert rc == 0, f"rev_coupling_invert returned CUDA error {rc}"
    return c_out, grad_c, grad_alpha


def emu_ln_forward(lib, x, weight, bias, eps=EPS, y=None):
    n, _, h, w = x.shape
    cd = _compute(x.dtype)
    if y is None:
        y = nan_filled(x.shape, x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    mean, rstd = torch.full((n, h, w), float("nan"), dtype=cd), torch.full((n, h, w), float("nan"), dtype=cd)
    rc = lib.emu_layer_norm2d_forward(DTYPE_CODE[x.dtype], i64(x.shape), ptr(x), _st(x), ptr(weight),
                                      ptr(bias), eps, ptr(y), _st(y), ptr(mean), ptr(rstd))
    assert rc == 0, f"layer_norm2d_forward returned CUDA error {rc}"
    return y, mean, rstd


def emu_ln_backward(lib, dy, x, weight, mean, rstd, dx=None):
    code = DTYPE_CODE[x.dtype]
    if dx is None:
        dx = nan_filled(x.shape, x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    dw = torch.full((x.shape[1],), float("nan"), dtype=_compute(x.dtype))
    db = dw.clone()
    ws = _workspace(lib.emu_layer_norm2d_backward_workspace_size(code, x.shape[1]))
    rc = lib.emu_layer_norm2d_backward(code, i64(x.shape), ptr(dy), _st(dy), ptr(x), _st(x), ptr(weight),
                                       ptr(mean), ptr(rstd), ptr(dx), _st(dx), ptr(dw), ptr(db), ptr(ws),
                                       ctypes.c_int64(ws.numel()))
    assert rc == 0, f"layer_norm2d_backward returned CUDA error {rc}"
    return dx, dw, db


def emu_sg_forward(lib, x, y=None):
    n, c, h, w = x.shape
    if y is None:
        y = nan_filled((n, c // 2, h, w), x.dtype,
                 x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    rc = lib.emu_simple_gate_forward(DTYPE_CODE[x.dtype], i64(x.shape), ptr(x), _st(x), ptr(y), _st(y))
    assert rc == 0, f"simple_gate_forward returned CUDA error {rc}"
    return y


def emu_sg_backward(lib, dy, x, dx=None):
    if dx is None:
        dx = nan_filled(x.shape, x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    rc = lib.emu_simple_gate_backward(DTYPE_CODE[x.dtype], i64(x.shape), ptr(dy), _st(dy), ptr(x), _st(x),
                                      ptr(dx), _st(dx))
    assert rc == 0, f"simple_gate_backward returned CUDA error {rc}"
    return dx


# ------------------------------------------------------------------ checks
def check_rev(lib, shape, dtype, channels_last, seed=0):
    x, f, g = (_make(shape, dtype, channels_last, seed + i) for i in range(3))
    alpha = _alpha(shape[1], dtype)
    d = [t.double() for t in (x, f, alpha, g)]
    out = emu_rev_forward(lib, x, f, alpha)
    assert out.is_contiguous(memory_format=_layout(channels_last))
    assert_close(out, rev_coupling_forward_reference(d[0], d[1], d[2]), dtype, "forward")
    c_ref, gc_ref, ga_ref = rev_coupling_invert_reference(*d)
    c, gc, ga = emu_rev_invert(lib, x, f, alpha, g)
    assert_close(c, c_ref, dtype, "invert c")
    assert_close(gc, gc_ref, dtype, "invert grad_c")
    assert_close(ga, ga_ref, dtype, "invert grad_alpha")
    _, gc2, ga2 = emu_rev_invert(lib, x, None, alpha, g, rebuild=False)  # the coupling's backward: x is c
    assert_close(gc2, gc_ref, dtype, "backward grad_c")
    assert_close(ga2, (d[3] * d[0]).sum((0, 2, 3)), dtype, "backward grad_alpha")


def check_layer_norm(lib, shape, dtype, channels_last, seed=0):
    x = _make(shape, dtype, channels_last, seed, offset=3.0)  # an offset makes the centring matter
    dy = _make(shape, dtype, channels_last, seed + 1)
    weight = (1 + 0.5 * _make((shape[1],), torch.float64, seed=seed + 2)).to(_compute(dtype))
    bias = _make((shape[1],), torch.float64, seed=seed + 3).to(_compute(dtype))
    y_ref, mean_ref, rstd_ref = _reference_layer_norm2d(x.double(), weight.double(), bias.double(), EPS)
    y, mean, rstd = emu_ln_forward(lib, x, weight, bias)
    assert y.is_contiguous(memory_format=_layout(channels_last))
    assert_close(y, y_ref, dtype, "y")
    assert_close(mean, mean_ref, torch.float32 if dtype != torch.float64 else dtype, "mean")
    assert_close(rstd, rstd_ref, torch.float32 if dtype != torch.float64 else dtype, "rstd")
    dx_ref, dw_ref, db_ref = _reference_ln_backward(dy.double(), x.double(), weight.double(), mean_ref, rstd_ref,
                                                    channels_last)
    dx, dw, db = emu_ln_backward(lib, dy, x, weight, mean, rstd)
    assert dx.is_contiguous(memory_format=_layout(channels_last))
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, dw_ref, dtype, "dweight")
    assert_close(db, db_ref, dtype, "dbias")


def check_gate(lib, shape, dtype, channels_last, seed=0):
    x = _make(shape, dtype, channels_last, seed)
    n, c, h, w = shape
    dy = _make((n, c // 2, h, w), dtype, channels_last, seed + 1)
    y = emu_sg_forward(lib, x)
    assert y.is_contiguous(memory_format=_layout(channels_last))
    assert_close(y, simple_gate_reference(x.double()), dtype, "y")
    dx = emu_sg_backward(lib, dy, x)
    assert_close(dx, _reference_sg_backward(dy.double(), x.double(), channels_last), dtype, "dx")


# Every dtype on the small shapes; the wide one (slow to emulate: a block per channel) in float64.
CASES = [(s, d, cl) for s in SHAPES for d in DTYPES for cl in (False, True)
         if d == torch.float64 or s in SHAPES[:3]]
GATE_CASES = [(s, d, cl) for s in GATE_SHAPES for d in DTYPES for cl in (False, True)
              if d == torch.float64 or s in GATE_SHAPES[:3]]


def _id(case):
    shape, dtype, cl = case
    return "x".join(map(str, shape)) + "-" + str(dtype).replace("torch.", "") + ("-cl" if cl else "")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_rev_coupling_matches_reference(lib, case):
    check_rev(lib, *case)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_layer_norm2d_matches_reference(lib, case):
    check_layer_norm(lib, *case)


@pytest.mark.parametrize("case", GATE_CASES, ids=_id)
def test_simple_gate_matches_reference(lib, case):
    check_gate(lib, *case)


@pytest.mark.parametrize("cap", ["1", "2"])
def test_grid_stride_loops_and_partial_rows(lib, monkeypatch, cap):
    """Capped grids: every block loops over several tiles (LayerNorm adds into its
    partial row), channels are strided over blockIdx.y, results stay right."""
    monkeypatch.setenv("RN_EMU_GRID_CAP", cap)
    for channels_last in (False, True):
        check_rev(lib, (3, 5, 9, 11), torch.float32, channels_last, seed=3)
        check_layer_norm(lib, (2, 5, 9, 11), torch.float32, channels_last, seed=3)
        check_gate(lib, (2, 6, 9, 11), torch.float32, channels_last, seed=3)


def test_large_channel_count_layer_norm(lib):
    """C = 700: few pixels per shared-memory tile, several channels per thread."""
    check_layer_norm(lib, (1, 700, 3, 3), torch.float32, True)
    check_layer_norm(lib, (1, 700, 3, 3), torch.float64, False)


def test_reductions_are_deterministic(lib):
    x, f, g = (_make((3, 7, 9, 11), torch.float32, True, s) for s in range(3))
    alpha = _alpha(7, torch.float32)
    first, second = emu_rev_invert(lib, x, f, alpha, g), emu_rev_invert(lib, x, f, alpha, g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    weight, bias = torch.ones(7), torch.zeros(7)
    _, mean, rstd = emu_ln_forward(lib, x, weight, bias)
    first, second = emu_ln_backward(lib, g, x, weight, mean, rstd), emu_ln_backward(lib, g, x, weight, mean, rstd)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values one element past a 16-byte boundary (no vector access)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buf[1:].view(t.permute(0, 2, 3, 1).shape if t.stride(1) == 1 and t.shape[1] > 1 else t.shape)
    if view.shape != t.shape:
        view = view.permute(0, 3, 1, 2)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0 and view.stride() == t.stride()
    return view


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_misaligned_pointers_fall_back_to_scalar_access(lib, channels_last):
    shape = (2, 16, 4, 6)  # packs would be allowed by the sizes
    x, f, g = (_misaligned(_make(shape, torch.float16, channels_last, s)) for s in range(3))
    alpha = _alpha(16, torch.float16)
    d = [t.double() for t in (x, f, alpha, g)]
    assert_close(emu_rev_forward(lib, x, f, alpha), rev_coupling_forward_reference(d[0], d[1], d[2]),
                 torch.float16, "forward")
    for got, ref, name in zip(emu_rev_invert(lib, x, f, alpha, g), rev_coupling_invert_reference(*d),
                              ("c", "grad_c", "grad_alpha")):
        assert_close(got, ref, torch.float16, name)
    xg = _misaligned(_make((2, 32, 4, 6), torch.float16, channels_last, 5))
    assert_close(emu_sg_forward(lib, xg), simple_gate_reference(xg.double()), torch.float16, "gate")


def test_mixed_layouts_and_channel_slices(lib):
    """Per-tensor strides: f in NCHW while x is channels_last, outputs written
    into channel slices of bigger buffers, a gate over a channel-sliced input."""
    shape = (2, 6, 5, 7)
    x = _make(shape, torch.float64, True, 0)
    f = _make(shape, torch.float64, False, 1)
    alpha = _alpha(6, torch.float64)
    big = torch.full((2, 9, 5, 7), float("nan"), dtype=torch.float64)
    out = emu_rev_forward(lib, x, f, alpha, out=big[:, 2:8])
    assert_close(out, rev_coupling_forward_reference(x, f, alpha), torch.float64, "forward")
    assert torch.isnan(big[:, :2]).all() and torch.isnan(big[:, 8:]).all(), "wrote outside its slice"
    g = _make(shape, torch.float64, False, 2)
    c_out = torch.full((2, 8, 5, 7), float("nan"), dtype=torch.float64)[:, 1:7]
    grad_c = nan_filled(shape, torch.float64, True)
    got = emu_rev_invert(lib, x, f, alpha, g, outs=(c_out, grad_c))
    for a, b, name in zip(got, rev_coupling_invert_reference(x, f, alpha, g), ("c", "grad_c", "grad_alpha")):
        assert_close(a, b, torch.float64, name)
    wide = _make((2, 10, 5, 7), torch.float64, True, 3)[:, 1:9]  # 8 channels, channel stride 1, pixel stride 10
    assert_close(emu_sg_forward(lib, wide), simple_gate_reference(wide), torch.float64, "gate")
    y, mean, rstd = emu_ln_forward(lib, wide, torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
    assert_close(y, _reference_layer_norm2d(wide, torch.ones(8).double(), torch.zeros(8).double(), EPS)[0],
                 torch.float64, "layer_norm")


def test_empty_pixels_give_zero_parameter_gradients(lib):
    x = torch.zeros(0, 4, 3, 3)
    alpha, weight = torch.ones(4), torch.ones(4)
    _, _, ga = emu_rev_invert(lib, x, x, alpha, x)
    assert torch.equal(ga, torch.zeros(4))
    _, dw, db = emu_ln_backward(lib, x, x, weight, torch.zeros(0, 3, 3), torch.zeros(0, 3, 3))
    assert torch.equal(dw, torch.zeros(4)) and torch.equal(db, torch.zeros(4))


def test_invalid_arguments_are_rejected(lib):
    x = torch.zeros(1, 3, 4, 4)
    y = torch.zeros(1, 1, 4, 4)
    assert lib.emu_simple_gate_forward(0, i64((1, 3, 4, 4)), ptr(x), _st(x), ptr(y), _st(y)) == \
        CUDA_ERROR_INVALID_VALUE  # odd channel count
    # h and w that do not merge into one pixel index (a column-sliced view)
    v = torch.zeros(1, 2, 4, 8)[..., :4]
    assert lib.emu_simple_gate_forward(0, i64((1, 2, 4, 4)), ptr(v), _st(v), ptr(y), _st(y)) == \
        CUDA_ERROR_INVALID_VALUE
    # a channel count whose pixel column does not fit the shared-memory tile
    big = torch.zeros(1, 20000, 1, 2)
    ones = torch.ones(20000)
    stats = torch.zeros(1, 1, 2)
    assert lib.emu_layer_norm2d_forward(0, i64(big.shape), ptr(big), _st(big), ptr(ones), ptr(ones), EPS,
                                        ptr(big), _st(big), ptr(stats), ptr(stats)) == CUDA_ERROR_INVALID_VALUE
    # rebuild without an output for c
    alpha = torch.ones(3)
    ws = _workspace(lib.emu_rev_coupling_invert_workspace_size(0, 3))
    assert lib.emu_rev_coupling_invert(0, i64(x.shape), ptr(x), _st(x), ptr(x), _st(x), ptr(alpha), ptr(x),
                                       _st(x), ptr(None), _st(None), ptr(x), _st(x), ptr(alpha), ptr(ws),
                                       ctypes.c_int64(ws.numel())) == CUDA_ERROR_INVALID_VALUE


# ------------------------------------------------------------------ sanitizers
@pytest.mark.slow
def test_no_shared_memory_race(tmp_path, cuda_include_dir):
    """layer_norm2d (channel statistics, weight/bias gradients) and
    rev_coupling_invert (alpha gradient, both layouts) sum through shared
    memory: built with ThreadSanitizer, the harness's main runs without a race
    between the emulated threads of a block."""
    run_sanitized(tmp_path, cuda_include_dir, EMU / "elementwise_harness.cpp", "thread",
                  defines=["-DRN_SANITIZE_MAIN"])
