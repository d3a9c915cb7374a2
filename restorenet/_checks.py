"""Argument checks shared by models and ops.

Every check raises an exception whose message starts with the argument's name,
so a user sees which input is wrong instead of a shape error deep in a conv.
"""
from __future__ import annotations

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
    """``x`` must be an [N, channels, H, W] floating tensor."""
    check_tensor(name, x, ndim=4)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} must have {channels} channels (shape [N, {channels}, H, W]), "
            f"got shape {tuple(x.shape)}"
        )
