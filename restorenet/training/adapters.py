"""How each model is fed, trained and scored: one small adapter per model name.

A training step is split in two so that every process of a distributed run can
take its own share of one global batch:

    batch = adapter.make_batch(task, clean, generator)   # the whole global batch
    batch = batch.shard(rank, world_size)                # this process's rows
    loss  = adapter.batch_loss(model, batch)             # a mean over its rows

Every loss is a mean of equally weighted rows, so the mean of the ranks' losses
(what DistributedDataParallel's gradient average differentiates) is the loss of
the whole batch.

    default    model(x) -> restored image; each image gets a random task level;
               L1. Evaluated by PSNR/SSIM (RGB and Y) against the clean image.
    hyperres   model(x, level) with the raw level (sigma, quality, scale); the
               batch is degraded at *every* task level and all run in one forward
               (the rows are the images at level 1, then at level 2, ...); the mean
               over rows equals the paper's mean over levels of per-level L1.
    adarevd    train mode returns one output per reversible column; loss = mean
               over columns of L1 + 0.01 * mean|rfft2(pred) - rfft2(gt)|.
    level estimators (``hyperres_level_estimator``): model(x) -> the level [N]
               of each image; trained by L1 on the level (regression) and scored
               by the mean absolute level error, whatever the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

from restorenet.data import Task
from restorenet.metrics import psnr, ssim

__all__ = ["Batch", "ModelAdapter", "HyperResAdapter", "AdaRevDAdapter", "LevelEstimatorAdapter",
           "get_adapter", "l1_loss", "fft_l1_loss", "quantize"]


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def fft_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean |rfft2(pred) - rfft2(target)| (complex modulus), AdaRevD's frequency term."""
    return (torch.fft.rfft2(pred.float()) - torch.fft.rfft2(target.float())).abs().mean()


def quantize(img: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """What an image file holds: clamped to [0, 1] and rounded to ``bits`` (BasicSR's
    ``tensor2img`` before its metrics)."""
    scale = float(2**bits - 1)
    return (img.float().clamp(0, 1) * scale).round() / scale


@dataclass
class Batch:
    """One training batch: model inputs, targets and the raw level per row (or None)."""

    inputs: torch.Tensor
    target: torch.Tensor
    levels: torch.Tensor | None = None

    def shard(self, rank: int, world_size: int) -> "Batch":
        """Rows ``[rank * M / W, (rank + 1) * M / W)``: disjoint, equal shares."""
        rows = self.inputs.shape[0]
        if rows % world_size:
            raise ValueError(f"batch must split evenly over {world_size} processes, got "
                             f"{rows} rows")
        share = rows // world_size
        return self._map(lambda t: t[rank * share:(rank + 1) * share])

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device))

    def _map(self, fn) -> "Batch":
        return replace(self, **{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})


class ModelAdapter:
    """Default: ``model(x)`` restores an image; a random task level per image."""

    takes_level = False  # the model is called as model(x, level)
    metrics = ("psnr", "ssim", "psnr_y", "ssim_y")  # first: the one plotted and printed

    def make_batch(self, task: Task | None, data, generator: torch.Generator,
                   level=None) -> Batch:
        """``data`` is a clean batch (degraded here by ``task``) or an ``(lq, gt)`` pair
        from paired folders (``level``: their known level, if any)."""
        if isinstance(data, tuple):
            lq, gt = data
            return Batch(lq, gt, self._level_rows(level, lq.shape[0]))
        levels = self.random_levels(task, data.shape[0], generator)
        return Batch(task.degrade(data, levels, generator), data,
                     torch.tensor(levels, dtype=torch.float32))

    def _level_rows(self, level, rows: int) -> torch.Tensor | None:
        if level is None:
            if self.takes_level:
                raise ValueError("level must be given for paired data with a model that takes "
                                 "the degradation level (--level)")
            return None
        return torch.full((rows,), float(level))

    def random_levels(self, task: Task, n: int, generator: torch.Generator) -> list:
        picks = torch.randint(len(task.levels), (n,), generator=generator)
        return [task.levels[i] for i in picks.tolist()]

    def batch_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of ``model`` on ``batch`` (a mean over its rows)."""
        return self.loss(self.forward(model, batch.inputs, batch.levels), batch.target)

    def loss(self, output, target: torch.Tensor) -> torch.Tensor:
        """The loss of a model output (the benchmarks call this one too)."""
        return l1_loss(output, target)

    def forward(self, model: nn.Module, inputs: torch.Tensor, levels) -> torch.Tensor:
        return model(inputs, levels) if self.takes_level else model(inputs)

    def restore(self, model: nn.Module, degraded: torch.Tensor, level) -> torch.Tensor:
        """Eval-mode restoration of images degraded at one ``level`` (None: unknown)."""
        return self.forward(model, degraded, None if level is None else float(level))

    def output_for_scoring(self, output: torch.Tensor, bits: int = 8) -> torch.Tensor:
        """A restored batch as its image files would hold it (held-out photos: 8-bit)."""
        return quantize(output.detach().cpu(), bits)

    def score(self, output: torch.Tensor, clean: torch.Tensor, level,
              crop_border: int = 0) -> dict[str, list[float]]:
        """Per-image metrics of ``output`` against ``clean`` (quantize a restored image
        first, see ``quantize``: papers score the saved 8-bit files)."""
        out, ref = output.float(), clean.float()
        return {"psnr": psnr(out, ref, crop_border=crop_border).tolist(),
                "ssim": ssim(out, ref, crop_border=crop_border).tolist(),
                "psnr_y": psnr(out, ref, y_channel=True, crop_border=crop_border).tolist(),
                "ssim_y": ssim(out, ref, y_channel=True, crop_border=crop_border).tolist()}

    def input_score(self, degraded: torch.Tensor, clean: torch.Tensor, level,
                    crop_border: int = 0) -> dict[str, list[float]] | None:
        """The do-nothing baseline: the degraded input scored as an output."""
        return self.score(degraded, clean, level, crop_border)


class HyperResAdapter(ModelAdapter):
    """All task levels in one forward: the batch is repeated once per level."""

    takes_level = True

    def make_batch(self, task, data, generator, level=None):
        if isinstance(data, tuple):
            return super().make_batch(task, data, generator, level)
        n = data.shape[0]
        degraded = torch.cat([task.degrade(data, lv, generator) for lv in task.levels])
        levels = torch.tensor(task.levels, dtype=torch.float32).repeat_interleave(n)
        return Batch(degraded, data.repeat(len(task.levels), 1, 1, 1), levels)


class AdaRevDAdapter(ModelAdapter):
    """Deep supervision on every reversible column's output."""

    def loss(self, output, target):
        columns = output if isinstance(output, (list, tuple)) else [output]
        per_column = [l1_loss(out, target) + 0.01 * fft_l1_loss(out, target) for out in columns]
        return torch.stack(per_column).mean()


class LevelEstimatorAdapter(ModelAdapter):
    """A model that predicts each image's degradation level ``[N]`` (blind setting):
    regression on the raw level, scored by the mean absolute level error."""

    metrics = ("level_error",)

    def make_batch(self, task, data, generator, level=None):
        if isinstance(data, tuple):
            raise ValueError("a level estimator trains on clean images degraded by a task "
                             "(--data or the bundled photos), not on --paired folders")
        batch = super().make_batch(task, data, generator)
        return Batch(batch.inputs, batch.levels, batch.levels)

    def loss(self, output, target):
        return l1_loss(output.float(), target)

    def output_for_scoring(self, output, bits=8):
        return output.detach().float().cpu()  # a level, not an image

    def score(self, output, clean, level, crop_border=0):
        if level is None:
            raise ValueError("a level estimator is scored against known levels: evaluate on "
                             "clean images degraded by a task")
        return {"level_error": (output.float().flatten() - float(level)).abs().tolist()}

    def input_score(self, degraded, clean, level, crop_border=0):
        return None  # no do-nothing baseline for a level


ADAPTERS: dict[str, ModelAdapter] = {
    "hyperres": HyperResAdapter(),
    "adarevd": AdaRevDAdapter(),
    "hyperres_level_estimator": LevelEstimatorAdapter(),
}


def get_adapter(model_name: str) -> ModelAdapter:
    return ADAPTERS.get(model_name, ModelAdapter())
