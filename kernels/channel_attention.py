"""Triton kernels for ``restorenet.ops.channel_attention`` (NAFBlock's channel
attention of the simple gate, and the scaled residual).

As in ``restorenet_kernels.naf_elementwise``, an [N, C, H, W] tensor is a
[C, M] matrix (M = N*H*W) addressed through three element strides (sample,
channel, pixel) of its canonical layout: one kernel serves NCHW and
channels_last. With GATED, channel c of t = SG(x) is x[c] * x[c + C], read from
an x of 2C channels; t itself is never stored.

* ``channel_attention_reduce_kernel``          partial[split, n, c] = sum over the split's pixels
                                of t (pool) or du * t (gradient of the scale).
                                Programs own (sample, pixel split, channel block);
                                the launcher adds the split rows in order.
* ``channel_attention_apply_kernel``           u = t * s[n, c]
* ``channel_attention_backward_input_kernel``  dt = du * s[n, c] + q[n, c]; dx = (dt * x2, dt * x1)
                                when gated, else dt
* ``scaled_residual_forward_kernel``         y = inp + beta[c] * z
* ``scaled_residual_backward_kernel``        dz = beta[c] * g, partial[program, c] = sum of g * z
                                over the program's pixels (no atomics; rows added
                                in order by the launcher).

The grids depend on the shape only, so every reduction is deterministic and
device independent. Arithmetic is fp32 for fp16/bf16/fp32 storage (fp64 for
fp64); offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from restorenet_kernels._addressing import channel_pixel_tile, pixel_block
from restorenet_kernels._launch import canonical_strides, compute_dtypes, interpreting, launch_options, layout_format

MAX_SPLITS = 64  # pixel splits per sample in the reductions (GPU); bounds the partial buffer
MAX_PROGRAMS = 1024  # pixel programs of the scaled-residual backward (GPU): at most this many partial rows
# The reduction and the input gradient carry two gated halves (and du) per element:
# at 4 warps ptxas spilled 4-20 B in them (fp64 reduce, small fp16/fp32 input gradients;
# docs/kernel_report.md), at 8 warps each thread holds half as many elements.
WIDE_WARPS = 8
# The fp64 gated gradient reduce still spilled 4 B at 8 warps on sm_80 with Triton 3.6
# (48 registers, channels_last 64 x 16 tile); at 16 warps each thread holds 2 elements.
REDUCE_FP64_WARPS = 16


# ----------------------------------------------------------------------- kernels
@triton.jit
def _gated_tile(x_ptr, offs_c, offs_m, C, HW, M, s_n, s_c, s_p, GATED: tl.constexpr, COMPUTE: tl.constexpr):
    """t on tile [offs_c, offs_m] in the compute dtype (0 outside), the offsets
    of x's first (and, gated, second) half, and the mask. x has 2C channels when
    GATED, so its strides are those of a 2C-channel tensor."""
    x_off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
    a = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(COMPUTE)
    if GATED:
        x2_off = x_off + C * s_c
        b = tl.load(x_ptr + x2_off, mask=mask, other=0.0).to(COMPUTE)
        t = a * b
    else:
        x2_off = x_off
        b = a
        t = a
    return t, a, b, x_off, x2_off, mask


@triton.jit
def channel_attention_reduce_kernel(x_ptr, du_ptr, partial_ptr, N, C, HW, xs_n, xs_c, xs_p, ts_n, ts_c, ts_p, iters,
                     WITH_GRAD: tl.constexpr, GATED: tl.constexpr, COMPUTE: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_ns, pid_c = tl.program_id(0), tl.program_id(1)
    splits = tl.num_programs(0) // N
    n = pid_ns // splits
    split = pid_ns - n * splits
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=COMPUTE)
    end = n.to(tl.int64) * HW + HW  # this sample's pixels only
    for it in range(iters):
        offs_p = pixel_block(split, it, iters, BLOCK_P)
        offs_m = n.to(tl.int64) * HW + offs_p
        t, _, _, _, _, mask = _gated_tile(x_ptr, offs_c, offs_m, C, HW, end, xs_n, xs_c, xs_p, GATED, COMPUTE)
        if WITH_GRAD:
            du_off, _ = channel_pixel_tile(offs_c, offs_m, C, HW, end, ts_n, ts_c, ts_p)
            t = t * tl.load(du_ptr + du_off, mask=mask, other=0.0).to(COMPUTE)
        acc += t  # masked lanes are 0: they add nothing
    row = (split.to(tl.int64) * N + n) * C
    tl.store(partial_ptr + row + offs_c, tl.sum(acc, axis=1), mask=offs_c < C)


@triton.jit
def _per_sample_channel(ptr, offs_c, offs_m, C, HW, mask):
    """v[n(m), c] of an [N, C] contiguous vector, broadcast over the tile."""
    n = offs_m // HW
    return tl.load(ptr + n[None, :] * C + offs_c[:, None], mask=mask, other=0.0)


@triton.jit
def channel_attention_apply_kernel(x_ptr, s_ptr, u_ptr, C, HW, M, xs_n, xs_c, xs_p, ts_n, ts_c, ts_p,
                    GATED: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    t, _, _, _, _, mask = _gated_tile(x_ptr, offs_c, offs_m, C, HW, M, xs_n, xs_c, xs_p, GATED, COMPUTE)
    s = _per_sample_channel(s_ptr, offs_c, offs_m, C, HW, mask)
    u_off, _ = channel_pixel_tile(offs_c, offs_m, C, HW, M, ts_n, ts_c, ts_p)
    tl.store(u_ptr + u_off, (t * s).to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_attention_backward_input_kernel(du_ptr, x_ptr, s_ptr, q_ptr, dx_ptr, C, HW, M, xs_n, xs_c, xs_p, ts_n, ts_c, ts_p,
                             GATED: tl.constexpr, COMPUTE: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    du_off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, ts_n, ts_c, ts_p)
    du = tl.load(du_ptr + du_off, mask=mask, other=0.0).to(COMPUTE)
    s = _per_sample_channel(s_ptr, offs_c, offs_m, C, HW, mask)
    q = _per_sample_channel(q_ptr, offs_c, offs_m, C, HW, mask)
    dt = du * s + q
    if GATED:
        _, a, b, x_off, x2_off, _ = _gated_tile(x_ptr, offs_c, offs_m, C, HW, M, xs_n, xs_c, xs_p, GATED, COMPUTE)
        tl.store(dx_ptr + x_off, (dt * b).to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + x2_off, (dt * a).to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dx_ptr + du_off, dt.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scaled_residual_forward_kernel(inp_ptr, beta_ptr, z_ptr, y_ptr, C, HW, M, s_n, s_c, s_p,
                      COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
    beta = tl.load(beta_ptr + offs_c, mask=offs_c < C, other=0.0).to(COMPUTE)
    inp = tl.load(inp_ptr + off, mask=mask, other=0.0).to(COMPUTE)
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(COMPUTE)
    tl.store(y_ptr + off, (inp + beta[:, None] * z).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scaled_residual_backward_kernel(g_ptr, beta_ptr, z_ptr, dz_ptr, partial_ptr, C, HW, M, s_n, s_c, s_p, iters,
                       NEED_Z: tl.constexpr, NEED_BETA: tl.constexpr, COMPUTE: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    beta = tl.load(beta_ptr + offs_c, mask=offs_c < C, other=0.0).to(COMPUTE)
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=COMPUTE)
    for it in range(iters):
        offs_m = pixel_block(pid_m, it, iters, BLOCK_M)
        off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(COMPUTE)
        if NEED_Z:
            tl.store(dz_ptr + off, (beta[:, None] * g).to(dz_ptr.dtype.element_ty), mask=mask)
        if NEED_BETA:
            acc += g * tl.load(z_ptr + off, mask=mask, other=0.0).to(COMPUTE)
    if NEED_BETA:
        tl.store(partial_ptr + pid_m.to(tl.int64) * C + offs_c, tl.sum(acc, axis=1), mask=offs_c < C)


# --------------------------------------------------------------------- launchers
def _tile(c: int, pixels: int, channels_last: bool):
    """(BLOCK_C, BLOCK_M) of a [channel, pixel] tile: wide in the contiguous dim."""
    if interpreting():  # the interpreter pays per program: few, big tiles
        block_c = min(64, triton.next_power_of_2(c))
        return block_c, min(16384 // block_c, triton.next_power_of_2(max(pixels, 1)))
    if channels_last:
        block_c = min(64, triton.next_power_of_2(c))
        return block_c, max(1, 1024 // block_c)
    return 2, 512


def _elementwise_grid(c: int, m: int, channels_last: bool):
    block_c, block_m = _tile(c, m, channels_last)
    return (triton.cdiv(m, block_m), triton.cdiv(c, block_c)), dict(BLOCK_C=block_c, BLOCK_M=block_m)


def _reduce_geometry(n: int, c: int, hw: int, channels_last: bool):
    """Grid (N * splits, channel blocks), iterations per program and blocks."""
    block_c, block_p = _tile(c, hw, channels_last)
    p_blocks = triton.cdiv(hw, block_p)
    splits = min(p_blocks, 1 if interpreting() else MAX_SPLITS)
    iters = triton.cdiv(p_blocks, splits)
    splits = triton.cdiv(p_blocks, iters)
    return (n * splits, triton.cdiv(c, block_c)), splits, iters, dict(BLOCK_C=block_c, BLOCK_P=block_p)


def _attended_shape(x: torch.Tensor, gated: bool):
    n, cx, h, w = x.shape
    return n, (cx // 2 if gated else cx), h, w


def channel_attention_reduce(x: torch.Tensor, du, gated: bool, channels_last: bool) -> torch.Tensor:
    """[N, C] compute-dtype sums over H, W of t (``du`` None) or of du * t."""
    n, c, h, w = _attended_shape(x, gated)
    tl_dtype, torch_dtype = compute_dtypes(x.dtype)
    if n * c == 0:
        return torch.zeros((n, c), dtype=torch_dtype, device=x.device)
    grid, splits, iters, blocks = _reduce_geometry(n, c, h * w, channels_last)
    partial = torch.empty((splits, n, c), dtype=torch_dtype, device=x.device)
    channel_attention_reduce_kernel[grid](x, x if du is None else du, partial, n, c, h * w, *canonical_strides(x.shape, channels_last),
                           *canonical_strides((n, c, h, w), channels_last), iters, WITH_GRAD=du is not None,
                           GATED=gated, COMPUTE=tl_dtype, **blocks,
                           **launch_options(REDUCE_FP64_WARPS if x.dtype == torch.float64 else WIDE_WARPS))
    return partial.sum(0)  # split rows added in order: a fixed reduction order


def channel_attention_apply(x: torch.Tensor, scale: torch.Tensor, gated: bool, channels_last: bool) -> torch.Tensor:
    """u = t * scale[n, c] in the dtype and layout of x."""
    n, c, h, w = _attended_shape(x, gated)
    u = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=layout_format(channels_last))
    if u.numel() == 0:
        return u
    tl_dtype, _ = compute_dtypes(x.dtype)
    grid, blocks = _elementwise_grid(c, n * h * w, channels_last)
    channel_attention_apply_kernel[grid](x, scale.contiguous(), u, c, h * w, n * h * w, *canonical_strides(x.shape, channels_last),
                          *canonical_strides(u.shape, channels_last), GATED=gated, COMPUTE=tl_dtype, **blocks,
                          **launch_options())
    return u


def channel_attention_backward_input(du: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor,
                                     gated: bool, channels_last: bool) -> torch.Tensor:
    """dx for dt = du * scale[n, c] + q[n, c], in the dtype and layout of x."""
    n, c, h, w = _attended_shape(x, gated)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout_format(channels_last))
    if dx.numel() == 0:
        return dx
    tl_dtype, _ = compute_dtypes(x.dtype)
    grid, blocks = _elementwise_grid(c, n * h * w, channels_last)
    channel_attention_backward_input_kernel[grid](du, x, scale.contiguous(), q.contiguous(), dx, c, h * w, n * h * w,
                                   *canonical_strides(x.shape, channels_last),
                                   *canonical_strides(du.shape, channels_last),
                                   GATED=gated, COMPUTE=tl_dtype, **blocks, **launch_options(WIDE_WARPS))
    return dx


def scaled_residual_forward(inp: torch.Tensor, beta: torch.Tensor, z: torch.Tensor,
                            channels_last: bool) -> torch.Tensor:
    """inp + beta[c] * z; inp and z share one layout."""
    n, c, h, w = inp.shape
    y = torch.empty(inp.shape, dtype=inp.dtype, device=inp.device, memory_format=layout_format(channels_last))
    if y.numel() == 0:
        return y
    tl_dtype, _ = compute_dtypes(inp.dtype)
    grid, blocks = _elementwise_grid(c, n * h * w, channels_last)
    scaled_residual_forward_kernel[grid](inp, beta.contiguous(), z, y, c, h * w, n * h * w,
                            *canonical_strides(inp.shape, channels_last), COMPUTE=tl_dtype, **blocks,
                            **launch_options())
    return y


def scaled_residual_backward(g: torch.Tensor, beta: torch.Tensor, z: torch.Tensor, need_z: bool,
                             need_beta: bool, channels_last: bool):
    """(beta * g or None, sum_{n,h,w} g * z in the compute dtype or None), one pass."""
    n, c, h, w = z.shape
    m = n * h * w
    tl_dtype, torch_dtype = compute_dtypes(z.dtype)
    fmt = layout_format(channels_last)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=fmt) if need_z else None
    if z.numel() == 0 or not (need_z or need_beta):
        return dz, (torch.zeros(c, dtype=torch_dtype, device=z.device) if need_beta else None)
    block_c, block_m = _tile(c, m, channels_last)
    m_blocks = triton.cdiv(m, block_m)
    programs = min(m_blocks, 1 if interpreting() else MAX_PROGRAMS)
    iters = triton.cdiv(m_blocks, programs)
    programs = triton.cdiv(m_blocks, iters)
    partial = torch.empty((programs, c), dtype=torch_dtype, device=z.device)
    scaled_residual_backward_kernel[(programs, triton.cdiv(c, block_c))](
        g, beta.contiguous(), z, dz if need_z else g, partial, c, h * w, m, *canonical_strides(z.shape, channels_last),
        iters, NEED_Z=need_z, NEED_BETA=need_beta, COMPUTE=tl_dtype, BLOCK_C=block_c, BLOCK_M=block_m,
        **launch_options())
    return dz, (partial.sum(0) if need_beta else None)  # rows added in order: deterministic
