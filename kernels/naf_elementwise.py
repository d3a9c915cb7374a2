"""Triton kernels for ``restorenet.ops.naf_elementwise`` (NAFBlock's LayerNorm2d
and SimpleGate).

Like ``restorenet_kernels.reversible``, every kernel sees an [N, C, H, W] tensor
as a [C, M] matrix with M = N*H*W, addressed through three element strides (per
sample, per channel, per pixel): one kernel serves the contiguous and the
channels_last layout.

* ``layer_norm2d_forward_kernel``  per pixel (column): mean and rstd over the C
  channels, y = (x - mean) * rstd * w + b; mean and rstd are stored per pixel
  ([N, H, W], compute dtype) for the backward. Variance is two-pass,
  sum((x - mean)^2) / C (no E[x^2] - E[x]^2 cancellation).
* ``layer_norm2d_backward_kernel`` with xhat = (x - mean) * rstd, g = dy * w:
      dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
      partial_w[program, c] = sum over the program's pixels of dy * xhat
      partial_b[program, c] = sum over the program's pixels of dy
  Each program owns a fixed set of pixels and writes its own partial row: no
  atomics. The launcher adds the rows in order (deterministic; the grid depends
  on the shape only).
* ``simple_gate_forward_kernel`` / ``simple_gate_backward_kernel``:
  y = x[:, :C/2] * x[:, C/2:]; dx = (dy * x[:, C/2:], dy * x[:, :C/2]).

When C fits one channel block (``MAX_BLOCK_C``; every NAFNet width does) a
column is loaded once and kept in registers; wider tensors loop over channel
blocks (the forward then reads x three times, the backward twice, and the
partial rows are accumulated in place, each program in its own row).

Arithmetic is fp32 for fp16/bf16/fp32 storage (fp64 for fp64). Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from restorenet_kernels._addressing import channel_pixel_tile, pixel_block
from restorenet_kernels._launch import canonical_strides, compute_dtypes, interpreting, launch_options, layout_format

MAX_BLOCK_C = 1024
TILE = 4096  # elements per [BLOCK_C, BLOCK_M] tile on a GPU
MAX_PROGRAMS = 1024  # bounds the partial-sum buffer: at most MAX_PROGRAMS rows
# The LayerNorm backward holds four tile-sized values per element (x, dy, xhat, g):
# 8 warps give each thread 16 elements of a tile (at 4 warps fp32 channels_last
# spilled 8 B, fp64 up to 760 B: docs/kernel_report.md). The fp64 forward too (4 B
# spilled at 4 warps); the 16-bit forward stays at 4 (ptxas spilled 8-16 B at 8).
NORM_WARPS = 8


# ----------------------------------------------------------------------- kernels
@triton.jit
def layer_norm2d_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                                C, HW, M, s_n, s_c, s_p, eps, iters,
                                COMPUTE: tl.constexpr, C_BLOCKS: tl.constexpr,
                                BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    for it in range(iters):
        offs_m = pixel_block(pid, it, iters, BLOCK_M)
        if C_BLOCKS == 1:
            offs_c = tl.arange(0, BLOCK_C)
            off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(COMPUTE)
            mean = tl.sum(x, axis=0) / C
            d = tl.where(mask, x - mean[None, :], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
            w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(COMPUTE)
            b = tl.load(b_ptr + offs_c, mask=offs_c < C, other=0.0).to(COMPUTE)
            y = d * rstd[None, :] * w[:, None] + b[:, None]
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            total = tl.zeros((BLOCK_M,), dtype=COMPUTE)
            for cb in range(C_BLOCKS):
                offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
                off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
                total += tl.sum(tl.load(x_ptr + off, mask=mask, other=0.0).to(COMPUTE), axis=0)
            mean = total / C
            sq = tl.zeros((BLOCK_M,), dtype=COMPUTE)
            for cb in range(C_BLOCKS):
                offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
                off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
                x = tl.load(x_ptr + off, mask=mask, other=0.0).to(COMPUTE)
                d = tl.where(mask, x - mean[None, :], 0.0)
                sq += tl.sum(d * d, axis=0)
            rstd = 1.0 / tl.sqrt(sq / C + eps)
            for cb in range(C_BLOCKS):
                offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
                off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
                x = tl.load(x_ptr + off, mask=mask, other=0.0).to(COMPUTE)
                w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(COMPUTE)
                b = tl.load(b_ptr + offs_c, mask=offs_c < C, other=0.0).to(COMPUTE)
                y = (x - mean[None, :]) * rstd[None, :] * w[:, None] + b[:, None]
                tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + offs_m, mean, mask=offs_m < M)
        tl.store(rstd_ptr + offs_m, rstd, mask=offs_m < M)


@triton.jit
def layer_norm2d_backward_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, pw_ptr, pb_ptr,
                                 C, HW, M, s_n, s_c, s_p, iters,
                                 COMPUTE: tl.constexpr, C_BLOCKS: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * C
    if C_BLOCKS == 1:
        offs_c = tl.arange(0, BLOCK_C)
        w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(COMPUTE)
        acc_w = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        acc_b = tl.zeros((BLOCK_C,), dtype=COMPUTE)
        for it in range(iters):
            offs_m = pixel_block(pid, it, iters, BLOCK_M)
            off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
            mean = tl.load(mean_ptr + offs_m, mask=offs_m < M, other=0.0)
            rstd = tl.load(rstd_ptr + offs_m, mask=offs_m < M, other=0.0)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(COMPUTE)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(COMPUTE)
            xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
            g = dy * w[:, None]
            c1 = tl.sum(g * xhat, axis=0) / C
            c2 = tl.sum(g, axis=0) / C
            dx = rstd[None, :] * (g - c2[None, :] - xhat * c1[None, :])
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            acc_w += tl.sum(dy * xhat, axis=1)  # masked lanes are 0: they add nothing
            acc_b += tl.sum(dy, axis=1)
        tl.store(pw_ptr + row + offs_c, acc_w, mask=offs_c < C)
        tl.store(pb_ptr + row + offs_c, acc_b, mask=offs_c < C)
    else:
        # The partial rows start at zero (the launcher's job); each program
        # adds into its own row only, so the read-modify-write is race free.
        for it in range(iters):
            offs_m = pixel_block(pid, it, iters, BLOCK_M)
            mean = tl.load(mean_ptr + offs_m, mask=offs_m < M, other=0.0)
            rstd = tl.load(rstd_ptr + offs_m, mask=offs_m < M, other=0.0)
            s1 = tl.zeros((BLOCK_M,), dtype=COMPUTE)
            s2 = tl.zeros((BLOCK_M,), dtype=COMPUTE)
            for cb in range(C_BLOCKS):
                offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
                off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
                w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(COMPUTE)
                x = tl.load(x_ptr + off, mask=mask, other=0.0).to(COMPUTE)
                dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(COMPUTE)
                xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
                g = dy * w[:, None]
                s1 += tl.sum(g * xhat, axis=0)
                s2 += tl.sum(g, axis=0)
            c1 = s1 / C
            c2 = s2 / C
            for cb in range(C_BLOCKS):
                offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
                off, mask = channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p)
                w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(COMPUTE)
                x = tl.load(x_ptr + off, mask=mask, other=0.0).to(COMPUTE)
                dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(COMPUTE)
                xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
                g = dy * w[:, None]
                dx = rstd[None, :] * (g - c2[None, :] - xhat * c1[None, :])
                tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                cmask = offs_c < C
                pw = tl.load(pw_ptr + row + offs_c, mask=cmask, other=0.0)
                pb = tl.load(pb_ptr + row + offs_c, mask=cmask, other=0.0)
                tl.store(pw_ptr + row + offs_c, pw + tl.sum(dy * xhat, axis=1), mask=cmask)
                tl.store(pb_ptr + row + offs_c, pb + tl.sum(dy, axis=1), mask=cmask)


@triton.jit
def _gate_tile(CH, HW, M, xs_n, xs_c, xs_p, ys_n, ys_c, ys_p,
               BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's tile: offsets of the two halves of x (channel c of the second
    half is channel c + C/2 of x), of the output, and the in-bounds mask."""
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_off, mask = channel_pixel_tile(offs_c, offs_m, CH, HW, M, xs_n, xs_c, xs_p)
    x2_off, _ = channel_pixel_tile(offs_c + CH, offs_m, 2 * CH, HW, M, xs_n, xs_c, xs_p)
    y_off, _ = channel_pixel_tile(offs_c, offs_m, CH, HW, M, ys_n, ys_c, ys_p)
    return x_off, x2_off, y_off, mask


@triton.jit
def simple_gate_forward_kernel(x_ptr, y_ptr, CH, HW, M, xs_n, xs_c, xs_p, ys_n, ys_c, ys_p,
                               COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    x_off, x2_off, y_off, mask = _gate_tile(CH, HW, M, xs_n, xs_c, xs_p, ys_n, ys_c, ys_p, BLOCK_C, BLOCK_M)
    a = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(x_ptr + x2_off, mask=mask, other=0.0).to(COMPUTE)
    tl.store(y_ptr + y_off, (a * b).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def simple_gate_backward_kernel(dy_ptr, x_ptr, dx_ptr, CH, HW, M, xs_n, xs_c, xs_p, ys_n, ys_c, ys_p,
                                COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    x_off, x2_off, y_off, mask = _gate_tile(CH, HW, M, xs_n, xs_c, xs_p, ys_n, ys_c, ys_p, BLOCK_C, BLOCK_M)
    dy = tl.load(dy_ptr + y_off, mask=mask, other=0.0).to(COMPUTE)
    a = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(x_ptr + x2_off, mask=mask, other=0.0).to(COMPUTE)
    tl.store(dx_ptr + x_off, (dy * b).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + x2_off, (dy * a).to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------- launchers
def _norm_geometry(x: torch.Tensor):
    """Tiling of the LayerNorm kernels: (grid, iters, blocks). A program takes
    ``iters`` consecutive blocks of BLOCK_M pixels; the program count depends
    on the shape only (so does the partial-sum order)."""
    n, c, h, w = x.shape
    m = n * h * w
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(c))
    c_blocks = triton.cdiv(c, block_c)
    # The interpreter pays per program: big tiles. On a GPU fp64 takes half a tile,
    # so the backward's x, dy, xhat and g fit in registers (see NORM_WARPS).
    tile = 16384 if interpreting() else TILE // 2 if x.dtype == torch.float64 else TILE
    block_m = max(1, min(tile // block_c, triton.next_power_of_2(max(m, 1))))
    m_blocks = triton.cdiv(m, block_m)
    programs = min(m_blocks, 16 if interpreting() else MAX_PROGRAMS)
    iters = triton.cdiv(m_blocks, programs)
    programs = triton.cdiv(m_blocks, iters)
    return (programs,), iters, dict(C_BLOCKS=c_blocks, BLOCK_C=block_c, BLOCK_M=block_m)


def layer_norm2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         channels_last: bool):
    """(y, mean, rstd): y in the dtype and layout of x, mean/rstd [N, H, W] in
    the compute dtype."""
    n, c, h, w = x.shape
    tl_dtype, torch_dtype = compute_dtypes(x.dtype)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout_format(channels_last))
    mean = torch.empty((n, h, w), dtype=torch_dtype, device=x.device)
    rstd = torch.empty((n, h, w), dtype=torch_dtype, device=x.device)
    if x.numel() == 0:
        return y, mean, rstd
    grid, iters, blocks = _norm_geometry(x)
    s_n, s_c, s_p = canonical_strides(x.shape, channels_last)
    layer_norm2d_forward_kernel[grid](
        x, weight.contiguous(), bias.contiguous(), y, mean, rstd, c, h * w, n * h * w, s_n, s_c, s_p,
        float(eps), iters, COMPUTE=tl_dtype, **blocks,
        **launch_options(NORM_WARPS if x.dtype == torch.float64 else 4))
    return y, mean, rstd


def layer_norm2d_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, channels_last: bool):
    """(dx, dweight, dbias): dx in the dtype and layout of x, dweight/dbias [C] in
    the compute dtype (fp32 partial sums added in a fixed order)."""
    n, c, h, w = x.shape
    tl_dtype, torch_dtype = compute_dtypes(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout_format(channels_last))
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=torch_dtype, device=x.device)
        return dx, zeros, zeros.clone()
    grid, iters, blocks = _norm_geometry(x)
    partial_w = torch.zeros((grid[0], c), dtype=torch_dtype, device=x.device)
    partial_b = torch.zeros((grid[0], c), dtype=torch_dtype, device=x.device)
    s_n, s_c, s_p = canonical_strides(x.shape, channels_last)
    layer_norm2d_backward_kernel[grid](
        dy, x, weight.contiguous(), mean.contiguous(), rstd.contiguous(), dx, partial_w, partial_b,
        c, h * w, n * h * w, s_n, s_c, s_p, iters, COMPUTE=tl_dtype, **blocks,
        **launch_options(NORM_WARPS))
    # Rows added in order: a fixed reduction order (no atomics anywhere).
    return dx, partial_w.sum(0), partial_b.sum(0)


def _gate_geometry(x: torch.Tensor, channels_last: bool):
    n, c, h, w = x.shape
    half, m = c // 2, n * h * w
    if interpreting():
        block_c = min(64, triton.next_power_of_2(half))
        block_m = min(16384 // block_c, triton.next_power_of_2(max(m, 1)))
    elif channels_last:  # channels are contiguous: a wide channel block
        block_c = min(64, triton.next_power_of_2(half))
        block_m = max(1, 1024 // block_c)
    else:  # pixels are contiguous: long pixel rows
        block_c, block_m = 2, 512
    grid = (triton.cdiv(m, block_m), triton.cdiv(half, block_c))
    return half, h * w, m, grid, dict(BLOCK_C=block_c, BLOCK_M=block_m)


def simple_gate_forward(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    y = torch.empty((n, c // 2, h, w), dtype=x.dtype, device=x.device, memory_format=layout_format(channels_last))
    if y.numel() == 0:
        return y
    tl_dtype, _ = compute_dtypes(x.dtype)
    half, hw, m, grid, blocks = _gate_geometry(x, channels_last)
    simple_gate_forward_kernel[grid](x, y, half, hw, m, *canonical_strides(x.shape, channels_last),
                                     *canonical_strides(y.shape, channels_last), COMPUTE=tl_dtype,
                                     **blocks, **launch_options())
    return y


def simple_gate_backward(dy: torch.Tensor, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout_format(channels_last))
    if dx.numel() == 0:
        return dx
    tl_dtype, _ = compute_dtypes(x.dtype)
    half, hw, m, grid, blocks = _gate_geometry(x, channels_last)
    simple_gate_backward_kernel[grid](dy, x, dx, half, hw, m, *canonical_strides(x.shape, channels_last),
                                      *canonical_strides(dy.shape, channels_last), COMPUTE=tl_dtype,
                                      **blocks, **launch_options())
    return dx
