"""Ahead-of-time compile check of every kernel, on a machine without a GPU.

    python -m restorenet.aot                              # table on stdout
    python -m restorenet.aot --write docs/kernel_report.md --jobs 2
    python -m restorenet.aot --check                      # exit 1 on any finding
    python -m restorenet.aot --arch 90a --kernels tile_blend --json out.json

**Which specialisations.** Not a hand-written list: the public ops are called,
forward and backward, on CPU tensors (the ``CASES`` below: every dtype an op
accepts, NCHW and channels_last, the unit-test shapes and the benchmark / paper
shapes), in a subprocess running Triton's interpreter inside
``kernels._launch.gpu_launch_config()`` so the launchers choose the GPU's tiles,
grids, ``num_warps`` and ``num_stages``. Every launch is intercepted before it
runs (``InterpretedFunction.run``; ``Autotuner.run`` records every config it
would try) and turned into what ``JITFunction.run`` would compile, with the
installed Triton's own binder (``create_function_from_signature`` +
``_pack_args``): argument types, the integer specialisation (== 1, divisible by
16) and pointer alignment, constexprs, options.

**Compile.** Each unique compile key (``JITFunction.cache_key`` -- the kernel's
and its callees' source --, signature, constexprs, attributes, options, arch,
Triton version) is compiled once per arch with ``triton.compile(ASTSource,
GPUTarget)`` in ``--jobs`` processes; ``--cache DIR`` keeps each result under
that full key. From the cubin (``cuobjdump --dump-resource-usage`` of the wheel)
come registers, the stack frame and static shared memory, from ptxas -v the spill
stores and loads; Triton's
metadata gives the dynamic shared memory; the PTX shows tensor-core instructions
(``wgmma`` / ``mma.sync``) and async copies (``cp.async``, TMA ``cp.async.bulk``).

**Findings** (``--check`` exits 1 on any): a compile error; spill stores or
loads (at the launch configuration the op uses); a 16-bit or tf32 ``tt.dot``
without tensor-core instructions; a kernel with a 16-bit ``tt.dot`` (the conv
GEMMs) whose PTX issues no async copy (its mainloop loads synchronously and does
not pipeline); shared memory over the per-block limit.

The CUDA kernels (``csrc/*.cu``) are compiled with nvcc for the same archs and
read the same way (``--no-cuda`` skips them).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "kernel_report.md"
COMMAND = "python -m restorenet.aot --write docs/kernel_report.md"
ARCHS = ("90a", "80")

# Per-SM and per-block limits (CUDA programming guide, compute capabilities 8.0 and 9.0).
SM_LIMITS = {
    "90a": dict(regs=65536, warps=64, blocks=32, smem_sm=233472, smem_block=232448, name="H100/H200"),
    "80": dict(regs=65536, warps=64, blocks=32, smem_sm=167936, smem_block=166912, name="A100"),
}
SMEM_RESERVED = 1024  # per block, reserved by the driver on sm_80+
REG_UNIT = 256  # registers are allocated per warp in units of 256


# ====================================================================== cases
# Each case calls public ops, forward and backward, as a model or a benchmark
# does. Shapes (N, C, H, W). ``big`` tensors are never touched (torch.empty):
# the launches are recorded, not run.
DTYPES = ("float32", "bfloat16", "float16", "float64")
LAYOUTS = ("nchw", "channels_last")


def _tensor(shape, dtype, layout, grad=False, fill=None):
    import torch
    fmt = torch.channels_last if layout == "channels_last" and len(shape) == 4 else torch.contiguous_format
    t = torch.empty(shape, dtype=dtype, memory_format=fmt)
    if fill is not None:
        t.fill_(fill)
    return t.requires_grad_(grad)


def _backward(out, inputs):
    import torch
    torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad],
                        torch.empty_like(out), allow_unused=True)


def _hyper(n, c_in, c_out, h, w, k=3, stride=1, padding=1):
    def run(dtype, layout):
        from restorenet.ops import hyper_conv2d
        x = _tensor((n, c_in, h, w), dtype, layout, grad=True)
        ws = [_tensor((c_out, c_in, k, k), dtype, "nchw", grad=True) for _ in range(2)]
        bs = [_tensor((c_out,), dtype, "nchw", grad=True) for _ in range(2)]
        level = [0.1 * (i + 1) for i in range(n)]
        y = hyper_conv2d(x, level, *ws, *bs, stride=stride, padding=padding, backend="triton")
        _backward(y, [x, *ws, *bs])
    return run


def _slim(n, c_in, c_out, h, w, in_width, out_width, k=3, padding=1):
    def run(dtype, layout):
        from restorenet.ops import slim_conv2d
        x = _tensor((n, c_in, h, w), dtype, layout, grad=True)
        weight = _tensor((c_out, c_in, k, k), dtype, "nchw", grad=True)
        bias = _tensor((c_out,), dtype, "nchw", grad=True)
        y = slim_conv2d(x, weight, bias, in_width, out_width, padding=padding, backend="triton")
        _backward(y, [x, weight, bias])
    return run


def _mix(n, choices):
    return [choices[i % len(choices)] for i in range(n)]


def _naf(n, c, h, w):
    """NAFBlock's element-wise stages at width c: LayerNorm2d, SimpleGate, gated
    SCA, plain SCA, scaled residual (each forward and backward)."""
    def run(dtype, layout):
        from restorenet.ops import channel_attention, layer_norm2d, scaled_residual, simple_gate
        pdtype = dtype if str(dtype) == "torch.float64" else __import__("torch").float32
        x = _tensor((n, c, h, w), dtype, layout, grad=True)
        p = [_tensor((c,), pdtype, "nchw", grad=True) for _ in range(2)]
        _backward(layer_norm2d(x, *p, backend="triton"), [x, *p])
        x2 = _tensor((n, 2 * c, h, w), dtype, layout, grad=True)
        _backward(simple_gate(x2, backend="triton"), [x2])
        wca, bca = _tensor((c, c), pdtype, "nchw", grad=True), _tensor((c,), pdtype, "nchw", grad=True)
        _backward(channel_attention(x2, wca, bca, gated=True, backend="triton"), [x2, wca, bca])
        _backward(channel_attention(x, wca, bca, backend="triton"), [x, wca, bca])
        beta, z = _tensor((1, c, 1, 1), pdtype, "nchw", grad=True), _tensor((n, c, h, w), dtype, layout, grad=True)
        _backward(scaled_residual(x, beta, z, backend="triton"), [x, beta, z])
    return run


def _coupling(n, c, h, w):
    """AdaRevD's coupling: forward + its backward, and the one-pass invert."""
    def run(dtype, layout):
        from restorenet.ops import rev_coupling_forward, rev_coupling_invert
        adtype = dtype if str(dtype) == "torch.float64" else __import__("torch").float32
        c_, f = _tensor((n, c, h, w), dtype, layout, grad=True), _tensor((n, c, h, w), dtype, layout, grad=True)
        alpha = _tensor((c,), adtype, "nchw", grad=True, fill=1.0)
        _backward(rev_coupling_forward(c_, f, alpha, backend="triton"), [c_, f, alpha])
        with __import__("torch").no_grad():
            rev_coupling_invert(c_, f, alpha, _tensor((n, c, h, w), dtype, layout), backend="triton")
    return run


def _tiles(size, tile, overlap, multiple, widths):
    """AdaRevD.restore's tile ops: gather of every encoder level, blend of the output."""
    def run(dtype, layout):
        from restorenet.ops import tile_blend, tile_gather, tile_plan
        plan = tile_plan(_tensor((1, 3, *size), dtype, layout), tile, overlap, multiple=multiple)
        for level, c in enumerate(widths):
            feats = _tensor((1, c, size[0] >> level, size[1] >> level), dtype, layout)
            tile_gather(feats, plan, scale=2 ** level, backend="triton")
        for c in (3, 16):  # the restored image; features (the launcher's widest channel block)
            tile_blend(_tensor((plan.num_tiles, c, *plan.tile), dtype, "nchw"), plan, backend="triton")
    return run


NAF_WIDTHS = (32, 64, 128, 256, 512, 1024)  # NAFNet-width32/64 levels
CASES: dict[str, Callable] = {
    # unit-test shapes: odd sizes, batch 1, channel counts off the tile sizes
    "hyper 2x5x9x11 -> 7": _hyper(2, 5, 7, 9, 11),
    "hyper 1x3x8x8 -> 4 k1 s2": _hyper(1, 3, 4, 8, 8, k=1, stride=2, padding=0),
    "hyper 2x70x12x10 -> 80": _hyper(2, 70, 80, 12, 10),
    "slim 2x6x9x11 -> 5": _slim(2, 6, 5, 9, 11, [6, 3], [2, 5]),
    "slim 3x40x10x12 -> 36": _slim(3, 40, 36, 10, 12, [40, 17, 1], [36, 9, 20]),
    "naf 2x5x7x9": _naf(2, 5, 7, 9),
    "naf 1x1100x3x5": _naf(1, 1100, 3, 5),  # wider than one channel block
    "coupling 2x5x7x9": _coupling(2, 5, 7, 9),
    "tiles 64x96 t48 o16": _tiles((64, 96), 48, 16, 16, (8, 16, 32, 64, 128)),
    # benchmark / paper shapes
    "hyper 16x64x96x96 (HyperRes)": _hyper(16, 64, 64, 96, 96),
    "hyper 16x64x256x256 (HyperRes)": _hyper(16, 64, 64, 256, 256),
    "slim 16x64x96x96 dds 16/32/48/64": _slim(16, 64, 64, 96, 96, *[_mix(16, (16, 32, 48, 64))] * 2),
    "slim 16x64x256x256 dds 16/32/48/64": _slim(16, 64, 64, 256, 256, *[_mix(16, (16, 32, 48, 64))] * 2),
    "slim 16x3x96x96 -> 64 (DDS-Net head)": _slim(16, 3, 64, 96, 96, 3, _mix(16, (16, 32, 48, 64))),
    "slim 16x64x96x96 -> 3 (DDS-Net tail)": _slim(16, 64, 3, 96, 96, _mix(16, (16, 32, 48, 64)), 3),
    **{f"naf 8x{c}x{256 >> i}x{256 >> i} (NAFNet)": _naf(8, c, 256 >> i, 256 >> i)
       for i, c in enumerate(NAF_WIDTHS[1:])},
    "naf 8x32x256x256 (NAFNet-width32)": _naf(8, 32, 256, 256),
    **{f"coupling 8x{64 << i}x{256 >> i}x{256 >> i} (AdaRevD level {i})": _coupling(8, 64 << i, 256 >> i, 256 >> i)
       for i in range(4)},
    "tiles 720x1280 t384 o32 (AdaRevD restore)": _tiles((720, 1280), 384, 32, 16, (64, 128, 256, 512, 1024)),
}


# ================================================================== discovery
def _encode(value):
    """JSON form of a constexpr value (tl.dtype objects by name)."""
    import triton.language as tl
    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return {"repr": repr(value)}


def _decode(value):
    import triton.language as tl
    if isinstance(value, dict) and "dtype" in value:
        return tl.dtype(value["dtype"])
    if isinstance(value, dict):
        raise ValueError(f"constexpr {value} cannot be rebuilt")
    return value


class _Recorder:
    """Turns each intercepted launch into the compile inputs JITFunction.run would use."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binders = {}
        self.launches: list[dict] = []
        self.case = ""

    def _binder(self, fn):
        if fn not in self.binders:
            from triton.runtime.jit import JITFunction, create_function_from_signature
            jit = JITFunction(fn)
            self.binders[fn] = (jit, create_function_from_signature(jit.signature, jit.params, self.backend))
        return self.binders[fn]

    def record(self, interpreted, args, kwargs, grid, autotune=None):
        fn = interpreted.fn
        jit, binder = self._binder(fn)
        bound, specialization, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = jit._pack_args(self.backend, dict(kwargs), bound, specialization, options)
        names = jit.arg_names
        self.launches.append(dict(
            module=fn.__module__, kernel=fn.__qualname__, case=self.case,
            signature=signature,
            constexprs={names[k[0]]: _encode(v) for k, v in constexprs.items()},
            attrs={names[k[0]]: v for k, v in attrs.items() if v},
            options={k: v for k, v in kwargs.items() if k not in names},
            grid=list(grid) if isinstance(grid, (tuple, list)) else repr(grid),
            autotune=autotune,
        ))

    @contextlib.contextmanager
    def intercepting(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.interpreter import InterpretedFunction
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            recorder.record(self, args, kwargs, grid)

        def autotune_run(self, *args, **kwargs):
            # Every config the autotuner would time on the GPU (after its pruning).
            self.nargs = dict(zip(self.arg_names, args))
            configs = self.prune_configs(kwargs) if hasattr(self, "prune_configs") else self.configs
            grid = kwargs.pop("grid")
            kwargs.pop("warmup", None)
            inner = self.fn
            while not isinstance(inner, InterpretedFunction):
                inner = inner.fn
            for i, config in enumerate(configs):
                merged = {**kwargs, **config.all_kwargs()}
                recorder.record(inner, args, merged, grid, autotune=f"{i + 1}/{len(configs)}")

        saved = InterpretedFunction.run, Autotuner.run
        InterpretedFunction.run, Autotuner.run = run, autotune_run
        try:
            yield
        finally:
            InterpretedFunction.run, Autotuner.run = saved


def discover(case_names: Iterable[str] | None = None) -> tuple[list[dict], list[str]]:
    """Every launch of every case (must run under TRITON_INTERPRET=1): (launches, notes)."""
    import torch
    from restorenet_kernels._launch import gpu_launch_config
    recorder = _Recorder()
    notes = []
    for name in case_names or CASES:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                recorder.case = f"{name} | {dtype} | {layout}"
                try:
                    with recorder.intercepting(), gpu_launch_config():
                        CASES[name](getattr(torch, dtype), layout)
                except (TypeError, ValueError) as error:  # the op refuses this dtype: not a spec
                    notes.append(f"{recorder.case}: refused ({str(error).splitlines()[0][:120]})")
    return recorder.launches, notes


def run_discovery(case_names=None) -> tuple[list[dict], list[str]]:
    """``discover`` in a subprocess under Triton's interpreter (this process may not be)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "restorenet.aot", "--discover-only"]
    if case_names:
        cmd += ["--cases", json.dumps(list(case_names))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"discovery failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["launches"], out["notes"]


# ===================================================================== CI subset
def _elements_per_thread(launch: dict) -> float:
    c = launch["constexprs"]
    tile = math.prod(v for k, v in c.items() if k.startswith("BLOCK_") and isinstance(v, int))
    return tile / launch["options"].get("num_warps", 4)


def _code_path(launch: dict) -> str:
    """The constexprs that switch code paths (flags, precisions, one channel block or several)."""
    c = launch["constexprs"]
    flags = {k: v for k, v in c.items() if k.isupper() and isinstance(v, (bool, str, dict))}
    if "C_BLOCKS" in c:
        flags["C_BLOCKS>1"] = c["C_BLOCKS"] > 1
    return _canonical(flags)


def ci_selection(launches: list[dict]) -> list[dict]:
    """What CI compiles (tests/kernels): for every kernel, data dtype and code path,
    the launch with the most tile elements per thread -- the register-hungriest, so
    the one that spills first; ties go to the later case (the benchmark shapes).
    Every autotune config of that launch's shape comes along. The full list is
    the report's job (``python -m restorenet.aot``)."""
    best: dict[tuple, dict] = {}
    for launch in launches:
        group = (launch["kernel"], _data_type(launch["signature"]), _code_path(launch))
        if group not in best or _elements_per_thread(launch) >= _elements_per_thread(best[group]):
            best[group] = launch
    chosen_cases = {(l["kernel"], l["case"]) for l in best.values()}
    return [l for l in launches if (l["kernel"], l["case"]) in chosen_cases
            and (l["autotune"] or l in best.values())]


# ======================================================================= keys
def _kernel_fn(module: str, qualname: str):
    import importlib
    from triton.runtime.jit import JITFunction
    fn = getattr(importlib.import_module(module), qualname)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def spec_of(launch: dict) -> dict:
    """The part of a launch that decides the binary."""
    return {k: launch[k] for k in ("module", "kernel", "signature", "constexprs", "attrs", "options")}


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# Bump when what a row holds changes (cached rows are upgraded or recompiled: ``_cached_row``).
# 2: ptxas's spill stores/loads (1 had the stack frame only).
ANALYSIS_VERSION = 2


def compile_key(spec: dict, arch: str) -> str:
    """Kernel source (with its callees: JITFunction.cache_key), spec, arch, Triton version."""
    import triton
    source = _kernel_fn(spec["module"], spec["kernel"]).cache_key
    parts = [source, spec, arch, triton.__version__]
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()[:20]


def source_fingerprint(launches: list[dict]) -> str:
    """What the committed report describes: the kernel sources (Triton and CUDA)
    and the spec list the ops launch. Cheap: no compile."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")) + sorted((ROOT / "csrc").glob("*.cu*")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    specs = sorted({_canonical(spec_of(l)) for l in launches})
    h.update("\n".join(specs).encode())
    return h.hexdigest()[:16]


# ==================================================================== compile
def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else (shutil.which(name) or name)


SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
RESOURCE = re.compile(r"Function (\S+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict[str, dict]:
    """{function: {regs, stack, static_smem, local}} from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    return {m[1]: dict(regs=int(m[2]), stack=int(m[3]), static_smem=int(m[4]), local=int(m[5]))
            for m in RESOURCE.finditer(text)}


DOT_OPERAND = re.compile(r"tt\.dot .*: tensor<[0-9x]+x(\w+)>")
DOT_PRECISION = re.compile(r"inputPrecision = (\w+)")


def _dots(ttir: str) -> list[tuple[str, str]]:
    """(input precision, operand element type) of every tt.dot; an fp32 dot without
    the attribute is tf32 (Triton's default, and what the ops ask for)."""
    found = []
    for line in ttir.splitlines():
        operand = DOT_OPERAND.search(line)
        if operand:
            precision = DOT_PRECISION.search(line)
            found.append((precision[1] if precision else "tf32", operand[1]))
    return found


def ptx_features(ptx: str, ttir: str) -> dict:
    dots = _dots(ttir)
    needs_tc = any(t in ("bf16", "f16") or (t == "f32" and p in ("tf32", "tf32x3")) for p, t in dots)
    return dict(
        dots=len(dots), dot_types=sorted({f"{t}/{p}" for p, t in dots}), needs_tensor_cores=needs_tc,
        wgmma=ptx.count("wgmma.mma_async"), mma=len(re.findall(r"\bmma\.sync", ptx)),
        dmma=len(re.findall(r"\bmma\.sync\S*\.f64", ptx)),
        cp_async=len(re.findall(r"\bcp\.async\.c[ag]", ptx)), tma=ptx.count("cp.async.bulk"),
        div_full=ptx.count("div.full.f32"), div_rn=ptx.count("div.rn.f32"),
    )


def occupancy(regs: int, smem: int, num_warps: int, arch: str) -> int:
    """Resident warps per SM that registers and shared memory allow."""
    lim = SM_LIMITS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_UNIT) * REG_UNIT
    blocks = min(lim["blocks"], (lim["regs"] // regs_per_warp) // num_warps)
    if smem:
        blocks = min(blocks, lim["smem_sm"] // (smem + SMEM_RESERVED))
    return min(lim["warps"], blocks * num_warps)


def compile_triton(job: tuple[str, dict, str]) -> dict:
    """Compile one spec for one arch: the report row (runs in a worker process)."""
    key, spec, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _kernel_fn(spec["module"], spec["kernel"])
    constexprs = {name: _decode(v) for name, v in spec["constexprs"].items()}
    attrs = {(fn.arg_names.index(name),): v for name, v in spec["attrs"].items()}
    options = dict(spec["options"])
    row = dict(key=key, arch=arch, kernel=spec["kernel"], num_warps=options.get("num_warps", 4),
               num_stages=options.get("num_stages", 3))
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v: the spill counts
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, spec["signature"], constexprs, attrs),
                                      target=GPUTarget("cuda", int(arch.rstrip("a")), 32), options=options)
    except Exception as error:  # noqa: BLE001 -- any compiler error is a finding, reported
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        # A CompilationError ends with its cause (after the source excerpt); an MLIR
        # or ptxas failure names the failing pass or assertion on an "error" line.
        first = next((ln for ln in lines if "error" in ln.lower() or "assert" in ln.lower()), "")
        first = first or (f"{lines[0]} {lines[-1]}" if lines else "")
        return dict(row, ok=False, error=f"{type(error).__name__}: {first[:240]}", analysis=ANALYSIS_VERSION,
                    seconds=round(time.perf_counter() - start, 2), cpu_seconds=round(_cpu_seconds() - cpu0, 2))
    usage = next(iter(resource_usage(compiled.asm["cubin"]).values()))
    smem = max(int(compiled.metadata.shared), usage["static_smem"])
    spills = SPILLS.search(log.getvalue())
    if spills is None:
        raise RuntimeError(f"no ptxas -v spill line for {spec['kernel']}: {log.getvalue()[-300:]}")
    row.update(ok=True, regs=usage["regs"], stack=usage["stack"], local=usage["local"], smem=smem,
               spill_stores=int(spills[1]), spill_loads=int(spills[2]), analysis=ANALYSIS_VERSION,
               warps_per_sm=occupancy(usage["regs"], smem, row["num_warps"], arch),
               **ptx_features(compiled.asm["ptx"], compiled.asm["ttir"]),
               seconds=round(time.perf_counter() - start, 2), cpu_seconds=round(_cpu_seconds() - cpu0, 2))
    return row


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): the cost of a
    compile whatever else the machine runs."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def sixteen_bit_gemm(row: dict) -> bool:
    return any(t.split("/")[0] in ("bf16", "f16") for t in row["dot_types"])


def findings(row: dict) -> list[str]:
    """What --check and the CI tests refuse."""
    if not row["ok"]:
        return ["compile error"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spill ({row['spill_stores']} B stores, {row['spill_loads']} B loads)")
    if row["needs_tensor_cores"] and not (row["wgmma"] or row["mma"]):
        out.append("16-bit/tf32 dot without tensor cores")
    if sixteen_bit_gemm(row) and not (row["cp_async"] or row["tma"]):
        out.append("16-bit GEMM without async copies")
    if row["smem"] > SM_LIMITS[row["arch"]]["smem_block"]:
        out.append(f"shared memory {row['smem']} B over the block limit")
    return out


def findings_by_kernel(rows: list[dict]) -> dict[str, list[str]]:
    """{kernel: sorted distinct "sm_<arch>: finding"} over every row (every kernel listed)."""
    out: dict[str, set] = {}
    for r in rows:
        out.setdefault(r["kernel"], set()).update(f"sm_{r['arch']}: {re.sub(r' [(].*', '', f)}" for f in findings(r))
    return {k: sorted(v) for k, v in sorted(out.items())}


def compile_all(jobs: list[tuple[str, dict, str]], workers: int, cache: Path | None,
                cached_only: bool = False) -> list[dict]:
    """Rows for every job, from the cache where a row exists, else compiled in
    ``workers`` processes (``cached_only``: left out, for a report of what a cut
    run compiled; the report then names the kernels it does not cover)."""
    rows, todo = {}, []
    for job in jobs:
        hit = _cached_row(cache / f"{job[0]}-{job[2]}.json") if cache else None
        if hit:
            rows[(job[0], job[2])] = hit
        else:
            todo.append(job)
    todo = [] if cached_only else sorted(todo, key=lambda j: ("conv" in j[1]["kernel"], j[1]["kernel"]))
    with tempfile.TemporaryDirectory() as triton_cache:
        # Triton's own cache would hide compile time and errors: a fresh one per run.
        os.environ["TRITON_CACHE_DIR"] = triton_cache
        if workers <= 1 or len(todo) <= 1:
            results = map(compile_triton, todo)
            for row in results:
                _store(rows, row, cache)
        else:
            ctx = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                for row in pool.map(compile_triton, todo, chunksize=1):
                    _store(rows, row, cache)
    return [rows[(j[0], j[2])] for j in jobs if (j[0], j[2]) in rows]


def _cached_row(path: Path) -> dict | None:
    """The cached row, upgraded from an older analysis where that is exact (a binary
    without a stack frame spills nothing), else None (compile again)."""
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    if row.get("analysis", 1) == ANALYSIS_VERSION:
        return row
    if not row["ok"]:
        return dict(row, analysis=ANALYSIS_VERSION)
    if row["stack"] == 0 and row["local"] == 0:
        return dict(row, spill_stores=0, spill_loads=0, analysis=ANALYSIS_VERSION)
    return None


def _store(rows, row, cache):
    rows[(row["key"], row["arch"])] = row
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{row['key']}-{row['arch']}.json").write_text(json.dumps(row))


# ======================================================================= CUDA
NVCC_FLAGS = ["-std=c++20", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def compile_cuda(job: tuple[str, str]) -> list[dict]:
    """nvcc -cubin of one csrc/*.cu for one arch: a row per kernel instantiation."""
    source, arch = job
    nvcc = shutil.which("nvcc")
    base = dict(source=source, arch=arch)
    if nvcc is None:
        return [dict(base, ok=False, kernel="*", error="nvcc not found")]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        done = subprocess.run([nvcc, *NVCC_FLAGS, "-Xptxas", "-v", f"-arch=sm_{arch}", "-cubin", "-o", str(cubin),
                               str(ROOT / "csrc" / source)], capture_output=True, text=True)
        if done.returncode != 0:
            err = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr[:200])
            return [dict(base, ok=False, kernel="*", error=err.strip()[:240])]
        usage = resource_usage(cubin.read_bytes())
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    names = _demangle(list(usage))
    # ptxas -v: "Function properties for NAME\n  S bytes stack frame, X bytes spill stores, Y bytes spill loads"
    spills = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(
        r"Function properties for (\S+?):?\s*\n\s*\d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
        done.stderr + done.stdout)}
    rows = []
    for mangled, u in usage.items():
        body = _sass_of(sass, mangled)
        stores, loads = spills.get(mangled, (0, 0))
        rows.append(dict(base, ok=True, kernel=names.get(mangled, mangled), regs=u["regs"], stack=u["stack"],
                         local=u["local"], smem=u["static_smem"], spill_stores=stores, spill_loads=loads,
                         hmma=len(re.findall(r"\bHGMMA|\bHMMA", body)), dmma=body.count("DMMA"),
                         cp_async=body.count("LDGSTS"), tma=body.count("UTMALDG")))
    return rows


def _cached_cuda(job: tuple[str, str], cache: Path | None, cached_only: bool) -> list[dict]:
    """compile_cuda, cached under every csrc/ file's text, the arch, nvcc's version and flags."""
    if cache is None:
        return compile_cuda(job)
    nvcc = shutil.which("nvcc")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    h = hashlib.sha256(_canonical([job, version, NVCC_FLAGS, ANALYSIS_VERSION]).encode())
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    hit = cache / f"cuda-{h.hexdigest()[:20]}.json"
    if hit.exists():
        return json.loads(hit.read_text())
    if cached_only:
        return [dict(source=job[0], arch=job[1], ok=False, kernel="*", error="not compiled (--cached-only)")]
    rows = compile_cuda(job)
    cache.mkdir(parents=True, exist_ok=True)
    hit.write_text(json.dumps(rows))
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    def short(demangled: str) -> str:  # "void ns::(anonymous namespace)::k<T>(args)" -> "ns::k<T>"
        name = demangled.replace("void ", "", 1).replace("(anonymous namespace)::", "")
        return name[:name.rfind("(")] if name.endswith(")") else name
    return {m: short(d) for m, d in zip(names, out)}


def _sass_of(sass: str, mangled: str) -> str:
    parts = sass.split("Function : ")
    return next((p for p in parts if p.startswith(mangled)), "")


# ===================================================================== report
def _data_type(sig: dict) -> str:
    """The element type of the kernel's first pointer (its data)."""
    return next((v[1:] for v in sig.values() if v.startswith("*")), "-")


CONSTEXPR_SHOWN = re.compile(r"^(BLOCK_|KH|KW|ITERS|C_BLOCKS|SPLIT|REBUILD|GATED|HAS_|NEED_|WITH_|COVER_|DOT_)")


def _spec_label(spec: dict) -> str:
    """Tile constexprs, then the integer specialisation: arguments equal to 1, and
    integer arguments *not* known divisible by 16 (``odd:``)."""
    c, sig = spec["constexprs"], spec["signature"]
    parts = [f"{k}={v}" for k, v in c.items() if CONSTEXPR_SHOWN.match(k) and not isinstance(v, dict)]
    ones = [k for k in c if k in sig and not CONSTEXPR_SHOWN.match(k) and c[k] == 1 and not k.isupper()]
    odd = [k for k, v in sig.items() if v[0] in "iu" and k not in spec["attrs"]]
    if ones:
        parts.append("=1: " + ",".join(ones))
    if odd:
        parts.append("odd: " + ",".join(odd))
    return " ".join(parts)


def _cell(row: dict) -> str:
    if not row["ok"]:
        return f"**FAIL** {row['error'][:90]}"
    tc = "wgmma" if row["wgmma"] else "mma" if row["mma"] else ("**none**" if row["needs_tensor_cores"] else "-")
    if row.get("dmma"):
        tc = "dmma"
    cp = (f"{row['cp_async']}" if row["cp_async"] else "0") + (f"+{row['tma']}tma" if row["tma"] else "")
    spill = f"**{row['spill_stores']}/{row['spill_loads']}**" if row["spill_stores"] or row["spill_loads"] else "0"
    stack = f" ({row['stack']})" if row["stack"] else ""
    return f"{row['regs']} | {spill}{stack} | {row['smem'] // 1024 if row['smem'] >= 1024 else row['smem']}{'K' if row['smem'] >= 1024 else ''} | {row['warps_per_sm']} | {tc} | {cp}"


def hyper_loads_per_flop(launches: list[dict]) -> list[str]:
    """Loads per FLOP of hyper_conv2d_fwd_kernel at every tile it launches, from its tile sizes."""
    lines = []
    seen = set()
    for l in launches:
        if l["kernel"] != "hyper_conv2d_fwd_kernel":
            continue
        c = l["constexprs"]
        if "BLOCK_P" not in c or "BLOCK_CO" not in c or "BLOCK_CI" not in c:
            continue
        p, co, ci = c["BLOCK_P"], c["BLOCK_CO"], c["BLOCK_CI"]
        if (p, co, ci) in seen:
            continue
        seen.add((p, co, ci))
        flops = 2 * p * co * ci
        x_loads, w_loads = p * ci, 2 * co * ci
        lines.append(f"| {p} | {co} | {ci} | {x_loads} | {w_loads} | {flops} | "
                     f"{(x_loads + w_loads) / flops:.4f} | {w_loads / (x_loads + w_loads):.0%} |")
    return lines


def render(launches, rows, cuda_rows, archs, meta) -> str:
    import triton
    by_key: dict[str, dict] = {}
    for launch in launches:
        key = launch["_key"]
        entry = by_key.setdefault(key, dict(spec=spec_of(launch), cases=[], autotune=launch["autotune"]))
        entry["cases"].append(launch["case"])
    result = {(r["key"], r["arch"]): r for r in rows}
    lines = [
        "# Kernel report: every kernel compiled ahead of time",
        "",
        f"Generated by `{meta.get('command', COMMAND)}` (restorenet/aot.py) with Triton {triton.__version__}, "
        f"archs {', '.join('sm_' + a for a in archs)}, on a machine without a GPU. "
        "Do not edit: regenerate. `tests/kernels/test_aot.py` checks that the committed reports (Triton 3.8: "
        "docs/kernel_report.md, Triton 3.6: docs/kernel_report_triton36.md) match the code and reads their findings.",
        "",
        f"<!-- fingerprint: {meta['fingerprint']} -->",
        f"<!-- scope: {_canonical(dict(kernels=meta.get('kernels'), ci=meta.get('ci', False), archs=list(archs), incomplete=meta.get('incomplete', [])))} -->",
        f"<!-- findings: {_canonical(findings_by_kernel(rows))} -->",
        "",
        f"**{meta['launches']} launches** recorded from {len(CASES)} cases x {len(DTYPES)} dtypes x "
        f"{len(LAYOUTS)} layouts (the ops called forward and backward, see `CASES` in restorenet/aot.py), "
        f"**{len(by_key)} unique specialisations**, {len(rows)} compiles"
        + (f" (only kernels matching `{meta['kernels']}`)" if meta.get("kernels") else "")
        + (" (only the CI subset, `ci_selection`)" if meta.get("ci") else "") + "."
        + (f" **Not every spec was compiled** (a run cut short, `--cached-only`) for: "
           f"{', '.join('`' + k + '`' for k in meta['incomplete'])}." if meta.get("incomplete") else ""),
        "",
    ]
    for arch in archs:
        arch_rows = [r for r in rows if r["arch"] == arch]
        bad = [r for r in arch_rows if findings(r)]
        fails = sum(not r["ok"] for r in arch_rows)
        spills = sum(1 for r in arch_rows if r["ok"] and (r["spill_stores"] or r["spill_loads"]))
        lines.append(f"- sm_{arch}: {len(arch_rows)} compiled, **{fails} compile failures, {spills} spill**, "
                     f"{len(bad)} with a finding.")
    lines += [
        "",
        "Columns per arch: registers/thread | spill stores/loads in bytes from ptxas -v (bold when > 0), then "
        "the stack frame in parentheses when there is one (local memory: spills, or a call's frame) | shared memory "
        "per block | resident warps per SM that registers and shared memory allow (of 64) | tensor-core "
        "instructions in the PTX (wgmma on sm_90, mma.sync on sm_80; dmma = fp64 mma; **none** = a 16-bit or tf32 "
        "dot without them; - = no dot) | async copies in the PTX (cp.async; +N tma = cp.async.bulk). "
        "`=1:` lists integer arguments specialised to the constant 1, `odd:` integer arguments not known to be "
        "divisible by 16. `cases` counts the (case, dtype, layout) calls that launch that exact specialisation. "
        "Recorded on CPU tensors: a launch parameter read from the GPU itself (the weight-gradient `SPLIT`, "
        "from the SM count in `conv_core.split_count`) has its CPU value here.",
        "",
    ]
    kernels = sorted({e["spec"]["kernel"] for e in by_key.values()})
    head = " | ".join(f"sm_{a} regs | spill (stack) | smem | warps/SM | TC | async" for a in archs)
    for kernel in kernels:
        entries = sorted((e for e in by_key.values() if e["spec"]["kernel"] == kernel),
                         key=lambda e: (_data_type(e["spec"]["signature"]), _spec_label(e["spec"])))
        lines += [f"### `{kernel}` ({entries[0]['spec']['module'].split('.')[-1]}.py)", "",
                  f"| dtype | specialisation | warps/stages | cases | {head} |",
                  "|" + "---|" * (4 + 6 * len(archs))]
        for e in entries:
            key = next(k for k, v in by_key.items() if v is e)
            opts = e["spec"]["options"]
            cells = " | ".join(_cell(result[(key, a)]) if (key, a) in result else "not compiled | | | | |"
                               for a in archs)
            tune = f" (autotune {e['autotune']})" if e["autotune"] else ""
            lines.append(f"| {_data_type(e['spec']['signature'])} | {_spec_label(e['spec'])}{tune} | "
                         f"{opts.get('num_warps', 4)}/{opts.get('num_stages', 3)} | {len(e['cases'])} | {cells} |")
        lines.append("")
    lines += ["## Loads per FLOP of the hyper_conv2d forward", "",
              "Per reduction step of `hyper_conv2d_fwd_kernel` (one tap, one input-channel block) a program "
              "loads a BLOCK_P x BLOCK_CI activation tile and, to generate the kernel tile `c*W + B`, "
              "two BLOCK_CI x BLOCK_CO weight tiles, and issues 2 * BLOCK_P * BLOCK_CO * BLOCK_CI FLOP. "
              "Loads per FLOP = (BLOCK_P*BLOCK_CI + 2*BLOCK_CI*BLOCK_CO) / (2*BLOCK_P*BLOCK_CO*BLOCK_CI) "
              "(elements per FLOP, from the tile sizes the launches use; caches not counted). "
              "`weight share` is the fraction of loads that regenerate the kernel tile.", "",
              "| BLOCK_P | BLOCK_CO | BLOCK_CI | activation loads | weight loads | FLOP | loads/FLOP | weight share |",
              "|---|---|---|---|---|---|---|---|", *hyper_loads_per_flop(launches), ""]
    if cuda_rows:
        lines += ["## CUDA kernels (csrc/*.cu, nvcc)", "",
                  "nvcc -cubin with the extension's flags; registers/thread | spill stores/loads (stack frame) | static shared memory | "
                  "tensor-core SASS (HMMA/HGMMA) | DMMA | async copies (LDGSTS = cp.async, UTMALDG = TMA).", ""]
        for arch in archs:
            lines += [f"### sm_{arch}", "", "| file | kernel | regs | spill (stack) | smem | HMMA | DMMA | LDGSTS/TMA |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in sorted((r for r in cuda_rows if r["arch"] == arch), key=lambda r: (r["source"], r["kernel"])):
                if not r["ok"]:
                    lines.append(f"| {r['source']} | {r['kernel']} | **FAIL** {r['error']} | | | | | |")
                    continue
                spill = f"**{r['spill_stores']}/{r['spill_loads']}**" if r["spill_stores"] or r["spill_loads"] else "0"
                stack = f" ({r['stack']})" if r["stack"] else ""
                lines.append(f"| {r['source']} | `{r['kernel'][:110]}` | {r['regs']} | {spill}{stack} | {r['smem']} | "
                             f"{r['hmma']} | {r['dmma']} | {r['cp_async']}/{r['tma']} |")
            lines.append("")
    lines += ["## Refused by the ops (not specs)", ""] + [f"- {n}" for n in meta["notes"]] if meta["notes"] else []
    return "\n".join(lines).rstrip() + "\n"


# ======================================================================= main
def build(archs=ARCHS, jobs=2, cache: Path | None = None, kernels: str | None = None, cuda=True,
          case_names=None, ci=False, cached_only=False) -> dict:
    """Discover, dedupe, compile: everything the report and the tests need."""
    import triton
    start = time.perf_counter()
    launches, notes = run_discovery(case_names)
    t_discover = time.perf_counter() - start
    fingerprint = source_fingerprint(launches)
    if ci:
        launches = ci_selection(launches)
    if kernels:
        launches = [l for l in launches if re.search(kernels, l["kernel"])]
    keys = {}
    for launch in launches:
        spec = spec_of(launch)
        canon = _canonical(spec)
        if canon not in keys:
            keys[canon] = compile_key(spec, "")
        launch["_key"] = keys[canon]
    unique = {l["_key"]: spec_of(l) for l in launches}
    work = [(key, spec, arch) for arch, only in map(_arch_scope, archs) for key, spec in unique.items()
            if only is None or re.search(only, f"{spec['kernel']} {_data_type(spec['signature'])}")]
    t0 = time.perf_counter()
    rows = compile_all(work, jobs, cache, cached_only)
    done = {(r["key"], r["arch"]) for r in rows}
    incomplete = sorted({spec["kernel"] for key, spec, arch in work if (key, arch) not in done})
    t_compile = time.perf_counter() - t0
    cuda_rows = []
    if cuda:
        sources = sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))
        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            jobs_ = [(s, a) for a, _ in map(_arch_scope, archs) for s in sources]
            for got in pool.map(lambda job: _cached_cuda(job, cache, cached_only), jobs_):
                cuda_rows += got
    return dict(triton=triton.__version__, archs=list(archs), launches=launches, notes=notes, rows=rows,
                cuda_rows=cuda_rows, fingerprint=fingerprint, kernels=kernels, ci=ci, incomplete=incomplete,
                seconds=dict(discover=round(t_discover, 1), compile=round(t_compile, 1),
                             total=round(time.perf_counter() - start, 1)))


def _arch_scope(arch: str) -> tuple[str, str | None]:
    """"80" -> ("80", None); "80:conv" -> ("80", "conv"): that arch only for the specs whose
    "<kernel> <data type>" (e.g. "slim_conv2d_fwd_kernel bf16") matches the regex."""
    name, _, only = arch.partition(":")
    return name, only or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m restorenet.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(ARCHS), help="comma-separated: 90a, 80 (default both); "
                        "ARCH:REGEX compiles that arch for the kernels matching REGEX only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--cache", type=Path, help="directory keeping one result per full compile key")
    parser.add_argument("--kernels", help="regex on kernel names: compile only those")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    parser.add_argument("--ci", action="store_true", help="compile only ci_selection(): per kernel, dtype "
                        "and code path the register-hungriest launch (what tests/kernels runs)")
    parser.add_argument("--write", type=Path, help="write the markdown report there")
    parser.add_argument("--json", type=Path, help="write every row as JSON there")
    parser.add_argument("--check", action="store_true", help="exit 1 on any compile failure, spill, "
                        "16-bit/tf32 dot without tensor cores, 16-bit GEMM without async copies, "
                        "shared memory over the limit")
    parser.add_argument("--cached-only", action="store_true", help="compile nothing: report what --cache holds "
                        "and name the kernels with specs left uncompiled")
    parser.add_argument("--discover-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    case_names = json.loads(args.cases) if args.cases else None
    if args.discover_only:
        launches, notes = discover(case_names)
        print(json.dumps(dict(launches=launches, notes=notes)))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a, _ in map(_arch_scope, archs):
        if a not in SM_LIMITS:
            parser.error(f"--arch must be among {list(SM_LIMITS)}, got {a!r}")
    out = build(archs, args.jobs, args.cache, args.kernels, cuda=not args.no_cuda, case_names=case_names,
                ci=args.ci, cached_only=args.cached_only)
    meta = dict(fingerprint=out["fingerprint"], launches=len(out["launches"]), notes=out["notes"],
                kernels=args.kernels, ci=args.ci, incomplete=out["incomplete"],
                command=f"python -m restorenet.aot --write {args.write}" if args.write else COMMAND)
    text = render(out["launches"], out["rows"], out["cuda_rows"], [a for a, _ in map(_arch_scope, archs)], meta)
    if args.write:
        args.write.write_text(text)
    else:
        sys.stdout.write(text)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    bad = [(r["kernel"], r["arch"], f) for r in out["rows"] for f in findings(r)]
    cuda_bad = [(r["source"], r["kernel"], r["arch"]) for r in out["cuda_rows"]
                if not r["ok"] or r["spill_stores"] or r["spill_loads"]]
    print(f"[aot] Triton {out['triton']}: {len(out['launches'])} launches, "
          f"{len({l['_key'] for l in out['launches']})} unique specs, {len(out['rows'])} compiles, "
          f"{len(bad)} findings, CUDA {len(cuda_bad)} findings; {out['seconds']}", file=sys.stderr)
    for b in bad + cuda_bad:
        print("[aot] finding:", *b, file=sys.stderr)
    return 1 if args.check and (bad or cuda_bad) else 0


if __name__ == "__main__":
    sys.exit(main())
