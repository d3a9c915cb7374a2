"""Ragged tile ops: plan geometry, gather and blend on every backend against plain
slicing and AdaRevD's plain blend, the schedule (and its single host read), errors.

On a CPU machine the fast backend is Triton under TRITON_INTERPRET=1 (tests/conftest.py).
"""
from __future__ import annotations

import random
import re
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from restorenet.models.adarevd import _blend_tiles, _tile_starts
from restorenet.ops import available_backends, use_backend
from restorenet.ops import _backend
from restorenet.ops import tiles as tiles_mod
from restorenet.ops.tiles import (tile_blend, tile_gather, tile_plan, tile_schedule,
                                  tile_starts)
from restorenet.testing import assert_within_baseline_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# "cuda" only once restorenet._C carries these kernels.
FAST_BACKENDS = [b for b in available_backends(DEVICE, "tile_gather_forward") if b != "reference"]
BACKENDS = ["reference"] + FAST_BACKENDS
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def ragged_batch(channels=5, dtype=torch.float32, scale=1):
    """Two tensors of different sizes (3 images): a channels_last one and a strided view."""
    a = torch.randn(2, channels, 64 // scale, 80 // scale, device=DEVICE).to(dtype)
    a = a.contiguous(memory_format=torch.channels_last)
    b = torch.randn(1, channels + 2, 48 // scale, 2 * 32 // scale, device=DEVICE).to(dtype)
    b = b[:, 1:channels + 1, :, ::2]  # not contiguous in any format
    return [a, b]


def level0_plan(tile=32, overlap=16):
    shapes = [torch.empty(2, 1, 64, 80, device="meta"), torch.empty(1, 1, 48, 32, device="meta")]
    return tile_plan(shapes, tile, overlap, multiple=16)


def naive_gather(feats, plan, order, scale):
    images = [img for f in feats for img in f]
    th, tw = plan.tile[0] // scale, plan.tile[1] // scale
    rows = plan.layout("cpu")[order.cpu()] if order is not None else plan.layout("cpu")
    return torch.stack([images[b][:, y // scale:y // scale + th, x // scale:x // scale + tw]
                        for b, y, x in rows[:, :3].tolist()])


# ---------------------------------------------------------------------- geometry


def test_tile_starts_follow_the_plain_path():
    assert tile_starts(80, 32, 16) == [0, 16, 32, 48]
    assert tile_starts(70, 32, 8) == [0, 24, 38]  # last one shifted inward
    assert tile_starts(32, 32, 16) == [0]
    for length in range(16, 208, 16):
        for tile in (32, 48, 64):
            for overlap in (0, 16, 32):
                if overlap < tile <= length:
                    assert tile_starts(length, tile, overlap) == _tile_starts(length, tile, overlap)


def test_plan_layout_cells_and_unflatten():
    plan = level0_plan()
    assert plan.tiles_per_image == (12, 12, 2) and plan.num_tiles == 26 and plan.num_images == 3
    assert plan.grid(0) == (3, 4) and plan.grid(2) == (2, 1) and plan.max_cover == (2, 2)
    layout = plan.layout("cpu")
    col = {name: layout[:, i] for i, name in enumerate(tiles_mod.LAYOUT_COLUMNS)}
    assert col["image"].tolist() == [0] * 12 + [1] * 12 + [2] * 2
    assert layout[24].tolist() == [2, 0, 0, 0, 0, 1, 16, 32, 2 * 64 * 80, 48, 32, 6, 8]
    # The cells partition every image.
    for b, (h, w) in enumerate(plan.image_sizes):
        mine = col["image"] == b
        assert int((col["cell_h"] * col["cell_w"])[mine].sum()) == h * w
    exits = plan.unflatten(torch.arange(26))
    assert [e.shape for e in exits] == [(2, 3, 4), (1, 2, 1)]
    assert exits[0][1, 2, 3] == 23 and exits[1][0, 1, 0] == 25
    single = tile_plan(torch.empty(2, 3, 64, 64), 32, 16)
    assert not single.from_list and single.unflatten(torch.arange(18)).shape == (2, 3, 3)


def test_max_cover_counts_deep_overlaps():
    plan = tile_plan(torch.empty(1, 1, 64, 100), 48, 32, multiple=4)
    # Pixel 52 (where the shifted last tile starts) lies in tiles 16, 32, 48 and 52.
    assert plan.col_starts[0] == (0, 16, 32, 48, 52) and plan.max_cover == (2, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ramp_weights_follow_the_docstring_formula(dtype):
    plan = tile_plan([torch.empty(1, 1, 96, 100), torch.empty(1, 1, 48, 60)], (48, 32), (32, 8),
                     multiple=4)
    row_weight, col_weight = plan.weights(dtype, "cpu")

    def ramp(starts, j, size):  # min(1, (p + 1/2) / ov_prev) * min(1, (T - p - 1/2) / ov_next)
        values = []
        for p in range(size):
            v = 1.0
            if j > 0:
                v *= min(1.0, (p + 0.5) / (starts[j - 1] + size - starts[j]))
            if j + 1 < len(starts):
                v *= min(1.0, (size - p - 0.5) / (starts[j] + size - starts[j + 1]))
            values.append(v)
        return values

    expect_rows = [ramp(s, j, 48) for s in plan.row_starts for j in range(len(s))]
    expect_cols = [ramp(s, j, 32) for s in plan.col_starts for j in range(len(s))]
    torch.testing.assert_close(row_weight, torch.tensor(expect_rows, dtype=dtype), rtol=2e-7, atol=0)
    torch.testing.assert_close(col_weight, torch.tensor(expect_cols, dtype=dtype), rtol=2e-7, atol=0)


def released_grids_inverse(tiles, starts_y, starts_x, height, width, tile, overlap):
    """AdaRevD's released ``grids_inverse`` for one image, transcribed loop for loop:
    each tile's slices multiplied by linspace ramps in place, then summed."""
    def overlap_last(n, length):  # the released ek: n * stride + 2 * overlap - length
        return n * (tile - overlap) + 2 * overlap - length

    ek1, ek2 = overlap_last(len(starts_y), height), overlap_last(len(starts_x), width)
    out = torch.zeros(tiles.shape[1], height, width, dtype=tiles.dtype)
    lin = lambda a, b, n: torch.linspace(a, b, n, dtype=tiles.dtype)
    t = 0
    for i in starts_y:
        for j in starts_x:
            o = tiles[t].clone()
            if i != 0 and i + tile != height:
                o[:, :overlap, :] *= lin(0, 1, overlap)[:, None]
            if i + 2 * tile - ek1 < height:
                o[:, -overlap:, :] *= lin(1, 0, overlap)[:, None]
            if i + tile == height:
                o[:, :ek1, :] *= lin(0, 1, ek1)[:, None]
            if i + 2 * tile - ek1 == height:
                o[:, -ek1:, :] *= lin(1, 0, ek1)[:, None]
            if j != 0 and j + tile != width:
                o[:, :, :overlap] *= lin(0, 1, overlap)
            if j + 2 * tile - ek2 < width:
                o[:, :, -overlap:] *= lin(1, 0, overlap)
            if j + tile == width:
                o[:, :, :ek2] *= lin(0, 1, ek2)
            if j + 2 * tile - ek2 == width:
                o[:, :, -ek2:] *= lin(1, 0, ek2)
            out[:, i:i + tile, j:j + tile] += o
            t += 1
    return out


# Tile 48, overlap 16 (stride 32): one tile across (the fade-in quirk), two or more
# tiles with the last one overlapping by the overlap (80) or by more (64, 96, 160).
RELEASED_GEOMETRIES = [(48, 48), (48, 96), (96, 160), (80, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_released_blend_is_the_released_grids_inverse(backend):
    tile, overlap = 48, 16
    images = [torch.empty(1, 1, h, w, device="meta") for h, w in RELEASED_GEOMETRIES]
    plan = tile_plan(images, tile, overlap, multiple=16)
    gen = torch.Generator().manual_seed(3)
    tiles = torch.randn(plan.num_tiles, 3, tile, tile, generator=gen, dtype=torch.float64)
    order = torch.randperm(plan.num_tiles, generator=gen)
    out = tile_blend(tiles[order].to(DEVICE), plan, order.to(DEVICE), ramp="released",
                     backend=backend)
    first = 0
    for got, (h, w), ys, xs in zip(out, RELEASED_GEOMETRIES, plan.row_starts, plan.col_starts):
        count = len(ys) * len(xs)
        want = released_grids_inverse(tiles[first:first + count], ys, xs, h, w, tile, overlap)
        torch.testing.assert_close(got[0].cpu(), want, rtol=1e-12, atol=1e-12)
        first += count
    assert not torch.equal(out[0], tiles[0:1].to(DEVICE))  # the one-tile quirk fades in


def test_released_blend_of_a_clamped_tile_fades_in_over_the_given_overlap():
    # A caller that clamps the tile to a small image plans with overlap 0 and passes the
    # overlap the released code was given: the first 16 rows and columns fade in.
    plan = tile_plan(torch.empty(1, 1, 32, 48), (32, 48), 0, multiple=16)
    ones = torch.ones(1, 1, 32, 48, dtype=torch.float64)
    out = tile_blend(ones, plan, ramp="released", overlap=16)
    ramp = torch.ones(48, dtype=torch.float64)
    ramp[:16] = torch.linspace(0, 1, 16, dtype=torch.float64)
    torch.testing.assert_close(out[0, 0], ramp[:32, None] * ramp[None, :])
    assert torch.equal(tile_blend(ones, plan, ramp="released"), ones)  # overlap 0: no ramp


def test_blend_ramp_arguments_are_checked():
    plan = tile_plan(torch.empty(1, 1, 64, 64), 32, 16, multiple=16)
    tiles = torch.zeros(plan.num_tiles, 1, 32, 32)
    with pytest.raises(ValueError, match="ramp must be one of"):
        tile_blend(tiles, plan, ramp="linear")
    with pytest.raises(ValueError, match="overlap must be"):
        tile_blend(tiles, plan, ramp="released", overlap=-1)


# ------------------------------------------------------------------------ gather


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1, 4])
def test_gather_equals_slicing(backend, dtype, scale):
    feats = ragged_batch(dtype=dtype, scale=scale)
    plan = level0_plan()
    perm = torch.randperm(plan.num_tiles, device=DEVICE)
    for order in (None, perm, perm[:7]):
        out = tile_gather(feats, plan, order, scale=scale, backend=backend)
        assert out.is_contiguous() and out.dtype == dtype
        assert torch.equal(out, naive_gather(feats, plan, order, scale))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_from_a_single_tensor(backend):
    x = torch.randn(3, 4, 48, 64, device=DEVICE, dtype=torch.float64)  # level 1 of 96 x 128
    plan = tile_plan(torch.empty(3, 1, 96, 128, device="meta"), (32, 48), (16, 32), multiple=16)
    out = tile_gather(x, plan, scale=2, backend=backend)
    assert out.shape == (plan.num_tiles, 4, 16, 24)
    assert torch.equal(out, naive_gather([x], plan, None, 2))


# ------------------------------------------------------------------------- blend


def plain_blend(tiles_in_plan_order, plan, dtype):
    """AdaRevD's plain blend (the authors' loop), one tensor of the plan at a time."""
    outs, first, image = [], 0, 0
    for n, (h, w) in zip(plan.batch_sizes, plan.tensor_sizes):
        ys, xs = list(plan.row_starts[image]), list(plan.col_starts[image])
        count = n * len(ys) * len(xs)
        t = tiles_in_plan_order[first:first + count].to(dtype)
        outs.append(_blend_tiles(t.view(n, len(ys) * len(xs), *t.shape[1:]), ys, xs, h, w))
        first, image = first + count, image + n
    return outs


GEOMETRIES = [
    ([(2, 64, 80), (1, 48, 32)], 32, 16, 16),  # ragged, two per axis
    ([(1, 64, 100), (1, 48, 48)], 48, 32, 4),  # overlap > tile / 2: up to four tiles deep
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["ragged", "deep-overlap"])
def test_blend_equals_the_plain_blend(backend, dtype, geometry):
    shapes, tile, overlap, multiple = geometry
    plan = tile_plan([torch.empty(n, 1, h, w, device="meta") for n, h, w in shapes], tile, overlap,
                     multiple=multiple)
    tiles = torch.randn(plan.num_tiles, 3, tile, tile, dtype=torch.float64, device=DEVICE)
    order = torch.randperm(plan.num_tiles, device=DEVICE)
    out = tile_blend(tiles[order].to(dtype), plan, order, backend=backend)
    truth = plain_blend(tiles, plan, torch.float64)
    baseline = plain_blend(tiles.to(dtype), plan, dtype)  # the plain path at this precision
    assert isinstance(out, list) and len(out) == len(shapes)
    for o, t, b in zip(out, truth, baseline):
        assert o.dtype == dtype
        assert_within_baseline_error("blend", o, t, b, dtype)
        if dtype == torch.float32:  # same weights, same summation order
            torch.testing.assert_close(o, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blend_normalises_exactly(backend):
    plan = tile_plan(torch.empty(2, 1, 64, 100), 48, 32, multiple=4)
    for value in (1.0, 0.25):
        out = tile_blend(torch.full((plan.num_tiles, 2, 48, 48), value, device=DEVICE), plan,
                         backend=backend)
        assert out.shape == (2, 2, 64, 100) and torch.equal(out, torch.full_like(out, value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_then_blend_gives_the_images_back(backend):
    feats = ragged_batch(channels=3)
    plan = level0_plan()
    order = torch.randperm(plan.num_tiles, device=DEVICE)
    back = tile_blend(tile_gather(feats, plan, order, backend=backend), plan, order, backend=backend)
    for b, f in zip(back, feats):
        torch.testing.assert_close(b, f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.empty(0, 3, 64, 64, device=DEVICE)
    plan = tile_plan(x, 32, 16)
    assert plan.num_tiles == 0
    t = tile_gather(x, plan, backend=backend)
    assert t.shape == (0, 3, 32, 32)
    assert tile_blend(t, plan, backend=backend).shape == (0, 3, 64, 64)


# ---------------------------------------------------------------------- schedule


class HostReads(TorchDispatchMode):
    """Counts reads of tensor data by the host -- each one a device-to-host sync on CUDA:
    .item()/bool()/int() (aten._local_scalar_dense), data-dependent sizes (nonzero,
    boolean masks), and, with ``patch``, .tolist()/.numpy()/.cpu()."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2"):
            self.reads.append(name)
        elif name in ("index", "index_put", "index_put_") and any(  # x[mask]: a hidden nonzero
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self.reads.append(f"{name}[mask]")
        return func(*args, **(kwargs or {}))

    def patch(self, monkeypatch):
        for method in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, method)

            def counted(t, *a, _original=original, _name=method, **k):
                self.reads.append(_name)
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, method, counted)
        return self


def test_schedule_sorts_deepest_first():
    depth = torch.tensor([1, 3, 2, 3, 1, 2, 2], device=DEVICE)
    s = tile_schedule(depth, 3)
    assert s.order.tolist() == [1, 3, 2, 5, 6, 0, 4]  # stable: ties keep plan order
    assert s.active == (7, 5, 2) and s.num_columns == 3
    assert [s.exiting(k) for k in range(3)] == [slice(5, 7), slice(2, 5), slice(0, 2)]
    depth = torch.randint(1, 5, (200,), device=DEVICE)
    s = tile_schedule(depth, 6)
    sorted_depth = depth[s.order]
    assert torch.equal(sorted_depth, depth.sort(descending=True).values)
    for k in range(6):
        assert s.active[k] == int((depth > k).sum())
        assert bool((sorted_depth[s.exiting(k)] == k + 1).all())
    assert tile_schedule(torch.zeros(0, dtype=torch.long, device=DEVICE), 2).active == (0, 0)


def test_schedule_reads_the_host_once_for_all_groups(monkeypatch):
    depths = [torch.randint(1, 4, (n,), device=DEVICE) for n in (30, 5, 12)]
    with HostReads() as counter:
        counter.patch(monkeypatch)
        schedules = tile_schedule(depths, 3)
    assert len(counter.reads) == 1
    for d, s in zip(depths, schedules):
        assert s.active[0] == d.numel() and s.active[2] == int((d == 3).sum())
    with HostReads() as counter:  # the detector sees what the plain path does
        int(depths[0].max())
        depths[0][depths[0] > 1]
    assert counter.reads == ["_local_scalar_dense", "index[mask]"]


@pytest.mark.parametrize("depth,k,error,match", [
    (torch.tensor([1, 0, 2]), 3, ValueError, "^depth must hold exit depths in 1..3 .* from 0 to 2"),
    (torch.tensor([1, 4]), 3, ValueError, "^depth must hold exit depths in 1..3"),
    (torch.tensor([1.0, 2.0]), 3, TypeError, "^depth must have dtype"),
    (torch.ones(2, 2, dtype=torch.long), 3, ValueError, "^depth must be 1-D"),
    ([torch.tensor([1]), torch.tensor([5])], 3, ValueError, "^depth\\[1\\] must hold"),
    (torch.tensor([1]), 0, ValueError, "^num_columns"),
])
def test_schedule_rejects_bad_depths(depth, k, error, match):
    with pytest.raises(error, match=match):
        tile_schedule(depth, k)


# ------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    feats = ragged_batch(channels=3)
    boxes = torch.tensor([[2, 8, 0], [0, 16, 32], [1, 0, 48]], device=DEVICE)
    torch.library.opcheck(torch.ops.restorenet.tile_gather.default, (feats, boxes, 16, 32, backend))
    plan = level0_plan()
    tiles = torch.randn(plan.num_tiles, 3, 32, 32, device=DEVICE)
    slots = torch.randperm(plan.num_tiles, device=DEVICE)
    row_weight, col_weight = plan.weights(torch.float32, DEVICE)
    torch.library.opcheck(torch.ops.restorenet.tile_blend.default,
                          (tiles, slots, plan.layout(DEVICE), row_weight, col_weight,
                           plan.num_pixels, *plan.max_cover, backend))


def test_profiler_sees_the_named_ranges():
    feats, plan = ragged_batch(), level0_plan()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        s = tile_schedule(torch.randint(1, 3, (plan.num_tiles,), device=DEVICE), 2)
        tile_blend(tile_gather(feats, plan, s.order, backend="reference"), plan, s.order,
                   backend="reference")
    names = {e.name for e in prof.events()}
    assert {"restorenet::tile_schedule::fwd", "restorenet::tile_gather::fwd",
            "restorenet::tile_blend::fwd"} <= names


def test_cuda_backend_is_refused_until_its_kernels_exist(monkeypatch):
    monkeypatch.delenv("RESTORENET_BACKEND", raising=False)
    cuda = torch.device("cuda")  # only resolved, never allocated on
    built = types.SimpleNamespace()  # an extension built without the tile kernels
    monkeypatch.setattr(_backend, "cuda_extension", lambda: built)
    monkeypatch.setattr(tiles_mod, "cuda_extension", lambda: built)
    with pytest.raises(RuntimeError, match="tile_gather: backend='cuda' .* tile_gather_forward"):
        tiles_mod._resolve("tile_gather", "cuda", cuda)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="tile_blend_forward"):
        tiles_mod._resolve("tile_blend", None, cuda)
    fallback = "triton" if _backend.triton_available() else "reference"
    assert tiles_mod._resolve("tile_blend", None, cuda) == fallback  # automatic: skip cuda
    built.tile_blend_forward = lambda *a: None
    assert tiles_mod._resolve("tile_blend", None, cuda) == "cuda"
    if DEVICE.type == "cpu":
        feats, plan = ragged_batch(), level0_plan()
        with pytest.raises(RuntimeError, match="cuda"):
            tile_gather(feats, plan, backend="cuda")


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,kwargs,error,match", [
    (([torch.empty(1, 1, 64, 64)], 32, 32), {}, ValueError, "^tile must be larger than overlap"),
    (([torch.empty(1, 1, 64, 64)], 32, -1), {}, ValueError, "^overlap must be"),
    (([torch.empty(1, 1, 64, 64)], 40, 16), dict(multiple=16), ValueError, "^tile must be a multiple"),
    (([torch.empty(1, 1, 64, 64)], 32, 8), dict(multiple=16), ValueError, "^overlap must be a multiple"),
    (([torch.empty(1, 1, 64, 64), torch.empty(1, 1, 32, 64)], 48, 16), {}, ValueError,
     "^images\\[1\\] has size \\(32, 64\\), smaller than the tile"),
    ((torch.empty(1, 1, 72, 64), 32, 16), dict(multiple=16), ValueError,
     "^images has size .* not a multiple"),
    (([torch.empty(1, 64, 64)], 32, 16), {}, ValueError, "^images\\[0\\] must be 4-D"),
    (([], 32, 16), {}, TypeError, "^images must be"),
    ((torch.empty(1, 1, 64, 64), 32.0, 16), {}, TypeError, "^tile must be an int"),
    ((torch.empty(1, 1, 64, 64), 32, 16), dict(multiple=0), ValueError, "^multiple must be"),
])
def test_plan_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        tile_plan(*args, **kwargs)


def test_gather_and_blend_reject_bad_input():
    feats, plan = ragged_batch(), level0_plan()
    cases = [
        (lambda: tile_gather(feats[:1], plan), ValueError, "^feats must hold 2 tensors"),
        (lambda: tile_gather([feats[0][:, :, :32], feats[1]], plan), ValueError,
         "^feats\\[0\\] must have shape \\[2, 5, 64, 80\\]"),
        (lambda: tile_gather(feats, plan, scale=2), ValueError,
         "^feats\\[0\\] must have shape \\[2, 5, 32, 40\\]"),
        (lambda: tile_gather(feats, plan, scale=32), ValueError, "^scale must divide"),
        (lambda: tile_gather([feats[0], feats[1].double()], plan), TypeError,
         "^feats\\[1\\] must have dtype"),
        (lambda: tile_gather(feats, plan, torch.arange(3, dtype=torch.int32)), TypeError, "^order"),
        (lambda: tile_gather(feats, "plan"), TypeError, "^plan must be a TilePlan"),
        (lambda: tile_blend(torch.zeros(26, 3, 32, 16), plan), ValueError,
         "^tiles must have shape \\[26, C, 32, 32\\]"),
        (lambda: tile_blend(torch.zeros(26, 3, 32, 32), plan, torch.arange(25)), ValueError,
         "^order must be a permutation"),
        (lambda: tile_blend(torch.zeros(26, 3, 32, 32, dtype=torch.long), plan), TypeError,
         "^tiles must have dtype"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# ------------------------------------------------------------------ order checks


def spy_on_kernels(monkeypatch):
    """Record every call of a backend implementation (each one a kernel launch)."""
    launches = []
    for table, op in ((tiles_mod._GATHER, "gather"), (tiles_mod._BLEND, "blend")):
        for name, impl in list(table.items()):
            def spy(*args, _impl=impl, _name=f"{op}:{name}"):
                launches.append(_name)
                return _impl(*args)

            monkeypatch.setitem(table, name, spy)
    return launches


def raised(call):
    """(type, message) of what ``call()`` raises; (None, "returned") if it returns."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 -- which one is what the callers check
        return type(e), str(e)
    return None, "returned"


def edited_schedule_order(n_tiles, at, value):
    """A schedule's order changed in place after tile_schedule marked it."""
    order = tile_schedule(torch.ones(n_tiles, dtype=torch.long, device=DEVICE), 1).order
    order[at] = value
    return order


def test_blend_rejects_an_order_that_is_not_a_permutation_before_any_kernel(monkeypatch):
    # A repeated index used to leave a slot unwritten: the Triton interpreter then
    # crashed the process and the reference read garbage. Now one message, every backend.
    plan = level0_plan()  # 26 tiles
    tiles = torch.zeros(26, 3, 32, 32, device=DEVICE)
    repeated = torch.arange(26, device=DEVICE)
    repeated[3] = 4
    rule = ("^order must be a permutation of 0\\.\\.25 \\(each of the plan's 26 tiles once\\): "
            f"a list of ints, or an int64 tensor \\[26\\] on {tiles.device}; got ")
    cases = [
        (repeated, ValueError, "a tile twice"),
        (repeated.tolist(), ValueError, "a tile twice"),
        (edited_schedule_order(26, 0, 1), ValueError, "a tile twice"),
        (torch.arange(1, 27, device=DEVICE), ValueError, "values from 1 to 26"),
        ([-1] + list(range(1, 26)), ValueError, "values from -1 to 25"),
        (torch.arange(25, device=DEVICE), ValueError, "shape \\(25,\\)"),
        (list(range(27)), ValueError, "27 values"),
        (torch.arange(26, device=DEVICE, dtype=torch.int32), TypeError, "dtype torch.int32"),
        (torch.ones(26, device=DEVICE, dtype=torch.bool), TypeError, "dtype torch.bool"),
        ([True] * 26, TypeError, "list of bool"),
        (torch.arange(26, device=DEVICE)[None], ValueError, "shape \\(1, 26\\)"),
        (torch.arange(26, device="meta"), ValueError, "a tensor on meta"),
        ("0..25", TypeError, "str"),
    ]
    launches = spy_on_kernels(monkeypatch)
    for order, error, got in cases:
        seen = set()
        for backend in BACKENDS:
            with pytest.raises(error, match=rule + got) as info:
                tile_blend(tiles, plan, order, backend=backend)
            seen.add(str(info.value))
        assert len(seen) == 1, seen  # the same message on every backend
    assert launches == []


def test_gather_rejects_indices_outside_the_plan_before_any_kernel(monkeypatch):
    feats, plan = ragged_batch(), level0_plan()
    rule = (f"^order must hold plan tile indices in 0\\.\\.25: a list of ints, or a 1-D int64 "
            f"tensor on {feats[0].device}; got ")
    cases = [
        (torch.tensor([0, 26], device=DEVICE), ValueError, "values from 0 to 26"),
        ([5, -2], ValueError, "values from -2 to 5"),
        (edited_schedule_order(26, 2, 99), ValueError, "values from 0 to 99"),
        (torch.arange(27, device=DEVICE), ValueError, "values from 0 to 26"),  # too long
        (torch.zeros((), dtype=torch.long, device=DEVICE), ValueError, "shape \\(\\)"),
        (torch.zeros(2, device=DEVICE), TypeError, "dtype torch.float32"),
        ([1.0, 2.0], TypeError, "list of float"),
    ]
    launches = spy_on_kernels(monkeypatch)
    for order, error, got in cases:
        for backend in BACKENDS:
            with pytest.raises(error, match=rule + got):
                tile_gather(feats, plan, order, backend=backend)
    assert launches == []
    # A gather may repeat tiles and take any number of them (row p is tile order[p]).
    out = tile_gather(feats, plan, [3, 3, 0], backend="reference")
    assert torch.equal(out, naive_gather(feats, plan, torch.tensor([3, 3, 0]), 1))


def test_only_a_users_tensor_order_costs_a_host_read(monkeypatch):
    feats, plan = ragged_batch(channels=3), level0_plan()
    depth = torch.randint(1, 3, (plan.num_tiles,), device=DEVICE)
    schedule = tile_schedule(depth, 2)
    user = schedule.order.clone()  # the same values, but not tile_schedule's tensor
    for order, reads in ((None, 0), (schedule.order, 0), (user.tolist(), 0), (user, 1)):
        with HostReads() as counter:
            counter.patch(monkeypatch)
            t = tile_gather(feats, plan, order)
            tile_blend(t, plan, order)
        monkeypatch.undo()
        assert counter.reads == ["tolist"] * (2 * reads), (order, counter.reads)


def test_lists_of_ints_work_wherever_integer_tensors_do():
    depth = [1, 3, 2, 3, 1, 2, 2]
    single = tile_schedule(depth, 3)
    assert single.order.tolist() == [1, 3, 2, 5, 6, 0, 4] and single.active == (7, 5, 2)
    both = tile_schedule([depth, torch.tensor([2, 1], device=DEVICE), []], 3)
    assert [s.active for s in both] == [(7, 5, 2), (2, 1, 0), (0, 0, 0)]
    assert all(s.order.device == DEVICE for s in both)
    feats, plan = ragged_batch(), level0_plan()
    perm = torch.randperm(plan.num_tiles, device=DEVICE)
    for backend in BACKENDS:
        t = tile_gather(feats, plan, perm.tolist(), backend=backend)
        assert torch.equal(t, tile_gather(feats, plan, perm, backend=backend))
        for a, b in zip(tile_blend(t, plan, perm.tolist(), backend=backend),
                        tile_blend(t, plan, perm, backend=backend)):
            assert torch.equal(a, b)


# -------------------------------------------------------------------- compile


def pipeline(images, feats):
    """The module docstring's pipeline: exits from a stand-in classifier, data-dependent
    column prefixes, the schedule's order reused by the gather and the blend. Exact
    arithmetic only (no reductions a compiler may reorder), so compiled == eager."""
    plan = tile_plan(images, 32, 16, multiple=16)
    e3 = tile_gather(feats, plan)
    depth = (e3[:, 0, 0, 0] * 4).floor().long() % 3 + 1
    schedule = tile_schedule(depth, 3)
    t = tile_gather(feats, plan, schedule.order)
    out = torch.zeros_like(t)
    for k in range(3):
        t = t[:schedule.active[k]] * 2 + 1
        out[schedule.exiting(k)] = t[schedule.exiting(k)]
    return tile_blend(out, plan, schedule.order)


def test_compiled_pipeline_has_one_declared_graph_break():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 64, 80, device=DEVICE)
    explained = torch._dynamo.explain(pipeline)(x, x)
    assert explained.graph_count == 2 and explained.graph_break_count == 1
    (reason,) = explained.break_reasons
    assert "torch.compiler.disable" in reason.reason  # declared, not a data-dependent guard
    assert "tile_schedule(" in reason.user_stack[-1].line
    torch._dynamo.reset()
    compiled = torch.compile(pipeline, backend="inductor")
    for seed in range(3):  # other exits: other prefixes, traced again
        torch.manual_seed(seed)
        x = torch.randn(2, 3, 64, 80, device=DEVICE)
        assert torch.equal(compiled(x, x), pipeline(x, x))


def test_plan_gather_and_blend_compile_to_one_graph():
    # fullgraph=True: no break anywhere. aot_eager runs the fake kernels and the real ones.
    x = torch.randn(2, 3, 64, 80, device=DEVICE)
    plan = tile_plan(x, 32, 16, multiple=16)
    tiles = torch.randn(plan.num_tiles, 3, 32, 32, device=DEVICE)
    order = tile_schedule(torch.randint(1, 3, (plan.num_tiles,), device=DEVICE), 2).order
    cases = [
        (lambda im: tile_gather(im, tile_plan(im, 32, 16, multiple=16), scale=1), (x,)),
        (lambda f: tile_gather(f, plan), (x,)),
        (lambda f: tile_gather(f, plan, [5, 0, 3]), (x,)),
        (lambda f, o: tile_gather(f, plan, o), (x, order)),
        (lambda t: tile_blend(t, plan), (tiles,)),
        (lambda t, o: tile_blend(t, plan, o), (tiles[order], order)),
    ]
    for fn, args in cases:
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(*args), fn(*args))


def test_compiled_blend_still_checks_a_users_order():
    plan = level0_plan()
    bad = torch.arange(26, device=DEVICE)
    bad[0] = 1
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, o: tile_blend(t, plan, o), backend="eager")
    tiles = torch.zeros(26, 3, 32, 32, device=DEVICE)
    with pytest.raises(ValueError, match="^order must be a permutation .* a tile twice"):
        compiled(tiles, bad)
    good = torch.randperm(26, device=DEVICE)
    assert all(torch.equal(a, b) for a, b in zip(compiled(tiles, good), tile_blend(tiles, plan, good)))


# ---------------------------------------------------------- randomised inputs


def random_geometry(rng):
    """A small valid plan from a list or a tensor: tile, overlap and sizes multiples of m."""
    m = rng.choice([1, 2, 4])
    th, tw = (m * rng.randint(-(-4 // m), 16 // m) for _ in range(2))
    overlap = (m * rng.randint(0, th // m - 1), m * rng.randint(0, tw // m - 1))
    shapes = [(rng.randint(1, 2), th + m * rng.randint(0, 6), tw + m * rng.randint(0, 6))
              for _ in range(rng.randint(1, 2))]
    images = [torch.empty(n, 1, h, w, device="meta") for n, h, w in shapes]
    from_list = len(shapes) > 1 or rng.random() < 0.5
    plan = tile_plan(images if from_list else images[0], (th, tw), overlap, multiple=m)
    return plan, shapes, from_list


def random_feats(rng, plan, shapes, from_list, scale, channels, dtype=torch.float32):
    feats = []
    for n, h, w in shapes:
        f = torch.randn(n, channels + 1, h // scale, w // scale, device=DEVICE).to(dtype)
        kind = rng.choice(["nchw", "nhwc", "view"])
        f = (f[:, 1:] if kind == "view" else
             f[:, :channels].contiguous(memory_format=torch.channels_last) if kind == "nhwc" else
             f[:, :channels].contiguous())
        feats.append(f)
    return feats if from_list else feats[0]


def as_list(feats):
    return feats if isinstance(feats, list) else [feats]


KEEP = object()  # an argument a mutation leaves as the setup has it


class Setup:
    """A valid call of every op; a mutation below spoils one argument of one of them."""

    def __init__(self, rng):
        self.plan, self.shapes, self.from_list = random_geometry(rng)
        self.rng, self.T = rng, self.plan.num_tiles
        self.scale = rng.choice([s for s in (1, 2, 4) if self.plan.multiple % s == 0])
        self.feats = random_feats(rng, self.plan, self.shapes, self.from_list, self.scale, 3)
        self.tiles = torch.randn(self.T, 3, *self.plan.tile, device=DEVICE)
        self.depth = torch.randint(1, 4, (self.T,), device=DEVICE)

    def images(self):
        images = [torch.empty(n, 1, h, w, device="meta") for n, h, w in self.shapes]
        return images if self.from_list else images[0]

    def feats_name(self, i=0):
        return f"feats[{i}]" if self.from_list else "feats"

    def gather(self, order=None, feats=KEEP, plan=KEEP, scale=KEEP):
        return lambda backend: tile_gather(self.feats if feats is KEEP else feats,
                                           self.plan if plan is KEEP else plan, order,
                                           scale=self.scale if scale is KEEP else scale,
                                           backend=backend)

    def blend(self, tiles=KEEP, order=None, plan=KEEP):
        return lambda backend: tile_blend(self.tiles if tiles is KEEP else tiles,
                                          self.plan if plan is KEEP else plan, order,
                                          backend=backend)

    def schedule(self, depth, k=3):
        return lambda backend: tile_schedule(depth, k)

    def plan_with(self, **changes):
        a = dict(images=self.images(), tile=self.plan.tile, overlap=self.plan.overlap,
                 multiple=self.plan.multiple) | changes
        return lambda backend: tile_plan(a["images"], a["tile"], a["overlap"], multiple=a["multiple"])

    def perm(self):
        return torch.randperm(self.T, device=DEVICE)


def _spoil(s, order, value):
    """``order`` with one entry set to ``value``, or with "repeat" to another entry's
    value (out of range where there is no other entry)."""
    at = s.rng.randrange(s.T)
    if value == "repeat":
        value = order[(at + s.rng.randrange(1, s.T)) % s.T] if s.T > 1 else s.T
    order[at] = value
    return order


def _repeat(s):
    return _spoil(s, s.perm(), "repeat")


def _edited(s, value):
    return _spoil(s, tile_schedule(s.depth, 3).order, value)


def _resized(f, dim, by):
    shape = list(f.shape)
    shape[dim] += by
    return torch.zeros(shape, dtype=f.dtype, device=f.device)


def _swap_first(s, f):
    feats = list(as_list(s.feats))
    feats[0] = f
    return feats if s.from_list else feats[0]


bad = float("nan")
# (the argument the message must name, a call with that argument spoilt)
MUTATIONS = [
    # tile_plan
    lambda s: ("images", s.plan_with(images=[])),
    lambda s: ("images", s.plan_with(images=None)),
    lambda s: ("images", s.plan_with(images=torch.empty(1, 16, 16))),
    lambda s: ("images", s.plan_with(images=[torch.empty(1, 1, 2, 2)] * 2, multiple=1)),
    lambda s: ("tile", s.plan_with(tile=s.rng.choice([0, -4, True, (4, True), 2.5, bad, (4, 4, 4), "8"]))),
    lambda s: ("overlap", s.plan_with(overlap=s.rng.choice([-1, (0, -4), False, 1.5, bad, None]))),
    lambda s: ("tile", s.plan_with(overlap=s.plan.tile)),  # "tile must be larger than overlap"
    lambda s: ("multiple", s.plan_with(multiple=s.rng.choice([0, -2, True, 2.0, None]))),
    lambda s: ("tile", s.plan_with(tile=(3, 3), overlap=0, multiple=2)),
    # tile_schedule
    lambda s: ("depth", s.schedule(torch.tensor(s.rng.choice([[0, 1], [1, 4], [-3]]), device=DEVICE))),
    lambda s: ("depth", s.schedule(s.depth.to(s.rng.choice([torch.float32, torch.bool])))),
    lambda s: ("depth", s.schedule(s.depth[None])),
    lambda s: ("depth", s.schedule(s.depth.to("meta"))),
    lambda s: ("depth", s.schedule(s.rng.choice([None, 3, "1", [], {1: 2}, [1, 2.0], [True], [1, None]]))),
    lambda s: ("depth", s.schedule([s.depth, torch.tensor([1, 9], device=DEVICE)])),
    lambda s: ("depth", s.schedule([s.depth, s.depth.to("meta")])),
    lambda s: ("num_columns", s.schedule(s.depth, s.rng.choice([0, -1, True, 2.0, None]))),
    # tile_gather
    lambda s: ("plan", s.gather(plan=s.rng.choice([None, "plan", s.plan.layout("cpu")]))),
    lambda s: ("feats", s.gather(feats=s.rng.choice([None, 3, "feats", {0: 1}]))),
    lambda s: ("feats", s.gather(feats=as_list(s.feats) * 2)),
    # (the first tensor sets the channel count -- any, where it is the only one: a
    # wrong one there names the next tensor)
    lambda s: ("feats", s.gather(feats=_swap_first(s, _resized(as_list(s.feats)[0], s.rng.choice([0, 2, 3] + [1] * (len(s.shapes) > 1)), 1)))),
    lambda s: (s.feats_name(), s.gather(feats=_swap_first(s, as_list(s.feats)[0][0]))),
    lambda s: (s.feats_name(), s.gather(feats=_swap_first(s, as_list(s.feats)[0].to(s.rng.choice([torch.int32, torch.bool, torch.complex64]))))),
    lambda s: ("feats[1]", s.gather(feats=[as_list(s.feats)[0], as_list(s.feats)[0].double()], plan=tile_plan([torch.empty(*as_list(s.feats)[0].shape[:2], s.shapes[0][1], s.shapes[0][2])] * 2, s.plan.tile, s.plan.overlap, multiple=s.plan.multiple))),
    lambda s: ("scale", s.gather(scale=s.rng.choice([0, -2, 3, 6, True, 2.0, None, bad, 8 * s.plan.multiple]))),
    lambda s: ("order", s.gather(order=torch.tensor([s.T + s.rng.randint(0, 3)], device=DEVICE))),
    lambda s: ("order", s.gather(order=[s.rng.randint(-5, -1)])),
    lambda s: ("order", s.gather(order=_edited(s, s.T))),
    lambda s: ("order", s.gather(order=s.perm().to(s.rng.choice([torch.int32, torch.float32, torch.bool, torch.uint8])))),
    lambda s: ("order", s.gather(order=s.perm()[None])),
    lambda s: ("order", s.gather(order=s.perm().to("meta"))),
    lambda s: ("order", s.gather(order=s.rng.choice([3, "0", [0.0], [True], [[0]], [None], bad]))),
    # tile_blend
    lambda s: ("tiles", s.blend(tiles=s.rng.choice([None, 1.0, [s.tiles]]))),
    lambda s: ("tiles", s.blend(tiles=s.tiles[0])),
    lambda s: ("tiles", s.blend(tiles=_resized(s.tiles, s.rng.choice([0, 2, 3]), s.rng.choice([-1, 1])))),
    lambda s: ("tiles", s.blend(tiles=s.tiles.to(s.rng.choice([torch.int64, torch.bool, torch.complex64])))),
    lambda s: ("plan", s.blend(plan=s.rng.choice([None, "plan"]))),
    lambda s: ("order", s.blend(order=_repeat(s))),
    lambda s: ("order", s.blend(order=_repeat(s).tolist())),
    lambda s: ("order", s.blend(order=_edited(s, s.rng.choice([-1, s.T, "repeat"])))),
    lambda s: ("order", s.blend(order=torch.arange(s.T + s.rng.choice([-1, 1]), device=DEVICE))),
    lambda s: ("order", s.blend(order=list(range(s.T + 1)))),
    lambda s: ("order", s.blend(order=s.perm() + s.rng.choice([-1, 1]))),
    lambda s: ("order", s.blend(order=s.perm().to(s.rng.choice([torch.int32, torch.float64, torch.bool])))),
    lambda s: ("order", s.blend(order=s.perm().to("meta"))),
    lambda s: ("order", s.blend(order=tile_schedule(torch.ones(s.T + 1, dtype=torch.long), 1).order)),
]


def test_randomised_bad_input_is_refused_the_same_way_by_every_backend(monkeypatch):
    """200 seeded cases, each a random valid call with one argument spoilt (every
    mutation about four times, with random values). Each must raise before any kernel
    runs (a kernel fed a bad order crashed the process: this test would not finish),
    an error of ours that names the argument, the same on every backend."""
    rng = random.Random(2024)
    launches = spy_on_kernels(monkeypatch)
    for case in range(200):
        setup = Setup(rng)
        name, call = MUTATIONS[case % len(MUTATIONS)](setup)
        outcomes = {raised(lambda: call(backend)) for backend in BACKENDS}
        assert len(outcomes) == 1, (case, name, outcomes)
        ((error, message),) = outcomes
        assert error is not None, (case, name, "no error")
        assert issubclass(error, (ValueError, TypeError, IndexError, RuntimeError)), (case, error, message)
        assert re.match(rf"{re.escape(name)}(\[\d+\])?(?![\w\[])", message), (case, name, message)
        assert launches == [], (case, launches)


def test_randomised_valid_calls_match_the_spec():
    """Random geometries (deep overlaps, one tile, ragged lists), layouts, channel counts
    (also 0), orders (None, tensor, list, a schedule's, subsets, repeats for the gather)
    and NaN tiles: every backend against plain slicing and AdaRevD's plain blend."""
    rng = random.Random(7)
    for case in range(24):
        plan, shapes, from_list = random_geometry(rng)
        T = plan.num_tiles
        dtype = rng.choice([torch.float32, torch.float64])
        channels = rng.choice([0, 1, 3, 4])
        scale = rng.choice([s for s in (1, 2, 4) if plan.multiple % s == 0])
        feats = random_feats(rng, plan, shapes, from_list, scale, channels, dtype)
        depth = torch.randint(1, 4, (T,), device=DEVICE)
        schedule = tile_schedule(depth.tolist() if rng.random() < 0.5 else depth, 3)
        assert torch.equal(depth[schedule.order], depth.sort(descending=True, stable=True).values)
        assert schedule.active == tuple(int((depth > k).sum()) for k in range(3))
        perm = torch.randperm(T, device=DEVICE)
        picks = torch.randint(0, T, (rng.randint(0, 2 * T),), device=DEVICE)
        gather_order = rng.choice([None, perm, perm.tolist(), schedule.order, picks, picks.tolist()])
        want = naive_gather(as_list(feats), plan, None if gather_order is None
                            else torch.as_tensor(gather_order, device=DEVICE), scale)
        for backend in BACKENDS:
            got = tile_gather(feats, plan, gather_order, scale=scale, backend=backend)
            assert got.dtype == dtype and torch.equal(got, want), (case, backend)

        tiles = torch.randn(T, channels, *plan.tile, dtype=torch.float64, device=DEVICE)
        if T and rng.random() < 0.25:
            tiles[rng.randrange(T)] = float("nan")
        blend_order = rng.choice([None, perm, perm.tolist(), schedule.order])
        index = None if blend_order is None else torch.as_tensor(blend_order, device=DEVICE)
        sorted_tiles = (tiles if index is None else tiles[index]).to(dtype)
        truth = plain_blend(tiles, plan, torch.float64)
        for backend in BACKENDS:
            out = tile_blend(sorted_tiles, plan, blend_order, backend=backend)
            for o, t in zip(as_list(out), truth):
                assert o.dtype == dtype
                torch.testing.assert_close(o, t.to(dtype), equal_nan=True, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"case {case}, {backend}: {m}")
