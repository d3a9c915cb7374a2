"""Training checkpoints, the final model file, and ``load_model``.

Layout of a run's folder (``--out DIR``)::

    DIR/checkpoints/step-<k>.pt   every --save-every steps and at the end (--keep-last N)
    DIR/checkpoint.pt             the latest of them (a hard link to it, or a copy where
                                  the file system has no hard links)
    DIR/model.pt                  final weights (the EMA ones with --ema), model name,
                                  kwargs and config: ``restorenet.load_model(path)``

A checkpoint holds everything that decides what training does next: the model,
optimizer, learning-rate scheduler, gradient scaler and EMA states, the step, the
crop sampler's and the degradation generator's states, every RNG state of every
process (torch CPU and CUDA, NumPy, Python ``random``), the run's config and its
history so far. Every file is written to a temporary name in the same folder and
renamed over the target (``os.replace``, atomic on POSIX and Windows), so a save
that is interrupted never leaves a truncated file: ``checkpoint.pt`` is always the
last *complete* checkpoint. Everything is stored as tensors and plain Python values,
so files load with ``torch.load(weights_only=True)``, which runs no pickled code.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from restorenet.registry import create_model

__all__ = ["CHECKPOINT_FORMAT", "MODEL_FORMAT", "rng_state", "set_rng_state", "atomic_save",
           "save_checkpoint", "latest_checkpoint", "read_file", "save_model", "load_model",
           "model_from_file", "is_restorenet_file", "ema_weights"]

CHECKPOINT_FORMAT = "restorenet-checkpoint"
MODEL_FORMAT = "restorenet-model"
VERSION = 1
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every global RNG state of this process, as tensors and plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------- files


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _point_latest(out_dir: Path, step_file: Path) -> None:
    """Make ``out_dir/checkpoint.pt`` the same file as ``step_file``, atomically."""
    tmp = out_dir / f".checkpoint.pt.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(step_file, tmp)  # no copy: the same file under a second name
        except OSError:
            shutil.copyfile(step_file, tmp)
        os.replace(tmp, out_dir / "checkpoint.pt")
    finally:
        tmp.unlink(missing_ok=True)


def step_files(out_dir: str | os.PathLike) -> list[Path]:
    """``out_dir/checkpoints/step-<k>.pt`` files, by increasing k."""
    folder = Path(out_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict[str, Any], out_dir: str | os.PathLike,
                    keep_last: int | None = None) -> Path:
    """Write ``state`` (``step`` required) as ``checkpoints/step-<k>.pt``, point
    ``checkpoint.pt`` at it, then delete all but the newest ``keep_last`` step files."""
    out_dir = Path(out_dir)
    payload = {"format": CHECKPOINT_FORMAT, "version": VERSION, **state}
    path = atomic_save(payload, out_dir / "checkpoints" / f"step-{state['step']}.pt")
    _point_latest(out_dir, path)
    if keep_last is not None:
        for old in step_files(out_dir)[:-keep_last]:
            old.unlink()
    return path


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    path = Path(out_dir) / "checkpoint.pt"
    return path if path.exists() else None


def read_file(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint or model file's contents (``weights_only=True``), errors naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot load it with torch.load(weights_only=True) "
                         f"({type(error).__name__}: {error})") from error


# ----------------------------------------------------------------------------- model files


def ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The averaged model's own state dict out of an ``AveragedModel`` state dict."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}


def save_model(path: str | os.PathLike, model_name: str, model_kwargs: dict,
               state_dict: dict[str, torch.Tensor], *, config: dict | None = None,
               step: int | None = None, ema: bool = False) -> Path:
    """The deployable weights: ``load_model(path)`` rebuilds the model from them."""
    return atomic_save({"format": MODEL_FORMAT, "version": VERSION, "model": model_name,
                        "model_kwargs": dict(model_kwargs), "state_dict": state_dict,
                        "ema": ema, "step": step, "config": config}, path)


def is_restorenet_file(contents) -> bool:
    """A restorenet model file's or checkpoint's contents (not someone else's file)."""
    return isinstance(contents, dict) and contents.get("format") in (MODEL_FORMAT, CHECKPOINT_FORMAT)


def model_from_file(contents: dict, path: str | os.PathLike = "file") -> nn.Module:
    """Build and load the model a model or checkpoint file describes (eval mode).

    From a training checkpoint the EMA weights are taken where it has them, as
    ``model.pt`` would hold them."""
    kind = contents.get("format") if isinstance(contents, dict) else None
    if kind == MODEL_FORMAT:
        name, kwargs, weights = contents["model"], contents["model_kwargs"], contents["state_dict"]
    elif kind == CHECKPOINT_FORMAT:
        cfg = contents["config"]
        name, kwargs = cfg["model"], cfg["model_kwargs"]
        weights = ema_weights(contents["ema"]) if contents.get("ema") else contents["model"]
    else:
        raise ValueError(f"{path}: not a restorenet model or checkpoint file (no "
                         f"'format': {MODEL_FORMAT!r} or {CHECKPOINT_FORMAT!r})")
    model = create_model(name, **kwargs)
    model.load_state_dict(weights)
    return model.eval()


def load_model(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """The model saved in ``path`` -- a trainer's ``model.pt`` or a checkpoint -- rebuilt
    with its name and kwargs, weights loaded, in eval mode, on ``map_location``.

    >>> model = restorenet.load_model("runs/hyperres-denoise/model.pt")
    """
    return model_from_file(read_file(path, map_location), path).to(map_location)
