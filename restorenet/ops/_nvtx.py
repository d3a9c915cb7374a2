"""NVTX ranges around kernel launches, named ``restorenet::<op>::<fwd|bwd>``.

Ranges are pushed inside the custom ops' implementations, which torch.compile
treats as opaque, so they cost no graph break. Without CUDA they are no-ops.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def nvtx_range(op: str, phase: str, device: torch.device):
    if device.type != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(f"restorenet::{op}::{phase}")
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
