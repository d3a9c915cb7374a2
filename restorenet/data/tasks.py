"""Restoration tasks: a degradation plus the levels a model is trained on.

    denoise  sigma (0-255 units)   15, 35, 55, 75    (HyperRes' training levels)
    dejpeg   JPEG quality          10, 30, 50, 80    (HyperRes' training levels)
    sr       scale                 2, 3, 4, 5        (HyperRes' training levels)
    deblur   motion kernel size    7, 11, 15, 19     (our choice: longer streaks, harder)

``task.degrade(clean, level, generator)`` takes one level for the whole batch
or one level per image (a sequence or tensor of length N), which is how the
trainer mixes levels inside a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from restorenet._checks import check_image
from restorenet.data.degradations import (
    add_gaussian_noise,
    bicubic_down_up,
    jpeg_compress,
    random_motion_blur,
)

__all__ = ["Task", "TASKS", "get_task"]

Level = float | int


@dataclass(frozen=True)
class Task:
    """A named degradation with its training levels.

    ``level_name`` says what a level means (``sigma``, ``quality`` ...);
    ``integer_levels`` tasks (JPEG quality, kernel size) accept only whole numbers.
    """

    name: str
    levels: tuple[Level, ...]
    level_name: str
    _apply: Callable[[torch.Tensor, Level, torch.Generator | None], torch.Tensor]
    integer_levels: bool = False

    def _as_level(self, value) -> Level:
        value = value.item() if isinstance(value, torch.Tensor) else value
        if self.integer_levels:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"level must be a whole number ({self.level_name}) for task "
                                f"{self.name!r}, got {value!r}")
        return value

    def degrade(self, clean: torch.Tensor, level, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        """Degrade a clean batch ``[N, 3, H, W]`` at ``level`` (scalar or one per image)."""
        check_image("clean", clean, 3)
        if isinstance(level, (torch.Tensor, Sequence)) and not isinstance(level, str):
            levels = level.tolist() if isinstance(level, torch.Tensor) else list(level)
            if isinstance(level, torch.Tensor) and level.dim() == 0:
                return self._apply(clean, self._as_level(level), generator)
            if len(levels) != clean.shape[0]:
                raise ValueError(f"level must be a scalar or have one entry per image "
                                 f"({clean.shape[0]}), got {len(levels)}")
            # Images are degraded one at a time, in order, so the generator's
            # draws do not depend on how the levels happen to be grouped.
            return torch.cat([self._apply(clean[i:i + 1], self._as_level(lv), generator)
                              for i, lv in enumerate(levels)])
        return self._apply(clean, self._as_level(level), generator)


TASKS: dict[str, Task] = {
    "denoise": Task("denoise", (15, 35, 55, 75), "sigma",
                    lambda x, lv, g: add_gaussian_noise(x, lv, g)),
    "dejpeg": Task("dejpeg", (10, 30, 50, 80), "quality",
                   lambda x, lv, g: jpeg_compress(x, lv), integer_levels=True),
    "sr": Task("sr", (2, 3, 4, 5), "scale",
               lambda x, lv, g: bicubic_down_up(x, lv)),
    "deblur": Task("deblur", (7, 11, 15, 19), "kernel size",
                   lambda x, lv, g: random_motion_blur(x, lv, g), integer_levels=True),
}


def get_task(name: str) -> Task:
    """The task called ``name`` (one of ``denoise``, ``dejpeg``, ``sr``, ``deblur``)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}") from None
