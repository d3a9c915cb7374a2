"""Whole models: a training step (forward, loss, backward, AdamW) and inference.

GPU: the paper configurations (``create_model(name)`` with no kwargs), training
on 4 crops of 256x256 (HyperRes: 4 levels x 4 crops of 192^2) and inference on
one 512x512 image, in fp32 and under bf16 autocast. CPU: tiny configurations
on 32x32 crops, fp32 only, to keep ``pytest bench/`` quick; CPU numbers are a
smoke test of the harness, not a performance claim.

Two sweeps feed the report's plots:
* AdaRevD training step vs K (number of reversible columns, 1/2/4/8), fp32 and
  bf16 autocast (CPU too: tiny sizes), with the reversible backward
  (``restorenet.ops.reversible_columns``), plain autograd, per-column
  ``torch.utils.checkpoint`` and revlib (skipped with its reason): peak memory
  and time vs K, ratios to the baselines and to K = 1 in ``extra_info``;
* DDS-Net inference vs the mix of per-image widths the batch runs at.

FLOPs are counted with torch.utils.flop_counter's formulas on one call (executed
convolution/matmul FLOPs, so AdaRevD's recomputation counts); DDS-Net width
mixes use the model's own per-width FLOP count instead.
"""
from __future__ import annotations

import pytest
import torch

from bench import _util
from bench._util import DEVICE, ON_GPU
from restorenet.registry import count_parameters

MODELS = ("hyperres", "adarevd", "mhnet", "constyle_nafnet", "ddsnet", "nafnet")
LEVELS = (15.0, 35.0, 55.0, 75.0)  # HyperRes denoising sigmas (raw levels)

# Tiny CPU configurations: a few NAF blocks of width 8, so each call is milliseconds.
TINY = {
    "hyperres": dict(width=16, num_blocks=2),
    "adarevd": dict(width=8, num_decoders=2, enc_blocks=(1, 1, 1, 1), middle_blocks=1, estimator_width=8),
    "mhnet": dict(width=8, enc_blocks=(1, 1, 1, 1), dec_blocks=(1, 1, 1, 1), heads=2, cabg_blocks=1),
    "constyle_nafnet": dict(width=8, enc_blocks=(1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1)),
    "ddsnet": dict(width=32, depth=2),
    "nafnet": dict(width=8, enc_blocks=(1, 1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1, 1)),
}

if ON_GPU:
    CONFIGS = {name: {} for name in MODELS}  # the paper's
    TRAIN_BATCH, TRAIN_CROP, INFER_BATCH, INFER_SIZE = 4, 256, 1, 512
    HYPERRES_TRAIN = (16, 192)
    DTYPES = (torch.bfloat16, torch.float32)
else:
    CONFIGS = TINY
    TRAIN_BATCH, TRAIN_CROP, INFER_BATCH, INFER_SIZE = 2, 32, 1, 32
    HYPERRES_TRAIN = (4, 32)
    DTYPES = (torch.float32,)


def build(name: str, **cfg) -> torch.nn.Module:
    """``create_model(name, **cfg)`` on DEVICE, or a skip saying why it cannot be built."""
    import restorenet

    if name not in restorenet.list_models():
        pytest.skip(f"model {name!r} is not registered (restorenet/models/{name}.py not written yet)")
    return restorenet.create_model(name, **cfg).to(DEVICE)


def images(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    return x.to(DEVICE), x.clamp(0.05, 0.95).to(DEVICE)  # (input, a stand-in target)


def run_model(name: str, model, x):
    if name == "hyperres":
        levels = torch.tensor([LEVELS[i % len(LEVELS)] for i in range(x.shape[0])], device=x.device)
        return model(x, levels)
    return model(x)


def training_loss(name: str, output, target) -> torch.Tensor:
    """The model's training loss as restorenet.train defines it (AdaRevD: L1 +
    FFT term over every column); plain L1 if that module cannot be used."""
    try:
        from restorenet.train import get_adapter

        return get_adapter(name).loss(_as_float(output), target)
    except ImportError:
        outs = output if isinstance(output, (list, tuple)) else [output]
        return torch.stack([(o.float() - target).abs().mean() for o in outs]).mean()


def _as_float(output):
    if isinstance(output, (list, tuple)):
        return [o.float() for o in output]
    return output.float()


def train_step(name: str, model, x, target, dtype):
    return _util.training_step(lambda: run_model(name, model, x), lambda out: training_loss(name, out, target),
                               [p for p in model.parameters() if p.requires_grad], dtype)


def inference(name: str, model, x, dtype):
    def infer():
        with torch.no_grad(), _util.autocast(dtype):
            return run_model(name, model, x)

    return infer


@pytest.mark.parametrize("dtype", DTYPES, ids=_util.dtype_name)
@pytest.mark.parametrize("mode", ("train", "infer"))
@pytest.mark.parametrize("name", MODELS)
def test_model(benchmark, name, mode, dtype):
    with _util.skip_on_oom(f"{name} {mode} {_util.dtype_name(dtype)}"):
        _bench_model(benchmark, name, mode, dtype)


def _bench_model(benchmark, name, mode, dtype):
    cfg = CONFIGS[name]
    model = build(name, **cfg)
    if mode == "train":
        batch, crop = HYPERRES_TRAIN if name == "hyperres" else (TRAIN_BATCH, TRAIN_CROP)
        x, target = images(batch, crop)
        fn = train_step(name, model.train(), x, target, dtype)
        what = "train step (fwd+loss+bwd+AdamW)"
    else:
        batch, crop = INFER_BATCH, INFER_SIZE
        x, _ = images(batch, crop)
        fn = inference(name, model.eval(), x, dtype)
        what = "inference (eval, no_grad)"
    flops, flop_note = _util.count_flops(fn)  # one untimed call (also a warm-up)
    _util.run_benchmark(
        benchmark, fn, strategy=name, group=f"model {mode} {_util.dtype_name(dtype)}",
        flops=flops, dtype=dtype, shape=(batch, 3, crop, crop),
        model_config=cfg or "paper", params=count_parameters(model),
        flops_note=flop_note or "executed conv/matmul FLOPs (torch.utils.flop_counter formulas) of one call",
        **{"pass": what})


# ----------------------------------------------------- AdaRevD: memory and time vs K
# Strategies for the decoder's K columns, in run order: the baselines first, so
# that the later ones find their peak memory for the ratios.
#   autograd    plain autograd through the column loop (memory_efficient=False)
#   checkpoint  torch.utils.checkpoint around every column (use_reentrant=False)
#   revlib      the peer library (skips: it cannot express the RevCol coupling)
#   reversible  ours, restorenet.ops.reversible_columns (memory_efficient=True), pure:
#               rev_anchor_every=None, nothing kept that grows with K
#   reversible_anchor2  bf16 only: the same, keeping the states entering every 2nd
#               column (rev_anchor_every=2, AdaRevD's "auto" default under autocast:
#               pure inversion drifts by ~5e-2 of the gradient at K = 4 in bf16)
# extra_info["rev_anchor_every"] records the anchoring that ran (None: pure or n/a).
# Targets (issue #5, GPU): reversible peak memory at K = 8 within 1.2x of K = 1,
# step time within 1.25x of autograd, faster than checkpoint at <= its memory.
ADAREVD_KS = (1, 2, 4, 8) if ON_GPU else (1, 2)  # K = 1 is the memory baseline
ADAREVD_DTYPES = (torch.float32, torch.bfloat16)
# GPU: the paper's 4 crops of 256^2. CPU: one 16^2 crop, two timed rounds -- a smoke
# test of every strategy's code path (the whole sweep stays well under 20 s).
ADAREVD_BATCH, ADAREVD_CROP = (TRAIN_BATCH, TRAIN_CROP) if ON_GPU else (1, 16)
ADAREVD_ROUNDS = None if ON_GPU else 2
COLUMN_STRATEGIES = ("autograd", "checkpoint", "revlib", "reversible", "reversible_anchor2")
COLUMN_BASELINES = {"autograd": [], "checkpoint": ["autograd"], "reversible": ["autograd", "checkpoint"],
                    "reversible_anchor2": ["autograd", "checkpoint", "reversible"]}
ANCHOR_EVERY = {"reversible": None, "reversible_anchor2": 2}  # rev_anchor_every per strategy
_PEAKS: dict = {}  # (dtype, K, strategy) -> (peak bytes, peak above start) measured this session

REVLIB_REASON = (
    "revlib cannot express AdaRevD's RevCol coupling faithfully: its ReversibleSequential is a "
    "two-stream chain (x0, x1) -> (x1, coupling(x0, f(x1))), so f sees one stream, while L_i needs "
    "two states of different shapes (the new coarser c_{i-1}' and the old finer c_{i+1}); extra "
    "args to f get no gradient; and its memory-saving backward returns dx0 = dy1 whatever the "
    "coupling, so c' = a*c + f with a learnable a != 1 gets wrong gradients (revlib 1.7.2, checked: "
    "a = 0.5 gives O(1) gradient errors against its own no_savings mode, a = 1 matches)")


class CheckpointedColumns(torch.nn.Module):
    """AdaRevD's decoder with ``torch.utils.checkpoint`` around each column: the
    usual alternative to a reversible backward (keeps each column's input states)."""

    def __init__(self, columns):
        super().__init__()
        self.columns = columns

    def forward(self, x, states, memory_efficient=True, anchor_every=None, heads=None):
        from torch.utils.checkpoint import checkpoint

        from restorenet.ops import column_forward

        outputs = []
        for k, col in enumerate(self.columns):
            states = checkpoint(lambda x, *s, _col=col: column_forward(_col, x, s), x, *states,
                                use_reentrant=False)
            # The head's input is kept anyway: it enters the next checkpoint.
            outputs.append(heads[k](states[-1]) if heads is not None else states[-1])
        return outputs


def adarevd_with_strategy(strategy: str, K: int):
    if strategy == "revlib":
        pytest.importorskip("revlib", reason="revlib is not installed (pip install revlib)")
        pytest.skip(REVLIB_REASON)
    cfg = dict(CONFIGS["adarevd"], num_decoders=K, memory_efficient=strategy in ANCHOR_EVERY,
               rev_anchor_every=ANCHOR_EVERY.get(strategy))
    model = build("adarevd", **cfg).train()
    if strategy == "checkpoint":
        model.decoder = CheckpointedColumns(model.decoder.columns)
    return model, cfg


def _memory_ratios(dtype, K, strategy) -> dict:
    """Peak memory of this case over its baselines' (same K) and over its own K = 1,
    for the peaks measured earlier in this session (None where one is missing: CPU,
    or a case deselected or skipped)."""
    peak, above = _PEAKS.get((dtype, K, strategy), (None, None))

    def ratio(a, b):
        return a / b if a is not None and b else None

    k1, k1_above = _PEAKS.get((dtype, 1, strategy), (None, None))
    return {"peak_mem_vs": {b: ratio(peak, _PEAKS.get((dtype, K, b), (None,))[0])
                            for b in COLUMN_BASELINES[strategy]},
            "peak_mem_vs_K1": ratio(peak, k1), "peak_mem_above_start_vs_K1": ratio(above, k1_above)}


@pytest.mark.parametrize("dtype, K, strategy", [
    pytest.param(d, k, s, id=f"{_util.dtype_name(d)}-K{k}-{s}")
    for d in ADAREVD_DTYPES for k in ADAREVD_KS for s in COLUMN_STRATEGIES
    if s != "reversible_anchor2" or d == torch.bfloat16])
def test_adarevd_columns(benchmark, dtype, K, strategy):
    """Training step (fwd + loss + bwd + AdamW) vs the number of columns K: the
    reversible backward should keep activation memory flat in K, plain autograd
    should grow with it, per-column checkpointing in between."""
    model, cfg = adarevd_with_strategy(strategy, K)
    x, target = images(ADAREVD_BATCH, ADAREVD_CROP)
    with _util.skip_on_oom(f"adarevd K={K} {strategy} training {_util.dtype_name(dtype)}"):
        _util.run_benchmark(
            benchmark, train_step("adarevd", model, x, target, dtype), strategy=strategy,
            baselines=COLUMN_BASELINES[strategy],
            group=f"adarevd train step K{K} {_util.dtype_name(dtype)}", K=K,
            series=f"adarevd train step vs K {_util.dtype_name(dtype)}",
            dtype=dtype, shape=(ADAREVD_BATCH, 3, ADAREVD_CROP, ADAREVD_CROP), rounds=ADAREVD_ROUNDS,
            model_config=dict(cfg, decoder=strategy), params=count_parameters(model),
            rev_anchor_every=cfg["rev_anchor_every"], **{"pass": "train step (fwd+loss+bwd+AdamW)"})
    info = benchmark.extra_info
    _PEAKS[(dtype, K, strategy)] = (info.get("peak_mem_bytes"), info.get("peak_mem_above_start_bytes"))
    info.update(_memory_ratios(dtype, K, strategy))


# --------------------------------------------------- DDS-Net: time vs width mix
DDS_BATCH = 8 if ON_GPU else 4
DDS_SIZE = 256 if ON_GPU else 32
MIXES = ("narrowest", "even mix", "widest", "gate")


def mix_widths(mix: str, choices: list[int], batch: int) -> list[int] | None:
    """Per-image widths of a batch; None lets the gate decide."""
    if mix == "narrowest":
        return [choices[0]] * batch
    if mix == "widest":
        return [choices[-1]] * batch
    if mix == "even mix":
        return [choices[i % len(choices)] for i in range(batch)]
    return None


@pytest.mark.parametrize("mix", MIXES)
def test_ddsnet_width_mix(benchmark, mix):
    model = build("ddsnet", **CONFIGS["ddsnet"]).eval()
    widths = mix_widths(mix, list(model.choices), DDS_BATCH)
    x, _ = images(DDS_BATCH, DDS_SIZE)
    forced = None if widths is None else torch.tensor(widths, device=DEVICE)
    dtype = torch.bfloat16 if ON_GPU else torch.float32

    def infer():
        with torch.no_grad(), _util.autocast(dtype):
            return model(x, forced)

    flops = None
    if widths is not None:
        per_width = model.flops((DDS_SIZE, DDS_SIZE), include_gate=False)
        flops = sum(per_width[w] for w in widths)
    _util.run_benchmark(
        benchmark, infer, strategy="ddsnet",
        group=f"ddsnet inference vs width mix {_util.dtype_name(dtype)}",
        width_mix=mix, widths=widths, flops=flops, dtype=dtype,
        shape=(DDS_BATCH, 3, DDS_SIZE, DDS_SIZE), model_config=CONFIGS["ddsnet"] or "paper",
        flops_note=("DDSNet.flops: conv FLOPs of the forced widths" if flops else
                    "widths chosen by the gate: FLOPs not counted"),
        **{"pass": "inference (eval, no_grad)"})
