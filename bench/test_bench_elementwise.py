"""Memory-bound fused ops (AdaRevD's recompute loop, NAFBlock's element-wise
stages) against what a user would otherwise write.

Ops and passes:

    layer_norm2d       fwd, fwd+bwd    NAFNet's LayerNorm2d (stats over channels, per pixel)
    simple_gate        fwd, fwd+bwd    x[:, :C/2] * x[:, C/2:]
    rev_coupling       fwd, fwd+bwd    c' = a * c + f (per-channel alpha)
    rev_coupling_invert  step          c = (c' - f)/a, dc = a dc', da = sum dc' c (one backward step)
    gated_sca          fwd, fwd+bwd    SCA(SG(x)) = t * conv1x1(avgpool(t)), t = SG(x) (NAFBlock)
    scaled_residual    fwd, fwd+bwd    inp + beta * z (per-channel beta)

Strategies: ``eager`` (the composition of PyTorch ops a model would write, e.g.
NAFNet's mean/var LayerNorm2d), ``layer_norm_permuted`` (LayerNorm2d as
``F.layer_norm`` over a channels-last view: one fused PyTorch kernel, copies
for NCHW input), ``compiled`` (``torch.compile`` of eager, GPU only), the
``reference`` backend (the spec) and the fused backends ``triton`` / ``cuda``.

Bytes (``extra_info["bytes"]``, GB/s, fraction of the measured copy bandwidth)
are the compulsory traffic: every input tensor read once and every output
written once, per-channel vectors and per-pixel statistics included; issue #7's
target is >= 80% of the copy bandwidth for the fused kernels.

GPU: N=8, C=64, 256x256 (33.5 M elements per tensor), bf16 in NCHW and
channels_last, fp32 in NCHW. CPU: a 2x8x24x24 smoke test of the harness in fp32 (no numbers
worth reading; triton runs only in the interpreter there and is not timed).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

from bench import _util
from bench._util import DEVICE, ON_GPU
from restorenet.ops import (channel_attention, layer_norm2d, rev_coupling_forward, rev_coupling_invert,
                            scaled_residual, simple_gate)
from restorenet.ops._backend import available_backends

if ON_GPU:
    N, C, SIZE, DTYPES = 8, 64, 256, (torch.bfloat16, torch.float32)
else:
    N, C, SIZE, DTYPES = 2, 8, 24, (torch.float32,)
LAYOUTS = ("nchw", "channels_last")
EPS = 1e-6

# op -> the restorenet._C function that makes its cuda backend available
CUDA_SYMBOLS = {"layer_norm2d": "layer_norm2d_forward", "simple_gate": "simple_gate_forward",
                "rev_coupling": "rev_coupling_forward", "rev_coupling_invert": "rev_coupling_invert",
                "gated_sca": "channel_attention_apply", "scaled_residual": "scaled_residual_forward"}
BACKENDS = ("reference", "triton", "cuda")


# ------------------------------------------------------------ compositions
def layer_norm2d_eager(x, weight, bias):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return (x - mu) * torch.rsqrt(var + EPS) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def layer_norm2d_permuted(x, weight, bias):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight.to(x.dtype), bias.to(x.dtype), EPS)
    return y.permute(0, 3, 1, 2)


def simple_gate_eager(x):
    a, b = x.chunk(2, dim=1)
    return a * b


def rev_coupling_eager(c, f, alpha):
    return alpha.to(c.dtype).view(1, -1, 1, 1) * c + f


def rev_coupling_invert_eager(c_new, f, alpha, grad_c_new):
    a = alpha.to(c_new.dtype).view(1, -1, 1, 1)
    c = (c_new - f) / a
    return c, a * grad_c_new, (grad_c_new * c).float().sum((0, 2, 3))


def gated_sca_eager(x, weight, bias):
    t = simple_gate_eager(x)
    s = F.conv2d(F.adaptive_avg_pool2d(t, 1), weight.to(t.dtype)[:, :, None, None], bias.to(t.dtype))
    return t * s


def scaled_residual_eager(inp, beta, z):
    return inp + beta.to(inp.dtype).view(1, -1, 1, 1) * z


EAGER = {"layer_norm2d": layer_norm2d_eager, "gated_sca": gated_sca_eager, "scaled_residual": scaled_residual_eager, "simple_gate": simple_gate_eager,
         "rev_coupling": rev_coupling_eager, "rev_coupling_invert": rev_coupling_invert_eager}
FUSED = {"layer_norm2d": lambda b: functools.partial(_layer_norm2d_backend, backend=b),
         "gated_sca": lambda b: functools.partial(channel_attention, gated=True, backend=b),
         "scaled_residual": lambda b: functools.partial(scaled_residual, backend=b),
         "simple_gate": lambda b: functools.partial(simple_gate, backend=b),
         "rev_coupling": lambda b: functools.partial(rev_coupling_forward, backend=b),
         "rev_coupling_invert": lambda b: functools.partial(rev_coupling_invert, backend=b)}


def _layer_norm2d_backend(x, weight, bias, *, backend):
    return layer_norm2d(x, weight, bias, EPS, backend=backend)


@functools.lru_cache(maxsize=None)
def _compiled(op: str) -> Callable:
    return torch.compile(EAGER[op], dynamic=False, fullgraph=True)


def strategy_fn(op: str, strategy: str) -> Callable:
    if strategy == "eager":
        return EAGER[op]
    if strategy == "layer_norm_permuted":
        return layer_norm2d_permuted
    if strategy == "compiled":
        return _compiled(op)
    return FUSED[op](strategy)


def unavailable_reason(op: str, strategy: str) -> Optional[str]:
    if strategy == "compiled" and not ON_GPU:
        return "torch.compile benchmarks run on GPU only (inductor compiles slowly on CPU)"
    if strategy == "triton" and not ON_GPU:
        return "triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): not benchmarked"
    if strategy in BACKENDS and strategy not in available_backends(DEVICE, CUDA_SYMBOLS[op]):
        return f"restorenet backend {strategy!r} is not available for {op} on {DEVICE.type} here"
    return None


# ------------------------------------------------------------------- inputs
def _activation(channels: int, dtype, layout: str, requires_grad: bool = False) -> torch.Tensor:
    t = torch.randn(N, channels, SIZE, SIZE, device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def make_inputs(op: str, dtype, layout: str, requires_grad: bool) -> dict:
    if op == "layer_norm2d":
        w = (1 + 0.1 * torch.randn(C, device=DEVICE)).requires_grad_(requires_grad)
        b = (0.1 * torch.randn(C, device=DEVICE)).requires_grad_(requires_grad)
        return {"args": [_activation(C, dtype, layout, requires_grad), w, b]}
    if op == "simple_gate":
        return {"args": [_activation(2 * C, dtype, layout, requires_grad)]}
    if op == "gated_sca":
        w = (torch.randn(C, C, device=DEVICE) / C ** 0.5).requires_grad_(requires_grad)
        b = (0.1 * torch.randn(C, device=DEVICE)).requires_grad_(requires_grad)
        return {"args": [_activation(2 * C, dtype, layout, requires_grad), w, b]}
    if op == "scaled_residual":
        beta = (0.1 * torch.randn(C, device=DEVICE)).requires_grad_(requires_grad)
        return {"args": [_activation(C, dtype, layout, requires_grad), beta,
                         _activation(C, dtype, layout, requires_grad)]}
    alpha = (0.25 + 0.75 * torch.rand(C, device=DEVICE)).requires_grad_(requires_grad and op == "rev_coupling")
    if op == "rev_coupling":
        return {"args": [_activation(C, dtype, layout, requires_grad), _activation(C, dtype, layout, requires_grad),
                         alpha]}
    return {"args": [_activation(C, dtype, layout), _activation(C, dtype, layout), alpha,
                     _activation(C, dtype, layout)]}


def compulsory_bytes(op: str, phase: str, dtype) -> int:
    """Each tensor read once, each output written once (elements x element size)."""
    e, pixels = torch.finfo(dtype).bits // 8, N * SIZE * SIZE
    full, vec = e * N * C * SIZE * SIZE, 4 * C
    stats = 2 * 4 * pixels  # layer_norm2d keeps mean and rstd per pixel, fp32
    per_pass = {
        ("layer_norm2d", "fwd"): 2 * full + 2 * vec + stats,
        ("layer_norm2d", "bwd"): 3 * full + vec + stats + 2 * vec,  # read dy, x, stats; write dx, dw, db
        ("simple_gate", "fwd"): 2 * full + full,                    # read 2C channels, write C
        ("simple_gate", "bwd"): 2 * full + 2 * full + full,         # read x and dy, write dx
        ("rev_coupling", "fwd"): 3 * full + vec,                    # read c, f; write c'
        ("rev_coupling", "bwd"): 3 * full + 2 * vec,                # read dc', c; write dc (df = dc')
        ("rev_coupling_invert", "step"): 5 * full + 2 * vec,        # read c', f, dc'; write c, dc
        # gated SCA: the pool needs all of SG(x) before any output, so the kernels read x
        # twice (pool, then apply); compulsory is once: read 2C channels, write C.
        ("gated_sca", "fwd"): 2 * full + full,
        ("gated_sca", "bwd"): 2 * full + full + 2 * full,           # read x, du; write dx
        ("scaled_residual", "fwd"): 3 * full + vec,                 # read inp, z; write y
        ("scaled_residual", "bwd"): 3 * full + 2 * vec,             # read dy, z; write dz (d_inp = dy)
    }
    if phase == "fwd+bwd":
        return per_pass[(op, "fwd")] + per_pass[(op, "bwd")]
    return per_pass[(op, phase)]


def make_call(op: str, strategy: str, phase: str, dtype, layout: str) -> Callable[[], object]:
    fn = strategy_fn(op, strategy)
    sets_needed = _util.input_sets_needed(compulsory_bytes(op, "fwd" if phase != "step" else phase, dtype))
    if phase == "step":
        sets = [make_inputs(op, dtype, layout, False) for _ in range(sets_needed)]
        return _util.rotating(sets, lambda t: fn(*t["args"]))

    def make_sets(requires_grad: bool):
        return [make_inputs(op, dtype, layout, requires_grad) for _ in range(sets_needed)]

    def grad_inputs(t):
        return [a for a in t["args"] if a.requires_grad]

    return _util.phase_call(fn, phase, make_sets, lambda t: t["args"], grad_inputs)


# -------------------------------------------------------------------- checks
# Largest |strategy - float64 spec| / max|spec| accepted before a strategy is timed:
# a wrong kernel or composition must not produce a number.
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def check_against_spec(op: str, strategy: str, dtype, layout: str) -> None:
    """The strategy's outputs on one input set match the reference op run in float64."""
    torch.manual_seed(1)
    t = make_inputs(op, dtype, layout, False)
    got = strategy_fn(op, strategy)(*t["args"])
    spec_args = [a.double() for a in t["args"]]
    want = FUSED[op]("reference")(*spec_args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        err = (g.double() - w).abs().max().item() / max(w.abs().max().item(), 1e-12)
        assert err <= CHECK_TOL[dtype], f"{op} {strategy} {layout}: relative error {err:.3g} vs the spec"


# -------------------------------------------------------------------- cases
STRATEGIES = ("eager", "compiled", "reference", "triton", "cuda")
CASES = [(op, phase, s) for op in ("layer_norm2d", "simple_gate", "rev_coupling", "gated_sca", "scaled_residual")
         for phase in ("fwd", "fwd+bwd")
         for s in STRATEGIES + (("layer_norm_permuted",) if op == "layer_norm2d" else ())]
CASES += [("rev_coupling_invert", "step", s) for s in STRATEGIES]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_util.dtype_name)
@pytest.mark.parametrize("op,phase,strategy", CASES, ids=["-".join(c) for c in CASES])
def test_elementwise(benchmark, op, phase, dtype, layout, strategy):
    reason = unavailable_reason(op, strategy)
    if reason:
        pytest.skip(reason)
    if ON_GPU and dtype == torch.float32 and layout == "channels_last":
        pytest.skip("fp32 runs in NCHW only: keeps the GPU run (one torch.compile per case) short")
    check_against_spec(op, strategy, dtype, layout)
    call = make_call(op, strategy, phase, dtype, layout)
    shape = (N, 2 * C if op in ("simple_gate", "gated_sca") else C, SIZE, SIZE)
    name = _util.dtype_name(dtype)
    _util.run_benchmark(
        benchmark, call, strategy=strategy,
        baselines=[b for b in ("eager", "compiled", "layer_norm_permuted") if b != strategy
                   and (b != "layer_norm_permuted" or op == "layer_norm2d") and unavailable_reason(op, b) is None],
        group=f"elementwise {op} {phase} {name} {layout} N{N} C{C} {SIZE}x{SIZE}",
        nbytes=compulsory_bytes(op, phase, dtype), dtype=dtype, shape=shape,
        **{"pass": phase, "layout": layout,
           "bytes_note": "compulsory traffic: each input read once, each output written once"})
