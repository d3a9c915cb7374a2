"""The conv weight-gradient kernels compile for Hopper (sm_90) with the installed
Triton, on this CPU machine: ``triton.compile(ASTSource(...), GPUTarget("cuda", 90,
32))`` runs the whole pipeline down to the cubin with the ptxas that ships in the
Triton wheel. The interpreter the other tests use proves the arithmetic, not that a
kernel compiles: Triton 3.6 (torch 2.11's) used to fail these in its
TritonGPUOptimizeThreadLocality pass for fp32/fp64 (a row sum inside the pixel loop,
see ``kernels/conv_core.py::conv_wgrad_tile``).

The compile runs in a subprocess: tests/conftest.py sets TRITON_INTERPRET=1, under
which ``@triton.jit`` gives interpreted functions that cannot be compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (module, kernel, pointer arguments -> element type: "x" is the op's dtype, "acc"
# the accumulator's), compiled at the tiles the ops launch (kernels.conv_core.tiles:
# 16 and 64/32 channel blocks, 64 pixels), num_warps 4, num_stages 3.
PROBE = r'''
import json, sys
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
sys.path.insert(0, sys.argv[1])
from kernels import hyper_conv2d, slim_conv2d

KERNELS = {
    "hyper_conv2d_wgrad_kernel": (hyper_conv2d.hyper_conv2d_wgrad_kernel,
        dict(dy_ptr="x", x_ptr="x", w_ptr="x", bias_ptr="x", level_ptr="acc", dw_part_ptr="acc",
             dwb_part_ptr="acc", dlevel_part_ptr="acc", dbias_part_ptr="acc", dbias_base_part_ptr="acc"),
        dict(HAS_BIAS=True)),
    "slim_conv2d_wgrad_kernel": (slim_conv2d.slim_conv2d_wgrad_kernel,
        dict(dy_ptr="x", x_ptr="x", in_width_ptr="i32", out_width_ptr="i32", dw_part_ptr="acc",
             dbias_part_ptr="acc"), {}),
}
DTYPES = {"fp32": ("fp32", tl.float32, "tf32"), "bf16": ("fp32", tl.float32, "ieee"),
          "fp64": ("fp64", tl.float64, "ieee")}
results = []
for name, (fn, pointers, extra) in KERNELS.items():
    for dtype, (acc, acc_dtype, precision) in DTYPES.items():
        for co, ci in ((16, 16), (64, 32)):
            kinds = {"x": dtype, "acc": acc, "i32": "i32"}
            const = dict(KH=3, KW=3, ACC_DTYPE=acc_dtype, DOT_PRECISION=precision, SPLIT=4,
                         BLOCK_P=64, BLOCK_CO=co, BLOCK_CI=ci, **extra)
            sig = {a: "*" + kinds[pointers[a]] if a in pointers else ("constexpr" if a in const else "i32")
                   for a in fn.arg_names}
            case = dict(kernel=name, dtype=dtype, block_co=co, block_ci=ci)
            try:
                kernel = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                                        options=dict(num_warps=4, num_stages=3))
                ptx = kernel.asm["ptx"]
                case.update(ok=True, tensor_cores="wgmma" in ptx or "mma.sync" in ptx)
            except Exception as error:  # the first line says which pass failed
                case.update(ok=False, error=str(error).splitlines()[0][:200])
            results.append(case)
print(json.dumps(dict(triton=triton.__version__, results=results)))
'''


def _has_hopper_toolchain() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_hopper_toolchain(), reason="this Triton has no NVIDIA backend (ptxas)")
def test_conv_weight_gradient_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    failed = [r for r in report["results"] if not r["ok"]]
    assert not failed, f"Triton {report['triton']}: {failed}"
    assert len(report["results"]) == 12
    # Every one of these is a GEMM: tf32/bf16 on tensor cores, fp64 as DMMA (mma.sync).
    assert all(r["tensor_cores"] for r in report["results"]), report["results"]
