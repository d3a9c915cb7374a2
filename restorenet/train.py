"""Train any registered model on a restoration task; save, resume, restore.

    python -m restorenet.train --model hyperres --task denoise --steps 300
    python -m restorenet.train --model nafnet --task deblur --steps 500 --width 16 \\
        --model-kwarg 'enc_blocks=(1,1,2,2)' --out runs/naf-deblur
    python -m restorenet.train --resume runs/hyperres-denoise/checkpoint.pt --steps 600
    torchrun --standalone --nproc_per_node=2 -m restorenet.train --model hyperres \\
        --task denoise --steps 300 --batch 8

Data. By default, random crops (with flips) of the photos scikit-image ships,
degraded on the fly by the task; ``--data DIR`` takes the clean images of a
folder instead, ``--paired LQ_DIR GT_DIR`` degraded/clean pairs matched by file
name (no task degradation). Evaluation uses fixed held-out images degraded once
with a fixed seed -- centre crops of two bundled photos, or ``--val DIR`` /
``--val LQ_DIR GT_DIR`` -- and reports PSNR/SSIM on RGB and on Y (BT.601,
``--crop-border``) per degradation level at step 0, every ``--eval-every``
steps and at the end, on the EMA weights with ``--ema``. AdamW, cosine
learning-rate decay to 1% of the peak, L1 loss (plus the model's own extra
terms, see ``restorenet.training.adapters``).

Written to ``--out`` (default ``runs/<model>-<task>``) by rank 0:

    history.json                 config, per-step loss and lr, every evaluation, input quality
    plot.png                     loss vs step, and held-out PSNR per level vs step
    checkpoints/step-<k>.pt      every --save-every steps and at the end (--keep-last N)
    checkpoint.pt                the latest checkpoint (resume from it with --resume)
    model.pt                     final weights (EMA with --ema): restorenet.load_model(path)

``--resume FILE`` continues a run exactly where the checkpoint left it (same
weights as an uninterrupted run, bitwise on CPU with a fixed thread count); the
run's settings come from the checkpoint, ``--steps`` may extend it (the cosine
schedule then follows the new length).

Precision and speed: ``--amp bf16|fp16`` (autocast; fp16 with a gradient
scaler), ``--ema DECAY``, ``--compile`` (torch.compile), ``--grad-clip NORM``,
``--threads N`` (default: the CPUs this process may use -- affinity and cgroup
quota -- divided among the processes torchrun starts on the machine).

Several processes: under ``torchrun`` the model runs in DistributedDataParallel
(NCCL on CUDA, one GPU per process; Gloo on CPU). ``--batch`` is the global
batch: every process draws the same global batch from identically seeded
generators and trains on its own disjoint 1/N of it, so the run computes what
one process with the whole batch computes (up to float summation order) and a
checkpoint resumes with any number of processes.

Model size: every model starts from its entry in ``SMALL_CONFIGS`` (CPU-sized);
``--width`` and ``--model-kwarg`` override single kwargs on top of it, and
``--paper-config`` starts from the paper's configuration instead.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from restorenet.data import FolderCropSampler, PairedCropSampler, RandomCropSampler, TASKS, get_task
from restorenet.registry import count_parameters, create_model, list_models
from restorenet.training import distributed
from restorenet.training.adapters import (AdaRevDAdapter, HyperResAdapter, LevelEstimatorAdapter,
                                          ModelAdapter, fft_l1_loss, get_adapter, l1_loss)
from restorenet.training.checkpoint import (ema_weights, read_file, rng_state, save_checkpoint,
                                            save_model, set_rng_state)
from restorenet.training.evaluation import EvalSet, evaluate, input_quality
from restorenet.training.plot import save_plot

__all__ = ["SMALL_CONFIGS", "AMP_DTYPES", "train", "evaluate", "save_plot", "main", "build_parser",
           "resolve_config", "ModelAdapter", "HyperResAdapter", "AdaRevDAdapter",
           "LevelEstimatorAdapter", "get_adapter", "l1_loss", "fft_l1_loss", "EvalSet"]


# ----------------------------------------------------------------------------- configs

# Small configurations that train in minutes on a laptop CPU. ``model`` holds the
# model kwargs; the rest are trainer defaults. Command-line flags override them.
SMALL_CONFIGS: dict[str, dict[str, Any]] = {
    "hyperres": dict(model=dict(width=32, num_blocks=2), batch=8, crop=48, lr=2e-3),
    "nafnet": dict(model=dict(width=8, enc_blocks=(1, 1, 1, 1), middle_blocks=1,
                              dec_blocks=(1, 1, 1, 1)), batch=8, crop=64, lr=1e-3),
    "mhnet": dict(model=dict(width=8, enc_blocks=(1, 1, 1, 1), dec_blocks=(1, 1, 1, 1),
                             cabg_blocks=1), batch=8, crop=64, lr=1e-3),
    "adarevd": dict(model=dict(width=8, num_decoders=2, enc_blocks=(1, 1, 1, 1), estimator_width=8),
                    batch=8, crop=64, lr=1e-3, weight_decay=1e-3, betas=(0.9, 0.9)),
    "constyle_nafnet": dict(model=dict(width=8, enc_blocks=(1, 1, 1), middle_blocks=1,
                                       dec_blocks=(1, 1, 1)), batch=8, crop=64, lr=1e-3),
    "ddsnet": dict(model=dict(width=32, depth=4), batch=8, crop=64, lr=1e-3),
    # The estimator is small already: the paper's network, on 128x128 crops (the size
    # its fixed-size input takes); no architecture kwargs, so any estimator fits.
    "hyperres_level_estimator": dict(model=dict(), batch=8, crop=128, lr=1e-3),
}
_TRAINER_DEFAULTS = dict(batch=8, crop=64, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999))
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _optional(name: str, value, check):
    return None if value is None else check(name, value)


def _positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _ema_decay(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a decay in (0, 1), e.g. 0.999, got {value!r}")
    return float(value)


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


def _fresh_config(model, task, steps, width, model_kwargs, small, **run) -> dict:
    """The full config of a new run (``run``: the other settings that decide what it
    computes -- the ones a resumed run takes from its checkpoint)."""
    if model not in list_models():
        raise ValueError(f"model must be one of {list_models()}, got {model!r}")
    if run["paired"] is None and task is None:
        raise ValueError(f"task must be one of {sorted(TASKS)} (it degrades the clean "
                         f"images), or give --paired LQ_DIR GT_DIR")
    if task is not None:
        get_task(task)
    kwargs, settings = resolve_config(model, width, model_kwargs, small, batch=run.pop("batch"),
                                      crop=run.pop("crop"), lr=run.pop("lr"),
                                      weight_decay=run.pop("weight_decay"))
    cfg = dict(model=model, task=task, steps=steps, model_kwargs=kwargs, **settings, **run)
    cfg["betas"] = tuple(cfg["betas"])
    cfg["seed"] = 0 if cfg["seed"] is None else cfg["seed"]
    cfg["crop_border"] = 0 if cfg["crop_border"] is None else cfg["crop_border"]
    cfg["eval_size"] = 128 if cfg["eval_size"] is None else cfg["eval_size"]
    return cfg


def _resumed_config(saved: dict, path, steps, width, model_kwargs, small, **given) -> dict:
    """The checkpoint's config; settings given explicitly must agree with it (only the
    length, ``steps``, and the session's own flags -- output, evaluation and checkpoint
    intervals, threads, device, progress -- may change)."""
    cfg = dict(saved)
    if width is not None or model_kwargs or small is False:
        given["model_kwargs"], _ = resolve_config(saved["model"], width, model_kwargs,
                                                  small is not False)
    for key, value in given.items():
        saved_value = saved.get(key)
        same = (tuple(value) == tuple(saved_value) if isinstance(value, (list, tuple))
                and isinstance(saved_value, (list, tuple)) else value == saved_value)
        if value is not None and not same:
            raise ValueError(f"{key} must match the checkpoint being resumed ({path}: "
                             f"{saved_value!r}), got {value!r}; leave it out to resume")
    if steps is not None:
        cfg["steps"] = steps
    return cfg


def _check_config(cfg: dict, world_size: int) -> None:
    _positive_int("steps", cfg["steps"])
    _positive_int("batch", cfg["batch"])
    _positive_int("crop", cfg["crop"])
    _positive_int("eval_size", cfg["eval_size"])
    _positive_float("lr", cfg["lr"])
    _optional("grad_clip", cfg["grad_clip"], _positive_float)
    _optional("ema", cfg["ema"], _ema_decay)
    if cfg["amp"] is not None and cfg["amp"] not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {cfg['amp']!r}")
    if isinstance(cfg["crop_border"], bool) or not isinstance(cfg["crop_border"], int) \
            or cfg["crop_border"] < 0:
        raise ValueError(f"crop_border must be an integer >= 0, got {cfg['crop_border']!r}")
    if cfg["data"] is not None and cfg["paired"] is not None:
        raise ValueError("data and paired are exclusive: clean images to degrade, or pairs")
    if cfg["batch"] % world_size:
        raise ValueError(f"batch must be divisible by the number of processes ({world_size}): "
                         f"--batch is the global batch, split evenly, got {cfg['batch']}")


def _check_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, after checking this device can run it."""
    if amp is None:
        return None
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"amp: autocast is not available on device type {device.type!r}")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp: this GPU ({torch.cuda.get_device_name(device)}) has no bf16; "
                         f"use --amp fp16")
    # Where torch cannot autocast to a dtype on a device it only warns and runs in fp32
    # (e.g. fp16 on CPU before torch 2.5): make that an error instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device.type, dtype=AMP_DTYPES[amp]):
            pass
    refusals = [str(w.message) for w in caught if "autocast" in str(w.message).lower()]
    if refusals:
        raise ValueError(f"amp: torch {torch.__version__} cannot autocast to {amp} on "
                         f"{device.type} ({refusals[0]})")
    return AMP_DTYPES[amp]


# ----------------------------------------------------------------------------- schedule


class CosineDecay:
    """Learning-rate factor: cosine from 1 at step 0 to ``floor`` at ``steps``.

    A closed form of the step (not a recursion), so a resumed run with a longer
    ``steps`` simply follows the longer schedule from where it stands."""

    def __init__(self, steps: int, floor: float = 0.01):
        self.steps, self.floor = steps, floor

    def __call__(self, step: int) -> float:
        t = min(step, self.steps) / self.steps
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- the run


class _Run:
    """Everything one training run holds, built from its config (and a checkpoint)."""

    def __init__(self, cfg: dict, ctx: distributed.DistContext, use_compile: bool):
        self.cfg, self.ctx = cfg, ctx
        self.task = get_task(cfg["task"]) if cfg["task"] is not None else None
        self.adapter = get_adapter(cfg["model"])
        self.amp_dtype = _check_amp(cfg["amp"], ctx.device)
        seed = cfg["seed"]
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.model = create_model(cfg["model"], **cfg["model_kwargs"]).to(ctx.device)
        self.sampler = self._sampler()
        self.degrade_generator = torch.Generator().manual_seed(seed + 1)
        self.evalset = self._evalset() if ctx.is_main else None

        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                           weight_decay=cfg["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, CosineDecay(cfg["steps"]))
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg["amp"] == "fp16")
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]),
                                  use_buffers=True) if cfg["ema"] else None)
        self.step = 0
        self.history = None
        self.use_compile = use_compile

    def _sampler(self):
        cfg = self.cfg
        if cfg["paired"] is not None:
            return PairedCropSampler(*cfg["paired"], crop=cfg["crop"], seed=cfg["seed"])
        if cfg["data"] is not None:
            return FolderCropSampler(cfg["data"], crop=cfg["crop"], seed=cfg["seed"])
        return RandomCropSampler(crop=cfg["crop"], seed=cfg["seed"])

    def _evalset(self) -> EvalSet | None:
        cfg = self.cfg
        if cfg["val"] is not None:
            return EvalSet.from_folders(list(cfg["val"]), self.task, cfg["level"])
        if cfg["paired"] is not None:
            return None  # nothing known to compare with: give --val LQ_DIR GT_DIR
        return EvalSet.build(self.task, cfg["eval_size"])

    # -- resume

    def state(self) -> dict:
        """This run's checkpoint (collective under torchrun: every rank's RNG states)."""
        return {"step": self.step, "config": self.cfg, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "sampler": self.sampler.generator.get_state(),
                "degrade": self.degrade_generator.get_state(),
                "rng": self.ctx.gather(rng_state()), "history": self.history}

    def load(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.sampler.generator.set_state(ckpt["sampler"])
        self.degrade_generator.set_state(ckpt["degrade"])
        # Each rank its own RNG states; with another process count, rank 0's for all.
        states = ckpt["rng"]
        set_rng_state(states[self.ctx.rank] if len(states) == self.ctx.world_size else states[0])
        self.step, self.history = ckpt["step"], ckpt["history"]
        self.history["config"] = self.cfg

    # -- training

    def wrapped_model(self) -> nn.Module:
        """The module the steps call: DDP under torchrun, compiled with --compile."""
        net = self.model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Unused parameters (AdaRevD's exit classifier) are allowed.
            net = DistributedDataParallel(
                net, device_ids=[self.ctx.device] if self.ctx.device.type == "cuda" else None,
                find_unused_parameters=True)
        return torch.compile(net) if self.use_compile else net

    def train_step(self, net: nn.Module) -> tuple[float, float]:
        """One optimizer step; returns (loss averaged over the processes, lr used)."""
        cfg, ctx = self.cfg, self.ctx
        data = self.sampler.sample(cfg["batch"])
        batch = self.adapter.make_batch(self.task, data, self.degrade_generator, cfg["level"])
        batch = batch.shard(ctx.rank, ctx.world_size).to(ctx.device)
        autocast = (torch.autocast(ctx.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else nullcontext())
        with autocast:
            loss = self.adapter.batch_loss(net, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg["grad_clip"] is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return ctx.mean(loss.detach().float()).item(), lr

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def final_weights(self) -> dict[str, torch.Tensor]:
        return ema_weights(self.ema.state_dict()) if self.ema is not None else self.model.state_dict()


def _new_history(run: _Run) -> dict:
    task = run.task
    evalset = run.evalset
    return {
        "config": run.cfg,
        "parameters": count_parameters(run.model),
        "levels": evalset.keys if evalset is not None else [],
        # Pairs have no task level unless --level names one.
        "level_name": task.level_name if task is not None and len(run.cfg["val"] or "x") == 1
        else "level",
        "metric": run.adapter.metrics[0],
        "train": {"step": [], "loss": [], "lr": []},
        "input": (input_quality(run.adapter, evalset, run.cfg["crop_border"])
                  if evalset is not None else None),
        "eval": [],
        "wall_time_s": 0.0,
    }


def train(model: str | None = None, task: str | None = None, steps: int | None = None, *,
          width: int | None = None, batch: int | None = None, crop: int | None = None,
          lr: float | None = None, weight_decay: float | None = None,
          eval_every: int | None = None, eval_size: int | None = None,
          out: str | os.PathLike | None = None, seed: int | None = None, device: str = "cpu",
          model_kwargs: dict | None = None, small: bool | None = None, progress: bool = True,
          amp: str | None = None, ema: float | None = None, compile: bool = False,
          threads: int | None = None, grad_clip: float | None = None,
          save_every: int | None = None, keep_last: int | None = None,
          resume: str | os.PathLike | None = None, data: str | None = None,
          paired: Sequence[str] | None = None, val: Sequence[str] | None = None,
          level: float | None = None, crop_border: int | None = None) -> dict:
    """Train ``model`` on ``task`` for ``steps`` steps; return the metrics history.

    The history (also written to ``out/history.json``) holds ``config``,
    ``levels``, ``train`` (per-step ``step``/``loss``/``lr`` lists), ``eval``
    (a list of ``{"step", "psnr": {level: dB}, "ssim": .., "psnr_y": .., "ssim_y": ..}``,
    the first at step 0 and the last at ``steps``), ``input`` (the degraded
    inputs' own scores), ``wall_time_s`` and ``out``. See the module docstring
    for the files written and the flags (same names). Under torchrun every
    process calls it; only rank 0's history holds evaluations.
    """
    ctx = distributed.setup(device)
    try:
        torch.set_num_threads(_positive_int("threads", threads) if threads is not None
                              else distributed.default_threads())
        run_args = dict(batch=batch, crop=crop, lr=lr, weight_decay=weight_decay, seed=seed,
                        amp=amp, ema=ema, grad_clip=grad_clip, data=data,
                        paired=tuple(paired) if paired is not None else None,
                        level=level, val=tuple(val) if val is not None else None,
                        eval_size=eval_size, crop_border=crop_border)
        if resume is not None:
            ckpt = read_file(resume)
            if ckpt.get("format") != "restorenet-checkpoint":
                raise ValueError(f"resume: {resume} is not a training checkpoint "
                                 f"(checkpoints/step-<k>.pt or checkpoint.pt)")
            cfg = _resumed_config(ckpt["config"], resume, steps, width, model_kwargs, small,
                                  model=model, task=task, **run_args)
        else:
            if steps is None:
                raise ValueError("steps must be given for a new run (or resume a checkpoint)")
            cfg = _fresh_config(model, task, steps, width, model_kwargs, small is not False,
                                **run_args)
        cfg["eval_every"] = _positive_int("eval_every", eval_every or cfg.get("eval_every")
                                          or max(1, cfg["steps"] // 5))
        cfg["save_every"] = _optional("save_every", save_every or cfg.get("save_every"),
                                      _positive_int)
        cfg["keep_last"] = _optional("keep_last", keep_last or cfg.get("keep_last"), _positive_int)
        _check_config(cfg, ctx.world_size)
        run = _Run(cfg, ctx, compile)
        if resume is not None:
            run.load(ckpt)
            if run.step > cfg["steps"]:
                raise ValueError(f"steps must be at least the checkpoint's step {run.step}, "
                                 f"got {cfg['steps']}")
        else:
            run.history = _new_history(run)
        out_dir = Path(out) if out is not None else Path("runs") / f"{cfg['model']}-{cfg['task'] or 'paired'}"
        return _loop(run, out_dir, progress)
    finally:
        distributed.teardown(ctx)


def _loop(run: _Run, out_dir: Path, progress: bool) -> dict:
    cfg, ctx, history = run.cfg, run.ctx, run.history
    net = run.wrapped_model()
    label = history["metric"]

    def run_eval(bar) -> None:
        if run.evalset is None:
            return
        record = {"step": run.step, **evaluate(run.eval_model(), run.adapter, run.evalset,
                                               ctx.device, cfg["crop_border"])}
        history["eval"].append(record)
        line = "  ".join(f"{lv}: {v:.2f}" for lv, v in record[label].items())
        bar.write(f"step {run.step:>6}  held-out {label} per {history['level_name']}  {line}")

    def save() -> None:
        state = run.state()  # every rank: gathers the RNG states
        if ctx.is_main:
            save_checkpoint(state, out_dir, cfg["keep_last"])

    start = time.perf_counter()
    net.train()
    with tqdm(total=cfg["steps"], initial=run.step, disable=not (progress and ctx.is_main),
              dynamic_ncols=True, desc=f"{cfg['model']}/{cfg['task'] or 'paired'}") as bar:
        if run.step == 0 and ctx.is_main:
            run_eval(bar)
        while run.step < cfg["steps"]:
            loss, lr = run.train_step(net)
            history["train"]["step"].append(run.step)
            history["train"]["loss"].append(loss)
            history["train"]["lr"].append(lr)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            last = run.step == cfg["steps"]
            if ctx.is_main and (run.step % cfg["eval_every"] == 0 or last):
                run_eval(bar)
            if last or (cfg["save_every"] and run.step % cfg["save_every"] == 0):
                history["wall_time_s"] += time.perf_counter() - start
                start = time.perf_counter()
                save()
    if ctx.is_main:
        save_model(out_dir / "model.pt", cfg["model"], cfg["model_kwargs"], run.final_weights(),
                   config=cfg, step=run.step, ema=run.ema is not None)
        with open(out_dir / "history.json", "w") as f:
            json.dump(history, f, indent=1)
        save_plot(history, out_dir / "plot.png")
    ctx.barrier()
    return {**history, "out": str(out_dir)}


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
    models = list_models()
    p = argparse.ArgumentParser(prog="python -m restorenet.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--model", choices=models, metavar="NAME",
                     help="model to train, one of: " + ", ".join(models))
    run.add_argument("--task", choices=sorted(TASKS),
                     help="degradation applied to clean images (not needed with --paired)")
    run.add_argument("--steps", type=int, help="optimizer steps in all (a resumed run: up to)")
    run.add_argument("--out", help="output folder (default runs/<model>-<task>)")
    run.add_argument("--seed", type=int, help="seed of the model, crops and degradations (default 0)")
    run.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    run.add_argument("--threads", type=int, help="CPU threads per process (default: the "
                     "CPUs this process may use, divided among torchrun's local processes)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    model = p.add_argument_group("model")
    model.add_argument("--width", type=int, help="model width (overrides the small config's)")
    model.add_argument("--model-kwarg", action="append", type=_parse_kwarg, default=[],
                       metavar="KEY=VALUE", help="extra model kwarg, repeatable; quote it in "
                       "the shell: --model-kwarg 'enc_blocks=(1,1,2,2)'")
    model.add_argument("--paper-config", action="store_true",
                       help="start from the paper-size model instead of SMALL_CONFIGS")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch", type=int, help="clean crops per step (global, over all processes)")
    opt.add_argument("--crop", type=int, help="training crop size")
    opt.add_argument("--lr", type=float, help="peak learning rate (cosine decay)")
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--grad-clip", type=float, metavar="NORM", help="clip the gradient norm")
    opt.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast precision (fp16 adds "
                     "a gradient scaler)")
    opt.add_argument("--ema", type=float, metavar="DECAY", help="keep an exponential moving "
                     "average of the weights (e.g. 0.999); evaluated and saved as model.pt")
    opt.add_argument("--compile", action="store_true", help="torch.compile the model")

    data = p.add_argument_group("data and evaluation")
    data.add_argument("--data", metavar="DIR", help="folder of clean images (instead of the "
                      "bundled photos), degraded on the fly by --task")
    data.add_argument("--paired", nargs=2, metavar=("LQ_DIR", "GT_DIR"),
                      help="degraded and clean folders, pairs matched by file name")
    data.add_argument("--val", nargs="+", metavar="DIR", help="held-out images: a folder of "
                      "clean images (degraded at every task level) or LQ_DIR GT_DIR pairs")
    data.add_argument("--level", type=float, help="the known degradation level of --paired "
                      "data (models that take one, e.g. HyperRes)")
    data.add_argument("--eval-every", type=int, help="steps between evaluations (default steps/5)")
    data.add_argument("--eval-size", type=int, help="centre-crop size of the bundled held-out "
                      "photos (default 128)")
    data.add_argument("--crop-border", type=int, help="pixels left out on each side by the "
                      "metrics (SR papers: the scale)")

    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps "
                      "(always at the end)")
    ckpt.add_argument("--keep-last", type=int, metavar="N", help="keep only the newest N "
                      "checkpoints/step-<k>.pt")
    ckpt.add_argument("--resume", metavar="FILE", help="continue from a checkpoint "
                      "(DIR/checkpoint.pt or DIR/checkpoints/step-<k>.pt)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is None and (args.model is None or args.steps is None):
        parser.error("--model and --steps are required (unless --resume continues a run)")
    try:
        history = train(args.model, args.task, args.steps, width=args.width, batch=args.batch,
                        crop=args.crop, lr=args.lr, weight_decay=args.weight_decay,
                        eval_every=args.eval_every, eval_size=args.eval_size, out=args.out,
                        seed=args.seed, device=args.device, model_kwargs=dict(args.model_kwarg),
                        small=False if args.paper_config else None,
                        progress=not args.no_progress, amp=args.amp, ema=args.ema,
                        compile=args.compile, threads=args.threads, grad_clip=args.grad_clip,
                        save_every=args.save_every, keep_last=args.keep_last, resume=args.resume,
                        data=args.data, paired=args.paired, val=args.val, level=args.level,
                        crop_border=args.crop_border)
    except (ValueError, FileNotFoundError) as error:  # bad settings or data: no traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(history)
    return history


def _print_summary(history: dict) -> None:
    if not history["eval"]:
        print(f"wall time {history['wall_time_s']:.1f} s; wrote {history['out']}")
        return
    metric = history["metric"]
    first, last = history["eval"][0], history["eval"][-1]
    print(f"held-out {metric} per {history['level_name']}, step {first['step']} -> {last['step']}:")
    for key in first[metric]:
        baseline = (f"   (degraded input {history['input'][metric][key]:6.2f})"
                    if history["input"] is not None else "")
        print(f"  {key:>6}: {first[metric][key]:6.2f} -> {last[metric][key]:6.2f}{baseline}")
    print(f"wall time {history['wall_time_s']:.1f} s; wrote {history['out']}/model.pt, "
          f"checkpoint.pt, history.json, plot.png")


if __name__ == "__main__":
    main()
