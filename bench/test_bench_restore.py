"""AdaRevD adaptive tiled inference (``AdaRevD.restore``): ragged batching vs the rest.

Three ways to restore the same images, timed in one group per (class mix, batch):

    batched   restore(batched=True): all tiles of the batch sorted by exit depth, column
              k runs on a prefix of them (restorenet.ops tile ops), one host read;
    plain     restore(batched=False): the authors' way, every column gathers the tiles
              still running with a boolean mask and scatters the exits back (host syncs);
    all-K     restore(batched=True, exit_idx=[K]*6): every tile through all K columns,
              i.e. what early exiting saves against.

Class mixes. The classifier is replaced by ``FixedClassClassifier``, a stand-in that
returns one-hot logits of a fixed class per tile (plan order: image, tile row, tile
column -- the order both paths feed it), so the exit depths are known and identical
on every path and round. With the GoPro exit map of AdaRevD-B, exit_idx = (4,4,3,3,2,1):

    all-easy    every tile class 5 -> exits after column 1
    all-hard    every tile class 0 -> runs all K = 4 columns
    gopro-like  class histogram GOPRO_LIKE_CLASS_P = (0.10, 0.35, 0.30, 0.15, 0.07, 0.03)
                for PSNR(blurry, sharp) in <20, 20-25, 25-30, 30-35, 35-40, >=40 dB:
                an ASSUMED spread around the ~25.6 dB mean PSNR of GoPro's blurry test
                inputs (not measured from the data set); per-depth: 4 cols 45 %,
                3 cols 45 %, 2 cols 7 %, 1 col 3 %. Exact quotas (largest remainder)
                over the batch's tiles, shuffled with a fixed seed.

Ideal time (``extra_info["ideal_s"]``, ``["time_vs_ideal"]``; issue target <= 1.1):

    ideal = t_encoder + sum_k active_k * c_column + T * c_head + t_blend

with active_k the tiles that run column k in the mix (all T for all-K), c_column the
per-tile cost of one column measured once per batch size (one column on all T tiles
of the batch, divided by T), c_head likewise for a head, t_encoder the encoder on the
padded batch and t_blend one ``tile_blend``. Tile cutting (``tile_gather``) and the
(stand-in) classifier are overhead, not part of the ideal; ``t_gather_s`` is recorded.

Host syncs and launches (``extra_info["host_reads"]``, ``["host_syncs"]``): one untimed
restore under torch.profiler, minus what the profiler shows around an empty call
(``trace_summary``): aten::item / aten::_local_scalar_dense / aten::nonzero (data-
dependent host reads), the boolean-mask gathers and index scatters (aten::index,
aten::index_put_), top-level aten ops, and on CUDA the "Memcpy DtoH" device events,
cuda*Synchronize calls, kernel-launch API calls and kernels run. ``host_syncs`` = DtoH
copies on CUDA; on CPU, where a read is no copy, _local_scalar_dense + nonzero (what
would each be a sync on CUDA) -- so the batched path's single ``.tolist()`` (no aten op
on CPU) counts 0 there. After the module, the counts of every case are printed as a
markdown table and written next to the --benchmark-json file (<stem>-restore-trace.md).

GPU: paper AdaRevD-B (K = 4) on 720x1280 (GoPro size), batch 1 and 8, bf16 autocast,
tile 384 overlap 32 (8 tiles per image). CPU: tiny model (width 8, enc_blocks
(1,1,1,1)) on 64x96, tile 48 overlap 16 (6 tiles per image), batch 1 and 2, fp32;
CPU numbers are a harness smoke test, not a performance claim.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import statistics
import time
from pathlib import Path

import pytest
import torch

from bench import _util
from bench._util import DEVICE, ON_GPU

K = 4
GOPRO_EXIT_IDX = (4, 4, 3, 3, 2, 1)  # AdaRevD-B, GoPro: columns run per class
NUM_CLASSES = 6
GOPRO_LIKE_CLASS_P = (0.10, 0.35, 0.30, 0.15, 0.07, 0.03)  # assumed, see the docstring
MIXES = ("all-easy", "all-hard", "gopro-like")
STRATEGIES = ("batched", "plain", "all-K")
BASELINES = {"batched": ["plain", "all-K"], "plain": ["all-K"], "all-K": []}

if ON_GPU:
    CONFIG: dict = {}  # the paper's AdaRevD-B
    SIZE, TILE, OVERLAP, BATCHES = (720, 1280), 384, 32, (1, 8)
    DTYPE = torch.bfloat16
    COST_REPS = 10
else:
    CONFIG = dict(width=8, enc_blocks=(1, 1, 1, 1), middle_blocks=1, estimator_width=8)
    SIZE, TILE, OVERLAP, BATCHES = (64, 96), 48, 16, (1, 2)
    DTYPE = torch.float32
    COST_REPS = 3


class FixedClassClassifier(torch.nn.Module):
    """Stand-in patch-exit classifier: one-hot logits of ``classes[t]`` for tile t.

    The tiles come in plan order on both restore paths. One-hot by scatter (no host
    read: F.one_hot checks its range on the host), in the features' dtype."""

    def __init__(self, classes: torch.Tensor):
        super().__init__()
        self.register_buffer("classes", classes.long())

    def forward(self, e3: torch.Tensor) -> torch.Tensor:
        if e3.shape[0] != self.classes.numel():
            raise ValueError(f"e3 must hold {self.classes.numel()} tiles (the forced mix), "
                             f"got {e3.shape[0]}")
        return e3.new_zeros(e3.shape[0], NUM_CLASSES).scatter_(1, self.classes[:, None], 1.0)


def mix_classes(mix: str, num_tiles: int) -> torch.Tensor:
    """The class of each tile (plan order) in a mix; deterministic."""
    if mix == "all-easy":
        return torch.full((num_tiles,), GOPRO_EXIT_IDX.index(1), dtype=torch.long)
    if mix == "all-hard":
        return torch.full((num_tiles,), GOPRO_EXIT_IDX.index(K), dtype=torch.long)
    if mix != "gopro-like":
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    # Largest remainder: counts that sum to num_tiles and follow the histogram.
    exact = [p * num_tiles for p in GOPRO_LIKE_CLASS_P]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(NUM_CLASSES), key=lambda c: exact[c] - counts[c], reverse=True)
    for c in by_remainder[:num_tiles - sum(counts)]:
        counts[c] += 1
    classes = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    return classes[torch.randperm(num_tiles, generator=torch.Generator().manual_seed(0))]


def active_per_column(depths: torch.Tensor, num_columns: int) -> list[int]:
    """active_k: tiles that run column k (0-based), from exit depths in 1..K."""
    return [int((depths > k).sum()) for k in range(num_columns)]


# ------------------------------------------------------------------ model and inputs
@functools.lru_cache(maxsize=None)
def _model():
    import restorenet

    if "adarevd" not in restorenet.list_models():
        pytest.skip("model 'adarevd' is not registered")
    return restorenet.create_model("adarevd", num_decoders=K, **CONFIG).to(DEVICE).eval()


def model_or_skip():
    with _util.skip_on_oom(f"AdaRevD {'paper' if ON_GPU else 'tiny'} model"):
        return _model()


def images(batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.rand(batch, 3, *SIZE, generator=g).to(DEVICE)


def plan_of(model, x):
    from restorenet.models.blocks import pad_to_multiple
    from restorenet.ops.tiles import tile_plan

    xp = pad_to_multiple(x, model.size_multiple)
    return xp, tile_plan(xp, TILE, OVERLAP, multiple=model.size_multiple)


def median_seconds(fn, reps: int = COST_REPS, warmup: int = 1) -> float:
    """Median wall time of ``fn`` with the device synchronised inside each call."""
    call = _util.synced(fn)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def ideal_costs(batch: int) -> dict:
    """The pieces of the ideal time for one batch size, measured once."""
    from restorenet.ops.tiles import tile_blend, tile_gather

    model = model_or_skip()
    xp, plan = plan_of(model, images(batch))
    T = plan.num_tiles
    with torch.no_grad(), _util.autocast(DTYPE):
        feats = model.encode(xp)
        levels = [tile_gather(feats[lvl], plan, scale=2 ** lvl) for lvl in range(5)]
        x_t, states = levels[4], (levels[3], levels[2], levels[1], levels[0])
        column, head = model.decoder.columns[0], model.heads[0]
        c3 = column(x_t, states)[-1]
        residual = head(c3)

        def timed(fn):
            def run():
                with torch.no_grad(), _util.autocast(DTYPE):
                    return fn()
            return median_seconds(run)

        out = {
            "tiles": T,
            "t_encoder_s": timed(lambda: model.encode(xp)),
            "c_column_per_tile_s": timed(lambda: column(x_t, states)) / T,
            "c_head_per_tile_s": timed(lambda: head(c3)) / T,
            "t_blend_s": timed(lambda: tile_blend(residual, plan)),
            "t_gather_s": timed(lambda: [tile_gather(feats[lvl], plan, scale=2 ** lvl)
                                         for lvl in range(5)]),
            "cost_tiles": T,
        }
    return out


def ideal_seconds(costs: dict, active: list[int]) -> float:
    return (costs["t_encoder_s"] + sum(active) * costs["c_column_per_tile_s"]
            + costs["tiles"] * costs["c_head_per_tile_s"] + costs["t_blend_s"])


# ------------------------------------------------------------ profiler trace summary
SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::index",
               "aten::index_put_", "cudaStreamSynchronize")
# CUDA runtime / driver calls that make the host wait for the device, and that launch kernels.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel",
                "cuLaunchKernel", "cuLaunchKernelEx")
# The summary's table: column title -> count key. GPU-only columns read "-" on CPU.
TRACE_COLUMNS = {
    "DtoH copies": "Memcpy DtoH",
    "sync calls": "sync_calls",
    "scalar reads": "aten::_local_scalar_dense",
    "nonzero": "aten::nonzero",
    "index gathers": "aten::index",
    "index scatters": "aten::index_put_",
    "kernel launches": "kernel_launches",
    "GPU kernels": "gpu_kernels",
    "top-level aten ops": "aten_ops",
}
GPU_ONLY_COUNTS = ("Memcpy DtoH", "sync_calls", "kernel_launches", "gpu_kernels")


def _profiled_events(fn):
    """torch.profiler events of one call of ``fn`` (CPU ops, and on GPU the CUDA runtime
    calls and device activity); the device is synchronised inside the trace so all of the
    call's device work is in it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    _util.synchronize()
    with profile(activities=activities) as prof:
        fn()
        _util.synchronize()
    return prof.events()


def _top_level_ops(events) -> int:
    """aten ops not called by another aten op: the dispatches the Python code made."""
    count = 0
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def event_counts(events) -> dict:
    """Sync, copy and launch counts of a list of profiler events (see ``trace_summary``)."""
    names = collections.Counter(e.name for e in events)
    on_device = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    counts = {name: names.get(name, 0) for name in SYNC_EVENTS}
    counts["Memcpy DtoH"] = sum(n for name, n in names.items() if "DtoH" in name)
    counts["sync_calls"] = sum(names.get(name, 0) for name in SYNC_CALLS)
    counts["kernel_launches"] = sum(names.get(name, 0) for name in LAUNCH_CALLS)
    counts["gpu_kernels"] = sum(1 for e in on_device if not e.name.startswith(("Memcpy", "Memset")))
    counts["aten_ops"] = _top_level_ops(events)
    return counts


@functools.lru_cache(maxsize=None)
def _idle_counts() -> tuple:
    """What profiling itself shows around an empty call (the synchronisation the trace
    ends with, on GPU): subtracted from every summary."""
    return tuple(event_counts(_profiled_events(lambda: None)).items())


def trace_summary(fn) -> dict:
    """Host-device traffic of one call of ``fn`` from a torch.profiler trace, as counts:

        aten::item, aten::_local_scalar_dense   host reads of a scalar (.item(), int(), bool())
        aten::nonzero                           data-dependent sizes (boolean masks)
        aten::index, aten::index_put_           gathers by mask / index and scatters back
        Memcpy DtoH                             device-to-host copies (GPU)
        sync_calls                              cuda*/cu* Stream/Device/Event Synchronize (GPU)
        kernel_launches, gpu_kernels            launch API calls and kernels run (GPU)
        aten_ops                                top-level aten ops (the CPU-side work count)

    minus the same counts of an empty call (the profiler's own synchronisation). On CPU a
    host read is no copy: the aten-level counts are what would each be a sync on CUDA.
    """
    idle = dict(_idle_counts())
    counts = event_counts(_profiled_events(fn))
    return {name: max(0, n - idle.get(name, 0)) for name, n in counts.items()}


def host_syncs(counts: dict) -> int:
    """Device-to-host reads of one call: the DtoH copies on CUDA (at least the scalar
    reads and nonzeros, should the trace lack device events); on CPU those reads."""
    reads = counts["aten::_local_scalar_dense"] + counts["aten::nonzero"]
    return max(counts["Memcpy DtoH"], reads) if ON_GPU else reads


def trace_table(rows: list[dict], on_gpu: bool = ON_GPU) -> str:
    """Markdown table of trace summaries: one row per ``{"case": label, **counts}``."""
    lines = ["| case | " + " | ".join(TRACE_COLUMNS) + " |",
             "|---|" + "---:|" * len(TRACE_COLUMNS)]
    for row in rows:
        cells = ["-" if key in GPU_ONLY_COUNTS and not on_gpu else str(row.get(key, "?"))
                 for key in TRACE_COLUMNS.values()]
        lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Filled by the benchmarks, written once the module is done (``_restore_trace_report``).
_TRACE_ROWS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _restore_trace_report(request):
    """After this module: the trace summaries as a markdown table, printed in the
    session's output and written next to the --benchmark-json file as
    ``<json stem>-restore-trace.md`` (e.g. bench/results/ with scripts/gpu_check.sh)."""
    yield
    if not _TRACE_ROWS:
        return
    device = _util.device_name()
    text = (f"# AdaRevD.restore: host syncs and launches per call ({device})\n\n"
            "One untimed restore per case under torch.profiler, minus an empty call's counts "
            "(bench/test_bench_restore.py::trace_summary).\n\n" + trace_table(_TRACE_ROWS))
    json_file = request.config.getoption("benchmark_json", None)
    if getattr(json_file, "name", None):
        path = Path(json_file.name)
        path.with_name(f"{path.stem}-restore-trace.md").write_text(text)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None:
        # Teardown output is captured (and dropped on success) unless capture is paused.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line("")
            for line in text.splitlines():
                reporter.write_line(line)
    _TRACE_ROWS.clear()


# ------------------------------------------------------------------ the benchmark
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adarevd_restore(benchmark, strategy, mix, batch):
    what = f"adarevd restore {strategy} {mix} batch {batch} at {SIZE[0]}x{SIZE[1]}"
    with _util.skip_on_oom(what):
        _bench_restore(benchmark, strategy, mix, batch)


def _bench_restore(benchmark, strategy, mix, batch):
    model = model_or_skip()
    x = images(batch)
    _, plan = plan_of(model, x)
    classes = mix_classes(mix, plan.num_tiles)
    model.classifier = FixedClassClassifier(classes).to(DEVICE)
    exit_idx = [K] * NUM_CLASSES if strategy == "all-K" else list(GOPRO_EXIT_IDX)
    batched = strategy != "plain"

    def restore(return_exits=False):
        with torch.no_grad(), _util.autocast(DTYPE):
            return model.restore(x, tile=TILE, overlap=OVERLAP, exit_idx=exit_idx,
                                 return_exits=return_exits, batched=batched)

    # One untimed call (also a warm-up) under the profiler; the forced mix really is
    # what runs. (return_exits adds no host read: the exits stay on the device.)
    result = {}
    counts = trace_summary(lambda: result.update(out_exits=restore(return_exits=True)))
    _TRACE_ROWS.append({"case": f"{strategy} {mix} b{batch}", **counts})
    out, exits = result.pop("out_exits")
    expected = torch.tensor(exit_idx)[classes]
    assert torch.equal(exits.flatten().cpu(), expected), f"{strategy} {mix}: exits are not the forced mix"
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    del out, exits

    costs = ideal_costs(batch)
    active = active_per_column(expected, K)
    ideal = ideal_seconds(costs, active)

    _util.run_benchmark(
        benchmark, restore, strategy=strategy, baselines=BASELINES[strategy],
        group=f"adarevd restore {mix} b{batch} {_util.dtype_name(DTYPE)}",
        dtype=DTYPE, shape=(batch, 3, *SIZE), model_config=dict(CONFIG) or "paper",
        num_columns=K, class_mix=mix, tile=TILE, overlap=OVERLAP, exit_idx=exit_idx,
        tiles=plan.num_tiles, active_per_column=active,
        class_counts=torch.bincount(classes, minlength=NUM_CLASSES).tolist(),
        mix_note=("classes forced by FixedClassClassifier; gopro-like = assumed class "
                  f"histogram {GOPRO_LIKE_CLASS_P}"),
        host_reads=counts, host_syncs=host_syncs(counts),
        host_syncs_note=("DtoH memcpy events" if ON_GPU else
                         "_local_scalar_dense + nonzero (CPU: .tolist() is no aten op)"),
        ideal_s=ideal, ideal_costs=dict(costs),
        ideal_note="t_encoder + sum_k active_k * c_column + T * c_head + t_blend",
        **{"pass": "AdaRevD.restore (eval, no_grad)"})
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        ratio = stats.stats.mean / ideal
        benchmark.extra_info["time_vs_ideal"] = ratio
        benchmark.extra_info["within_1.1x_ideal"] = ratio <= 1.1


# ------------------------------------------------------------- the tile ops alone
TILE_OP_BACKENDS = ("reference", "triton", "cuda")
TILE_WIDTH = 64 if ON_GPU else 8  # AdaRevD-B's encoder width: levels carry w, 2w, ..., 16w


def _tile_op_case(op: str, batch: int):
    """(callable, bytes it must move, shape label) for one tile op over a batch at SIZE:
    gather = the five feature levels cut into sorted order (one launch each), bytes = every
    tile element read once and written once; blend = the head outputs (3 channels) blended
    back, bytes = tiles read once + images written once."""
    from restorenet.ops.tiles import tile_blend, tile_gather, tile_plan

    plan = tile_plan(torch.empty(batch, 1, *SIZE, device="meta"), TILE, OVERLAP, multiple=16)
    order = torch.randperm(plan.num_tiles, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    if op == "gather":
        feats = [torch.randn(batch, TILE_WIDTH * 2 ** lvl, SIZE[0] >> lvl, SIZE[1] >> lvl, device=DEVICE,
                             generator=g).to(DTYPE) for lvl in range(5)]
        out_elems = sum(plan.num_tiles * f.shape[1] * (TILE >> lvl) ** 2 for lvl, f in enumerate(feats))

        def fn(backend):
            return [tile_gather(f, plan, order, scale=2 ** lvl, backend=backend) for lvl, f in enumerate(feats)]

        return fn, 2 * out_elems * feats[0].element_size(), (plan.num_tiles, TILE_WIDTH, TILE, TILE)
    tiles = torch.randn(plan.num_tiles, 3, TILE, TILE, device=DEVICE, generator=g).to(DTYPE)

    def fn(backend):
        return tile_blend(tiles, plan, order, backend=backend)

    nbytes = (tiles.numel() + 3 * plan.num_pixels) * tiles.element_size()
    return fn, nbytes, tuple(tiles.shape)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("backend", TILE_OP_BACKENDS)
@pytest.mark.parametrize("op", ("gather", "blend"))
def test_tile_op(benchmark, op, backend, batch):
    """tile_gather (all five levels) and tile_blend alone, per backend, at the restore
    benchmark's geometry: GB/s of the bytes they must move (extra_info GBps)."""
    from restorenet.ops import available_backends

    if backend not in available_backends(DEVICE, f"tile_{op}_forward"):
        pytest.skip(f"backend {backend!r} cannot run tile_{op} on {DEVICE.type} here")
    with _util.skip_on_oom(f"tile_{op} {backend} batch {batch}"):
        fn, nbytes, shape = _tile_op_case(op, batch)
        _util.run_benchmark(
            benchmark, lambda: fn(backend), strategy=backend,
            baselines=[] if backend == "reference" else ["reference"],
            group=f"tile {op} {SIZE[0]}x{SIZE[1]} tile {TILE} b{batch} {_util.dtype_name(DTYPE)}",
            nbytes=nbytes, dtype=DTYPE, shape=shape, tile=TILE, overlap=OVERLAP,
            bytes_note=("gather: tiles read once + written once, all five levels; "
                        "blend: tiles read once + images written once"),
            **{"pass": f"tile_{op} forward"})
