"""Argument checks shared by models and ops.

Every check raises an exception whose message starts with the argument's name,
so a user sees which input is wrong instead of a shape error deep in a conv.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device}, got {t.device}")


def check_image(name: str, x, channels: int) -> None:
    """``x`` must be an [N, channels, H, W] floating tensor with N, H, W >= 1.

    An empty batch is rejected for every model alike: some cannot run one (AdaRevD's
    FFT, ConStyle's BatchNorm), and a call on no images is almost always an upstream
    bug (an empty split or filter) better named here than hidden in an empty result."""
    check_tensor(name, x, ndim=4)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} must have {channels} channels (shape [N, {channels}, H, W]), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one image (N >= 1: models do not run "
                         f"empty batches), got shape {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(x.shape)}")


def is_int(v) -> bool:
    """A Python int that is not a bool (True is an int to Python, never a size to us)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(name: str, v, minimum: int) -> int:
    """A constructor size (width, block count, ...): an int >= ``minimum``."""
    if not is_int(v) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def check_int_sequence(name: str, v, minimum: int, length: int | None = None,
                       min_length: int = 0) -> tuple[int, ...]:
    """A per-level list of sizes (e.g. NAFBlocks per level): ints >= ``minimum``,
    ``length`` of them (or at least ``min_length``)."""
    if not isinstance(v, Sequence) or isinstance(v, str) or not all(is_int(e) and e >= minimum for e in v):
        raise ValueError(f"{name} must be a sequence of ints >= {minimum}, got {v!r}")
    if length is not None and len(v) != length:
        raise ValueError(f"{name} must have {length} entries, got {list(v)}")
    if len(v) < min_length:
        raise ValueError(f"{name} must have at least {min_length} entries, got {list(v)}")
    return tuple(v)


def check_positive_float(name: str, v) -> float:
    """A finite number > 0 (a temperature, a scale)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def check_choice(name: str, v, choices: Sequence[str]) -> str:
    """A named option (e.g. a model's released-vs-variant switch): one of ``choices``."""
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {v!r}")
    return v
