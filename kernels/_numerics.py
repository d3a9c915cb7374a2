"""Device helpers for arithmetic that must match the CUDA backend bit for bit."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def div_rn(x, y):
    """``x / y`` correctly rounded, as nvcc's ``/`` (``div.rn``): Triton lowers an
    fp32 ``/`` to ``div.full.f32`` (up to 2 ulp off), so results compared bit for bit
    with csrc/ use this. fp64 ``/`` is already correctly rounded."""
    x, y = tl.broadcast(x, y)
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y
