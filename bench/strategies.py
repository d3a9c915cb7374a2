"""Ways to compute a HyperRes layer, the per-sample generated-kernel convolution

    y[n] = conv2d(x[n], c_n * W + B, c_n * b + b_base)

that the benchmarks compare. The compositions of stock PyTorch ops live here,
in one place, and :func:`verify` checks each against the float64 spec
(``hyper_conv2d_reference``) before anything is timed, so that a wrong baseline
fails loudly instead of producing a flattering ratio.

Every strategy has the signature of ``hyper_conv2d``'s tensor arguments:
``f(x, level, weight, weight_base, bias, bias_base, stride, padding) -> y``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from restorenet.ops import available_backends, hyper_conv2d, hyper_conv2d_reference


# ------------------------------------------------------------- compositions
def batch_as_groups(x: Tensor, level: Tensor, weight: Tensor, weight_base: Tensor,
                    bias: Optional[Tensor], bias_base: Optional[Tensor],
                    stride: int = 1, padding: int = 0) -> Tensor:
    """Materialise the N kernels, then one grouped convolution with the batch
    folded into the channels: x [N,Cin,H,W] -> [1, N*Cin, H, W], kernels
    [N*Cout, Cin, kh, kw], groups = N. Writes N kernels (and, in backward, N
    kernel gradients) to memory."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    c = level.to(weight.dtype)
    kernels = c.view(n, 1, 1, 1, 1) * weight + weight_base  # [N, Cout, Cin, kh, kw]
    b = _per_sample_bias(c, bias, bias_base, n, cout)
    y = F.conv2d(x.reshape(1, n * cin, h, w), kernels.reshape(n * cout, cin, *weight.shape[2:]),
                 None if b is None else b.reshape(n * cout), stride, padding, groups=n)
    return y.view(n, cout, *y.shape[2:])


def linearity(x: Tensor, level: Tensor, weight: Tensor, weight_base: Tensor,
              bias: Optional[Tensor], bias_base: Optional[Tensor],
              stride: int = 1, padding: int = 0) -> Tensor:
    """Convolution is linear in the kernel: conv(x, cW + B) = c conv(x, W) + conv(x, B).
    One shared-kernel convolution with [W; B] stacked on the output channels
    (twice the FLOPs of the layer), then y_n = c_n y_W + y_B + (c_n b + b_base)."""
    n = x.shape[0]
    cout = weight.shape[0]
    c = level.to(weight.dtype)
    both = F.conv2d(x, torch.cat([weight, weight_base]), None, stride, padding)
    y_w, y_b = both[:, :cout], both[:, cout:]
    y = c.view(n, 1, 1, 1) * y_w + y_b
    b = _per_sample_bias(c, bias, bias_base, n, cout)
    return y if b is None else y + b.view(n, cout, 1, 1)


def _per_sample_bias(c: Tensor, bias, bias_base, n: int, cout: int) -> Optional[Tensor]:
    if bias is None and bias_base is None:
        return None
    b = torch.zeros(n, cout, dtype=c.dtype, device=c.device)
    if bias is not None:
        b = b + c.view(n, 1) * bias
    if bias_base is not None:
        b = b + bias_base
    return b


def shared_kernel_floor(x: Tensor, level: Tensor, weight: Tensor, weight_base: Tensor,
                        bias: Optional[Tensor], bias_base: Optional[Tensor],
                        stride: int = 1, padding: int = 0) -> Tensor:
    """Not a hyper layer: one plain convolution with one shared kernel of the
    same shape. What the layer would cost if the kernel did not vary: the floor."""
    return F.conv2d(x, weight, bias, stride, padding)


def _backend(name: str) -> Callable[..., Tensor]:
    def run(x, level, weight, weight_base, bias, bias_base, stride=1, padding=0):
        return hyper_conv2d(x, level, weight, weight_base, bias, bias_base, stride, padding,
                            backend=name)

    run.__name__ = f"hyper_conv2d_{name}"
    return run


# ---------------------------------------------------------------- registry
@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[..., Tensor]
    description: str
    compiled: bool = False    # torch.compile of ``fn`` (GPU only: compiling on CPU is slow)
    backend: Optional[str] = None  # a restorenet backend that must be available
    exact: bool = True        # computes the hyper layer (the floor does not)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("reference", _backend("reference"),
             "restorenet backend 'reference': per-sample loop (the spec)", backend="reference"),
    Strategy("grouped", batch_as_groups, "materialised kernels, one grouped conv (groups=N)"),
    Strategy("linearity", linearity, "one conv with [W;B] stacked, combine c*y_W + y_B"),
    Strategy("compiled_grouped", batch_as_groups, "torch.compile(grouped)", compiled=True),
    Strategy("compiled_linearity", linearity, "torch.compile(linearity)", compiled=True),
    Strategy("floor", shared_kernel_floor, "plain F.conv2d, one shared kernel", exact=False),
    Strategy("triton", _backend("triton"), "restorenet backend 'triton'", backend="triton"),
    Strategy("cuda", _backend("cuda"), "restorenet backend 'cuda' (restorenet._C)", backend="cuda"),
)}


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why strategy ``name`` cannot be benchmarked on ``device`` (None: it can)."""
    s = STRATEGIES[name]
    if s.compiled and device.type != "cuda":
        return "torch.compile benchmarks run on GPU only (inductor compiles slowly on CPU)"
    if s.backend == "triton" and device.type != "cuda":
        return "triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): not benchmarked"
    if s.backend is not None and s.backend not in available_backends(device, "hyper_conv2d_forward"):
        return f"restorenet backend {s.backend!r} is not available on {device.type} here"
    return None


def _configure_dynamo() -> None:
    """Every (shape, dtype, grad mode) gets its own compiled graph; make sure
    dynamo never silently falls back to eager after too many recompiles."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                "accumulated_cache_size_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, max(getattr(cfg, key), 256))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


@functools.lru_cache(maxsize=None)
def get(name: str) -> Callable[..., Tensor]:
    """The callable for strategy ``name`` (compiled once per process)."""
    s = STRATEGIES[name]
    if not s.compiled:
        return s.fn
    _configure_dynamo()
    # dynamic=False: specialise on every shape, as a user with fixed crops gets;
    # fullgraph=True: a graph break would be an error, not a slower baseline.
    return torch.compile(s.fn, dynamic=False, fullgraph=True)


# ---------------------------------------------------------------- inputs
HYPERRES_LEVELS = (15.0, 35.0, 55.0, 75.0)  # denoising sigmas; c = sigma / 255


def layer_inputs(n: int, cin: int, cout: int, size: int, dtype: torch.dtype,
                 device: torch.device, kernel: int = 3, bias: bool = True,
                 requires_grad: bool = False, seed: int = 0) -> dict[str, Tensor]:
    """Random HyperRes-like layer inputs: mixed levels c = sigma/255 cycling
    over the training sigmas; W ~ 0.1 * Kaiming, B ~ Kaiming, random biases."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    fan_in = cin * kernel * kernel
    std = (2.0 / fan_in) ** 0.5

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    level = torch.tensor([HYPERRES_LEVELS[i % 4] / 255.0 for i in range(n)], device=device)
    return dict(
        x=rand(n, cin, size, size),
        level=level,
        weight=rand(cout, cin, kernel, kernel, scale=0.1 * std),
        weight_base=rand(cout, cin, kernel, kernel, scale=std),
        bias=rand(cout, scale=0.1) if bias else None,
        bias_base=rand(cout, scale=0.1) if bias else None,
    )


ARG_ORDER = ("x", "level", "weight", "weight_base", "bias", "bias_base")
GRAD_ARGS = ("x", "weight", "weight_base", "bias", "bias_base")  # level is data, not trained


# ---------------------------------------------------------------- verification
def _rel_err(a: Tensor, ref: Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def tolerance(device: torch.device) -> float:
    """||out - ref|| / ||ref|| allowed for a float32 run. On GPU, float32
    convolutions may run in TF32 (cuDNN's default, Triton's default dot), whose
    error is near 3e-4; a wrong composition is off by O(1)."""
    return 5e-3 if device.type == "cuda" else 1e-5


def spec_errors(label: str, fn, reference, args, arg_names, extra) -> dict[str, float]:
    """Relative errors of ``fn(*args, *extra)`` against ``reference`` run in
    float64: the output and the gradient of every tensor in ``args``."""
    ref_args = [a.detach().double().requires_grad_(True) for a in args]
    ref = reference(*ref_args, *extra)
    out = fn(*args, *extra)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7),
                     dtype=torch.float64).to(out.device)
    ref_grads = torch.autograd.grad(ref, ref_args, dy)
    grads = torch.autograd.grad(out, args, dy.to(out.dtype), allow_unused=True)
    errors = {f"{label}/y": _rel_err(out, ref)}
    for key, g, rg in zip(arg_names, grads, ref_grads):
        errors[f"{label}/d{key}"] = float("inf") if g is None else _rel_err(g, rg)
    return errors


def check_errors(what: str, errors: dict[str, float], device: torch.device) -> dict[str, float]:
    """``errors`` if all are within ``tolerance(device)``; else AssertionError starting with ``what``."""
    bad = {k: v for k, v in errors.items() if not v <= tolerance(device)}
    assert not bad, f"{what} on {device}: relative errors above {tolerance(device):g}: {bad}"
    return errors


@functools.lru_cache(maxsize=None)
def verify(name: str, device_str: str) -> dict[str, float]:
    """Check strategy ``name`` against the float64 spec, forward and every
    gradient, on small shapes (stride 1 pad 1 and stride 2 pad 0). Returns the
    relative errors; raises AssertionError naming what is wrong."""
    device = torch.device(device_str)
    fn = get(name)
    errors: dict[str, float] = {}
    for stride, padding, size in ((1, 1, 9), (2, 0, 10)):
        t = layer_inputs(4, 8, 6, size, torch.float32, device, requires_grad=True, seed=stride)
        t["level"] = t["level"].clone().requires_grad_(True)
        args = [t[k] for k in ARG_ORDER]
        errors.update(spec_errors(f"s{stride}", fn, hyper_conv2d_reference, args, ARG_ORDER,
                                  (stride, padding)))
    return check_errors(f"strategy {name!r} does not compute hyper_conv2d", errors, device)


# ======================================================================
# slim_conv2d: per-sample channel widths (DDS-Net)
# ======================================================================
#
#     out[n, :out_width[n]] = conv2d(x[n, :in_width[n]], weight[:out_width[n], :in_width[n]],
#                                    bias[:out_width[n]]),   out[n, out_width[n]:] = 0
#
# Every slim strategy has the signature of ``slim_conv2d``'s tensor arguments:
# ``f(x, weight, bias, in_width, out_width, stride, padding) -> y`` with widths
# an int or an integer tensor [N] on the device of x.
from restorenet.ops.slim_conv2d import slim_conv2d, slim_conv2d_reference  # noqa: E402


def _width_vector(width, x: Tensor) -> Tensor:
    """A width (int or tensor) as an int64 tensor [N] on x's device."""
    if isinstance(width, Tensor):
        return width.to(device=x.device, dtype=torch.int64).expand(x.shape[0])
    return torch.full((x.shape[0],), int(width), dtype=torch.int64, device=x.device)


def _channel_mask(width, x: Tensor, channels: int) -> Tensor:
    """[N, channels, 1, 1] 0/1 mask of each sample's leading ``width[n]`` channels, in x's dtype."""
    c = torch.arange(channels, device=x.device)
    return (c[None, :] < _width_vector(width, x)[:, None]).to(x.dtype)[:, :, None, None]


def slim_mask(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_width, out_width,
              stride: int = 1, padding: int = 0) -> Tensor:
    """Full width, then masks: zero x beyond in_width[n], one full-width conv,
    zero the output beyond out_width[n]. Costs the full-width FLOPs whatever
    the widths: a narrow sample saves nothing."""
    x = x * _channel_mask(in_width, x, x.shape[1])
    y = F.conv2d(x, weight, bias, stride, padding)
    return y * _channel_mask(out_width, y, y.shape[1])


def _width_groups(in_width, out_width, n: int, device: torch.device):
    """Host side of grouping: ((k_in, k_out), sample indices on ``device``) for
    each distinct width pair, in order of first appearance. Reads tensor widths
    back to the host (one sync), as a user's grouping code must."""
    k_in = _width_list_host(in_width, n)
    k_out = _width_list_host(out_width, n)
    members: dict[tuple[int, int], list[int]] = {}
    for i, pair in enumerate(zip(k_in, k_out)):
        members.setdefault(pair, []).append(i)
    return tuple((pair, None if len(idx) == n else torch.tensor(idx, device=device))
                 for pair, idx in members.items())


def _width_list_host(width, n: int) -> list[int]:
    if isinstance(width, Tensor):
        return [int(v) for v in width.expand(n).tolist()]
    return [int(width)] * n


def _grouped_sliced_convs(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups,
                          stride: int, padding: int) -> Tensor:
    """One sliced cuDNN call per width group, scattered into a zero output.
    A group holding the whole batch (index None) needs no gather/scatter."""
    n = x.shape[0]
    kh, kw = weight.shape[2:]
    ho = (x.shape[2] + 2 * padding - kh) // stride + 1
    wo = (x.shape[3] + 2 * padding - kw) // stride + 1
    out = None
    for (ki, ko), idx in groups:
        xs = x[:, :ki] if idx is None else x[idx, :ki]
        y = F.conv2d(xs, weight[:ko, :ki], None if bias is None else bias[:ko], stride, padding)
        if out is None:  # the convs' dtype (autocast may change it), not x's
            out = y.new_zeros(n, weight.shape[0], ho, wo)
        if idx is None:
            out[:, :ko] = y
        else:
            out[idx, :ko] = y
    return out if out is not None else x.new_zeros(n, weight.shape[0], ho, wo)


def slim_group_by_width(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_width, out_width,
                        stride: int = 1, padding: int = 0) -> Tensor:
    """What a user writes: for each distinct (in, out) width pair, gather its
    samples, one F.conv2d with weight[:out, :in] sliced, scatter back. One
    cuDNN call per distinct pair, plus a host sync to read the widths."""
    groups = _width_groups(in_width, out_width, x.shape[0], x.device)
    return _grouped_sliced_convs(x, weight, bias, groups, stride, padding)


@functools.lru_cache(maxsize=None)
def _compiled_grouped_sliced_convs():
    _configure_dynamo()
    return torch.compile(_grouped_sliced_convs, dynamic=False, fullgraph=True)


def slim_compile_group(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_width, out_width,
                       stride: int = 1, padding: int = 0) -> Tensor:
    """torch.compile of grouping by width: the width pairs are read on the host
    (data-dependent control flow cannot be traced), then the gathers, sliced
    convs and scatters run as one compiled graph, specialised on the pairs."""
    groups = _width_groups(in_width, out_width, x.shape[0], x.device)
    return _compiled_grouped_sliced_convs()(x, weight, bias, groups, stride, padding)


def slim_dense_full(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_width, out_width,
                    stride: int = 1, padding: int = 0) -> Tensor:
    """Not the slim layer: plain F.conv2d at full width, widths ignored. Its
    rate (full-width FLOPs / time) defines the FLOP-proportional ideal."""
    return F.conv2d(x, weight, bias, stride, padding)


def slim_dense_at_width(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_width, out_width,
                        stride: int = 1, padding: int = 0) -> Tensor:
    """Not the slim layer: one plain F.conv2d on x[:, :k_in] with weight[:k_out, :k_in]
    for a *uniform* width (read from sample 0); returns only the k_out active
    channels. What cuDNN costs at that width: the target for uniform batches."""
    ki = _width_list_host(in_width, x.shape[0])[0] if x.shape[0] else x.shape[1]
    ko = _width_list_host(out_width, x.shape[0])[0] if x.shape[0] else weight.shape[0]
    return F.conv2d(x[:, :ki], weight[:ko, :ki], None if bias is None else bias[:ko], stride, padding)


def _slim_backend(name: str) -> Callable[..., Tensor]:
    def run(x, weight, bias, in_width, out_width, stride=1, padding=0):
        return slim_conv2d(x, weight, bias, in_width, out_width, stride, padding, backend=name)

    run.__name__ = f"slim_conv2d_{name}"
    return run


@dataclass(frozen=True)
class SlimStrategy:
    name: str
    fn: Callable[..., Tensor]
    description: str
    gpu_only: Optional[str] = None    # why it runs on GPU only (None: runs anywhere)
    backend: Optional[str] = None     # a restorenet backend that must be available
    exact: bool = True                # computes slim_conv2d (the dense rows do not)
    uniform_only: bool = False        # meaningful only when every sample has the same widths


_COMPILE_GPU_ONLY = "torch.compile benchmarks run on GPU only (inductor compiles slowly on CPU)"
_TRITON_GPU_ONLY = "triton on CPU runs only in the interpreter (TRITON_INTERPRET=1): not benchmarked"

SLIM_STRATEGIES: dict[str, SlimStrategy] = {s.name: s for s in (
    SlimStrategy("reference", _slim_backend("reference"),
                 "restorenet backend 'reference': per-sample loop (the spec)", backend="reference"),
    SlimStrategy("mask", slim_mask, "full-width F.conv2d, input and output masked to each width"),
    SlimStrategy("group_by_width", slim_group_by_width,
                 "per distinct width pair: gather samples, sliced F.conv2d, scatter"),
    SlimStrategy("compile_mask", slim_mask, "torch.compile(mask)", gpu_only=_COMPILE_GPU_ONLY),
    SlimStrategy("compile_group", slim_compile_group,
                 "host grouping + torch.compile(gather, sliced convs, scatter)",
                 gpu_only=_COMPILE_GPU_ONLY),
    SlimStrategy("triton", _slim_backend("triton"), "restorenet backend 'triton'",
                 gpu_only=_TRITON_GPU_ONLY, backend="triton"),
    SlimStrategy("cuda", _slim_backend("cuda"), "restorenet backend 'cuda' (restorenet._C)",
                 backend="cuda"),
    SlimStrategy("dense_full", slim_dense_full,
                 "plain F.conv2d at full width, widths ignored (defines the ideal's rate)", exact=False),
    SlimStrategy("dense_at_width", slim_dense_at_width,
                 "plain F.conv2d on the sliced tensors at the (uniform) width", exact=False,
                 uniform_only=True),
)}


def slim_unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why slim strategy ``name`` cannot be benchmarked on ``device`` (None: it can)."""
    s = SLIM_STRATEGIES[name]
    if s.gpu_only and device.type != "cuda":
        return s.gpu_only
    if s.backend is not None and s.backend not in available_backends(device, "slim_conv2d_forward"):
        return f"restorenet backend {s.backend!r} is not available for slim_conv2d on {device.type} here"
    return None


@functools.lru_cache(maxsize=None)
def get_slim(name: str) -> Callable[..., Tensor]:
    """The callable for slim strategy ``name`` (compiled once per process)."""
    s = SLIM_STRATEGIES[name]
    if name == "compile_mask":
        _configure_dynamo()
        return torch.compile(s.fn, dynamic=False, fullgraph=True)
    return s.fn  # compile_group compiles its traceable part itself


def slim_layer_inputs(n: int, cin: int, cout: int, size: int, dtype: torch.dtype,
                      device: torch.device, kernel: int = 3, bias: bool = True,
                      requires_grad: bool = False, seed: int = 0) -> dict[str, Tensor]:
    """Random slim-layer inputs (widths are set by the caller): x, Kaiming-scaled
    weight at full width, small bias."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    std = (2.0 / (cin * kernel * kernel)) ** 0.5

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return dict(x=rand(n, cin, size, size), weight=rand(cout, cin, kernel, kernel, scale=std),
                bias=rand(cout, scale=0.1) if bias else None)


SLIM_GRAD_ARGS = ("x", "weight", "bias")


@functools.lru_cache(maxsize=None)
def verify_slim(name: str, device_str: str) -> dict[str, float]:
    """Check slim strategy ``name`` against the float64 spec, forward and the
    gradients of x, weight and bias, on small shapes with mixed, unequal in/out
    widths (stride 1 pad 1, stride 2 pad 0) and with one uniform width (the
    single-group path). Returns the relative errors; raises AssertionError."""
    device = torch.device(device_str)
    fn = get_slim(name)
    errors: dict[str, float] = {}
    cases = (("mixed s1", 1, 1, 9, [3, 8, 5, 3, 8], [6, 2, 6, 4, 6]),
             ("mixed s2", 2, 0, 10, [8, 1, 4, 8, 4], [1, 6, 6, 3, 6]),
             ("uniform", 1, 1, 7, [5] * 5, [4] * 5))
    for label, stride, padding, size, k_in, k_out in cases:
        t = slim_layer_inputs(5, 8, 6, size, torch.float32, device, requires_grad=True, seed=stride)
        args = [t[k] for k in SLIM_GRAD_ARGS]
        in_w = torch.tensor(k_in, device=device)
        out_w = torch.tensor(k_out, device=device)
        errors.update(spec_errors(label, fn, slim_conv2d_reference, args, SLIM_GRAD_ARGS,
                                  (in_w, out_w, stride, padding)))
    return check_errors(f"slim strategy {name!r} does not compute slim_conv2d", errors, device)
