"""Shared plumbing of the cuda-backend tests: for the GPU test files
(tests/ops/test_*_cuda.py) the skip marks, float64 inputs made on the GPU in a
layout, and the acceptance checks that compare a CUDA result with a float64
truth and a same-precision PyTorch baseline
(``restorenet.testing.assert_within_baseline_error``); for the CPU op tests,
the backend choice with an extension that lacks an op's kernels."""
from __future__ import annotations

from typing import Optional, Sequence

import pytest
import torch

from restorenet.ops import _backend, available_backends
from restorenet.ops._backend import cuda_extension
from restorenet.testing import assert_within_baseline_error


def cuda_backend_marks(symbol: Optional[str] = None, built_with: Optional[str] = None) -> list:
    """A GPU test module's ``pytestmark``: marked ``gpu``, skipped without a CUDA
    device or when ``restorenet._C`` is missing (or lacks ``symbol``)."""
    ext = cuda_extension()
    missing = ext is None or (symbol is not None and not hasattr(ext, symbol))
    reason = "restorenet._C (the CUDA extension) is not built" + (f" with {built_with}" if built_with else "")
    return [
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        pytest.mark.skipif(missing, reason=reason),
    ]


def assert_cuda_needs_symbols(monkeypatch, symbols: Sequence[str], op: str = "op") -> None:
    """With a built extension that lacks ``symbols`` (the op's kernels), the
    automatic choice skips cuda and asking for cuda names the missing symbol."""
    monkeypatch.setattr(_backend, "cuda_extension", lambda: object())
    gpu = torch.device("cuda")
    for symbol in symbols:
        assert "cuda" not in available_backends(gpu, symbol)
        with pytest.raises(RuntimeError, match=symbol):
            _backend.resolve_backend("cuda", gpu, op, symbol)


def layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def make_cuda(shape, channels_last: bool = False, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    """float64 N(offset, 1) values on the GPU, seeded, in the given layout."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randn(*shape, dtype=torch.float64, device="cuda", generator=g)
    if offset:
        t = t + offset
    return t.contiguous(memory_format=layout(channels_last))


def as_leaves(inputs: Sequence, names: Sequence[str], dtype: torch.dtype, channels_last: bool = False,
              fp32_names: Sequence[str] = ()) -> list:
    """Fresh autograd leaves of ``dtype`` (those named in ``fp32_names`` float32
    unless ``dtype`` is float64); ``x`` in the requested layout; anything that is
    not a tensor (None, a Python scalar) passes through."""
    out = []
    for name, t in zip(names, inputs):
        if isinstance(t, torch.Tensor):
            t = t.detach().to(torch.float32 if name in fp32_names and dtype != torch.float64 else dtype)
            if name == "x" and channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            t.requires_grad_()
        out.append(t)
    return out


def assert_output_and_grads(names: Sequence[str], inputs: Sequence, dtype: torch.dtype, channels_last: bool,
                            y_cuda, g_cuda, y_true, truth_leaves, y_base, g_base) -> None:
    """The CUDA output in ``dtype`` and the input's layout, within the baseline
    error of the float64 truth; a gradient exactly where the input was a tensor,
    in the baseline's dtype (``dx`` in the input's layout), within the baseline
    error of the truth leaf's gradient."""
    assert y_cuda.dtype == dtype
    fmt = layout(channels_last)
    assert y_cuda.is_contiguous(memory_format=fmt)
    assert_within_baseline_error("y", y_cuda, y_true, y_base, dtype)
    for name, t_in, t_true, gb, gc in zip(names, inputs, truth_leaves, g_base, g_cuda):
        if not isinstance(t_in, torch.Tensor):
            assert gc is None, name
            continue
        assert gc is not None and gc.dtype == gb.dtype, name
        if name == "x":
            assert gc.is_contiguous(memory_format=fmt)
        assert_within_baseline_error(f"d{name}", gc, t_true.grad, gb, dtype)


def assert_runs_equal(first, second) -> None:
    """Two ``(y, grads)`` runs bitwise equal (no atomics: a fixed reduction order)."""
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


def huge_fp16_input(min_free_gib: int) -> torch.Tensor:
    """A float16 [2, 1, 32768, 32769] input (2^31 + 65536 elements: offsets past
    int32), zero but for N(0, 1) values in the last 4 rows of each image; skips
    the test with less than ``min_free_gib`` GiB of free GPU memory."""
    free, _ = torch.cuda.mem_get_info()
    if free < min_free_gib * 2**30:
        pytest.skip(f"needs {min_free_gib} GiB of free GPU memory")
    x = torch.empty(2, 1, 32768, 32769, dtype=torch.float16, device="cuda")
    assert x.numel() > 2**31
    x[:, :, -4:].normal_()
    x[:, :, :-4].zero_()
    return x


_SPOILERS = {"cpu": lambda t: t.cpu(), "half": lambda t: t.half(), "double": lambda t: t.double(),
             "int64": lambda t: t.long(), "short": lambda t: t[:1]}


def spoiled(args: dict, change: dict) -> dict:
    """A binding's arguments with the named ones spoiled, ``change`` mapping a
    name to how: moved to the CPU, ``half``/``double``/``int64`` dtype, or
    ``short`` (the first row only)."""
    out = dict(args)
    for name, how in change.items():
        out[name] = _SPOILERS[how](out[name])
    return out
