"""Toolchain lookup shared by the csrc tests (no GPU needed by any of them)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

def find_cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime_api.h, cuda_fp16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for home in filter(None, candidates):
        include = Path(home) / "include"
        if (include / "cuda_runtime_api.h").exists() and (include / "cuda_fp16.h").exists():
            return include
    return None


@pytest.fixture(scope="session")
def cuda_include_dir_or_none() -> Path | None:
    return find_cuda_include_dir()


@pytest.fixture(scope="session")
def cuda_include_dir() -> Path:
    include = find_cuda_include_dir()
    if include is None:
        pytest.skip("CUDA toolkit headers not found (set CUDA_HOME)")
    return include
