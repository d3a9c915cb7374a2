"""The tile ops' CUDA backend (restorenet._C, csrc/tiles.cu) on a GPU.

tests/ops/test_tiles.py already runs the cuda backend through the shared cases
(it joins the backend list once the extension has the kernels). This file adds
the CUDA kernels' own axes: every dtype including bfloat16, NCHW / channels_last /
strided sources and tiles, the five AdaRevD feature levels at paper tile size,
determinism, no host synchronisation, and ``AdaRevD.restore`` end to end with
the tile ops on cuda against the same restore with the reference tile ops.

Skipped without a CUDA device or without the compiled kernels. The kernels'
indexing is also tested on CPU (tests/csrc/test_tiles_emulated.py).
"""
from __future__ import annotations

import pytest
import torch

from restorenet.ops import tiles as tiles_mod
from restorenet.ops._backend import cuda_extension
from restorenet.ops.tiles import tile_blend, tile_gather, tile_plan, tile_schedule
from restorenet.testing import assert_within_baseline_error

from _cuda_helpers import cuda_backend_marks

pytestmark = cuda_backend_marks("tile_gather_forward", "the tile kernels")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "nhwc", "view"]


def feature_level(n, c, h, w, dtype, layout, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c + 2, h, 2 * w, device="cuda", generator=g).to(dtype)
    if layout == "view":
        return x[:, 1:c + 1, :, ::2]
    x = x[:, :c, :, :w].contiguous()
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


def paper_plan():
    """AdaRevD's real geometry: tile 384, overlap 32, a GoPro-size 720x1280 image (2 x 4
    tiles) and a 512x768 one (2 x 3); levels 0..4 cut at scales 1..16."""
    shapes = [torch.empty(1, 1, 720, 1280, device="meta"), torch.empty(1, 1, 512, 768, device="meta")]
    return tile_plan(shapes, 384, 32, multiple=16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_every_level_is_a_bitwise_copy(dtype, layout):
    plan = paper_plan()
    order = torch.randperm(plan.num_tiles, device="cuda")
    widths = (32, 64, 128, 256, 512)  # AdaRevD-B's channels per level
    for level, c in enumerate(widths):
        s = 2 ** level
        feats = [feature_level(1, c, 720 // s, 1280 // s, dtype, layout, seed=level),
                 feature_level(1, c, 512 // s, 768 // s, dtype, "nchw", seed=level + 9)]
        for o in (order, order[:5]):
            out = tile_gather(feats, plan, o, scale=s, backend="cuda")
            ref = tile_gather(feats, plan, o, scale=s, backend="reference")
            assert out.is_contiguous() and torch.equal(out, ref), (level, o.numel())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blend_matches_the_reference(dtype, channels_last):
    plan = paper_plan()
    truth_tiles = torch.randn(plan.num_tiles, 3, 384, 384, dtype=torch.float64, device="cuda")
    order = torch.randperm(plan.num_tiles, device="cuda")
    tiles = truth_tiles[order].to(dtype)
    if channels_last:
        tiles = tiles.contiguous(memory_format=torch.channels_last)
    out = tile_blend(tiles, plan, order, backend="cuda")
    base = tile_blend(tiles, plan, order, backend="reference")
    truth = tile_blend(truth_tiles[order], plan, order, backend="reference")
    for o, b, t in zip(out, base, truth):
        assert o.dtype == dtype and not o.isnan().any()
        assert_within_baseline_error("blend", o, t, b, dtype)
    again = tile_blend(tiles, plan, order, backend="cuda")
    assert all(torch.equal(a, o) for a, o in zip(again, out)), "not deterministic"


def test_blend_many_channels_and_constants():
    plan = tile_plan(torch.empty(2, 1, 64, 100, device="meta"), 48, 32, multiple=4)  # 4 deep
    tiles = torch.randn(plan.num_tiles, 70, 48, 48, device="cuda").contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(tile_blend(tiles, plan, backend="cuda"),
                               tile_blend(tiles, plan, backend="reference"), rtol=1e-5, atol=1e-6)
    const = torch.full((plan.num_tiles, 2, 48, 48), 0.25, device="cuda")
    out = tile_blend(const, plan, backend="cuda")
    assert torch.equal(out, torch.full_like(out, 0.25))


def test_no_host_synchronisation():
    plan = paper_plan()
    feats = [feature_level(1, 32, 720, 1280, torch.float16, "nhwc"),
             feature_level(1, 32, 512, 768, torch.float16, "nchw")]
    # The schedule's order is trusted (a user's tensor order costs one checking read).
    order = tile_schedule(torch.randint(1, 4, (plan.num_tiles,), device="cuda"), 3).order
    plan.layout("cuda"), plan.weights(torch.float16, "cuda")  # cached host-to-device tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t = tile_gather(feats, plan, order, backend="cuda")
        tile_blend(t[:, :3], plan, order, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_opcheck_and_binding_errors():
    x = torch.randn(2, 3, 64, 64, device="cuda")
    boxes = torch.tensor([[1, 8, 0], [0, 16, 32]], device="cuda")
    torch.library.opcheck(torch.ops.restorenet.tile_gather.default, ([x], boxes, 16, 32, "cuda"))
    ext = cuda_extension()
    with pytest.raises(TypeError, match="^boxes must have dtype int64"):
        ext.tile_gather_forward([x], boxes.int(), 16, 16)
    with pytest.raises(ValueError, match="^feats\\[1\\] must have 3 channels"):
        ext.tile_gather_forward([x, x[:, :2]], boxes, 16, 16)
    plan = tile_plan(x, 32, 16)
    tiles = torch.randn(plan.num_tiles, 3, 32, 32, device="cuda")
    row_weight, col_weight = plan.weights(torch.float32, "cuda")
    slots = torch.arange(plan.num_tiles, device="cuda")
    with pytest.raises(TypeError, match="^row_weight must have dtype"):
        ext.tile_blend_forward(tiles, slots, plan.layout("cuda"), row_weight.double(), col_weight,
                               plan.num_pixels, 2, 2)
    with pytest.raises(ValueError, match="^layout must have shape"):
        ext.tile_blend_forward(tiles, slots, plan.layout("cuda")[:, :5], row_weight, col_weight,
                               plan.num_pixels, 2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adarevd_restore_end_to_end(monkeypatch, dtype):
    """restore() with the tile ops on cuda vs on reference; every other op on the same
    (automatic) backend in both runs. Ragged list input, two exit depths."""
    import restorenet

    model = restorenet.create_model("adarevd", num_decoders=3, width=8, enc_blocks=(1, 1, 1, 1),
                                    middle_blocks=1).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    imgs = [torch.rand(2, 3, 96, 128, device="cuda", generator=g),
            torch.rand(3, 80, 64, device="cuda", generator=g)]
    calls = {"tile_gather": 0, "tile_blend": 0}

    def run(backend):
        def resolve(op, _backend, _device):
            calls[op] += backend == "cuda"
            return backend

        monkeypatch.setattr(tiles_mod, "_resolve", resolve)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            return model.restore(imgs, tile=48, overlap=16, exit_idx=[3, 2, 2, 1, 1, 1],
                                 return_exits=True)

    out_ref, exits_ref = run("reference")
    out_cuda, exits_cuda = run("cuda")
    assert calls["tile_gather"] >= 6 and calls["tile_blend"] >= 1, calls
    for e_ref, e_cuda in zip(exits_ref, exits_cuda):
        assert torch.equal(e_ref, e_cuda)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for o_ref, o_cuda in zip(out_ref, out_cuda):
        assert o_cuda.shape == o_ref.shape
        torch.testing.assert_close(o_cuda, o_ref, **tol)
