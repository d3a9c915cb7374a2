"""csrc/ builds without a GPU: every kernel file compiles with nvcc for the
Ampere and Hopper targets, each binding file passes the host compiler's checks
against torch's headers, and the kernel files stay torch-free.

The compiles are started together when the module's first test asks for them
(two CPU cores compile two files at once) and each test waits for its own.
The nvcc flags mirror what torch's CUDAExtension adds (C++20, no implicit half
conversions), so what compiles here compiles in ``pip install``.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"

KERNEL_FILES = sorted(CSRC.glob("*.cu"))
HEADER_FILES = sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))
BINDING_FILES = sorted((CSRC / "binding").glob("*.cpp"))
ARCHS = ("sm_80", "sm_90a")
NVCC = shutil.which("nvcc")

# The flags torch.utils.cpp_extension passes to nvcc for a CUDAExtension, plus ours.
TORCH_LIKE_NVCC_FLAGS = [
    "-std=c++20", "-O3", "-lineinfo", "-Xcompiler", "-fPIC",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr", "-Werror", "all-warnings",
]


def _gencode(arch: str) -> str:
    number = arch.removeprefix("sm_")
    return f"-gencode=arch=compute_{number},code={arch}"


def _binding_command(out_dir: Path, cuda_include: Path | None, source: Path) -> list[str] | None:
    """g++ -fsyntax-only of one csrc/binding/*.cpp against the installed torch's
    headers, or None where a piece is missing (no g++, no CUDA headers, no torch headers)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    torch_includes = [Path(p) for p in include_paths()]
    if cxx is None or cuda_include is None:
        return None
    if not any((p / "c10" / "cuda" / "CUDAStream.h").exists() for p in torch_includes):
        return None
    # A CPU wheel ships c10/cuda's headers but not this generated one.
    stub = out_dir / "stubs" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type",
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-I{CSRC}", *(f"-I{p}" for p in torch_includes), f"-I{out_dir / 'stubs'}",
            f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", str(source)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory, cuda_include_dir_or_none):
    """Starts every compile at once; maps a key to its Popen (or a skip reason)."""
    out = tmp_path_factory.mktemp("csrc_build")
    jobs: dict[str, subprocess.Popen | str] = {}
    for source in KERNEL_FILES:
        for arch in ARCHS:
            key = f"{source.name}:{arch}"
            if NVCC is None:
                jobs[key] = "nvcc is not installed"
                continue
            cmd = [NVCC, *TORCH_LIKE_NVCC_FLAGS, _gencode(arch), f"-I{CSRC}", "-c", str(source),
                   "-o", str(out / f"{source.stem}.{arch}.o")]
            jobs[key] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for source in BINDING_FILES:
        binding = _binding_command(out, cuda_include_dir_or_none, source)
        jobs[f"binding/{source.name}"] = (
            subprocess.Popen(binding, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if binding else "needs g++, CUDA headers and torch's c10/cuda headers")
    yield jobs
    for job in jobs.values():
        if isinstance(job, subprocess.Popen) and job.poll() is None:
            job.kill()


def _wait(job: subprocess.Popen | str) -> None:
    if isinstance(job, str):
        pytest.skip(job)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, f"{' '.join(job.args)}\n{output}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in KERNEL_FILES])
def test_kernel_compiles(builds, source, arch):
    _wait(builds[f"{source}:{arch}"])


@pytest.mark.parametrize("source", [p.name for p in BINDING_FILES])
def test_binding_passes_host_compiler(builds, source):
    """Each binding file type-checks with g++ against torch's headers (no nvcc needed)."""
    _wait(builds[f"binding/{source}"])


def test_there_are_kernel_and_binding_files():
    assert KERNEL_FILES, f"no .cu files under {CSRC}"
    assert (CSRC / "binding" / "module.cpp") in BINDING_FILES, "csrc/binding/module.cpp defines the module"


_TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2|pybind11)/', re.MULTILINE)


@pytest.mark.parametrize("path", [p.name for p in KERNEL_FILES + HEADER_FILES])
def test_kernels_are_torch_free(path):
    """Kernels and their headers compile without torch; only csrc/binding/ includes it."""
    text = (CSRC / path).read_text()
    found = _TORCH_INCLUDE.findall(text)
    assert not found, f"csrc/{path} includes torch headers ({found}); keep them in csrc/binding/"


def test_torch_free_check_would_catch_an_include():
    assert _TORCH_INCLUDE.search('#include <ATen/cuda/CUDAContext.h>\n')
    assert _TORCH_INCLUDE.search('  #  include "torch/extension.h"\n')
    assert not _TORCH_INCLUDE.search('#include <cuda_runtime.h>\n')
