"""csrc/ builds without a GPU: every kernel file compiles with nvcc for the
Ampere and Hopper targets without register spills (ptxas -v), the conv core's
mainloops issue asynchronous copies (LDGSTS in the SASS), each binding file
passes the host compiler's checks against torch's headers, and the kernel
files stay torch-free.

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


def _find_cuobjdump() -> str | None:
    """nvcc's cuobjdump, else the one the Triton wheel ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(shipped) if shipped.exists() else None


CUOBJDUMP = _find_cuobjdump()

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
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("csrc_build")


@pytest.fixture(scope="module")
def builds(build_dir, cuda_include_dir_or_none):
    """Starts every compile at once; maps a key to its Popen (or a skip reason)."""
    out = build_dir
    jobs: dict[str, subprocess.Popen | str] = {}
    for source in KERNEL_FILES:
        for arch in ARCHS:
            key = f"{source.name}:{arch}"
            if NVCC is None:
                jobs[key] = "nvcc is not installed"
                continue
            cmd = [NVCC, *TORCH_LIKE_NVCC_FLAGS, _gencode(arch), "-Xptxas", "-v", f"-I{CSRC}", "-c", str(source),
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


def _wait(job: subprocess.Popen | str) -> str:
    """The job's output once it has succeeded (skips for a skip reason)."""
    if isinstance(job, str):
        pytest.skip(job)
    if not hasattr(job, "output"):  # a job is waited for by several tests
        job.output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, f"{' '.join(job.args)}\n{job.output}"
    return job.output


# ptxas -v, once per kernel: "Compiling entry function '<name>'" ... "N bytes spill stores, M bytes spill loads".
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def spilling_kernels(ptxas_output: str) -> list[str]:
    """Entry functions for which ptxas -v reports spill stores or loads."""
    spilled, entry = [], None
    for line in ptxas_output.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
        elif (m := _SPILLS.search(line)) and (int(m.group(1)) or int(m.group(2))):
            spilled.append(f"{entry}: {m.group(0)}")
    return spilled


def test_spill_parser_finds_spills():
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Compiling entry function '_Z1gv' for 'sm_90a'\n"
           "    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n")
    assert spilling_kernels(log) == ["_Z1gv: 8 bytes spill stores, 8 bytes spill loads"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in KERNEL_FILES])
def test_kernel_compiles(builds, source, arch):
    """Compiles, and no kernel spills registers to local memory."""
    output = _wait(builds[f"{source}:{arch}"])
    assert "Compiling entry function" in output, "ptxas -v reported no kernel"
    spills = spilling_kernels(output)
    assert not spills, "\n".join(spills)


def _sass_functions(sass: str) -> dict[str, str]:
    """cuobjdump -sass output split per function (mangled name -> its SASS)."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def _copies_asynchronously(demangled: str) -> bool:
    """Whether a conv-core mainloop must use cp.async: every instantiation
    whose shared tiles keep the input type -- fp32 and fp64, and 16-bit types
    on tensor cores (the last template flag). 16-bit SIMT tiles are converted
    to fp32, which cp.async cannot do."""
    half_width = "__half" in demangled or "__nv_bfloat16" in demangled
    tensor_cores = re.search(r", (true|false)>\((?!anonymous)", demangled)
    assert tensor_cores, demangled
    return not half_width or tensor_cores.group(1) == "true"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", ["hyper_conv2d.cu", "slim_conv2d.cu"])
def test_conv_core_mainloops_copy_asynchronously(builds, build_dir, source, arch):
    """The conv core's forward / input-gradient / parameter-gradient kernels issue
    cp.async (LDGSTS) and wait for it (DEPBAR) in the SASS nvcc generates."""
    _wait(builds[f"{source}:{arch}"])
    if CUOBJDUMP is None or shutil.which("c++filt") is None:
        pytest.skip("cuobjdump (nvcc's or the Triton wheel's) or c++filt not found")
    obj = build_dir / f"{Path(source).stem}.{arch}.o"
    sass = subprocess.run([CUOBJDUMP, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0, sass.stderr
    functions = _sass_functions(sass.stdout)
    names = dict(zip(functions, subprocess.run(["c++filt"], input="\n".join(functions), capture_output=True,
                                               text=True).stdout.splitlines()))
    mainloops = [f for f in functions if "conv_gemm_kernel" in names[f] or "param_grad_kernel" in names[f]]
    assert len(mainloops) >= 12, f"expected the conv core's kernels, found {len(mainloops)}"
    for f in mainloops:
        expected = _copies_asynchronously(names[f])
        has = "LDGSTS" in functions[f] and "DEPBAR" in functions[f]
        assert has == expected, f"{names[f]}: LDGSTS/DEPBAR {'missing' if expected else 'unexpected'}"


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
