"""Which implementation an op runs: ``reference``, ``triton`` or ``cuda``.

Precedence: the op's ``backend=`` argument, then the innermost
``use_backend(...)`` context, then ``RESTORENET_BACKEND``, then the fastest one
available for the tensors' device (CUDA tensors: cuda > triton > reference;
CPU tensors: reference, or triton when ``TRITON_INTERPRET=1`` asks for it
explicitly through one of the settings above).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("reference", "triton", "cuda")
_override: list[str] = []


@contextlib.contextmanager
def use_backend(name: str):
    """Run every restorenet op inside the block with backend ``name``."""
    _validate_name(name, "name")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def _validate_name(name, arg: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS}, got {name!r}")


# Looked up once, without importing triton (the import must come after
# TRITON_INTERPRET is set, and is slow).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled ``restorenet._C`` module, or None where it was not built."""
    try:
        from restorenet import _C
    except ImportError:
        return None
    return _C


def available_backends(device: torch.device, cuda_symbol: str | None = None) -> list[str]:
    """Backends that can run on ``device``. With ``cuda_symbol``, ``cuda``
    counts only if the compiled extension has that function (ops whose CUDA
    kernels are not written yet fall back to the next backend)."""
    found = ["reference"]
    if triton_available() and (device.type == "cuda" or triton_interpreting()):
        found.append("triton")
    ext = cuda_extension() if device.type == "cuda" else None
    if ext is not None and (cuda_symbol is None or hasattr(ext, cuda_symbol)):
        found.append("cuda")
    return found


def resolve_backend(backend: str | None, device: torch.device, op: str,
                    cuda_symbol: str | None = None) -> str:
    """The backend ``op`` runs with on ``device``; raises if the one asked for cannot run there."""
    if backend is not None:
        _validate_name(backend, "backend")
        name = backend
    elif _override:
        name = _override[-1]
    elif os.environ.get("RESTORENET_BACKEND"):
        name = os.environ["RESTORENET_BACKEND"]
        _validate_name(name, "RESTORENET_BACKEND")
    elif device.type != "cuda":
        return "reference"  # the interpreter is for testing, never a default
    else:
        return _fastest(available_backends(device, cuda_symbol))
    if name not in available_backends(device, cuda_symbol):
        raise RuntimeError(_why_unavailable(name, device, op, cuda_symbol))
    return name


def _fastest(found: list[str]) -> str:
    for name in ("cuda", "triton"):
        if name in found:
            return name
    return "reference"


def _why_unavailable(name: str, device: torch.device, op: str, cuda_symbol: str | None) -> str:
    if name == "triton" and not triton_available():
        return f"{op}: backend='triton' needs the triton package, which is not installed"
    if name == "triton":
        return (f"{op}: backend='triton' on {device.type} tensors needs a CUDA device "
                "or TRITON_INTERPRET=1 (set before triton is imported)")
    if device.type != "cuda":
        return f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}"
    if cuda_extension() is not None:
        return (f"{op}: backend='cuda' is not available: restorenet._C has no {cuda_symbol} "
                "(this op's CUDA kernels are not built); use backend='triton' or 'reference'")
    return (f"{op}: backend='cuda' needs the compiled extension restorenet._C; "
            "reinstall with CUDA torch and nvcc present (see README)")
