"""Ranges around kernel launches, named ``restorenet::<op>::<fwd|bwd>``.

Each range is an NVTX range (for Nsight, CUDA only) and a torch.profiler
``record_function`` (for torch.profiler traces, any device; nearly free when no
profiler runs). They are opened inside the custom ops' implementations, which
torch.compile treats as opaque, so they cost no graph break.
"""
from __future__ import annotations

import contextlib

import torch


def range_name(op: str, phase: str) -> str:
    return f"restorenet::{op}::{phase}"


@contextlib.contextmanager
def nvtx_range(op: str, phase: str, device: torch.device):
    name = range_name(op, phase)
    with torch.profiler.record_function(name):
        if device.type != "cuda":
            yield
            return
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
