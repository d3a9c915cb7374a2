"""Ragged tile ops: plan geometry, gather and blend on every backend against plain
slicing and AdaRevD's plain blend, the schedule (and its single host read), errors.

On a CPU machine the fast backend is Triton under TRITON_INTERPRET=1 (tests/conftest.py).
"""
from __future__ import annotations

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from restorenet.models.adarevd import _blend_tiles, _ramps, _tile_starts
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
def test_ramp_weights_are_exactly_the_plain_paths(dtype):
    plan = tile_plan([torch.empty(1, 1, 96, 100), torch.empty(1, 1, 48, 60)], (48, 32), (32, 8),
                     multiple=4)
    row_weight, col_weight = plan.weights(dtype, "cpu")
    like = torch.empty(0, dtype=dtype)
    expect_rows = [r for s in plan.row_starts for r in _ramps(list(s), 48, like)]
    expect_cols = [r for s in plan.col_starts for r in _ramps(list(s), 32, like)]
    assert torch.equal(row_weight, torch.stack(expect_rows))
    assert torch.equal(col_weight, torch.stack(expect_cols))


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
