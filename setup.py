"""Build script.

The Python package needs no compiler. The CUDA extension ``restorenet._C``
(csrc/: torch-free .cu kernels behind a thin binding) is built with ninja only
where a CUDA build of torch and nvcc are both present; set
``RESTORENET_SKIP_CUDA_BUILD=1`` to skip it. Without it the ``reference`` and
``triton`` backends still work.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def cuda_extension_wanted() -> bool:
    """Build restorenet._C only where torch is a CUDA build and nvcc exists."""
    if os.environ.get("RESTORENET_SKIP_CUDA_BUILD", "0") == "1":
        return False
    try:
        import torch
    except ImportError:
        return False
    if torch.version.cuda is None:
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc_in_home = bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    return bool(shutil.which("nvcc")) or nvcc_in_home


def extension_kwargs() -> dict:
    if not cuda_extension_wanted():
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # csrc/*.cu: torch-free kernels (nvcc); csrc/binding/*.cpp: the torch binding,
    # one file per op (host compiler). No -std flag: torch's build adds the C++
    # standard its headers need (C++20).
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/binding/*.cpp"))
    ext = CUDAExtension(
        name="restorenet._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="restorenet",
    version="0.1.0",
    description="Fused-kernel backend and reference models for adaptive image restoration",
    python_requires=">=3.10",
    packages=find_packages(include=["restorenet", "restorenet.*"]) + ["restorenet_kernels"],
    package_dir={"restorenet_kernels": "kernels"},
    install_requires=[
        # torch is pinned by the README's install step (a CPU wheel here, CUDA
        # wheels on GPU machines); a range here would make pip fetch a new one.
        "torch>=2.11",
        "numpy",
        "tqdm",
        "matplotlib",
        "scikit-image",
        "pillow",
        "pypng",  # 16-bit RGB PNG (Pillow reads it as 8-bit, cannot write it): restorenet.data.images
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "triton==3.8.0; platform_system == 'Linux'", "ninja"],
        # Peer libraries the benchmarks compare with (skipped with a reason when absent).
        "peers": ["revlib==1.7.2"],
    },
    **extension_kwargs(),
)
