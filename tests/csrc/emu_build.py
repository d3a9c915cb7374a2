"""Plumbing of the emulated kernel tests (tests/csrc/test_*_emulated.py).

Each of them builds one harness of tests/csrc/emu (csrc/*.cu compiled by the
host compiler against the CUDA emulation, ``-DRN_CUDA_EMULATION``) into a
shared library once per module, calls the kernels' C API through ctypes with
CPU tensors, and may rebuild the same sources as an executable under
AddressSanitizer / ThreadSanitizer. The g++ command, the library loading, the
sanitizer run and the ctypes argument helpers live here, once.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent / "emu"
CXX = shutil.which("g++")
# The harnesses' dtype argument (tests/csrc/emu/*harness.cpp).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CUDA_ERROR_INVALID_VALUE = 1  # cudaErrorInvalidValue: what a launcher returns for bad arguments


def compile_harness(out: Path, include: Path, source: Path, extra: list[str]) -> None:
    """g++ ``source`` (a harness including csrc/*.cu) into ``out`` with the
    emulation on; ``extra`` adds e.g. ``-shared -fPIC`` or a sanitizer."""
    cmd = [CXX, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-DRN_CUDA_EMULATION",
           f"-I{ROOT / 'csrc'}", f"-I{EMU}", f"-I{include}", str(source), "-o", str(out), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stderr}"


def load_harness(tmp_path_factory, include: Path, harness: str, defines=()) -> ctypes.CDLL:
    """The harness ``tests/csrc/emu/<harness>`` built as a shared library and
    loaded (skips the calling test without g++); ``defines`` adds ``-D`` flags
    (test-only variants of the kernels). Call it from a module-scoped fixture:
    the build takes seconds."""
    if CXX is None:
        pytest.skip("g++ is not installed")
    out = tmp_path_factory.mktemp("emu") / (Path(harness).stem + "_emu.so")
    compile_harness(out, include, EMU / harness, [*defines, "-shared", "-fPIC"])
    return ctypes.CDLL(str(out))


def run_sanitized(tmp_path: Path, include: Path, source: Path, sanitizer: str, defines=()) -> str:
    """Build ``source`` as an executable with ``-fsanitize=<sanitizer>`` and run
    it (``quick`` under ThreadSanitizer, which is slow); it must exit 0, print
    "all cases ran" and report nothing. Returns its output. Skips when g++ is
    missing or cannot link that sanitizer."""
    if CXX is None:
        pytest.skip("g++ is not installed")
    probe = subprocess.run([CXX, f"-fsanitize={sanitizer}", "-x", "c++", "-", "-o", str(tmp_path / "probe")],
                           input="int main() { return 0; }\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"g++ cannot link with -fsanitize={sanitizer}: {probe.stderr[-300:]}")
    exe = tmp_path / f"{source.stem}_{sanitizer}"
    compile_harness(exe, include, source, [*defines, f"-fsanitize={sanitizer}", "-g"])
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=0")
    args = [str(exe)] + (["quick"] if sanitizer == "thread" else [])
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    report = run.stdout + run.stderr
    assert run.returncode == 0 and "Sanitizer" not in report, report[-4000:]
    assert "all cases ran" in run.stdout
    return report


# ------------------------------------------------------------------ buffers and checks
def nan_filled(shape, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """An output buffer filled with NaN, so an element a kernel forgets to write fails."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=fmt)


def poisoned_workspace(nbytes: int, minimum: int = 1) -> torch.Tensor:
    """A byte workspace of at least ``minimum`` bytes, every byte 0xFF: NaN in
    float and double, so a partial sum read before it is written fails."""
    return torch.full((max(int(nbytes), minimum),), 0xFF, dtype=torch.uint8)


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str,
                    nan_means: str = "elements left unwritten (NaN)") -> None:
    """Same shape, no NaN (outputs are NaN-filled first: a NaN is ``nan_means``),
    and max |actual - expected| <= tol * max(1, max |expected|)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: {nan_means}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


# ------------------------------------------------------------------ ctypes arguments
def i64(values) -> ctypes.Array:
    """An int64 array argument (shapes, strides)."""
    return (ctypes.c_int64 * len(values))(*values)


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """A tensor's data pointer; NULL for None (an absent optional operand)."""
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def conv_shape(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> list[int]:
    """The convolution launchers' shape argument:
    [N, Cin, H, W, Cout, KH, KW, OH, OW, stride, padding]."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    return [n, c_in, h, w, c_out, kh, kw, (h + 2 * padding - kh) // stride + 1,
            (w + 2 * padding - kw) // stride + 1, stride, padding]
