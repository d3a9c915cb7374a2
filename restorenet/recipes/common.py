"""What every recipe shares: the command line, the training loop, the report.

A recipe module defines ``run(settings, report)`` (and optionally
``add_arguments(parser)``). ``main`` parses the command line into
:class:`Settings`, runs the recipe inside a :class:`Report` and writes
``report.md`` and ``results.json`` -- also when the recipe fails half-way, so a
long run leaves what it measured (the report then says where it stopped).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from restorenet.recipes import RECIPES, load_recipe
from restorenet.train import AMP_DTYPES, CosineDecay, _check_amp, _parse_kwarg
from restorenet.training import distributed

__all__ = ["Settings", "Report", "fit", "build_parser", "main", "md_table", "mean"]


# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """A recipe's run settings; ``None`` means "the recipe's own default"."""

    system: str
    quick: bool = False
    paper_config: bool = False
    out: str | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    steps: int | None = None
    batch: int | None = None
    crop: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    amp: str | None = None
    eval_size: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # the recipe's own flags

    def choose(self, default, quick):
        """``quick`` under ``--quick``, else ``default``."""
        return quick if self.quick else default

    def given(self, name: str, default):
        """The flag ``name`` where the command line gave it, else ``default``."""
        value = getattr(self, name)
        return default if value is None else value

    @property
    def out_dir(self) -> Path:
        return Path(self.out if self.out is not None else Path("recipes") / self.system)


# ----------------------------------------------------------------------------- training


def fit(params: Sequence[nn.Parameter] | Iterator[nn.Parameter], step_loss: Callable[[int], torch.Tensor],
        steps: int, lr: float, *, weight_decay: float = 0.0, betas=(0.9, 0.999),
        grad_clip: float | None = None, amp: str | None = None, device: str | torch.device = "cpu",
        log: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW with the trainer's cosine decay (to 1% of ``lr``) over ``steps`` steps.

    ``step_loss(step)`` draws its batch and returns the loss (run under autocast
    with ``amp``); returns the loss of every step. ``log(step, loss)`` is called
    every ``max(1, steps // 10)`` steps and at the last.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params: nothing to train (no parameter requires grad)")
    device = torch.device(device)
    amp_dtype = _check_amp(amp, device)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, CosineDecay(steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    every = max(1, steps // 10)
    losses = []
    for step in range(steps):
        with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
            loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step}: lower --lr or use --grad-clip")
        losses.append(value)
        if log is not None and (step % every == every - 1 or step == steps - 1):
            log(step + 1, sum(losses[-every:]) / len(losses[-every:]))
    return losses


def mean(values) -> float:
    """The arithmetic mean of an iterable of numbers (plain left-to-right sum)."""
    values = list(values)
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- report


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with 2 decimals unless already formatted."""
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + (" (dirty)" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, str]:
    """Where the run ran: the numbers of a recipe mean little without it."""
    info = {"cpu": f"{distributed.cpu_name()} ({distributed.available_cpus()} CPUs usable, "
                   f"{torch.get_num_threads()} torch threads)",
            "torch": torch.__version__, "python": platform.python_version(), "commit": _commit()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class Report:
    """``report.md`` + ``results.json`` + plots in one folder.

    Recipes add markdown with :meth:`text` / :meth:`table`, plots with
    :meth:`figure`, numbers into :attr:`results`, and time their stages with
    :meth:`stage`.
    """

    def __init__(self, settings: Settings, command: str):
        self.settings, self.command = settings, command
        self.dir = settings.out_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {}
        self.stages: dict[str, float] = {}
        self._parts: list[str] = []
        self._start = time.perf_counter()
        self.status = "running"

    def text(self, markdown: str) -> None:
        self._parts.append(markdown.strip())

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> None:
        self.text((f"{caption}\n\n" if caption else "") + md_table(headers, rows))

    @contextlib.contextmanager
    def figure(self, name: str, caption: str, **subplots):
        """``with report.figure("psnr_vs_flops.png", "caption", ncols=2) as (fig, axes):``
        saves the figure into the folder and links it from the report."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(**subplots)
        try:
            yield fig, axes
            fig.tight_layout()
            fig.savefig(self.dir / name, dpi=110)
        finally:
            plt.close(fig)
        self.text(f"![{caption}]({name})\n\n*{caption}*")
        self.results.setdefault("plots", []).append(name)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Times a stage; prints its start and end (long runs show where they are)."""
        print(f"[{self.settings.system}] {name} ...", flush=True)
        start = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - start, 2)
        print(f"[{self.settings.system}] {name}: {self.stages[name]:.1f} s", flush=True)

    def write(self) -> None:
        wall = time.perf_counter() - self._start
        env = machine()
        settings = {k: v for k, v in asdict(self.settings).items() if v not in (None, {}, False)}
        payload = {"system": self.settings.system, "status": self.status, "command": self.command,
                   "settings": settings, "machine": env, "wall_time_s": round(wall, 2),
                   "stages_s": self.stages, **self.results}
        (self.dir / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        head = [f"# {self.settings.system} recipe" + (" (--quick: a smoke run; its numbers mean little)"
                                                       if self.settings.quick else ""),
                "", f"Command: `{self.command}`", "",
                f"Status: **{self.status}**. Wall time {wall / 60:.1f} min"
                + "".join(f"; {k} {v:.0f} s" for k, v in self.stages.items()) + ".", "",
                "Machine: " + "; ".join(f"{k} {v}" for k, v in env.items()) + "."]
        (self.dir / "report.md").write_text("\n".join(head) + "\n\n" + "\n\n".join(self._parts) + "\n")


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from restorenet import recipes

    p = argparse.ArgumentParser(prog="python -m restorenet.recipes", description=recipes.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", choices=sorted(RECIPES), help="the recipe to run")
    p.add_argument("--quick", action="store_true", help="smoke run of every stage (< 2 min)")
    p.add_argument("--paper-config", action="store_true", help="paper-size models")
    p.add_argument("--out", help="output folder (default recipes/<system>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: the CPUs this process may use)")
    train = p.add_argument_group("training (override the recipe's defaults)")
    train.add_argument("--steps", type=int, help="steps of the main training stage (the others scale with it)")
    train.add_argument("--batch", type=int)
    train.add_argument("--crop", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--grad-clip", type=float, metavar="NORM")
    train.add_argument("--amp", choices=sorted(AMP_DTYPES))
    train.add_argument("--eval-size", type=int, help="centre-crop size of the held-out photos")
    train.add_argument("--model-kwarg", action="append", type=_parse_kwarg, default=[],
                       metavar="KEY=VALUE", help="model kwarg, repeatable (quote it in the shell)")
    return p


def _recipe_parser(system: str) -> tuple[argparse.ArgumentParser, Any]:
    parser = build_parser()
    recipe = load_recipe(system)
    if hasattr(recipe, "add_arguments"):
        recipe.add_arguments(parser.add_argument_group(f"{system} recipe"))
    return parser, recipe


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Which recipe's flags to add: the first word naming one (--help must list them too).
    system = next((word for word in argv if word in RECIPES), None)
    if system is None:
        build_parser().parse_args(argv)  # prints the help, or the error naming what is wrong
        raise SystemExit(2)
    parser, recipe = _recipe_parser(system)
    args = vars(parser.parse_args(argv))
    common = {f for f in Settings.__dataclass_fields__}
    settings = Settings(**{k: v for k, v in args.items() if k in common and k != "model_kwargs"},
                        model_kwargs=dict(args.pop("model_kwarg")),
                        extra={k: v for k, v in args.items() if k not in common})
    torch.set_num_threads(settings.threads or distributed.default_threads())
    torch.manual_seed(settings.seed)
    report = Report(settings, "python -m restorenet.recipes " + shlex.join(argv))
    try:
        recipe.run(settings, report)
        report.status = "complete"
    except BaseException as error:
        report.status = f"stopped: {type(error).__name__}: {error}"
        raise
    finally:
        report.write()
    print(f"wrote {report.dir}/report.md and results.json")
    return json.loads((report.dir / "results.json").read_text())
