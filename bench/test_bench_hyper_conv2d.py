"""hyper_conv2d: HyperRes-sized layers, every way to compute them, fwd / bwd / fwd+bwd.

GPU: N=16 samples at mixed levels, 64 -> 64 channels, 3x3, padding 1, at 96x96
and 256x256, bf16 and fp32. CPU: N=4, 16 channels, 32x32 and 64x64, fp32, and
only the strategies that are meant to run there (no torch.compile, no triton).

Strategies (bench/strategies.py): reference, grouped, linearity, their
torch.compile versions, the triton/cuda backends, and the floor (one plain
conv with a shared kernel: what the layer costs if the kernel did not vary).
Each is checked against the float64 spec before it is timed.

Work counted per call: FLOPs of the layer, 2*N*Cout*Cin*kh*kw*Ho*Wo forward and
twice that backward (dx and the kernel gradient), whatever the strategy does
(linearity does twice the forward FLOPs, so its rate reads lower); bytes: the
compulsory traffic, each input read and each output written once.

A second test times a whole HyperRes training step (forward, backward, AdamW)
with each available backend.
"""
from __future__ import annotations

import pytest
import torch

from bench import _util, strategies
from bench._util import DEVICE, ON_GPU
from restorenet.registry import count_parameters

if ON_GPU:
    N, CHANNELS, SIZES, DTYPES = 16, 64, (96, 256), (torch.bfloat16, torch.float32)
else:
    N, CHANNELS, SIZES, DTYPES = 4, 16, (32, 64), (torch.float32,)
KERNEL, PADDING, STRIDE = 3, 1, 1
PASSES = ("fwd", "bwd", "fwd+bwd")
BASELINES = ("floor", "reference", "grouped")


def layer_work(size: int, dtype: torch.dtype, phase: str) -> tuple[int, int]:
    """(FLOPs, compulsory bytes) of one call of the layer in pass ``phase``."""
    e = torch.empty((), dtype=dtype).element_size()
    ho = (size + 2 * PADDING - KERNEL) // STRIDE + 1
    conv = _util.conv2d_flops(N, CHANNELS, CHANNELS, KERNEL, KERNEL, ho, ho)
    x = N * CHANNELS * size * size * e
    y = N * CHANNELS * ho * ho * e
    params = 2 * (CHANNELS * CHANNELS * KERNEL * KERNEL + CHANNELS) * e  # W, B and biases
    level = N * 4
    fwd = (conv, x + y + params + level)
    bwd = (2 * conv, y + x + params + level + x + params)  # read dy, x, params; write dx, dparams
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[phase]


def _input_sets(size, dtype, requires_grad):
    _, nbytes = layer_work(size, dtype, "fwd")
    count = _util.input_sets_needed(nbytes)
    return [strategies.layer_inputs(N, CHANNELS, CHANNELS, size, dtype, DEVICE, KERNEL,
                                    requires_grad=requires_grad, seed=i) for i in range(count)]


def _args(t):
    return [t[k] for k in strategies.ARG_ORDER] + [STRIDE, PADDING]


def _grad_inputs(t):
    return [t[k] for k in strategies.GRAD_ARGS]


def make_call(fn, phase: str, size: int, dtype: torch.dtype):
    """The callable to time for ``phase``, cycling over enough input sets to
    defeat the L2 cache on GPU."""
    return _util.phase_call(fn, phase, lambda grad: _input_sets(size, dtype, requires_grad=grad),
                            _args, _grad_inputs)


@pytest.mark.parametrize("strategy", list(strategies.STRATEGIES))
@pytest.mark.parametrize("phase", PASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_util.dtype_name)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}px")
def test_hyper_conv2d(benchmark, size, dtype, phase, strategy):
    reason = strategies.unavailable_reason(strategy, DEVICE)
    if reason:
        pytest.skip(reason)
    spec = strategies.STRATEGIES[strategy]
    if spec.exact:  # a wrong composition must not become a baseline
        strategies.verify(strategy, str(DEVICE))
    fn = strategies.get(strategy)
    flops, nbytes = layer_work(size, dtype, phase)
    call = make_call(fn, phase, size, dtype)
    name = _util.dtype_name(dtype)
    _util.run_benchmark(
        benchmark, call, strategy=strategy, baselines=[b for b in BASELINES if b != strategy],
        group=f"hyper_conv2d {phase} {name} N{N} C{CHANNELS} {size}x{size}",
        series=f"hyper_conv2d {phase} {name}", size=size,
        flops=flops, nbytes=nbytes, dtype=dtype, shape=(N, CHANNELS, size, size),
        **{"pass": phase, "description": spec.description,
           "compile": "torch.compile(dynamic=False, fullgraph=True)" if spec.compiled else None})


# ------------------------------------------------------------ whole training step
if ON_GPU:
    # Paper HyperRes (16 ResBlockMeta, width 64); 4 levels x 4 crops of 192^2,
    # so the main body runs at 96x96 like the layer benchmark above.
    STEP_MODEL, STEP_BATCH, STEP_CROP, STEP_DTYPES = {}, 16, 192, (torch.bfloat16, torch.float32)
else:
    STEP_MODEL, STEP_BATCH, STEP_CROP, STEP_DTYPES = dict(width=16, num_blocks=2), 4, 32, (torch.float32,)


def build_hyperres(**cfg):
    """The registered HyperRes, or a skip saying why it cannot be built yet."""
    import restorenet

    if "hyperres" not in restorenet.list_models():
        pytest.skip("model 'hyperres' is not registered (restorenet/models/hyperres.py not written yet)")
    return restorenet.create_model("hyperres", **cfg)


def hyperres_train_step(model, x, levels, target, dtype):
    return _util.training_step(lambda: model(x, levels), lambda out: (out.float() - target).abs().mean(),
                               model.parameters(), dtype)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("dtype", STEP_DTYPES, ids=_util.dtype_name)
def test_hyperres_train_step(benchmark, dtype, backend):
    from restorenet.ops import available_backends, use_backend

    if backend == "triton" and not ON_GPU:
        pytest.skip("triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): not benchmarked")
    if backend not in available_backends(DEVICE, "hyper_conv2d_forward"):
        pytest.skip(f"restorenet backend {backend!r} is not available on {DEVICE.type} here")
    model = build_hyperres(**STEP_MODEL).to(DEVICE).train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(STEP_BATCH, 3, STEP_CROP, STEP_CROP, generator=g).to(DEVICE)
    target = torch.rand(STEP_BATCH, 3, STEP_CROP, STEP_CROP, generator=g).to(DEVICE)
    levels = torch.tensor([strategies.HYPERRES_LEVELS[i % 4] for i in range(STEP_BATCH)], device=DEVICE)
    step = hyperres_train_step(model, x, levels, target, dtype)
    with use_backend(backend), _util.skip_on_oom(f"hyperres training step ({backend})"):
        flops, flop_note = _util.count_flops(step)
        _util.run_benchmark(
            benchmark, step, strategy=backend, baselines=["reference"] if backend != "reference" else [],
            group=f"hyperres train step {_util.dtype_name(dtype)} B{STEP_BATCH} {STEP_CROP}px",
            flops=flops, dtype=dtype, shape=(STEP_BATCH, 3, STEP_CROP, STEP_CROP),
            model_config=STEP_MODEL or "paper", params=count_parameters(model),
            flops_note=flop_note or "executed conv/matmul FLOPs (torch.utils.flop_counter formulas) of one step",
            **{"pass": "train step (fwd+bwd+AdamW)"})
