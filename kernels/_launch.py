"""Host-side launch helpers shared by the Triton launchers.

The memory-bound kernels take a tensor as (sample, channel, pixel) element
strides of one canonical layout, NCHW or channels_last, which the op has
already made its operands dense in; the launchers here pick that layout's
strides, the accumulation dtype and the launch options, and know when the
kernels run under Triton's CPU interpreter (which pays per program, so the
launchers give it few, big tiles).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch
import triton.language as tl


# Set by ``gpu_launch_config``: the launchers choose what they choose on a GPU.
_GPU_CONFIG: list[bool] = []


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)
    and no ``gpu_launch_config`` block asks for the GPU's launch configuration."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and not _GPU_CONFIG


@contextlib.contextmanager
def gpu_launch_config():
    """Inside the block the launchers pick tiles, grids, ``num_warps`` and
    ``num_stages`` as on a GPU even under the interpreter. For
    ``restorenet.aot``, which records the launches without running them; a
    kernel launched for real in the block would run the GPU's (slow) tiling."""
    _GPU_CONFIG.append(True)
    try:
        yield
    finally:
        _GPU_CONFIG.pop()


def launch_options(num_warps: int = 4) -> dict:
    """Extra launch arguments: ``num_warps`` on a GPU; the interpreter takes none."""
    return {} if interpreting() else dict(num_warps=num_warps)


@functools.cache
def interpreter_takes_scalar_bounds() -> None:
    """Let Triton 3.6's interpreter run ``range`` over a runtime scalar with NumPy >= 2.4.

    That interpreter holds every scalar as a 1-element array and gives tensors
    ``__index__ = int(array)``, which NumPy 2.4 refuses for a 1-D array (Triton
    3.8 squeezes the array first). This wraps its tensor patching to use 3.8's
    definition; nothing changes where the interpreter squeezes already."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if "squeeze" in inspect.getsource(patch_tensor):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


def compute_dtypes(dtype: torch.dtype):
    """(Triton, torch) accumulation dtype: float64 for float64 data, float32 otherwise."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def canonical_strides(shape, channels_last: bool) -> tuple[int, int, int]:
    """Element strides (sample, channel, pixel) of a dense [N, C, H, W] tensor in
    the canonical layout. Computed, not read: size-1 dims may carry any stride."""
    _, c, h, w = shape
    return (h * w * c, 1, c) if channels_last else (h * w * c, h * w, 1)


def layout_format(channels_last: bool) -> torch.memory_format:
    """The torch memory format of the canonical layout."""
    return torch.channels_last if channels_last else torch.contiguous_format
