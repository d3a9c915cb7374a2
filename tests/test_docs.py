"""docs/profiling.md names every kernel a user can meet in Nsight, and only real ones."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILING = (ROOT / "docs" / "profiling.md").read_text()

TRITON_KERNEL = re.compile(r"@triton\.jit\s*\ndef\s+(\w+_kernel)\s*\(")
CUDA_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+_kernel)\s*\(")


def defined_kernels() -> set[str]:
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names |= set(TRITON_KERNEL.findall(path.read_text()))
    for path in list((ROOT / "csrc").glob("*.cu")) + list((ROOT / "csrc").glob("*.cuh")):
        names |= set(CUDA_KERNEL.findall(path.read_text()))
    return names


def documented_kernels() -> set[str]:
    section = PROFILING.split("## Kernel names", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(\w+_kernel)\b", section))


def test_finds_the_kernels_of_both_languages():
    kernels = defined_kernels()
    assert "hyper_conv2d_fwd_kernel" in kernels and "conv_gemm_kernel" in kernels
    assert "tile_blend_kernel" in kernels and len(kernels) > 15


def test_every_kernel_is_in_the_profiling_table():
    missing = defined_kernels() - documented_kernels()
    assert not missing, f"docs/profiling.md's kernel table lacks {sorted(missing)}"


def test_the_table_names_no_kernel_that_does_not_exist():
    stale = documented_kernels() - defined_kernels()
    assert not stale, f"docs/profiling.md names kernels that no file defines: {sorted(stale)}"
