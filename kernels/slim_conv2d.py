"""Triton kernels for ``slim_conv2d``: each sample n convolves its first
``in_width[n]`` input channels with ``weight[:out_width[n], :in_width[n]]``.

The loops are the implicit-GEMM core shared with ``hyper_conv2d``
(``conv_core.py``, run with ``GENERATED=False``: the weight is read in place,
never sliced or copied). The per-op prologue loads the sample's two widths and
turns them into channel bounds:

* ``slim_conv2d_fwd_kernel``   reduces ci < in_width[n]; an output-channel tile
  wholly at or beyond out_width[n] runs no GEMM and writes its zeros;
* ``slim_conv2d_dgrad_kernel`` reduces co < out_width[n]; dx is zero for ci >= in_width[n]
  (a tile wholly beyond runs no GEMM);
* ``slim_conv2d_wgrad_kernel`` dW[co, ci] = sum over the samples with co < out_width[n]
  and ci < in_width[n]; a sample for which the program's whole (co, ci) tile is
  inactive reads nothing. Partial sums per program, no atomics: deterministic.

So the work per sample is proportional to in_width[n] * out_width[n] (rounded
up to the tile sizes). Widths are int32 tensors [N] on the device; they are
clamped to the channel counts in the kernels so a bad value cannot address
memory outside the tensors (the op validates them before launching).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from restorenet_kernels.conv_core import (
    accumulator_dtype, conv_dgrad_tile, conv_fwd_tile, conv_wgrad_tile, dense, launch_forward,
    launch_grad_input, launch_opts, numerics, split_count, store_output_tile, store_weight_partials, tiles,
)

# Output-channel tiles of at most 32 channels, so that widths that differ by
# 32 (e.g. DDS-Net's 16/32/48/64) skip whole tiles.
MAX_BLOCK_CO = 32


# ----------------------------------------------------------------------- kernels
@triton.jit
def slim_conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, in_width_ptr, out_width_ptr, y_ptr,
    C_in, H, W, C_out, H_out, W_out, stride, padding,
    s_xn, s_xc, s_xh, s_xw, s_yn, s_yc, s_yh, s_yw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    pid_p, pid_co, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    k_in = tl.minimum(tl.load(in_width_ptr + n), C_in)
    k_out = tl.minimum(tl.load(out_width_ptr + n), C_out)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    p_mask, co_active = offs_p < H_out * W_out, offs_co < k_out
    oh, ow = offs_p // W_out, offs_p % W_out
    # A tile wholly beyond out_width reduces over zero input channels: no GEMM.
    ci_end = tl.where(pid_co * BLOCK_CO < k_out, k_in, 0)

    acc = conv_fwd_tile(x_ptr + n * s_xn, w_ptr, w_ptr, 1.0, oh, ow, p_mask, offs_co, co_active, ci_end,
                        H, W, stride, padding, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
                        KH, KW, False, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_CI)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_co, mask=co_active, other=0.0).to(ACC_DTYPE)[None, :]
    # Inactive channels hold exact zeros (masked weights and bias contribute 0.0).
    store_output_tile(y_ptr, acc, n, offs_co, oh, ow, p_mask[:, None] & (offs_co < C_out)[None, :],
                      s_yn, s_yc, s_yh, s_yw)


@triton.jit
def slim_conv2d_dgrad_kernel(
    dy_ptr, w_ptr, in_width_ptr, out_width_ptr, dx_ptr,
    C_in, H, W, C_out, H_out, W_out, stride, padding,
    s_dyn, s_dyc, s_dyh, s_dyw, s_xn, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    pid_p, pid_ci, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    k_in = tl.minimum(tl.load(in_width_ptr + n), C_in)
    k_out = tl.minimum(tl.load(out_width_ptr + n), C_out)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    p_mask, ci_active = offs_p < H * W, offs_ci < k_in
    ih, iw = offs_p // W, offs_p % W
    co_end = tl.where(pid_ci * BLOCK_CI < k_in, k_out, 0)

    acc = conv_dgrad_tile(dy_ptr + n * s_dyn, w_ptr, w_ptr, 1.0, ih, iw, p_mask, offs_ci, ci_active, co_end,
                          H_out, W_out, stride, padding, s_dyc, s_dyh, s_dyw, s_wo, s_wi, s_wh, s_ww,
                          KH, KW, False, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_CI)
    store_output_tile(dx_ptr, acc, n, offs_ci, ih, iw, p_mask[:, None] & (offs_ci < C_in)[None, :],
                      s_xn, s_xc, s_xh, s_xw)


@triton.jit
def slim_conv2d_wgrad_kernel(
    dy_ptr, x_ptr, in_width_ptr, out_width_ptr, dw_part_ptr, dbias_part_ptr,
    N, C_in, H, W, C_out, H_out, W_out, stride, padding,
    s_dyn, s_dyc, s_dyh, s_dyw, s_xn, s_xc, s_xh, s_xw,
    KH: tl.constexpr, KW: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """One program owns a (co block, ci block, tap) tile of dW and a 1/SPLIT
    share of every sample's pixels; samples whose widths leave the whole tile
    inactive cost two width loads."""
    pid_co, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = (pid_k % (KH * KW)) // KW
    s = pid_k % KW
    pid_ci = pid_k // (KH * KW)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    owns_bias = pid_k == 0  # one program per co block reduces the bias gradient

    dw = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    dbias = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
    n_pix_blocks = tl.cdiv(H_out * W_out, BLOCK_P)
    for n in range(N):
        n64 = tl.cast(n, tl.int64)
        k_in = tl.minimum(tl.load(in_width_ptr + n), C_in)
        k_out = tl.minimum(tl.load(out_width_ptr + n), C_out)
        # The bias-owning program also reduces a sample with no active input channel
        # (k_in <= 0 after clamping): its output is the bias alone, so dbias still gets
        # its dy; the x tile is then fully masked and adds nothing to dW.
        live = (pid_co * BLOCK_CO < k_out) & ((pid_ci * BLOCK_CI < k_in) | owns_bias)
        pb_end = tl.where(live, n_pix_blocks, 0)
        g, db = conv_wgrad_tile(dy_ptr + n64 * s_dyn, x_ptr + n64 * s_xn, offs_co, offs_ci,
                                offs_co < k_out, offs_ci < k_in, r, s, pid_s, pb_end,
                                H, W, W_out, H_out * W_out, stride, padding,
                                s_dyc, s_dyh, s_dyw, s_xc, s_xh, s_xw,
                                ACC_DTYPE, DOT_PRECISION, SPLIT, BLOCK_P, BLOCK_CO, BLOCK_CI)
        dw += g
        dbias += db

    # Partial buffers are [SPLIT, C_out, C_in, KH, KW] and [SPLIT, C_out].
    w_mask = (offs_co < C_out)[:, None] & (offs_ci < C_in)[None, :]
    store_weight_partials(dw_part_ptr, dw, pid_s, offs_co, offs_ci, r, s, w_mask, C_out, C_in, KH, KW)
    tl.store(dbias_part_ptr + pid_s * C_out + offs_co, dbias, mask=(offs_co < C_out) & owns_bias)


# --------------------------------------------------------------------- launchers
def _tiles(c_in: int, c_out: int) -> dict:
    return tiles(c_in, c_out, max_co=MAX_BLOCK_CO)


def forward(x, weight, bias, in_width, out_width, stride, padding):
    """y [N, C_out, Ho, Wo] in the layout of x; widths are int32 tensors [N]."""
    x = dense(x)
    weight = weight.contiguous()
    # The kernel indexes the bias with unit stride: a strided view must be made dense.
    op_args = (weight, bias.contiguous() if bias is not None else weight, in_width.contiguous(),
               out_width.contiguous())
    return launch_forward(slim_conv2d_fwd_kernel, x, weight, op_args, stride, padding,
                          _tiles(x.shape[1], weight.shape[0]), HAS_BIAS=bias is not None)


def backward(grad_out, x, weight, bias, in_width, out_width, stride, padding, needs):
    """Gradients for (x, weight, bias); None where not needed (or bias is None)."""
    x, grad_out = dense(x), dense(grad_out)
    weight, in_width, out_width = weight.contiguous(), in_width.contiguous(), out_width.contiguous()
    grads = [None, None, None]
    if needs[0]:
        grads[0] = _grad_input(grad_out, x, weight, in_width, out_width, stride, padding)
    if needs[1] or (needs[2] and bias is not None):
        dw, db = _grad_params(grad_out, x, weight, in_width, out_width, stride, padding)
        grads[1] = dw if needs[1] else None
        grads[2] = db if (needs[2] and bias is not None) else None
    return grads


def _grad_input(grad_out, x, weight, in_width, out_width, stride, padding):
    return launch_grad_input(slim_conv2d_dgrad_kernel, grad_out, x, weight, (weight, in_width, out_width),
                             stride, padding, _tiles(x.shape[1], weight.shape[0]))


def _grad_params(grad_out, x, weight, in_width, out_width, stride, padding):
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = grad_out.shape[2:]
    tile = _tiles(c_in, c_out)
    grid_co = triton.cdiv(c_out, tile["BLOCK_CO"])
    grid_k = triton.cdiv(c_in, tile["BLOCK_CI"]) * kh * kw
    split = split_count(grid_co * grid_k, triton.cdiv(h_out * w_out, tile["BLOCK_P"]), x.device)
    zeros = dict(dtype=accumulator_dtype(x.dtype), device=x.device)
    dw_part = torch.zeros((split, c_out, c_in, kh, kw), **zeros)
    dbias_part = torch.zeros((split, c_out), **zeros)
    if n > 0:
        slim_conv2d_wgrad_kernel[(grid_co, grid_k, split)](
            grad_out, x, in_width, out_width, dw_part, dbias_part,
            n, c_in, h, w, c_out, h_out, w_out, stride, padding,
            *grad_out.stride(), *x.stride(),
            KH=kh, KW=kw, SPLIT=split, **numerics(x.dtype), **tile, **launch_opts(),
        )
    return dw_part.sum(0), dbias_part.sum(0)
