"""Numerical acceptance rules shared by the tests and the benchmarks.

One table, one rule (the FlashAttention convention): a backend's error
against a float64 truth may be at most ``ERROR_FACTOR`` times the error of the
same computation done by plain PyTorch at the same precision, plus a small
floor relative to the truth's magnitude (so an exactly-rounded PyTorch result
does not demand bit-exactness).
"""
from __future__ import annotations

import torch

ERROR_FACTOR = 2.0

# Floor, relative to max|truth|, per dtype. fp32 allows for TF32 dots on GPU
# (Triton's default, and cuDNN's default for convolutions).
RELATIVE_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_error(out: torch.Tensor, truth: torch.Tensor) -> float:
    return (out.detach().double() - truth.detach().double()).abs().max().item() if truth.numel() else 0.0


def assert_within_baseline_error(name: str, out: torch.Tensor, truth: torch.Tensor,
                                 baseline: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` (the backend) and ``baseline`` (plain PyTorch at ``dtype``) are
    both compared with ``truth`` (float64); fail if ``out`` is over the budget."""
    if out.shape != truth.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != truth {tuple(truth.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: non-finite values")
    err, base = max_error(out, truth), max_error(baseline, truth)
    scale = truth.detach().abs().max().item() if truth.numel() else 0.0
    budget = ERROR_FACTOR * base + RELATIVE_FLOOR[dtype] * scale
    if err > budget:
        raise AssertionError(
            f"{name}: max error {err:.3e} vs float64 truth exceeds {ERROR_FACTOR}x the PyTorch "
            f"{str(dtype).replace('torch.', '')} error {base:.3e} (+ floor), budget {budget:.3e}")
