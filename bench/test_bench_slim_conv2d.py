"""slim_conv2d: DDS-Net-sized layers at per-sample widths, and whole DDS-Net runs.

Layer (``test_slim_conv2d``): GPU N=16, 64 max channels, 3x3, padding 1, at
96x96 and 256x256, bf16 and fp32; CPU N=4, 16 channels, 24x24, fp32. Passes:
fwd / bwd / fwd+bwd. Width mixes (in = out = k, as in DDS-Net's hidden layers;
samples in a fixed shuffled order, as a gate would leave them):

    uniform full    every sample at the max width
    uniform narrow  every sample at a quarter of it
    dds 1:2:3:2     widths C/4, C/2, 3C/4, C in proportions 1:2:3:2
    all different   sample i at round(C (i+1) / N): N distinct widths

Strategies (bench/strategies.py, ``SLIM_STRATEGIES``): reference, mask,
group_by_width, compile_mask / compile_group (GPU), the triton / cuda backends
(GPU, when available), and two plain-cuDNN rows that are not the slim layer:
dense_full (full width, widths ignored) and dense_at_width (uniform mixes only:
cuDNN at that width, the target for uniform batches). Every exact strategy is
checked against the float64 spec before it is timed.

FLOPs per call are the *active* ones, 2*kh*kw*Ho*Wo*sum_n in[n]*out[n] (x1 fwd,
x2 bwd, x3 fwd+bwd), whatever a strategy spends (mask runs full width, so its
TFLOP/s reads low); dense_full counts its full-width FLOPs.

The ideal is computed, not timed: each sample's active FLOPs at the rate
cuDNN reaches on the full-width conv (dense_full, measured once per size,
dtype and pass): ``ideal_s = full_width_s * active_flops / full_flops``.
Every case records ``ideal_s`` and ``time_vs_ideal`` in extra_info; the mix
is under ``mix`` (only the per-width DDS-Net table sets ``width_mix``, so the
report's width-mix plot is one panel per dtype).
Targets (issue 4, GPU bf16 fwd+bwd): mixed batch <= 1.15x ideal and >= 1.5x
faster than group_by_width; uniform batch <= 1.05x dense_at_width.

DDS-Net:
* ``test_ddsnet_train_step``: a whole training step (forward at forced widths,
  L1 loss, backward, AdamW) with every slim_conv2d call of the model routed to
  one strategy; uniform full, the 1:2:3:2 mix and the photo-oracle mix; ideal =
  the full-width dense step's time scaled by DDSNet.flops of the mix.
* ``test_ddsnet_per_width``: inference as ``model(x)`` spends it -- the gate,
  then the backbone at the widths it picked -- per width choice (every image at
  choice i), for the 1:2:3:2 and the photo-oracle mix (widths forced, so the
  mix is exact; the gate still runs), plus the gate alone and an untrained
  gate's own picks. FLOPs = backbone (``DDSNet.flops``) + gate
  (``gate_flops``), both also recorded apart; ideal = the FLOPs at the rate of
  the widest choice (measured): ``ideal_s = t(widest) * flops / flops(widest)``
  -- groups "ddsnet per width ...".

The realistic mix (``REALISTIC_MIX``, "dds photo-oracle") is the width
distribution DDS-Net's gate objective assigns to held-out photos at mixed noise
levels; see its provenance note.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from bench import _util, strategies
from bench._util import DEVICE, ON_GPU

if ON_GPU:
    N, CHANNELS, SIZES, DTYPES = 16, 64, (96, 256), (torch.bfloat16, torch.float32)
else:
    N, CHANNELS, SIZES, DTYPES = 4, 16, (24,), (torch.float32,)
KERNEL, PADDING, STRIDE = 3, 1, 1
PASSES = ("fwd", "bwd", "fwd+bwd")
MIXES = ("uniform full", "uniform narrow", "dds 1:2:3:2", "all different")
DDS_PROPORTIONS = (1, 2, 3, 2)  # of the choices C/4, C/2, 3C/4, C
REALISTIC = "dds photo-oracle"
# Proportions of the choices C/4, C/2, 3C/4, C (8/16/24/32 there) that DDS-Net's
# stage-3 gate objective (DDSNet.gate_targets, tau = 0.1 dB) assigns to held-out
# photos. Provenance: the CPU DDS-Net (width 32, depth 4) trained 80 steps as a
# slimmable supernet (every crop at every width, sigma ~ U[5, 75]) on the
# scikit-image training photos; targets on 18 64x64 crops of the two held-out
# photos at each sigma 5/15/35/55/75 (90 images): 5/26/1/58. Narrow widths win at
# sigma 5-15, the widest at 35-75. Not the trained gate's own picks: after 60
# gate steps it still picked the widest width for all 90 (no usable mix); the
# paper text we have (abstract only) reports no distribution.
REALISTIC_MIX = (5, 26, 1, 58)


# ------------------------------------------------------------------ width mixes
def _shuffled(widths: list[int], seed: int = 0) -> list[int]:
    perm = torch.randperm(len(widths), generator=torch.Generator().manual_seed(seed)).tolist()
    return [widths[i] for i in perm]


def _proportional_counts(n: int, proportions) -> list[int]:
    """Largest-remainder split of n samples in the given proportions."""
    total = sum(proportions)
    exact = [n * p / total for p in proportions]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    return counts


def mix_widths(mix: str, n: int, choices) -> list[int]:
    """Per-sample widths of mix ``mix`` for a batch of n, from ``choices``
    (increasing; the last is the max width)."""
    choices = list(choices)
    if mix == "uniform full":
        return [choices[-1]] * n
    if mix == "uniform narrow":
        return [choices[0]] * n
    if mix == "dds 1:2:3:2":
        counts = _proportional_counts(n, DDS_PROPORTIONS)
        return _shuffled([w for w, c in zip(choices, counts) for _ in range(c)])
    if mix == REALISTIC:
        counts = _proportional_counts(n, REALISTIC_MIX)
        return _shuffled([w for w, c in zip(choices, counts) for _ in range(c)])
    if mix == "all different":
        top = choices[-1]
        return _shuffled([max(1, round(top * (i + 1) / n)) for i in range(n)])
    raise ValueError(f"mix must be one of {MIXES + (REALISTIC,)}, got {mix!r}")


def layer_choices(channels: int = CHANNELS) -> list[int]:
    return [channels * i // 4 for i in range(1, 5)]


# ------------------------------------------------------------------ layer work
def _out_size(size: int) -> int:
    return (size + 2 * PADDING - KERNEL) // STRIDE + 1


PASS_CONVS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # bwd = dx + dW


def active_flops(widths: list[int], size: int, phase: str) -> int:
    ho = _out_size(size)
    return PASS_CONVS[phase] * _util.slim_conv2d_flops(widths, widths, KERNEL, KERNEL, ho, ho)


def full_flops(size: int, phase: str) -> int:
    ho = _out_size(size)
    return PASS_CONVS[phase] * _util.conv2d_flops(N, CHANNELS, CHANNELS, KERNEL, KERNEL, ho, ho)


def layer_bytes(size: int, dtype: torch.dtype, phase: str) -> int:
    """Compulsory traffic at full tensor size: x, y, weight, bias read/written once."""
    e = torch.empty((), dtype=dtype).element_size()
    x = N * CHANNELS * size * size * e
    y = N * CHANNELS * _out_size(size) ** 2 * e
    params = (CHANNELS * CHANNELS * KERNEL * KERNEL + CHANNELS) * e
    fwd, bwd = x + y + params, y + x + params + x + params  # bwd: read dy, x, W; write dx, dW
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[phase]


def _input_sets(size, dtype, widths, requires_grad):
    count = _util.input_sets_needed(layer_bytes(size, dtype, "fwd"))
    w = torch.tensor(widths, dtype=torch.int32, device=DEVICE)
    sets = []
    for i in range(count):
        t = strategies.slim_layer_inputs(N, CHANNELS, CHANNELS, size, dtype, DEVICE, KERNEL,
                                         requires_grad=requires_grad, seed=i)
        with torch.no_grad():  # a slimmable net keeps channels beyond the width at zero
            t["x"].mul_(strategies._channel_mask(w, t["x"], CHANNELS))
        t["width"] = w
        sets.append(t)
    return sets


def _args(t):
    return [t["x"], t["weight"], t["bias"], t["width"], t["width"], STRIDE, PADDING]


def _grad_inputs(t):
    return [t[k] for k in strategies.SLIM_GRAD_ARGS]


def make_call(fn, phase: str, size: int, dtype: torch.dtype, widths: list[int]):
    """The callable to time for ``phase``, rotating over enough input sets to
    defeat the L2 cache on GPU."""
    return _util.phase_call(fn, phase, lambda grad: _input_sets(size, dtype, widths, requires_grad=grad),
                            _args, _grad_inputs)


@functools.lru_cache(maxsize=None)
def full_width_seconds(size: int, dtype: torch.dtype, phase: str) -> float:
    """Measured time of the full-width cuDNN conv (dense_full) for ``phase``:
    the rate the FLOP-proportional ideal assumes."""
    widths = [CHANNELS] * N
    call = make_call(strategies.get_slim("dense_full"), phase, size, dtype, widths)
    return _util.measure_seconds(call)


def ideal_info(size: int, dtype: torch.dtype, phase: str, widths: list[int]) -> dict:
    full_s = full_width_seconds(size, dtype, phase)
    active, full = active_flops(widths, size, phase), full_flops(size, phase)
    return dict(ideal_s=full_s * active / full, full_width_s=full_s,
                full_width_TFLOPs=full / full_s / 1e12, full_width_flops=full,
                active_fraction=active / full,
                ideal_note="ideal = active FLOPs at the full-width cuDNN rate (dense_full, "
                           "measured untimed by pytest-benchmark); computed, not timed")


def _record_vs_ideal(benchmark, ideal: dict) -> None:
    info = benchmark.extra_info
    info.update(ideal)
    stats = getattr(benchmark, "stats", None)
    info["time_vs_ideal"] = stats.stats.mean / ideal["ideal_s"] if stats is not None else None


def _baselines(strategy: str, mix: str) -> list[str]:
    names = ["group_by_width", "mask", "dense_full", "reference"]
    if mix.startswith("uniform"):
        names.insert(0, "dense_at_width")
    return [b for b in names if b != strategy]


@pytest.mark.parametrize("strategy", list(strategies.SLIM_STRATEGIES))
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("phase", PASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_util.dtype_name)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}px")
def test_slim_conv2d(benchmark, size, dtype, phase, mix, strategy):
    spec = strategies.SLIM_STRATEGIES[strategy]
    reason = strategies.slim_unavailable_reason(strategy, DEVICE)
    if reason:
        pytest.skip(reason)
    if spec.uniform_only and not mix.startswith("uniform"):
        pytest.skip(f"{strategy} is one cuDNN call at one width: only for uniform mixes")
    if spec.exact:  # a wrong composition must not become a baseline
        strategies.verify_slim(strategy, str(DEVICE))
    widths = mix_widths(mix, N, layer_choices())
    flops = full_flops(size, phase) if strategy == "dense_full" else active_flops(widths, size, phase)
    ideal = ideal_info(size, dtype, phase, widths)
    call = make_call(strategies.get_slim(strategy), phase, size, dtype, widths)
    name = _util.dtype_name(dtype)
    with _util.skip_on_oom(f"slim_conv2d {strategy} {mix}") if ON_GPU else contextlib.nullcontext():
        _util.run_benchmark(
            benchmark, call, strategy=strategy, baselines=_baselines(strategy, mix),
            group=f"slim_conv2d {phase} {name} N{N} C{CHANNELS} {size}x{size} {mix}",
            mix=mix, widths=widths, flops=flops, nbytes=layer_bytes(size, dtype, phase),
            dtype=dtype, shape=(N, CHANNELS, size, size),
            # time-vs-size plot: one panel per dtype and mix, fwd+bwd only (few panels)
            series=f"slim_conv2d fwd+bwd {name} {mix}" if phase == "fwd+bwd" else None, size=size,
            **{"pass": phase, "description": spec.description,
               "flops_note": ("full-width FLOPs" if strategy == "dense_full" else
                              "active FLOPs 2*kh*kw*Ho*Wo*sum(in*out), whatever the strategy spends"),
               "compile": ("torch.compile(dynamic=False, fullgraph=True)"
                           if strategy.startswith("compile") else None)})
    _record_vs_ideal(benchmark, ideal)


# ================================================================== DDS-Net
if ON_GPU:
    # Paper-size DDS-Net (width 64, choices 16/32/48/64, 8 blocks) on 96^2 crops.
    DDS_CONFIG, DDS_BATCH, DDS_CROP, DDS_DTYPES = {}, 16, 96, (torch.bfloat16, torch.float32)
else:
    DDS_CONFIG, DDS_BATCH, DDS_CROP, DDS_DTYPES = dict(width=32, depth=1), 4, 24, (torch.float32,)
STEP_MIXES = ("uniform full", "dds 1:2:3:2", REALISTIC)
STEP_STRATEGIES = [s for s, spec in strategies.SLIM_STRATEGIES.items() if spec.exact]


def build_ddsnet():
    import restorenet

    if "ddsnet" not in restorenet.list_models():
        pytest.skip("model 'ddsnet' is not registered")
    return restorenet.create_model("ddsnet", **DDS_CONFIG).to(DEVICE)


@contextlib.contextmanager
def slim_conv2d_routed_to(fn):
    """Every slim_conv2d call of DDS-Net runs ``fn`` instead (restored after).
    The model hands its layers checked ``SlimWidths``; strategies take plain
    width tensors."""
    from restorenet.models import ddsnet as module
    from restorenet.ops.slim_conv2d import SlimWidths

    def plain(width):
        return width.values if isinstance(width, SlimWidths) else width

    def routed(x, weight, bias, in_width, out_width, stride=1, padding=0):
        return fn(x, weight, bias, plain(in_width), plain(out_width), stride, padding)

    saved = module.slim_conv2d
    module.slim_conv2d = routed
    try:
        yield
    finally:
        module.slim_conv2d = saved


def _noisy_images(batch: int, crop: int):
    """Random images with noise levels 5..50/255 spread over the batch, and clean targets."""
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(batch, 3, crop, crop, generator=g)
    sigma = torch.linspace(5, 50, batch).view(-1, 1, 1, 1) / 255
    noisy = clean + sigma * torch.randn(clean.shape, generator=g)
    return noisy.to(DEVICE), clean.to(DEVICE)


def ddsnet_train_step(model, x, target, widths, dtype):
    return _util.training_step(lambda: model(x, widths), lambda out: (out.float() - target).abs().mean(),
                               model.parameters(), dtype)


def _step_flops(model, widths: list[int]) -> int:
    """Conv FLOPs of one training step at forced widths: forward + 2x backward
    (dx and dW; the head's dx is not needed, counted anyway as an upper bound)."""
    per_width = model.flops((DDS_CROP, DDS_CROP), include_gate=False)
    return 3 * sum(per_width[w] for w in widths)


@functools.lru_cache(maxsize=None)
def full_width_step_seconds(dtype: torch.dtype) -> float:
    """Time of the same training step at full width with plain F.conv2d."""
    model = build_ddsnet().train()
    x, target = _noisy_images(DDS_BATCH, DDS_CROP)
    widths = torch.full((DDS_BATCH,), model.choices[-1], device=DEVICE)
    step = ddsnet_train_step(model, x, target, widths, dtype)
    with slim_conv2d_routed_to(strategies.get_slim("dense_full")):
        return _util.measure_seconds(step)


@pytest.mark.parametrize("strategy", STEP_STRATEGIES)
@pytest.mark.parametrize("mix", STEP_MIXES)
@pytest.mark.parametrize("dtype", DDS_DTYPES, ids=_util.dtype_name)
def test_ddsnet_train_step(benchmark, dtype, mix, strategy):
    reason = strategies.slim_unavailable_reason(strategy, DEVICE)
    if reason:
        pytest.skip(reason)
    strategies.verify_slim(strategy, str(DEVICE))
    model = build_ddsnet().train()
    widths = mix_widths(mix, DDS_BATCH, model.choices)
    x, target = _noisy_images(DDS_BATCH, DDS_CROP)
    step = ddsnet_train_step(model, x, target, torch.tensor(widths, device=DEVICE), dtype)
    flops = _step_flops(model, widths)
    full = _step_flops(model, [model.choices[-1]] * DDS_BATCH)
    full_s = full_width_step_seconds(dtype)
    name = _util.dtype_name(dtype)
    with slim_conv2d_routed_to(strategies.get_slim(strategy)), \
            (_util.skip_on_oom(f"ddsnet step {strategy}") if ON_GPU else contextlib.nullcontext()):
        _util.run_benchmark(
            benchmark, step, strategy=strategy,
            baselines=[b for b in ("group_by_width", "mask", "reference") if b != strategy],
            group=f"ddsnet train step {name} B{DDS_BATCH} {DDS_CROP}px {mix}",
            mix=mix, widths=widths, flops=flops, dtype=dtype,
            shape=(DDS_BATCH, 3, DDS_CROP, DDS_CROP), model_config=DDS_CONFIG or "paper",
            description=strategies.SLIM_STRATEGIES[strategy].description,
            flops_note="DDSNet.flops of the forced widths x3 (fwd, dx, dW)",
            **{"pass": "train step (fwd+loss+bwd+AdamW), every slim_conv2d routed to the strategy"})
    _record_vs_ideal(benchmark, dict(
        ideal_s=full_s * flops / full, full_width_s=full_s, full_width_flops=full,
        active_fraction=flops / full,
        ideal_note="ideal = the full-width step with plain F.conv2d, scaled by the mix's FLOPs"))


# ----------------------------------------------------- DDS-Net per width choice
def _per_width_cases() -> list[str]:
    return ["width 1", "width 2", "width 3", "width 4", "mix 1:2:3:2", f"mix {REALISTIC}",
            "gate only", "gate picks"]


def _infer(model, x, forced, dtype):
    """What ``model(x)`` spends when its gate picks ``forced``: the gate, then the
    backbone at those widths (forced=None: the gate alone)."""

    def run():
        with torch.no_grad(), _util.autocast(dtype):
            logits = model.gate_logits(x)
            return logits if forced is None else model(x, forced)

    return run


@functools.lru_cache(maxsize=None)
def widest_inference_seconds(dtype: torch.dtype) -> float:
    """Measured time of gate + backbone at the widest choice: the rate (FLOP/s)
    the per-width ideal assumes."""
    model = build_ddsnet().eval()
    x, _ = _noisy_images(DDS_BATCH, DDS_CROP)
    forced = torch.full((DDS_BATCH,), model.choices[-1], device=DEVICE)
    return _util.measure_seconds(_infer(model, x, forced, dtype))


def _case_widths(case: str, model, x) -> tuple[list[int] | None, str]:
    """(per-image widths or None for the gate alone, label) of a per-width case."""
    choices = list(model.choices)
    if case.startswith("width"):
        k = choices[int(case.split()[1]) - 1]
        return [k] * DDS_BATCH, f"width {k}"
    if case == "mix 1:2:3:2":
        return mix_widths("dds 1:2:3:2", DDS_BATCH, choices), case
    if case == f"mix {REALISTIC}":
        return mix_widths(REALISTIC, DDS_BATCH, choices), case
    if case == "gate only":
        return None, case
    with torch.no_grad():  # gate picks (an untrained gate: recorded, not meaningful)
        _, picked = model(x, return_widths=True)
    return picked.tolist(), case


@pytest.mark.parametrize("case", _per_width_cases())
@pytest.mark.parametrize("dtype", DDS_DTYPES, ids=_util.dtype_name)
def test_ddsnet_per_width(benchmark, dtype, case):
    """Inference (eval, no_grad, default backend): gate + backbone per width
    choice and per mix, with backbone / gate / total FLOPs and the ideal."""
    model = build_ddsnet().eval()
    choices = list(model.choices)
    x, _ = _noisy_images(DDS_BATCH, DDS_CROP)
    size = (DDS_CROP, DDS_CROP)
    per_width = model.flops(size, include_gate=False)
    gate_flops = model.gate_flops(size) * DDS_BATCH
    widths, label = _case_widths(case, model, x)
    backbone_flops = 0 if widths is None else sum(per_width[w] for w in widths)
    flops = backbone_flops + gate_flops
    widest_flops = (per_width[choices[-1]] + model.gate_flops(size)) * DDS_BATCH
    forced = None if widths is None else torch.tensor(widths, device=DEVICE)
    extra = dict(choices=choices, backbone_flops=backbone_flops, gate_flops=gate_flops,
                 gate_flops_per_image=model.gate_flops(size),
                 flops_per_image_by_width={str(k): v for k, v in per_width.items()})
    if widths is not None:
        extra["width_histogram"] = {str(k): widths.count(k) for k in choices}
    if case.startswith("width"):
        extra.update(width_choice=widths[0], flops_per_image=per_width[widths[0]])
    if case == f"mix {REALISTIC}":
        extra["mix_provenance"] = f"REALISTIC_MIX = {REALISTIC_MIX}, see the bench module"

    from restorenet.ops._backend import resolve_backend

    extra["backend"] = resolve_backend(None, DEVICE, "slim_conv2d", cuda_symbol="slim_conv2d_forward")
    name = _util.dtype_name(dtype)
    top = f"width {choices[-1]}"
    widest_s = widest_inference_seconds(dtype)
    _util.run_benchmark(
        benchmark, _infer(model, x, forced, dtype), strategy=label,
        baselines=[top] if label != top else [],
        group=f"ddsnet per width {name} B{DDS_BATCH} {DDS_CROP}px",
        width_mix=label, widths=widths, flops=flops, dtype=dtype,
        shape=(DDS_BATCH, 3, DDS_CROP, DDS_CROP), model_config=DDS_CONFIG or "paper",
        flops_note="DDSNet.flops (backbone) + gate_flops, whole batch",
        **extra, **{"pass": "inference (eval, no_grad): gate + backbone at the case's widths"})
    _record_vs_ideal(benchmark, dict(
        ideal_s=widest_s * flops / widest_flops, full_width_s=widest_s, full_width_flops=widest_flops,
        active_fraction=flops / widest_flops,
        ideal_note="ideal = the case's FLOPs at the rate of gate + backbone at the widest "
                   "choice (measured untimed by pytest-benchmark); computed, not timed"))
