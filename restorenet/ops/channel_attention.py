"""channel_attention / scaled_residual: NAFBlock's channel attention and its
scaled residual, fused.

A NAFBlock (``restorenet.models.blocks``) is

    y   = inp + beta  * conv1x1(SCA(SG(dw3x3(conv1x1(LN(inp))))))
    out = y   + gamma * conv1x1(SG(conv1x1(LN(y))))

with SG(x) = x[:, :C] * x[:, C:] and SCA(t) = t * s, s = W mean_hw(t) + b (a
1x1 conv on the pooled [N, C] vector). ``layer_norm2d`` and ``simple_gate``
(``restorenet.ops.naf_elementwise``) cover LN and the MLP's SG; this file
covers the rest.

channel_attention(x, W, b, gated)   u = t * (W mean_hw(t) + b)[n, c],  t = SG(x) if gated else x

    The pooled vector needs all of t before any u can be written, so the
    forward is two passes; the gradient of s needs all of du * t before any dx
    can be written, so the backward is two passes too. The [N, C] algebra in
    between (1x1 conv, its gradient) is tiny and stays in PyTorch.
        forward   pass 1  p = mean_hw(t)                          read x
                  (tiny)  s = p W^T + b
                  pass 2  u = t * s                               read x, write u
        backward  pass 1  ds = sum_hw du * t                      read du, x
                  (tiny)  dp = ds W,  dW = ds^T p,  db = sum_n ds
                  pass 2  dt = du * s + dp / HW,
                          dx = (dt * x2, dt * x1) if gated else dt   read du, x, write dx
    t is recomputed from x whenever it is needed and never stored: only x
    (which autograd keeps anyway) and the [N, C] pooled vector are saved.
    Full-tensor traffic, in units of |t| = N*C*H*W elements (x is 2 units when gated):
        gated     forward   fused: 2 launches, 5 (read 2, then read 2 + write 1)
                            PyTorch: SG, pool, mul = 3 launches, 6, and t (1 unit)
                            kept alive for the backward
                  backward  fused: 2 launches, 8 (read 3, then read 3 + write 2)
                            PyTorch: du*s, du*t, sum, pool-bwd, add, SG-bwd (2 muls,
                            cat) = 8 launches, about 20
        ungated   forward   fused: 2 launches, 3; PyTorch: pool, mul = 2 launches, 3
                            (no saving: the pool must finish before any u)
                  backward  fused: 2 launches, 4 (pass 2 reads only du);
                            PyTorch: 5 launches, about 10

scaled_residual(inp, beta, z)       y = inp + beta[c] * z

        forward   one pass: read inp, z, write y            (PyTorch: mul + add, 5 units)
        backward  d_inp = g (passed through: no pass at all),
                  d_z = beta * g and d_beta = sum_{n,h,w} g * z in one pass:
                  read g, z, write d_z                      (PyTorch: mul, mul, sum: 6 units)

Numerics. Arithmetic is fp32 whatever the storage (fp64 for fp64 tensors),
each output is rounded once to its storage dtype; the pooled vector, s and all
[N, C] algebra are fp32. Reductions are deterministic: every program writes
its own partial sums and they are added in a fixed order (no atomics).

Dtypes. Activations (x; inp and z) share one dtype, which the output keeps
(also under autocast: custom ops are invisible to it). Parameters (W, b; beta)
are that dtype or fp32 master parameters (fp64 for fp64 activations); their
gradients come back in their own dtype.

Pattern as in ``restorenet.ops.hyper_conv2d``: specs (``*_reference``), public
functions, custom ops ``torch.ops.restorenet.channel_attention`` (returns
``(u, pooled)``; + ``_backward``) and ``scaled_residual`` (+ ``_backward``) with
fake implementations and autograd, backends reference, Triton
(``restorenet_kernels.channel_attention``) and CUDA (``csrc/channel_attention.cu``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from restorenet._checks import check_tensor
from restorenet.ops._backend import cuda_extension, resolve_backend
from restorenet.ops._common import in_working_layout, output_memory_format
from restorenet.ops._nvtx import nvtx_range

CA_OP = "channel_attention"
SR_OP = "scaled_residual"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gate(x: Tensor, gated: bool) -> Tensor:
    if not gated:
        return x
    a, b = x.chunk(2, dim=1)
    return a * b


# --------------------------------------------------------------------------- spec
def channel_attention_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                                gated: bool = False) -> Tensor:
    """``u = t * (W mean_hw(t) + b)[:, :, None, None]`` with ``t = SG(x)`` when
    ``gated`` (else ``t = x``): ``blocks.SimplifiedChannelAttention`` (of
    ``blocks.SimpleGate``), computed in fp32 (fp64 for fp64 inputs) and rounded
    once to the dtype of ``x``. ``weight`` is [C, C] or [C, C, 1, 1]."""
    cd = _compute_dtype(x.dtype)
    t = _gate(x.to(cd), gated)
    w = weight.reshape(t.shape[1], t.shape[1]).to(cd)
    s = F.linear(t.mean((2, 3)), w, None if bias is None else bias.to(cd))
    return (t * s[:, :, None, None]).to(x.dtype)


def scaled_residual_reference(inp: Tensor, beta: Tensor, z: Tensor) -> Tensor:
    """``inp + beta * z`` with ``beta`` per channel ([C] or [1, C, 1, 1]), in fp32
    (fp64 for fp64 inputs), rounded once to the dtype of ``inp``."""
    cd = _compute_dtype(inp.dtype)
    return (inp.to(cd) + beta.to(cd).view(1, -1, 1, 1) * z.to(cd)).to(inp.dtype)


# ----------------------------------------------------------------- public functions
def channel_attention(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, gated: bool = False,
                      backend: Optional[str] = None) -> Tensor:
    """Simplified channel attention, optionally of the simple gate, in two passes
    over memory each way (see the module docstring).

    Args:
        x: [N, Cx, H, W] with H, W >= 1, float16/bfloat16/float32/float64,
            contiguous or channels_last (other strides are copied). The attention
            runs on C = Cx / 2 channels when ``gated`` (Cx even), else C = Cx.
        weight: the 1x1 conv's weight, [C, C] or [C, C, 1, 1].
        bias: [C] or None. weight and bias share one dtype: that of ``x``, or
            float32 for a float16/bfloat16/float32 ``x``.
        gated: apply SimpleGate to ``x`` first (NAFBlock's SCA(SG(x))).
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None for the
            process-wide choice (see ``restorenet.ops.use_backend``).
    Returns:
        [N, C, H, W] in the dtype and layout of ``x``. Differentiable in x,
        weight and bias.
    """
    channels = _check_channel_attention_args(x, weight, bias, gated)
    name = resolve_backend(backend, x.device, CA_OP, cuda_symbol="channel_attention_apply")
    u, _ = torch.ops.restorenet.channel_attention(x, weight.reshape(channels, channels), bias, bool(gated), name)
    return u


def scaled_residual(inp: Tensor, beta: Tensor, z: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``inp + beta * z`` with a per-channel ``beta``, one pass over memory each way.

    Args:
        inp, z: [N, C, H, W], one dtype (float16/bfloat16/float32/float64), one
            shape; contiguous or channels_last (z is brought to the layout of inp).
        beta: C values, shape [C] or [1, C, 1, 1]; the dtype of ``inp``, or
            float32 for a float16/bfloat16/float32 ``inp``.
        backend: as for ``channel_attention``.
    Returns:
        y in the dtype and layout of ``inp``. Differentiable in every input
        (``d_inp`` is the incoming gradient itself: no copy).
    """
    _check_scaled_residual_args(inp, beta, z)
    name = resolve_backend(backend, inp.device, SR_OP, cuda_symbol="scaled_residual_forward")
    return torch.ops.restorenet.scaled_residual(inp, beta.reshape(-1), z, name)


def _param_dtypes(x: Tensor) -> tuple:
    # fp32 master parameters may go with a low-precision x; fp64 x needs fp64 ones.
    return (torch.float64,) if x.dtype == torch.float64 else tuple(dict.fromkeys((x.dtype, torch.float32)))


def _check_channel_attention_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], gated) -> int:
    check_tensor("x", x, ndim=4, dtypes=DTYPES)
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {type(gated).__name__}")
    if gated and (x.shape[1] < 2 or x.shape[1] % 2):
        raise ValueError(f"x must have an even number of channels >= 2 when gated (SimpleGate splits them "
                         f"in halves), got shape {tuple(x.shape)}")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have C, H, W >= 1 (the attention averages over H and W), "
                         f"got shape {tuple(x.shape)}")
    c = x.shape[1] // 2 if gated else x.shape[1]
    check_tensor("weight", weight, dtypes=_param_dtypes(x), device=x.device)
    if tuple(weight.shape) not in ((c, c), (c, c, 1, 1)):
        raise ValueError(f"weight must have shape [C, C] or [C, C, 1, 1] with C = {c} (the 1x1 conv on the "
                         f"attended channels), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(weight.dtype,), device=x.device)
        if bias.shape[0] != c:
            raise ValueError(f"bias must have shape [C] = [{c}], got {tuple(bias.shape)}")
    return c


def _check_scaled_residual_args(inp: Tensor, beta: Tensor, z: Tensor) -> None:
    check_tensor("inp", inp, ndim=4, dtypes=DTYPES)
    check_tensor("z", z, ndim=4, dtypes=(inp.dtype,), device=inp.device)
    if z.shape != inp.shape:
        raise ValueError(f"z must have the shape of inp {tuple(inp.shape)}, got {tuple(z.shape)}")
    check_tensor("beta", beta, dtypes=_param_dtypes(inp), device=inp.device)
    c = inp.shape[1]
    if tuple(beta.shape) not in ((c,), (1, c, 1, 1)):
        raise ValueError(f"beta must have shape [C] or [1, C, 1, 1] with C = {c} (one scale per channel), "
                         f"got {tuple(beta.shape)}")


def _attention_vector(pooled: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """s = p W^T + b on the [N, C] pooled vector, in the pooled (compute) dtype."""
    cd = pooled.dtype
    return F.linear(pooled, weight.to(cd), None if bias is None else bias.to(cd))


# ------------------------------------------------------------------- custom ops
# Returns (u, pooled): pooled = mean_hw(t) [N, C] in the compute dtype is saved
# for the backward and is not differentiable. weight is [C, C].
@torch.library.custom_op("restorenet::channel_attention", mutates_args=())
def _channel_attention_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], gated: bool,
                          backend: str) -> tuple[Tensor, Tensor]:
    fmt, (x,) = in_working_layout(x)
    cl = fmt == torch.channels_last
    with nvtx_range(CA_OP, "fwd", x.device):
        sums = _CA_REDUCE[backend](x, None, gated, cl)                    # pass 1
        pooled = sums / (x.shape[2] * x.shape[3])
        scale = _attention_vector(pooled, weight, bias)                  # tiny
        u = _CA_APPLY[backend](x, scale, gated, cl)                      # pass 2
    return u.contiguous(memory_format=fmt), pooled


@_channel_attention_op.register_fake
def _(x, weight, bias, gated, backend):
    n, cx, h, w = x.shape
    c = cx // 2 if gated else cx
    u = x.new_empty((n, c, h, w)).contiguous(memory_format=output_memory_format(x))
    return u, x.new_empty((n, c), dtype=_compute_dtype(x.dtype))


# Returns (grad_x, grad_weight, grad_bias): grad_x in the dtype and layout of x,
# the parameter gradients in the dtype of weight (grad_bias also without bias).
@torch.library.custom_op("restorenet::channel_attention_backward", mutates_args=())
def _channel_attention_backward_op(grad_u: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   pooled: Tensor, gated: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    fmt, (x, du) = in_working_layout(x, grad_u)
    cl = fmt == torch.channels_last
    with nvtx_range(CA_OP, "bwd", x.device):
        ds = _CA_REDUCE[backend](x, du, gated, cl)                        # pass 1
        cd = pooled.dtype
        w = weight.to(cd)
        scale = _attention_vector(pooled, weight, bias)
        dpool_per_pixel = (ds @ w) / (x.shape[2] * x.shape[3])            # tiny
        dx = _CA_BACKWARD_INPUT[backend](du, x, scale, dpool_per_pixel, gated, cl)  # pass 2
        dw = ds.t() @ pooled
        db = ds.sum(0)
    return dx.to(x.dtype).contiguous(memory_format=fmt), dw.to(weight.dtype), db.to(weight.dtype)


@_channel_attention_backward_op.register_fake
def _(grad_u, x, weight, bias, pooled, gated, backend):
    return (torch.empty_like(x, memory_format=output_memory_format(x)), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]))


def _channel_attention_setup_context(ctx, inputs, output):
    x, weight, bias, gated, backend = inputs
    _, pooled = output
    ctx.mark_non_differentiable(pooled)
    ctx.save_for_backward(x, weight, bias, pooled)
    ctx.conf = (gated, backend)


def _channel_attention_autograd_backward(ctx, grad_u, grad_pooled):
    x, weight, bias, pooled = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None, None, None
    dx, dw, db = torch.ops.restorenet.channel_attention_backward(grad_u, x, weight, bias, pooled, *ctx.conf)
    return (dx if need_x else None, dw if need_w else None, db if (need_b and bias is not None) else None,
            None, None)


_channel_attention_op.register_autograd(_channel_attention_autograd_backward,
                                        setup_context=_channel_attention_setup_context)


@torch.library.custom_op("restorenet::scaled_residual", mutates_args=())
def _scaled_residual_op(inp: Tensor, beta: Tensor, z: Tensor, backend: str) -> Tensor:
    fmt, (inp, z) = in_working_layout(inp, z)
    with nvtx_range(SR_OP, "fwd", inp.device):
        y = _SR_FORWARD[backend](inp, beta, z, fmt == torch.channels_last)
    return y.contiguous(memory_format=fmt)


@_scaled_residual_op.register_fake
def _(inp, beta, z, backend):
    return torch.empty_like(inp, memory_format=output_memory_format(inp))


# Returns (grad_z, grad_beta); a gradient not asked for comes back empty.
@torch.library.custom_op("restorenet::scaled_residual_backward", mutates_args=())
def _scaled_residual_backward_op(grad_y: Tensor, beta: Tensor, z: Tensor, need_z: bool, need_beta: bool,
                                 backend: str) -> tuple[Tensor, Tensor]:
    fmt, (z, g) = in_working_layout(z, grad_y)
    with nvtx_range(SR_OP, "bwd", z.device):
        dz, dbeta = _SR_BACKWARD[backend](g, beta, z, need_z, need_beta, fmt == torch.channels_last)
    dz = dz.to(z.dtype).contiguous(memory_format=fmt) if need_z else z.new_empty(0)
    dbeta = dbeta.to(beta.dtype) if need_beta else beta.new_empty(0)
    return dz, dbeta


@_scaled_residual_backward_op.register_fake
def _(grad_y, beta, z, need_z, need_beta, backend):
    dz = torch.empty_like(z, memory_format=output_memory_format(z)) if need_z else z.new_empty(0)
    return dz, (torch.empty_like(beta) if need_beta else beta.new_empty(0))


def _scaled_residual_setup_context(ctx, inputs, output):
    inp, beta, z, backend = inputs
    ctx.save_for_backward(beta, z)
    ctx.backend = backend


def _scaled_residual_autograd_backward(ctx, grad_y):
    beta, z = ctx.saved_tensors
    need_inp, need_beta, need_z = ctx.needs_input_grad[:3]
    dz = dbeta = None
    if need_beta or need_z:
        dz, dbeta = torch.ops.restorenet.scaled_residual_backward(grad_y, beta, z, need_z, need_beta, ctx.backend)
    return (grad_y if need_inp else None, dbeta if need_beta else None, dz if need_z else None, None)


_scaled_residual_op.register_autograd(_scaled_residual_autograd_backward,
                                      setup_context=_scaled_residual_setup_context)


# ------------------------------------------------------------ backend: reference
# The three channel-attention primitives every backend provides (t = SG(x) if
# gated else x, all in the compute dtype, s and q [N, C]):
#   reduce(x, du)                 sum_hw t      (du None)   or   sum_hw du * t
#   apply(x, s)                   u = t * s
#   backward_input(du, x, s, q)   dt = du * s + q;  dx = (dt * x2, dt * x1) or dt
def _reference_ca_reduce(x, du, gated, channels_last):
    cd = _compute_dtype(x.dtype)
    t = _gate(x.to(cd), gated)
    return (t if du is None else du.to(cd) * t).sum((2, 3))


def _reference_ca_apply(x, scale, gated, channels_last):
    t = _gate(x.to(scale.dtype), gated)
    return (t * scale[:, :, None, None]).to(x.dtype)


def _reference_ca_backward_input(du, x, scale, q, gated, channels_last):
    cd = scale.dtype
    dt = du.to(cd) * scale[:, :, None, None] + q[:, :, None, None]
    if gated:
        a, b = x.to(cd).chunk(2, dim=1)
        dt = torch.cat((dt * b, dt * a), dim=1)
    return dt.to(x.dtype)


def _reference_sr_forward(inp, beta, z, channels_last):
    return scaled_residual_reference(inp, beta, z)


def _reference_sr_backward(g, beta, z, need_z, need_beta, channels_last):
    cd = _compute_dtype(z.dtype)
    gf = g.to(cd)
    dz = (gf * beta.to(cd).view(1, -1, 1, 1)).to(z.dtype) if need_z else None
    dbeta = (gf * z.to(cd)).sum((0, 2, 3)) if need_beta else None
    return dz, dbeta


# --------------------------------------------------------------- backend: triton
def _triton_ca_reduce(x, du, gated, channels_last):
    from restorenet_kernels import channel_attention as kernels

    return kernels.channel_attention_reduce(x, du, gated, channels_last)


def _triton_ca_apply(x, scale, gated, channels_last):
    from restorenet_kernels import channel_attention as kernels

    return kernels.channel_attention_apply(x, scale, gated, channels_last)


def _triton_ca_backward_input(du, x, scale, q, gated, channels_last):
    from restorenet_kernels import channel_attention as kernels

    return kernels.channel_attention_backward_input(du, x, scale, q, gated, channels_last)


def _triton_sr_forward(inp, beta, z, channels_last):
    from restorenet_kernels import channel_attention as kernels

    return kernels.scaled_residual_forward(inp, beta, z, channels_last)


def _triton_sr_backward(g, beta, z, need_z, need_beta, channels_last):
    from restorenet_kernels import channel_attention as kernels

    return kernels.scaled_residual_backward(g, beta, z, need_z, need_beta, channels_last)


# ----------------------------------------------------------------- backend: cuda
def _cuda_ca_reduce(x, du, gated, channels_last):
    return cuda_extension().channel_attention_reduce(x, du, gated)


def _cuda_ca_apply(x, scale, gated, channels_last):
    return cuda_extension().channel_attention_apply(x, scale, gated)


def _cuda_ca_backward_input(du, x, scale, q, gated, channels_last):
    return cuda_extension().channel_attention_backward_input(du, x, scale, q, gated)


def _cuda_sr_forward(inp, beta, z, channels_last):
    return cuda_extension().scaled_residual_forward(inp, beta, z)


def _cuda_sr_backward(g, beta, z, need_z, need_beta, channels_last):
    dz, dbeta = cuda_extension().scaled_residual_backward(g, beta, z, need_z, need_beta)
    return dz, dbeta


_CA_REDUCE = {"reference": _reference_ca_reduce, "triton": _triton_ca_reduce, "cuda": _cuda_ca_reduce}
_CA_APPLY = {"reference": _reference_ca_apply, "triton": _triton_ca_apply, "cuda": _cuda_ca_apply}
_CA_BACKWARD_INPUT = {"reference": _reference_ca_backward_input, "triton": _triton_ca_backward_input,
                      "cuda": _cuda_ca_backward_input}
_SR_FORWARD = {"reference": _reference_sr_forward, "triton": _triton_sr_forward, "cuda": _cuda_sr_forward}
_SR_BACKWARD = {"reference": _reference_sr_backward, "triton": _triton_sr_backward, "cuda": _cuda_sr_backward}
