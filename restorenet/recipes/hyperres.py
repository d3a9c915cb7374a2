"""HyperRes recipe: one model trained at four levels, measured at levels it never saw.

Stages (per task named by ``--task``: ``denoise`` by default, ``dejpeg``, ``sr``):

1. **train** HyperRes at the task's four training levels with ``restorenet.train``
   (``HyperResAdapter``: every crop is degraded at all four levels and the four
   go through one forward, the paper's mean over levels of per-level L1).
2. **evaluate** on the held-out photos (centre crops, ``--eval-size``) at the
   trained levels, at unseen levels inside the trained range and outside it,
   against the degraded input itself (the do-nothing baseline); plot PSNR vs level.
   Level sensitivity: PSNR at each trained level with each trained level fed as the
   level input -- if the output hardly depends on it, the unseen-level numbers say
   little about the hyper network's conditioning.
3. **blind** (with ``denoise``): train the released blind estimator (NoiseNet,
   ``hyperres_level_estimator``) on sigma drawn uniformly from the integers 0..100
   (as the released ``train_noisenet.py`` does), then report its level error at
   every evaluated sigma and HyperRes's PSNR with the estimated sigma instead of
   the true one.

Levels (``LEVELS``): the task's training levels (``restorenet.data.tasks``), three
unseen levels between them and one below / above the range; JPEG qualities are
whole numbers. Every level is >= 1, so HyperRes's released normalisation (divide
by 255 only when the batch's smallest level is >= 1, see
``restorenet.models.hyperres.level_to_condition``) feeds each one as ``level / 255``,
exactly as the training levels were fed; an estimated sigma is clamped to >= 1 for
the same reason (an estimate of 0.5 would otherwise be taken as already normalised,
i.e. sigma 127).

Differences from the paper (CPU-sized, named):

- Model: ``SMALL_CONFIGS["hyperres"]`` (width 32, 2 meta blocks; the paper has
  width 64, 16 blocks: ``--paper-config``), a few thousand steps on 48x48 crops of
  three photos instead of DIV2K for days; two held-out photos (centre crops).
- Estimator: width 32 (``--paper-config``: the released 64) and, by default,
  PyTorch's default initialisation (``--estimator-init pytorch``): the released
  Kaiming x 0.001 (``--estimator-init released``) kept predicting the mean sigma
  (L1 ~ 25) after 600 steps on this machine, where the default init reaches ~2 in
  400. Its noise is restorenet's unclipped AWGN (the released estimator trains on
  noisy images clipped to [0, 255]) -- the same noise HyperRes sees here.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from restorenet.data import RandomCropSampler, get_task, heldout_images
from restorenet.recipes.common import Report, Settings, fit, mean
from restorenet.registry import count_parameters, create_model
from restorenet.train import train
from restorenet.training.adapters import HyperResAdapter, l1_loss
from restorenet.training.checkpoint import load_model
from restorenet.training.evaluation import EVAL_SEED, EvalSet, evaluate, input_quality

__all__ = ["LEVELS", "ESTIMATOR_SIGMA_MAX", "add_arguments", "run"]

# task -> unseen levels inside the trained range, and outside it (below, above)
LEVELS: dict[str, dict[str, tuple]] = {
    "denoise": {"unseen_inside": (25, 45, 65), "unseen_outside": (5, 85)},
    "dejpeg": {"unseen_inside": (20, 40, 65), "unseen_outside": (5, 95)},
    "sr": {"unseen_inside": (2.5, 3.5, 4.5), "unseen_outside": (1.5, 6)},
}
ESTIMATOR_SIGMA_MAX = 100  # the released estimator trains on sigma in {0, ..., 100}
# The released condition rule divides a batch's levels by 255 only when the smallest is >= 1.
MIN_LEVEL = 1.0


def add_arguments(group) -> None:
    group.add_argument("--task", nargs="+", choices=sorted(LEVELS), default=["denoise"],
                       help="tasks to train and measure, one HyperRes each (default: denoise)")
    group.add_argument("--estimator-steps", type=int,
                       help="steps of the blind estimator (default: half of --steps)")
    group.add_argument("--estimator-init", choices=("pytorch", "released"), default="pytorch",
                       help="estimator initialisation: PyTorch's default (trains in hundreds "
                            "of steps) or the released Kaiming x 0.001")


def evaluated_levels(task_name: str) -> list[tuple[float, str]]:
    """(level, kind) sorted by level; kind is trained / unseen_inside / unseen_outside."""
    task = get_task(task_name)
    kinds = [(lv, "trained") for lv in task.levels]
    kinds += [(lv, kind) for kind, levels in LEVELS[task_name].items() for lv in levels]
    if min(lv for lv, _ in kinds) < MIN_LEVEL:
        raise ValueError(f"levels of {task_name} must be >= {MIN_LEVEL} (the released "
                         f"normalisation would take a smaller one as already divided by 255)")
    return sorted(kinds)


def level_evalset(task_name: str, levels, size: int) -> EvalSet:
    """The held-out photos (centre crops) degraded at ``levels``, once, with the trainer's
    evaluation seed."""
    task, clean = get_task(task_name), heldout_images(size)
    generator = torch.Generator().manual_seed(EVAL_SEED)
    return EvalSet({str(lv): (lv, [(task.degrade(clean, lv, generator), clean)]) for lv in levels})


# ----------------------------------------------------------------------------- stages


def train_hyperres(settings: Settings, task_name: str, workdir: Path) -> tuple[torch.nn.Module, dict]:
    steps = settings.given("steps", settings.choose(1000, 4))
    history = train(
        "hyperres", task_name, steps, out=workdir / f"hyperres-{task_name}", seed=settings.seed,
        device=settings.device, threads=settings.threads, progress=False,
        small=not settings.paper_config, eval_every=steps, eval_size=settings.given("eval_size", 64),
        model_kwargs=settings.model_kwargs or settings.choose({}, dict(width=8, num_blocks=1)),
        batch=settings.given("batch", settings.choose(None, 2)),
        crop=settings.given("crop", settings.choose(None, 32)), lr=settings.lr,
        weight_decay=settings.weight_decay, grad_clip=settings.grad_clip, amp=settings.amp)
    model = load_model(Path(history["out"]) / "model.pt", settings.device)
    losses = history["train"]["loss"]
    tail = losses[-max(1, len(losses) // 10):]
    info = {"steps": steps, "parameters": count_parameters(model),
            "model_kwargs": history["config"]["model_kwargs"], "batch": history["config"]["batch"],
            "crop": history["config"]["crop"], "lr": history["config"]["lr"],
            "final_loss": sum(tail) / len(tail), "train_wall_s": round(history["wall_time_s"], 1)}
    return model, info


def measure_levels(model, task_name: str, eval_size: int, device: str) -> list[dict]:
    kinds = evaluated_levels(task_name)
    adapter = HyperResAdapter()
    evalset = level_evalset(task_name, [lv for lv, _ in kinds], eval_size)
    restored = evaluate(model, adapter, evalset, device)
    degraded = input_quality(adapter, evalset)
    rows = []
    for level, kind in kinds:
        key = str(level)
        rows.append({"level": level, "kind": kind,
                     "psnr": restored["psnr"][key], "ssim": restored["ssim"][key],
                     "input_psnr": degraded["psnr"][key], "input_ssim": degraded["ssim"][key],
                     "gain_db": restored["psnr"][key] - degraded["psnr"][key]})
    return rows


class FedLevelAdapter(HyperResAdapter):
    """Restores with a fixed ``fed`` level whatever the images' true level is."""

    def __init__(self, fed):
        self.fed = fed

    def restore(self, model, degraded, level):
        return model(degraded, float(self.fed))


def measure_level_sensitivity(model, task_name: str, eval_size: int, device: str) -> dict:
    """PSNR at each trained level with each trained level fed as the level input: how
    much the output depends on the level input (a model that ignores it scores the same
    along a row, and then the unseen-level results say nothing about its conditioning)."""
    levels = get_task(task_name).levels
    evalset = level_evalset(task_name, levels, eval_size)
    by_fed = {fed: evaluate(model, FedLevelAdapter(fed), evalset, device)["psnr"] for fed in levels}
    rows = [{"true_level": true, "psnr_by_fed_level": {str(fed): by_fed[fed][str(true)] for fed in levels}}
            for true in levels]
    for row in rows:
        values = row["psnr_by_fed_level"].values()
        row["spread_db"] = max(values) - min(values)
        row["true_minus_best_db"] = row["psnr_by_fed_level"][str(row["true_level"])] - max(values)
    return {"fed_levels": list(levels), "rows": rows}


class EstimatedLevelAdapter(HyperResAdapter):
    """Restores with the level the blind estimator reads off each image (clamped to
    >= 1, see the module docstring) instead of the true one."""

    def __init__(self, estimator: torch.nn.Module):
        self.estimator = estimator.eval()

    def restore(self, model, degraded, level):
        return model(degraded, self.estimator(degraded).clamp_min(MIN_LEVEL))


def estimator_crop(eval_size: int) -> int:
    """The estimator's fixed input size: 128 as released, or what the held-out crops allow."""
    crop = min(128, eval_size) // 32 * 32
    if crop < 32:
        raise ValueError(f"eval_size must be >= 32 for the blind estimator, got {eval_size}")
    return crop


def train_estimator(settings: Settings, crop: int) -> tuple[torch.nn.Module, dict]:
    """NoiseNet regressing sigma (L1) on crops with sigma ~ U{0..100} per image."""
    width = settings.choose(64 if settings.paper_config else 32, 8)
    estimator = create_model("hyperres_level_estimator", width=width, crop_size=crop,
                             crop="center").to(settings.device)
    if settings.extra.get("estimator_init", "pytorch") == "pytorch":
        for module in estimator.modules():
            if module is not estimator and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    steps = settings.extra.get("estimator_steps") or max(1, settings.given("steps", settings.choose(1000, 4)) // 2)
    batch = settings.given("batch", settings.choose(8, 2))
    task = get_task("denoise")
    sampler = RandomCropSampler(crop=crop, seed=settings.seed + 2)
    generator = torch.Generator().manual_seed(settings.seed + 3)

    def step_loss(step: int) -> torch.Tensor:
        clean = sampler.sample(batch)
        sigma = torch.randint(0, ESTIMATOR_SIGMA_MAX + 1, (batch,), generator=generator).float()
        noisy = task.degrade(clean, sigma.tolist(), generator)
        return l1_loss(estimator(noisy.to(settings.device)), sigma.to(settings.device))

    losses = fit(estimator.parameters(), step_loss, steps, settings.given("lr", 1e-3),
                 device=settings.device, log=lambda s, l: print(f"  estimator step {s}: L1 {l:.2f}"))
    tail = losses[-max(1, steps // 10):]
    return estimator.eval(), {"steps": steps, "width": width, "crop": crop, "batch": batch,
                              "init": settings.extra.get("estimator_init", "pytorch"),
                              "parameters": count_parameters(estimator),
                              "final_loss": sum(tail) / len(tail)}


@torch.no_grad()
def measure_blind(model, estimator, rows: list[dict], eval_size: int, device: str) -> list[dict]:
    """Per sigma: the estimates, their mean absolute error, PSNR with estimated vs true sigma."""
    evalset = level_evalset("denoise", [r["level"] for r in rows], eval_size)
    with_estimate = evaluate(model, EstimatedLevelAdapter(estimator), evalset, device)["psnr"]
    blind = []
    for row in rows:
        level, pairs = evalset.groups[str(row["level"])]
        estimates = torch.cat([estimator(degraded.to(device)).cpu() for degraded, _ in pairs])
        blind.append({"level": level, "kind": row["kind"], "estimates": estimates.tolist(),
                      "level_error": (estimates - level).abs().mean().item(),
                      "psnr_true_level": row["psnr"], "psnr_estimated_level": with_estimate[str(level)],
                      "input_psnr": row["input_psnr"]})
    return blind


# ----------------------------------------------------------------------------- report

MARKERS = {"trained": ("o", "trained level"), "unseen_inside": ("s", "unseen, inside the range"),
           "unseen_outside": ("^", "unseen, outside the range")}


def plot_levels(report: Report, tasks: dict) -> None:
    with report.figure("psnr_vs_level.png", "Held-out PSNR vs degradation level: HyperRes "
                       "(markers by kind of level) and the degraded input (grey); the shaded band "
                       "is the trained range.", ncols=len(tasks), figsize=(4.6 * len(tasks), 3.6),
                       squeeze=False) as (fig, axes):
        for ax, (name, result) in zip(axes[0], tasks.items()):
            rows = result["levels"]
            x = [r["level"] for r in rows]
            trained = [r["level"] for r in rows if r["kind"] == "trained"]
            ax.axvspan(min(trained), max(trained), color="tab:blue", alpha=0.07)
            ax.plot(x, [r["psnr"] for r in rows], "-", color="tab:blue", lw=1)
            ax.plot(x, [r["input_psnr"] for r in rows], "--", color="grey", lw=1, label="degraded input")
            for kind, (marker, label) in MARKERS.items():
                pts = [r for r in rows if r["kind"] == kind]
                ax.plot([r["level"] for r in pts], [r["psnr"] for r in pts], marker, ls="none",
                        color="tab:blue", mfc="tab:blue" if kind == "trained" else "white", label=label)
            ax.set_xlabel(result["level_name"])
            ax.set_ylabel("PSNR (dB)")
            ax.set_title(name)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)


def plot_blind(report: Report, blind: list[dict]) -> None:
    with report.figure("blind.png", "Blind setting (denoise): the estimator's sigma per held-out "
                       "image vs the true sigma (left); HyperRes PSNR with the true and with the "
                       "estimated sigma (right).", ncols=2, figsize=(9, 3.6)) as (fig, (left, right)):
        x = [b["level"] for b in blind]
        for b in blind:
            left.plot([b["level"]] * len(b["estimates"]), b["estimates"], MARKERS[b["kind"]][0],
                      color="tab:orange", mfc="white" if b["kind"] != "trained" else "tab:orange")
        left.plot([0, max(x)], [0, max(x)], ":", color="grey", label="estimate = true")
        left.set_xlabel("true sigma")
        left.set_ylabel("estimated sigma")
        left.legend(fontsize=7)
        right.plot(x, [b["psnr_true_level"] for b in blind], "o-", label="true sigma")
        right.plot(x, [b["psnr_estimated_level"] for b in blind], "s--", label="estimated sigma")
        right.plot(x, [b["input_psnr"] for b in blind], ":", color="grey", label="noisy input")
        right.set_xlabel("sigma")
        right.set_ylabel("PSNR (dB)")
        right.legend(fontsize=7)
        for ax in (left, right):
            ax.grid(alpha=0.3)


def summarise(rows: list[dict]) -> dict[str, float]:
    """Mean PSNR gain over the input per kind of level."""
    return {kind: mean(r["gain_db"] for r in rows if r["kind"] == kind) for kind in MARKERS}


def write_report(report: Report, tasks: dict, blind: list[dict] | None, estimator: dict | None) -> None:
    report.text("HyperRes (width/blocks below) is trained at the four levels of each task and "
                "evaluated on two held-out photos at those levels, at unseen levels inside the "
                "trained range and at unseen levels outside it. *Gain* = PSNR of the restored "
                "image minus PSNR of the degraded input (RGB, 8-bit output).")
    for name, result in tasks.items():
        t = result["train"]
        report.table(
            [result["level_name"], "kind", "input PSNR", "HyperRes PSNR", "gain (dB)", "input SSIM",
             "HyperRes SSIM"],
            [[r["level"], r["kind"], r["input_psnr"], r["psnr"], r["gain_db"], f"{r['input_ssim']:.3f}",
              f"{r['ssim']:.3f}"] for r in result["levels"]],
            caption=f"**{name}**: {t['steps']} steps, batch {t['batch']} x 4 levels, crop "
                    f"{t['crop']}, lr {t['lr']}, {t['parameters']:,} parameters "
                    f"({t['model_kwargs']}), final training L1 {t['final_loss']:.4f}.")
    report.table(["task", "mean gain, trained (dB)", "unseen inside", "unseen outside"],
                 [[name, *result["gain_by_kind"].values()] for name, result in tasks.items()],
                 caption="Mean gain over the degraded input by kind of level:")
    plot_levels(report, tasks)
    for name, result in tasks.items():
        sens = result["level_sensitivity"]
        report.table([f"true {result['level_name']}", *(f"fed {lv}" for lv in sens["fed_levels"]),
                      "spread (dB)", "fed true - best fed (dB)"],
                     [[r["true_level"], *r["psnr_by_fed_level"].values(), r["spread_db"],
                       r["true_minus_best_db"]] for r in sens["rows"]],
                     caption=f"**{name}, level sensitivity**: held-out PSNR at each trained level "
                             f"(rows) with each trained level fed as HyperRes's level input "
                             f"(columns). A small spread along a row means the output hardly "
                             f"depends on the level input.")
    if blind is not None:
        report.table(["sigma", "kind", "mean estimate", "level error", "PSNR true sigma",
                      "PSNR estimated sigma", "difference (dB)"],
                     [[b["level"], b["kind"], mean(b["estimates"]), b["level_error"],
                       b["psnr_true_level"], b["psnr_estimated_level"],
                       b["psnr_estimated_level"] - b["psnr_true_level"]] for b in blind],
                     caption=f"**Blind setting**: NoiseNet (width {estimator['width']}, "
                             f"{estimator['parameters']:,} parameters, {estimator['init']} init) "
                             f"trained {estimator['steps']} steps on sigma ~ U{{0..100}}, "
                             f"{estimator['crop']}x{estimator['crop']} crops (final training L1 "
                             f"{estimator['final_loss']:.2f}); level error = mean |estimate - sigma| "
                             f"over the held-out photos.")
        plot_blind(report, blind)
    report.text(_conclusions(tasks, blind))


def _conclusions(tasks: dict, blind: list[dict] | None) -> str:
    lines = ["**What this shows.**"]
    for name, result in tasks.items():
        gains = result["gain_by_kind"]
        spread = max(r["spread_db"] for r in result["level_sensitivity"]["rows"])
        lines.append(f"- {name}: mean gain over the input {gains['trained']:.2f} dB at the trained "
                     f"levels, {gains['unseen_inside']:.2f} dB at unseen levels inside the range, "
                     f"{gains['unseen_outside']:.2f} dB at unseen levels outside it (measured as is). "
                     f"Feeding any other trained level instead of the true one changes PSNR by at "
                     f"most {spread:.2f} dB: the smaller this is, the less the unseen-level numbers "
                     f"say about the hyper network's conditioning (a level-blind network would "
                     f"score the same).")
    if blind is not None:
        lines.append(f"- blind denoising: mean level error {mean(b['level_error'] for b in blind):.2f} "
                     f"(sigma units); PSNR with the estimated sigma differs from the true-sigma PSNR by "
                     f"{mean(b['psnr_estimated_level'] - b['psnr_true_level'] for b in blind):+.2f} dB "
                     f"on average.")
    lines.append("\n**What it does not show.** Two held-out photos (centre crops) and a CPU-sized "
                 "model trained for minutes: the absolute PSNRs are far below the paper's, and "
                 "differences of a few tenths of a dB between levels are within what another seed "
                 "or other photos would change. No comparison with one model per level (the "
                 "paper's baseline) is made.")
    return "\n".join(lines)


def run(settings: Settings, report: Report) -> None:
    eval_size = settings.given("eval_size", settings.choose(128, 64))
    tasks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hyperres-recipe-") as tmp:  # checkpoints stay out
        for name in settings.extra.get("task") or ["denoise"]:
            with report.stage(f"train {name}"):
                model, info = train_hyperres(settings, name, Path(tmp))
            with report.stage(f"evaluate {name}"):
                rows = measure_levels(model, name, eval_size, settings.device)
                sensitivity = measure_level_sensitivity(model, name, eval_size, settings.device)
            tasks[name] = {"level_name": get_task(name).level_name, "train": info, "levels": rows,
                           "gain_by_kind": summarise(rows), "level_sensitivity": sensitivity,
                           "model": model}
    blind = estimator = None
    if "denoise" in tasks:
        with report.stage("train blind estimator"):
            net, estimator = train_estimator(settings, estimator_crop(eval_size))
        with report.stage("evaluate blind"):
            blind = measure_blind(tasks["denoise"]["model"], net, tasks["denoise"]["levels"],
                                  eval_size, settings.device)
    for result in tasks.values():
        del result["model"]
    report.results.update(eval_size=eval_size, tasks=tasks, blind=blind, estimator=estimator)
    write_report(report, tasks, blind, estimator)
