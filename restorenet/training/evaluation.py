"""Held-out evaluation: fixed degraded/clean images per level, scored per level.

Three sources, all fixed for the whole run (degraded once, seed 1234):

    bundled    centre crops (``eval_size``) of the held-out photos at every task level
    val DIR    every image of DIR, whole, at every task level
    val LQ GT  every pair, whole, under one key: the given ``level``, or "paired"

Scores are means over the images of a level: ``{"psnr": {"15": dB, ...}, "ssim": ...}``
(the metrics the adapter reports; see ``ModelAdapter.score``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from restorenet.data import Task, folder_images, heldout_images, paired_images
from restorenet.training.adapters import ModelAdapter

__all__ = ["EvalSet", "evaluate", "input_quality"]

EVAL_SEED = 1234


@dataclass
class EvalSet:
    """``groups[key] = (level, [(degraded [n, 3, H, W], clean [n, 3, H, W]), ...])``."""

    groups: dict = field(default_factory=dict)

    @classmethod
    def build(cls, task: Task, size: int, seed: int = EVAL_SEED) -> "EvalSet":
        """The bundled held-out photos, centre-cropped to ``size``, at every task level."""
        return cls.degraded(task, [heldout_images(size)], seed)

    @classmethod
    def degraded(cls, task: Task, cleans: list[torch.Tensor], seed: int = EVAL_SEED) -> "EvalSet":
        generator = torch.Generator().manual_seed(seed)
        return cls({str(level): (level, [(task.degrade(c, level, generator), c) for c in cleans])
                    for level in task.levels})

    @classmethod
    def from_folders(cls, val: list[str], task: Task | None, level=None) -> "EvalSet":
        """``[DIR]``: clean images degraded by ``task``; ``[LQ_DIR, GT_DIR]``: pairs."""
        if len(val) == 1:
            if task is None:
                raise ValueError("val: a folder of clean images needs a task to degrade them; "
                                 "give --task, or --val LQ_DIR GT_DIR pairs")
            return cls.degraded(task, [img for _, img in folder_images(val[0])])
        if len(val) != 2:
            raise ValueError(f"val must be one folder (clean images) or two (LQ_DIR GT_DIR), "
                             f"got {len(val)}")
        pairs = [(lq, gt) for _, lq, gt in paired_images(*val)]
        return cls({"paired" if level is None else str(level): (level, pairs)})

    @property
    def keys(self) -> list[str]:
        return list(self.groups)


def _mean_scores(per_image: list[dict[str, list[float]]]) -> dict[str, float]:
    names = per_image[0].keys()
    return {name: sum(sum(s[name]) for s in per_image) / sum(len(s[name]) for s in per_image)
            for name in names}


def _by_metric(per_key: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{key: {metric: v}} -> {metric: {key: v}} (the history's layout)."""
    metrics = next(iter(per_key.values())).keys()
    return {m: {key: scores[m] for key, scores in per_key.items()} for m in metrics}


@torch.no_grad()
def evaluate(model: nn.Module, adapter: ModelAdapter, evalset: EvalSet,
             device: torch.device | str = "cpu", crop_border: int = 0) -> dict[str, dict[str, float]]:
    """Mean held-out scores per level: ``{"psnr": {"15": ..}, "ssim": {..}, ...}``."""
    was_training = model.training
    model.eval()
    per_key = {}
    for key, (level, pairs) in evalset.groups.items():
        per_key[key] = _mean_scores([
            adapter.score(adapter.output_for_scoring(adapter.restore(model, degraded.to(device), level)),
                          clean, level, crop_border)
            for degraded, clean in pairs])
    model.train(was_training)
    return _by_metric(per_key)


def input_quality(adapter: ModelAdapter, evalset: EvalSet,
                  crop_border: int = 0) -> dict[str, dict[str, float]] | None:
    """Scores of the degraded inputs themselves (the do-nothing baseline), or None
    where the adapter has none (a level estimator)."""
    per_key = {}
    for key, (level, pairs) in evalset.groups.items():
        scores = [adapter.input_score(degraded, clean, level, crop_border) for degraded, clean in pairs]
        if any(s is None for s in scores):
            return None
        per_key[key] = _mean_scores(scores)
    return _by_metric(per_key)
