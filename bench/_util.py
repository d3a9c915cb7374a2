"""Shared benchmark machinery: device choice, timing, work counts, ceilings.

Every benchmark goes through :func:`run_benchmark`, which

* wraps the callable so that it synchronises the device *inside* the timed
  function (CUDA work is asynchronous; a host timer around an unsynchronised
  launch measures the launch, not the work);
* warms up (compilation, autotuning, cuDNN algorithm search stay out of the
  numbers), then picks the number of rounds from the warm call's time;
* measures peak device memory in one extra, untimed call (CUDA only: the CPU
  allocator keeps no statistics, so on CPU peak memory is reported as None);
* writes the derived numbers into ``benchmark.extra_info``.

``extra_info`` keys (the report, ``restorenet.bench_report``, reads these):

    strategy            name of the implementation being timed
    baselines           strategies of the same group to compare with; the
                        first is "the" baseline (conftest writes the ratios)
    time_vs_baseline    mean time / the baseline's mean time (>1: slower)
    time_vs             {baseline: ratio} for every name in ``baselines``
    series, size        benchmarks of one series at several sizes -> time vs size plot
    K                   a count such as AdaRevD's columns -> memory vs K plot
    width_mix           a label for a mix of widths -> time vs width mix plot
    flops, TFLOPs       work per call and the rate at the mean time
    bytes, GBps         compulsory device-memory traffic per call and its rate
    peak_mem_bytes      max_memory_allocated during one call (CUDA), else None
    peak_mem_above_start_bytes   the same minus what was allocated before the call
    ceiling, fraction_of_ceiling the ceiling the rate is compared with
    device, dtype, shape, pass
"""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib.metadata
import math
import os
import shutil
import subprocess
import time
import traceback
from typing import Any, Callable, Iterable, Optional, Sequence

import pytest
import torch

from restorenet.training.distributed import cpu_name

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

# CPU benchmarks run with BENCH_CPU_THREADS intra-op threads: 1 by default,
# "auto" keeps torch's choice. Why one: the CPU cases are tiny smoke tests, and
# on a shared machine threads that wait for a descheduled peer at every
# parallel region made them 10-50x slower (and their run time unpredictable).
# The count used is recorded in machine_info (restorenet.cpu_threads).
CPU_THREADS = os.environ.get("BENCH_CPU_THREADS", "1")
if not ON_GPU and CPU_THREADS != "auto":
    torch.set_num_threads(int(CPU_THREADS))

GPU_ONLY_REASON = "needs a CUDA device; this machine has none"
gpu_only = pytest.mark.skipif(not ON_GPU, reason=GPU_ONLY_REASON)

# Seconds of timed work to aim for per benchmark; the warm call's time decides
# how many rounds that is (at least MIN_ROUNDS). BENCH_TARGET_S overrides.
TARGET_S = float(os.environ.get("BENCH_TARGET_S", "0.3" if ON_GPU else "0.15"))
MIN_ROUNDS = 5 if ON_GPU else 3
MAX_ROUNDS = 200 if ON_GPU else 20
WARMUP_CALLS = 3 if ON_GPU else 1

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def autocast(dtype: torch.dtype):
    """Mixed precision in ``dtype`` on DEVICE; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=dtype)


def training_step(forward: Callable[[], Any], loss: Callable[[Any], torch.Tensor], params,
                  dtype: torch.dtype) -> Callable[[], None]:
    """One benchmarkable optimiser step: ``forward()`` under autocast(dtype),
    ``loss(out).backward()``, an AdamW step."""
    opt = torch.optim.AdamW(list(params), lr=1e-4)

    def step():
        with autocast(dtype):
            out = forward()
        loss(out).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device = DEVICE) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], Any], device: torch.device = DEVICE) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation: the function that gets timed."""

    def call() -> None:
        fn()
        synchronize(device)

    return call


def rotating(input_sets: Sequence[Any], fn: Callable[[Any], Any]) -> Callable[[], Any]:
    """A callable that runs ``fn`` on the next of ``input_sets`` each call, so that
    repeated calls do not find their inputs in the GPU's L2 cache."""
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(input_sets)
        return fn(input_sets[i])

    return call


def phase_call(fn: Callable[..., Any], phase: str, make_sets: Callable[[bool], Sequence[dict]],
               args: Callable[[dict], Sequence[Any]], grad_inputs: Callable[[dict], Sequence[Any]]):
    """The callable to time for ``phase`` ("fwd", "bwd" or "fwd+bwd") of ``fn(*args(t))``,
    rotating over ``make_sets(requires_grad)``. For "bwd" the forward graphs are built
    once, outside the timed region, and kept."""
    if phase == "fwd":
        def forward(t):
            with torch.no_grad():
                return fn(*args(t))

        return rotating(make_sets(False), forward)
    sets = make_sets(True)
    if phase == "fwd+bwd":
        for t in sets:
            t["dy"] = torch.randn_like(fn(*args(t)).detach())

        def train(t):
            return torch.autograd.grad(fn(*args(t)), grad_inputs(t), t["dy"], allow_unused=True)

        return rotating(sets, train)
    for t in sets:
        t["y"] = fn(*args(t))
        t["dy"] = torch.randn_like(t["y"].detach())

    def backward(t):
        return torch.autograd.grad(t["y"], grad_inputs(t), t["dy"], retain_graph=True, allow_unused=True)

    return rotating(sets, backward)


def input_sets_needed(bytes_per_set: float, device: torch.device = DEVICE, limit: int = 8) -> int:
    """How many distinct input sets to rotate through so that together they are
    at least 4x the L2 cache (1 on CPU, where we do not chase cache effects)."""
    if device.type != "cuda":
        return 1
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
    return max(1, min(limit, math.ceil(4 * l2 / max(bytes_per_set, 1))))


def device_name(device: torch.device = DEVICE) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}"


class skip_on_oom:
    """``with skip_on_oom("what"):`` turns a CUDA out-of-memory error into a
    skip that says what did not fit, after releasing the failed case's tensors
    (the traceback's frames would otherwise keep them alive)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if typ is None or not issubclass(typ, torch.cuda.OutOfMemoryError):
            return False
        first_line = str(exc).splitlines()[0] if str(exc) else "out of memory"
        traceback.clear_frames(tb)
        del exc, tb
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(DEVICE).total_memory / 2**30
        pytest.skip(f"{self.what} does not fit in {total:.0f} GiB: {first_line}")


# --------------------------------------------------------------------- ceilings
def _time_cuda(fn: Callable[[], Any], warmup: int = 3, reps: int = 10) -> float:
    """Mean seconds of ``fn`` over ``reps`` calls timed with CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


@functools.lru_cache(maxsize=None)
def device_ceilings() -> dict:
    """Measured once per session on a GPU: device copy bandwidth and matmul rates.

    * ``copy_GBps``: a 1 GiB device-to-device copy, counting bytes read + written;
    * ``bf16_matmul_TFLOPs``, ``tf32_matmul_TFLOPs``, ``fp32_matmul_TFLOPs``:
      8192^3 products on random data.

    Empty on CPU: we do not measure CPU ceilings.
    """
    if not ON_GPU:
        return {}
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    out: dict[str, Any] = {"measured_on": device_name()}
    src = torch.rand(2**28, device=DEVICE, generator=gen)  # 1 GiB of fp32
    dst = torch.empty_like(src)
    seconds = _time_cuda(functools.partial(dst.copy_, src))
    out["copy_GBps"] = 2 * src.numel() * src.element_size() / seconds / 1e9
    del src, dst
    n = 8192
    flops = 2 * n**3
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, tf32 in (("bf16_matmul_TFLOPs", torch.bfloat16, False),
                                 ("tf32_matmul_TFLOPs", torch.float32, True),
                                 ("fp32_matmul_TFLOPs", torch.float32, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=gen)
            b = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=gen)
            out[key] = flops / _time_cuda(functools.partial(torch.matmul, a, b)) / 1e12
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    torch.cuda.empty_cache()
    return out


def compute_ceiling(dtype: Optional[torch.dtype]) -> tuple[Optional[str], Optional[float]]:
    """(name, TFLOP/s) of the matmul rate that bounds work in ``dtype``.

    fp32 convolutions run on TF32 tensor cores when cuDNN is allowed to
    (``torch.backends.cudnn.allow_tf32``, on by default), so their ceiling is
    the TF32 rate; otherwise the plain fp32 one.
    """
    ceil = device_ceilings()
    if not ceil or dtype is None:
        return None, None
    if dtype in (torch.bfloat16, torch.float16):
        key = "bf16_matmul_TFLOPs"
    elif dtype == torch.float32:
        key = "tf32_matmul_TFLOPs" if torch.backends.cudnn.allow_tf32 else "fp32_matmul_TFLOPs"
    else:
        return None, None
    return key, ceil.get(key)


def fraction_of_ceiling(flops: Optional[float], nbytes: Optional[float], seconds: float,
                        dtype: Optional[torch.dtype]) -> tuple[Optional[str], Optional[float]]:
    """Achieved rate over the roofline bound for this much work and traffic.

    With both counts: attainable = min(peak FLOP/s, intensity * copy bandwidth),
    fraction = (flops / seconds) / attainable. With bytes only: fraction of the
    copy bandwidth. None where no ceiling was measured (CPU).
    """
    ceil = device_ceilings()
    if not ceil or seconds <= 0:
        return None, None
    bw = ceil["copy_GBps"] * 1e9
    key, peak_tflops = compute_ceiling(dtype)
    if flops and peak_tflops:
        peak = peak_tflops * 1e12
        if nbytes:
            attainable = min(peak, flops / nbytes * bw)
            name = f"roofline({key}, copy_GBps)"
        else:
            attainable, name = peak, key
        return name, flops / seconds / attainable
    if nbytes:
        return "copy_GBps", nbytes / seconds / bw
    return None, None


# --------------------------------------------------------------- environment
def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> Optional[str]:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """Versions and hardware, written into the JSON's machine_info."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info = {
        "device": device_name(),
        "device_type": DEVICE.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "triton": _version("triton"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "cpu_threads": torch.get_num_threads(),
        "commit": _run(["git", "-C", repo, "describe", "--always", "--dirty", "--abbrev=12"]),
        "driver": None,
    }
    if ON_GPU:
        props = torch.cuda.get_device_properties(DEVICE)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        info["total_memory_bytes"] = props.total_memory
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = smi.splitlines()[0].strip() if smi else None
    try:
        from restorenet.ops import available_backends

        info["restorenet_backends"] = available_backends(DEVICE)
    except Exception as exc:  # report, do not break the session over it
        info["restorenet_backends"] = f"unavailable: {exc}"
    info["ceilings"] = device_ceilings()
    return info


# ------------------------------------------------------------------- running
def _peak_memory(call: Callable[[], None]) -> tuple[Optional[int], Optional[int]]:
    if not ON_GPU:
        return None, None
    synchronize()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    start = torch.cuda.memory_allocated(DEVICE)
    call()
    peak = torch.cuda.max_memory_allocated(DEVICE)
    return peak, peak - start


def run_benchmark(benchmark, fn: Callable[[], Any], *, strategy: str, group: str,
                  baselines: Iterable[str] = (), flops: Optional[float] = None,
                  nbytes: Optional[float] = None, dtype: Optional[torch.dtype] = None,
                  shape: Any = None, series: Optional[str] = None, size: Any = None,
                  rounds: Optional[int] = None, **extra) -> None:
    """Time ``fn`` (synchronised inside), then fill ``benchmark.extra_info``.

    ``flops``/``nbytes`` are the work of one call of ``fn``. ``rounds`` forces a
    round count; by default it comes from the warm call's time and TARGET_S.
    """
    benchmark.group = group
    call = synced(fn)
    for _ in range(WARMUP_CALLS - 1):
        call()
    t0 = time.perf_counter()
    call()
    warm_s = time.perf_counter() - t0
    if rounds is None:
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TARGET_S / max(warm_s, 1e-6))))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    peak, peak_above = _peak_memory(call)

    info = benchmark.extra_info
    info.update(strategy=strategy, baselines=list(baselines), device=device_name(),
                dtype=dtype_name(dtype) if dtype is not None else None,
                shape=list(shape) if isinstance(shape, (tuple, list)) else shape,
                flops=flops, bytes=nbytes, peak_mem_bytes=peak,
                peak_mem_above_start_bytes=peak_above)
    if not ON_GPU:
        info["peak_mem_note"] = "not measured: the CPU allocator keeps no peak statistics"
    if series is not None:
        info["series"], info["size"] = series, size
    info.update(extra)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, untimed
        return
    mean = stats.stats.mean
    info["TFLOPs"] = flops / mean / 1e12 if flops else None
    info["GBps"] = nbytes / mean / 1e9 if nbytes else None
    info["ceiling"], info["fraction_of_ceiling"] = fraction_of_ceiling(flops, nbytes, mean, dtype)


# ------------------------------------------------------------------ FLOP count
def conv2d_flops(n: int, cin: int, cout: int, kh: int, kw: int, ho: int, wo: int) -> int:
    """Multiply-adds x 2 of one convolution: 2 * N * Cout * Cin * kh * kw * Ho * Wo."""
    return 2 * n * cout * cin * kh * kw * ho * wo


@functools.lru_cache(maxsize=None)
def _register_restorenet_flop_formulas() -> None:
    """Teach FlopCounterMode the restorenet custom ops: it cannot see inside them.

    hyper_conv2d forward = one convolution per sample; its backward = one conv
    for dx (if wanted) plus one for the kernel gradients (if any is wanted).
    """
    from torch.utils.flop_counter import conv_flop_count, register_flop_formula

    import restorenet.ops  # noqa: F401  (registers torch.ops.restorenet.*)

    ops = torch.ops.restorenet

    def forward(x_shape, level_shape, w_shape, *args, out_shape=None, **kwargs):
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    def backward(grad_shape, x_shape, level_shape, w_shape, *args, out_shape=None, **kwargs):
        needs = args[-1]
        one = conv_flop_count(x_shape, w_shape, grad_shape, transposed=False)
        return one * (int(bool(needs[0])) + int(any(needs[1:])))

    for name, formula in (("hyper_conv2d", forward), ("hyper_conv2d_backward", backward)):
        if hasattr(ops, name):
            try:
                register_flop_formula(getattr(ops, name))(formula)
            except RuntimeError:  # someone registered one already: theirs counts
                pass


def count_flops(fn: Callable[[], Any]) -> tuple[Optional[int], Optional[str]]:
    """(FLOPs, None) of one call of ``fn``: the convolutions and matrix products
    actually executed (recomputation included), counted with the formulas of
    torch.utils.flop_counter; or (None, why) if counting fails.

    A bare dispatch mode rather than FlopCounterMode: the latter's module hooks
    break models that call autograd.grad inside their own backward (AdaRevD).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    try:
        _register_restorenet_flop_formulas()
        with Counter() as counter:
            fn()
        synchronize()
        return counter.total or None, None
    except Exception as exc:  # the timing is still valid without a FLOP count
        return None, f"FLOP count failed: {type(exc).__name__}: {exc}"


# ------------------------------------------------------- untimed measurements
def measure_seconds(fn: Callable[[], Any], reps: Optional[int] = None) -> float:
    """Mean seconds of one call of ``fn`` outside pytest-benchmark (for derived
    rows such as an ideal computed from a measured rate): warm-up calls, then
    CUDA events on GPU, ``perf_counter`` around synchronised calls on CPU."""
    if ON_GPU:
        return _time_cuda(fn, warmup=WARMUP_CALLS, reps=reps or 20)
    call = synced(fn)
    for _ in range(WARMUP_CALLS):
        call()
    reps = reps or MIN_ROUNDS
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - t0) / reps


def slim_conv2d_flops(in_widths: Sequence[int], out_widths: Sequence[int], kh: int, kw: int,
                      ho: int, wo: int) -> int:
    """Active FLOPs of one slim_conv2d forward: 2 * kh*kw*Ho*Wo * sum_n in[n]*out[n]."""
    return 2 * kh * kw * ho * wo * sum(int(i) * int(o) for i, o in zip(in_widths, out_widths))
