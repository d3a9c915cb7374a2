"""csrc/tiles.cu run on the CPU: the tile gather and blend kernels compiled by
the host compiler against the CUDA emulation (tests/csrc/emu/cuda_emu.h: real
threads and a real barrier per block), called through their C API on CPU
tensors and compared with the ops' references (restorenet.ops.tiles).

Checks the kernels' indexing: ragged batches of mixed sizes and layouts, tiles
smaller than the image and a single tile per image, several feature levels,
orders and subsets, channel counts around the block's channel split, both tile
layouts, float32/float16/bfloat16/float64. Outputs are NaN-filled first, so an
element a kernel forgets fails. The gather is a copy (bitwise equal); the blend
sums the same float32 (float64) products in the same plan order as the
reference, so it is bitwise equal too. What only hardware shows (coalescing,
speed, device-compiler bugs) is for tests/ops/test_tiles_cuda.py.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from restorenet.ops.tiles import (LAYOUT_COLUMNS, tile_blend_reference, tile_gather_reference,
                                  tile_plan)

from emu_build import CUDA_ERROR_INVALID_VALUE, DTYPE_CODE, EMU, i64, load_harness, ptr, run_sanitized

DTYPES = list(DTYPE_CODE)


@pytest.fixture(scope="module")
def lib(tmp_path_factory, cuda_include_dir):
    return load_harness(tmp_path_factory, cuda_include_dir, "tiles_harness.cpp")


# ------------------------------------------------------------------ C calls
def source_table(feats: list[torch.Tensor]) -> torch.Tensor:
    """int64 [images, 4]: (address, stride_c, stride_h, stride_w) of every sample."""
    rows = [(f.data_ptr() + s * f.stride(0) * f.element_size(), *f.stride()[1:])
            for f in feats for s in range(f.shape[0])]
    return torch.tensor(rows, dtype=torch.int64).view(-1, 4)


GUARD = 256  # elements either side of an output that no kernel may write


def guarded_output(shape, dtype):
    """(NaN-filled output, its buffer with a -7 guard band on both sides)."""
    numel = torch.Size(shape).numel()
    buffer = torch.full((numel + 2 * GUARD,), -7.0, dtype=dtype)
    buffer[GUARD:GUARD + numel] = float("nan")
    return buffer[GUARD:GUARD + numel].view(shape), buffer


def check_guard(buffer):
    band = torch.cat([buffer[:GUARD], buffer[-GUARD:]])
    assert torch.equal(band, torch.full_like(band, -7.0)), "a kernel wrote outside its output"


def emu_gather(lib, feats, boxes, tile_h, tile_w) -> torch.Tensor:
    c = feats[0].shape[1]
    out, buffer = guarded_output((boxes.shape[0], c, tile_h, tile_w), feats[0].dtype)
    table, boxes = source_table(feats), boxes.contiguous()
    rc = lib.emu_tile_gather_forward(DTYPE_CODE[out.dtype], i64([boxes.shape[0], c, tile_h, tile_w]),
                                     ptr(table), ptr(boxes), ptr(out))
    assert rc == 0, f"tile_gather_forward returned CUDA error {rc}"
    check_guard(buffer)
    return out


def emu_blend(lib, tiles, slots, layout, row_weight, col_weight, num_pixels, cover_h, cover_w):
    n, c, th, tw = tiles.shape
    out, buffer = guarded_output((c * num_pixels,), tiles.dtype)
    shape = [n, c, th, tw, num_pixels, cover_h, cover_w]
    rc = lib.emu_tile_blend_forward(DTYPE_CODE[tiles.dtype], i64(shape), ptr(tiles), i64(tiles.stride()),
                                    ptr(slots), ptr(layout), ptr(row_weight), ptr(col_weight), ptr(out))
    assert rc == 0, f"tile_blend_forward returned CUDA error {rc}"
    check_guard(buffer)
    return out


# ------------------------------------------------------------ plan arguments
def boxes_of(plan, order, scale) -> torch.Tensor:
    """(image, y, x) at 1/scale of the plan tiles in ``order``, as tile_gather builds them."""
    layout = plan.layout("cpu")
    layout = layout if order is None else layout[order]
    return torch.stack([layout[:, 0], layout[:, 1] // scale, layout[:, 2] // scale], dim=1)


def blend_args(plan, tiles, order):
    """The op-level arguments of tile_blend for ``tiles`` in sorted ``order``."""
    slots = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    row_weight, col_weight = plan.weights(tiles.dtype, "cpu")
    return (tiles, slots, plan.layout("cpu"), row_weight, col_weight, plan.num_pixels, *plan.max_cover)


def features(shapes, channels, dtype, layouts, scale, seed=0):
    """One tensor per (n, h, w) at 1/scale, in the given layouts: "nchw", "nhwc" or
    "view" (a channel slice with every other column: not contiguous in any format)."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for (n, h, w), layout in zip(shapes, layouts):
        x = torch.randn(n, channels + 2, h // scale, 2 * w // scale, generator=g).to(dtype)
        if layout == "view":
            feats.append(x[:, 1:channels + 1, :, ::2])
        else:
            x = x[:, :channels, :, :w // scale].contiguous()
            feats.append(x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x)
    return feats


# (image shapes (n, h, w) at level 0, tile, overlap, multiple). Small: every emulated
# block costs a few ms of thread switching.
GEOMETRIES = {
    "ragged": ([(2, 32, 40), (1, 24, 16)], 16, 8, 8),            # mixed sizes, 2x1 .. 3x4 grids
    "deep-overlap": ([(1, 32, 50), (1, 24, 24)], 24, 16, 2),     # up to 4 tiles cover a pixel
    "single-tile": ([(2, 16, 24)], (16, 24), 8, 8),              # the image is one tile
    "non-square": ([(1, 48, 32), (2, 32, 56)], (32, 24), (16, 8), 8),
}


def plan_of(geometry):
    shapes, tile, overlap, multiple = GEOMETRIES[geometry]
    return shapes, tile_plan([torch.empty(n, 1, h, w, device="meta") for n, h, w in shapes], tile, overlap,
                             multiple=multiple)


# --------------------------------------------------------------------- gather
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", ["ragged", "non-square"])
def test_gather_every_level_equals_the_reference(lib, dtype, geometry):
    """Levels 0, 1 and 3 of a ragged batch (channels_last and a strided view mixed in
    one launch), in a permutation of the plan order and a subset of it."""
    shapes, plan = plan_of(geometry)
    perm = torch.randperm(plan.num_tiles, generator=torch.Generator().manual_seed(1))
    for scale in (1, 2, 8):
        feats = features(shapes, 5, dtype, ["nhwc", "view"], scale)
        th, tw = plan.tile[0] // scale, plan.tile[1] // scale
        for order in (perm, perm[:5]):
            boxes = boxes_of(plan, order, scale)
            out = emu_gather(lib, feats, boxes, th, tw)
            assert torch.equal(out, tile_gather_reference(feats, boxes, th, tw)), (scale, order)


@pytest.mark.parametrize("channels,layout", [(1, "nchw"), (1, "nhwc"), (3, "nhwc"), (40, "nhwc"), (33, "nchw")])
def test_gather_channel_splits(lib, channels, layout):
    """One channel, channel counts below, at and past the block's 32-channel split."""
    shapes, plan = plan_of("ragged")
    feats = features(shapes, channels, torch.float32, [layout, layout], 1)
    boxes = boxes_of(plan, torch.tensor([25, 3, 12, 0]), 1)  # from all three images
    out = emu_gather(lib, feats, boxes, *plan.tile)
    assert torch.equal(out, tile_gather_reference(feats, boxes, *plan.tile))


def test_gather_single_tile_images(lib):
    shapes, plan = plan_of("single-tile")
    feats = features(shapes, 4, torch.float16, ["nchw"], 2)
    boxes = boxes_of(plan, torch.tensor([1, 0]), 2)
    out = emu_gather(lib, feats, boxes, 8, 12)
    assert torch.equal(out, feats[0].flip(0))


# ---------------------------------------------------------------------- blend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_blend_equals_the_reference(lib, geometry, channels_last, dtype):
    _, plan = plan_of(geometry)
    g = torch.Generator().manual_seed(2)
    tiles = torch.randn(plan.num_tiles, 3, *plan.tile, generator=g).to(dtype)
    if channels_last:
        tiles = tiles.contiguous(memory_format=torch.channels_last)
    order = torch.randperm(plan.num_tiles, generator=g)
    args = blend_args(plan, tiles, order)
    out = emu_blend(lib, *args)
    expected = tile_blend_reference(*args[:6])
    assert not out.isnan().any(), "output elements left unwritten"
    assert torch.equal(out, expected), f"max error {(out.double() - expected.double()).abs().max():.3g}"


def test_blend_many_channels_and_exact_normalisation(lib):
    """Two channel blocks (40 channels, channels_last), and a constant tile set blends
    to that constant exactly."""
    _, plan = plan_of("deep-overlap")
    tiles = torch.randn(plan.num_tiles, 40, *plan.tile).contiguous(memory_format=torch.channels_last)
    order = torch.arange(plan.num_tiles)
    args = blend_args(plan, tiles, order)
    assert torch.equal(emu_blend(lib, *args), tile_blend_reference(*args[:6]))
    const = torch.full((plan.num_tiles, 2, *plan.tile), 0.25)  # 2 channels: 512 pixels a block
    out = emu_blend(lib, *blend_args(plan, const, order))
    assert torch.equal(out, torch.full_like(out, 0.25))


def test_gather_then_blend_gives_the_images_back(lib):
    shapes, plan = plan_of("ragged")
    feats = features(shapes, 3, torch.float64, ["nhwc", "view"], 1)
    order = torch.randperm(plan.num_tiles)
    tiles = emu_gather(lib, feats, boxes_of(plan, order, 1), *plan.tile)
    flat = emu_blend(lib, *blend_args(plan, tiles, order))
    images = torch.cat([f.contiguous().flatten() for f in feats])
    torch.testing.assert_close(flat, images, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------- the op's cuda path
class EmulatedExtension:
    """Stands in for restorenet._C: the binding's two functions, on the emulated kernels."""

    def __init__(self, lib):
        self.lib, self.calls = lib, []

    def tile_gather_forward(self, feats, boxes, tile_h, tile_w):
        self.calls.append("gather")
        return emu_gather(self.lib, feats, boxes, tile_h, tile_w)

    def tile_blend_forward(self, tiles, slots, layout, row_weight, col_weight, num_pixels, cover_h, cover_w):
        self.calls.append("blend")
        return emu_blend(self.lib, tiles, slots, layout, row_weight, col_weight, num_pixels, cover_h, cover_w)


def test_adarevd_restore_through_the_cuda_wiring(lib, monkeypatch):
    """AdaRevD.restore end to end with the tile ops' cuda functions (restorenet.ops.tiles
    _cuda_gather / _cuda_blend) calling the emulated kernels: bitwise the restore with the
    reference tile ops, on a ragged list of images."""
    import restorenet
    from restorenet.ops import tiles as tiles_mod

    model = restorenet.create_model("adarevd", num_decoders=3, width=8, enc_blocks=(1, 1, 1, 1),
                                    middle_blocks=1).eval()
    g = torch.Generator().manual_seed(3)
    imgs = [torch.rand(2, 3, 64, 96, generator=g), torch.rand(3, 48, 64, generator=g)]
    ext = EmulatedExtension(lib)
    monkeypatch.setattr(tiles_mod, "cuda_extension", lambda: ext)

    def restore(backend):
        monkeypatch.setattr(tiles_mod, "_resolve", lambda op, _backend, _device: backend)
        return model.restore(imgs, tile=48, overlap=16, exit_idx=[3, 2, 2, 1, 1, 1], return_exits=True)

    (out_ref, exits_ref), (out, exits) = restore("reference"), restore("cuda")
    assert ext.calls == ["gather"] * 6 + ["blend"], ext.calls
    for a, b in zip(exits, exits_ref):
        assert torch.equal(a, b)
    for a, b in zip(out, out_ref):
        assert a.shape == b.shape and torch.equal(a, b)


# ------------------------------------------------------------------- contract
def test_layout_columns_match_the_python_plan(lib):
    for i, name in enumerate(LAYOUT_COLUMNS):
        assert lib.emu_tile_layout_column(name.encode()) == i, name
    assert lib.emu_tile_layout_column(b"count") == len(LAYOUT_COLUMNS)
    assert lib.emu_tile_layout_column(b"no such column") == -1


def test_empty_work_launches_nothing(lib):
    out = torch.full((4,), float("nan"))
    none = ctypes.c_void_p(None)  # never dereferenced: nothing to do
    assert lib.emu_tile_gather_forward(0, i64([0, 3, 8, 8]), none, none, ptr(out)) == 0
    assert lib.emu_tile_blend_forward(0, i64([0, 3, 8, 8, 64, 1, 1]), none, i64([0] * 4), none, none,
                                      none, none, ptr(out)) == 0
    assert out.isnan().all()


@pytest.mark.parametrize("shape", [[1, 3, 0, 8], [1, 3, 8, -1], [-1, 3, 8, 8], [1, 3, 1 << 16, 1 << 16],
                                   [1, 1 << 31, 8, 8], [1, 65536 * 32 + 1, 1, 1]])
def test_gather_rejects_bad_shapes(lib, shape):
    none = ctypes.c_void_p(None)
    assert lib.emu_tile_gather_forward(0, i64(shape), none, none, none) == CUDA_ERROR_INVALID_VALUE


@pytest.mark.parametrize("change", [{2: 0}, {5: 0}, {6: 0}, {4: -1}, {0: -1}])
def test_blend_rejects_bad_shapes(lib, change):
    shape = [2, 3, 8, 8, 64, 1, 1]
    for i, v in change.items():
        shape[i] = v
    none = ctypes.c_void_p(None)
    rc = lib.emu_tile_blend_forward(0, i64(shape), none, i64([0] * 4), none, none, none, none, none)
    assert rc == CUDA_ERROR_INVALID_VALUE


# ------------------------------------------------------------------ sanitizers
@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_sanitizers(tmp_path, cuda_include_dir, sanitizer):
    """The harness's own main (exactly-sized buffers, ragged and deep-overlap plans, both
    layouts): AddressSanitizer -- every load and store in bounds; ThreadSanitizer -- no
    shared-memory race between the emulated threads of a block."""
    run_sanitized(tmp_path, cuda_include_dir, EMU / "tiles_harness.cpp", sanitizer,
                  defines=["-DRN_TILES_SANITIZE_MAIN"])
