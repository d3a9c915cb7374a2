"""A small trainer: any registered model, any task, real photos, CPU-friendly.

    python -m restorenet.train --model hyperres --task denoise --steps 300
    python -m restorenet.train --model nafnet --task deblur --steps 500 --width 16 \\
        --model-kwarg enc_blocks=(1,1,2,2) --out runs/naf-deblur

Training pairs are random crops (with flips) of the training photos, degraded
on the fly; evaluation uses centre crops of the held-out photos, degraded once
with a fixed seed, and reports PSNR/SSIM per degradation level at step 0, every
``eval_every`` steps and at the end. AdamW, cosine learning-rate decay, L1 loss
(plus the model's own extra terms, see the adapters). Written to ``out``:

    history.json   config, per-step loss and lr, every evaluation, input quality
    plot.png       loss vs step, and held-out PSNR per level vs step

Model size: every model starts from its entry in ``SMALL_CONFIGS`` (CPU-sized);
``--width`` and ``--model-kwarg`` override single kwargs on top of it, and
``--paper-config`` starts from the paper's configuration instead.

Models differ in how they are called and trained; one small adapter per model
name hides that:

    hyperres   model(x, level) with the raw level (sigma, quality, scale) per
               sample; each batch is degraded at *every* task level and all
               levels run in one forward, loss = mean over levels of L1.
    adarevd    train mode returns one output per reversible column; loss =
               mean over columns of L1 + 0.01 * mean|rfft2(pred) - rfft2(gt)|.
    others     model(x) -> restored image; each sample gets a random level.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from restorenet.data import RandomCropSampler, Task, get_task, heldout_images
from restorenet.metrics import psnr, ssim
from restorenet.registry import count_parameters, create_model, list_models

__all__ = ["SMALL_CONFIGS", "train", "evaluate", "save_plot", "main"]


# ----------------------------------------------------------------------------- configs

# Small configurations that train in minutes on a laptop CPU. ``model`` holds the
# model kwargs; the rest are trainer defaults. Command-line flags override them.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "hyperres": dict(model=dict(width=32, num_blocks=2), batch=8, crop=48, lr=2e-3),
    "nafnet": dict(model=dict(width=8, enc_blocks=(1, 1, 1, 1), middle_blocks=1,
                              dec_blocks=(1, 1, 1, 1)), batch=8, crop=64, lr=1e-3),
    "mhnet": dict(model=dict(width=8, enc_blocks=(1, 1, 1, 1), dec_blocks=(1, 1, 1, 1),
                             cabg_blocks=1), batch=8, crop=64, lr=1e-3),
    "adarevd": dict(model=dict(width=8, num_decoders=2, enc_blocks=(1, 1, 1, 1)),
                    batch=8, crop=64, lr=1e-3, weight_decay=1e-3, betas=(0.9, 0.9)),
    "constyle_nafnet": dict(model=dict(width=8, enc_blocks=(1, 1, 1), middle_blocks=1,
                                       dec_blocks=(1, 1, 1)), batch=8, crop=64, lr=1e-3),
    "ddsnet": dict(model=dict(width=32, depth=4), batch=8, crop=64, lr=1e-3),
}
_TRAINER_DEFAULTS = dict(batch=8, crop=64, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999))


# ----------------------------------------------------------------------------- adapters


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def fft_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean |rfft2(pred) - rfft2(target)| (complex modulus), AdaRevD's frequency term."""
    return (torch.fft.rfft2(pred) - torch.fft.rfft2(target)).abs().mean()


class ModelAdapter:
    """How to call a model and compute its training loss. Default: ``model(x)``."""

    def random_levels(self, task: Task, n: int, generator: torch.Generator) -> list:
        picks = torch.randint(len(task.levels), (n,), generator=generator)
        return [task.levels[i] for i in picks.tolist()]

    def training_loss(self, model: nn.Module, task: Task, clean: torch.Tensor,
                      generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Degrade ``clean`` at a random level per sample, restore, L1."""
        levels = self.random_levels(task, clean.shape[0], generator)
        degraded = task.degrade(clean, levels, generator).to(device)
        return self.loss(model(degraded), clean.to(device))

    def loss(self, output, clean: torch.Tensor) -> torch.Tensor:
        return l1_loss(output, clean)

    def restore(self, model: nn.Module, degraded: torch.Tensor, level) -> torch.Tensor:
        """Eval-mode restoration of a batch degraded at one ``level``."""
        return model(degraded)


class HyperResAdapter(ModelAdapter):
    """All task levels in one forward: the batch is repeated once per level."""

    def training_loss(self, model, task, clean, generator, device):
        n = clean.shape[0]
        degraded = torch.cat([task.degrade(clean, level, generator) for level in task.levels])
        levels = torch.tensor(task.levels, dtype=torch.float32).repeat_interleave(n)
        restored = model(degraded.to(device), levels.to(device))
        target = clean.to(device).repeat(len(task.levels), 1, 1, 1)
        per_level_l1 = (restored - target).abs().flatten(1).mean(1).view(len(task.levels), n).mean(1)
        return per_level_l1.mean()

    def restore(self, model, degraded, level):
        return model(degraded, float(level))


class AdaRevDAdapter(ModelAdapter):
    """Deep supervision on every reversible column's output."""

    def loss(self, output, clean):
        columns = output if isinstance(output, (list, tuple)) else [output]
        per_column = [l1_loss(out, clean) + 0.01 * fft_l1_loss(out, clean) for out in columns]
        return torch.stack(per_column).mean()


ADAPTERS: dict[str, ModelAdapter] = {
    "hyperres": HyperResAdapter(),
    "adarevd": AdaRevDAdapter(),
}


def get_adapter(model_name: str) -> ModelAdapter:
    return ADAPTERS.get(model_name, ModelAdapter())


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalSet:
    """Held-out clean crops and their degraded versions at every task level."""

    clean: torch.Tensor
    degraded: dict = field(default_factory=dict)  # level -> [N, 3, S, S]

    @classmethod
    def build(cls, task: Task, size: int, seed: int = 1234) -> "EvalSet":
        clean = heldout_images(size)
        generator = torch.Generator().manual_seed(seed)
        return cls(clean, {level: task.degrade(clean, level, generator) for level in task.levels})


def _mean_metrics(pred: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    pred = pred.clamp(0, 1)
    return float(psnr(pred, clean).mean()), float(ssim(pred, clean).mean())


@torch.no_grad()
def evaluate(model: nn.Module, adapter: ModelAdapter, evalset: EvalSet,
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Mean held-out PSNR (dB) and SSIM per level: ``{"psnr": {"15": ..}, "ssim": {..}}``."""
    was_training = model.training
    model.eval()
    result = {"psnr": {}, "ssim": {}}
    for level, degraded in evalset.degraded.items():
        restored = adapter.restore(model, degraded.to(device), level).float().cpu()
        result["psnr"][str(level)], result["ssim"][str(level)] = _mean_metrics(restored, evalset.clean)
    model.train(was_training)
    return result


def input_quality(evalset: EvalSet) -> dict[str, dict[str, float]]:
    """PSNR/SSIM of the degraded inputs themselves: the do-nothing baseline."""
    result = {"psnr": {}, "ssim": {}}
    for level, degraded in evalset.degraded.items():
        result["psnr"][str(level)], result["ssim"][str(level)] = _mean_metrics(degraded, evalset.clean)
    return result


# ----------------------------------------------------------------------------- plotting


def save_plot(history: dict, path: str | os.PathLike) -> None:
    """Two panels: training loss vs step, and held-out PSNR per level vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = history["config"]
    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4.2))

    steps, losses = history["train"]["step"], history["train"]["loss"]
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="per step")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax_loss.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.8,
                     label=f"mean of {window}")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3, which="both")
    ax_loss.legend()

    eval_steps = [e["step"] for e in history["eval"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, level in enumerate(history["levels"]):
        key, color = str(level), colors[i % len(colors)]
        ax_psnr.plot(eval_steps, [e["psnr"][key] for e in history["eval"]], "o-", color=color,
                     label=f"{history['level_name']} {level}")
        ax_psnr.axhline(history["input"]["psnr"][key], color=color, ls=":", lw=1)
    ax_psnr.set_xlabel("step")
    ax_psnr.set_ylabel("PSNR (dB)")
    ax_psnr.set_title("held-out PSNR per level (dotted: degraded input)")
    ax_psnr.grid(alpha=0.3)
    ax_psnr.legend(fontsize=8)

    fig.suptitle(f"{cfg['model']} on {cfg['task']}: {cfg['steps']} steps, "
                 f"batch {cfg['batch']}, crop {cfg['crop']}, lr {cfg['lr']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- training


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def resolve_config(model: str, width: int | None = None, model_kwargs: dict | None = None,
                   small: bool = True, **trainer) -> tuple[dict, dict]:
    """Model kwargs and trainer settings: small defaults, then explicit overrides.

    ``small=False`` starts from the paper's configuration (empty kwargs).
    ``trainer`` values that are None fall back to the defaults.
    """
    base = SMALL_CONFIGS.get(model, {}) if small else {}
    kwargs = dict(base.get("model", {}))
    if width is not None:
        kwargs["width"] = width
    kwargs.update(model_kwargs or {})
    settings = {k: base.get(k, v) for k, v in _TRAINER_DEFAULTS.items()}
    settings.update({k: v for k, v in trainer.items() if v is not None})
    return kwargs, settings


def train(model: str = "hyperres", task: str = "denoise", steps: int = 300, *,
          width: int | None = None, batch: int | None = None, crop: int | None = None,
          lr: float | None = None, weight_decay: float | None = None,
          eval_every: int | None = None, eval_size: int = 128, out: str | os.PathLike | None = None,
          seed: int = 0, device: str = "cpu", model_kwargs: dict | None = None,
          small: bool = True, progress: bool = True) -> dict:
    """Train ``model`` on ``task`` for ``steps`` steps; return the metrics history.

    The history (also written to ``out/history.json``) holds ``config``,
    ``levels``, ``train`` (per-step ``step``/``loss``/``lr`` lists), ``eval``
    (a list of ``{"step", "psnr": {level: dB}, "ssim": {level: ..}}``, the
    first at step 0 and the last at ``steps``), ``input`` (the degraded
    inputs' own PSNR/SSIM) and ``wall_time_s``. ``out`` defaults to
    ``runs/<model>-<task>``.
    """
    if model not in list_models():
        raise ValueError(f"model must be one of {list_models()}, got {model!r}")
    task_obj = get_task(task)
    steps = _positive_int("steps", steps)
    eval_size = _positive_int("eval_size", eval_size)
    kwargs, cfg = resolve_config(model, width, model_kwargs, small, batch=batch, crop=crop,
                                 lr=lr, weight_decay=weight_decay)
    batch, crop = _positive_int("batch", cfg["batch"]), _positive_int("crop", cfg["crop"])
    if not cfg["lr"] > 0:
        raise ValueError(f"lr must be positive, got {cfg['lr']!r}")
    eval_every = _positive_int("eval_every", eval_every or max(1, steps // 5))
    out_dir = Path(out) if out is not None else Path("runs") / f"{model}-{task}"
    dev = torch.device(device)

    torch.manual_seed(seed)
    net = create_model(model, **kwargs).to(dev)
    adapter = get_adapter(model)
    sampler = RandomCropSampler(crop=crop, seed=seed)
    degrade_generator = torch.Generator().manual_seed(seed + 1)
    evalset = EvalSet.build(task_obj, eval_size)

    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                  weight_decay=cfg["weight_decay"])
    # Cosine decay to 1% of the peak over the whole run, stepped every iteration.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps,
                                                           eta_min=cfg["lr"] * 0.01)

    history = {
        "config": dict(model=model, task=task, steps=steps, batch=batch, crop=crop,
                       lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=list(cfg["betas"]),
                       eval_every=eval_every, eval_size=eval_size, seed=seed, device=device,
                       model_kwargs={k: list(v) if isinstance(v, tuple) else v
                                     for k, v in kwargs.items()},
                       parameters=count_parameters(net)),
        "levels": list(task_obj.levels),
        "level_name": task_obj.level_name,
        "train": {"step": [], "loss": [], "lr": []},
        "input": input_quality(evalset),
        "eval": [],
    }

    def run_eval(step: int, bar) -> None:
        record = {"step": step, **evaluate(net, adapter, evalset, dev)}
        history["eval"].append(record)
        line = "  ".join(f"{lv}: {db:.2f}" for lv, db in record["psnr"].items())
        bar.write(f"step {step:>6}  held-out PSNR per {task_obj.level_name}  {line}")

    start = time.perf_counter()
    net.train()
    with tqdm(total=steps, disable=not progress, dynamic_ncols=True,
              desc=f"{model}/{task}") as bar:
        run_eval(0, bar)
        for step in range(1, steps + 1):
            clean = sampler.sample(batch)
            loss = adapter.training_loss(net, task_obj, clean, degrade_generator, dev)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            current_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()

            history["train"]["step"].append(step)
            history["train"]["loss"].append(loss.item())
            history["train"]["lr"].append(current_lr)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{current_lr:.2e}")
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                run_eval(step, bar)
    history["wall_time_s"] = time.perf_counter() - start

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "history.json", "w") as f:
        json.dump(history, f, indent=1)
    save_plot(history, out_dir / "plot.png")
    history["out"] = str(out_dir)
    return history


# ----------------------------------------------------------------------------- CLI


def _parse_kwarg(text: str) -> tuple[str, Any]:
    """``key=value``; the value is a Python literal when it parses as one."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--model-kwarg must look like key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m restorenet.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--task", required=True, choices=["denoise", "dejpeg", "sr", "deblur"])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--width", type=int, help="model width (overrides the small config's)")
    p.add_argument("--batch", type=int, help="clean crops per step")
    p.add_argument("--crop", type=int, help="training crop size")
    p.add_argument("--lr", type=float, help="peak learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default steps/5)")
    p.add_argument("--eval-size", type=int, default=128, help="held-out centre-crop size")
    p.add_argument("--out", help="output folder (default runs/<model>-<task>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model-kwarg", action="append", type=_parse_kwarg, default=[],
                   metavar="KEY=VALUE", help="extra model kwarg, repeatable")
    p.add_argument("--paper-config", action="store_true",
                   help="start from the paper-size model instead of SMALL_CONFIGS")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    history = train(args.model, args.task, args.steps, width=args.width, batch=args.batch,
                    crop=args.crop, lr=args.lr, weight_decay=args.weight_decay,
                    eval_every=args.eval_every, eval_size=args.eval_size, out=args.out,
                    seed=args.seed, device=args.device, model_kwargs=dict(args.model_kwarg),
                    small=not args.paper_config, progress=not args.no_progress)
    first, last = history["eval"][0]["psnr"], history["eval"][-1]["psnr"]
    print(f"held-out PSNR (dB) per {history['level_name']}, step 0 -> {args.steps}:")
    for level in first:
        print(f"  {level:>5}: {first[level]:6.2f} -> {last[level]:6.2f}   "
              f"(degraded input {history['input']['psnr'][level]:6.2f})")
    print(f"wall time {history['wall_time_s']:.1f} s; wrote {history['out']}/history.json, plot.png")
    return history


if __name__ == "__main__":
    main()
