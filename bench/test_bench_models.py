"""Whole models: a training step (forward, loss, backward, AdamW) and inference.

GPU: the paper configurations (``create_model(name)`` with no kwargs), training
on 4 crops of 256x256 (HyperRes: 4 levels x 4 crops of 192^2) and inference on
one 512x512 image, in fp32 and under bf16 autocast. CPU: tiny configurations
on 32x32 crops, fp32 only, to keep ``pytest bench/`` quick; CPU numbers are a
smoke test of the harness, not a performance claim.

Two sweeps feed the report's plots:
* AdaRevD training step vs K (number of reversible columns), with the
  memory-saving reversible backward and with plain autograd: peak memory vs K;
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

MODELS = ("hyperres", "adarevd", "mhnet", "constyle_nafnet", "ddsnet", "nafnet")
LEVELS = (15.0, 35.0, 55.0, 75.0)  # HyperRes denoising sigmas (raw levels)

# Tiny CPU configurations: a few NAF blocks of width 8, so each call is milliseconds.
TINY = {
    "hyperres": dict(width=16, num_blocks=2),
    "adarevd": dict(width=8, num_decoders=2, enc_blocks=(1, 1, 1, 1), middle_blocks=1),
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


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


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
        model_config=cfg or "paper", params=_params(model),
        flops_note=flop_note or "executed conv/matmul FLOPs (torch.utils.flop_counter formulas) of one call",
        **{"pass": what})


# ----------------------------------------------------- AdaRevD: memory vs K
ADAREVD_KS = (1, 2, 4, 8) if ON_GPU else (1, 2)


@pytest.mark.parametrize("memory_efficient", (True, False), ids=("reversible", "autograd"))
@pytest.mark.parametrize("K", ADAREVD_KS)
def test_adarevd_columns(benchmark, K, memory_efficient):
    """Training step vs number of columns: the reversible backward should keep
    peak memory flat in K, plain autograd should grow with it."""
    cfg = dict(CONFIGS["adarevd"], num_decoders=K, memory_efficient=memory_efficient)
    model = build("adarevd", **cfg).train()
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x, target = images(TRAIN_BATCH, TRAIN_CROP)
    strategy = "reversible" if memory_efficient else "autograd"
    with _util.skip_on_oom(f"adarevd K={K} {strategy} training"):
        _util.run_benchmark(
            benchmark, train_step("adarevd", model, x, target, dtype), strategy=strategy,
            baselines=["autograd"] if memory_efficient else [],
            group=f"adarevd train step K{K} {_util.dtype_name(dtype)}", K=K,
            series=f"adarevd train step vs K {_util.dtype_name(dtype)}",
            dtype=dtype, shape=(TRAIN_BATCH, 3, TRAIN_CROP, TRAIN_CROP),
            model_config=dict(cfg), params=_params(model),
            **{"pass": "train step (fwd+loss+bwd+AdamW)"})


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
