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

So the work per sample is proportional to in_width[n] * out_width[n], rounded
up to 16 channels each way: every channel tile is 16 wide (``GRANULARITY``), and
a reduction over a width that is not a multiple of the reduction tile ends in
16-channel chunks (see ``conv_core``). DDS-Net's widths 16/32/48/64 thus cost
in proportion to their FLOPs. Widths are int32 tensors [N] on the device; they are
clamped to the channel counts in the kernels so a bad value cannot address
memory outside the tensors (the op validates them before launching).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from restorenet_kernels.conv_core import (
    accumulator_dtype, conv_dgrad_tile, conv_fwd_tile, conv_wgrad_tile, dense, gpu_configs, index64, launch,
    launch_forward, launch_grad_input, numerics, pack_weight, pixel_strides, split_count, store_output_tile,
    store_weight_partials, vector_layout, wgrad_rows, wgrad_tile,
)

# Channel tiles of 16 (the smallest tl.dot accepts), so that widths that differ
# by 16 (e.g. DDS-Net's 16/32/48/64) differ in work.
GRANULARITY = 16


# ----------------------------------------------------------------------- kernels
@triton.jit
def slim_conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, in_width_ptr, out_width_ptr, y_ptr,
    C_in, H, W, C_out, H_out, W_out, stride: tl.constexpr, padding, C_in_alloc,
    s_xn, s_xc, s_xh, s_xw, s_yn, s_yc, s_yh, s_yw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, INDEX64: tl.constexpr,
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

    acc = conv_fwd_tile(x_ptr + n * s_xn, w_ptr, w_ptr, 1.0, oh, ow, p_mask, offs_co, co_active, ci_end, C_in_alloc,
                        H, W, stride, padding, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
                        KH, KW, False, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_CI, INDEX64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_co, mask=co_active, other=0.0).to(ACC_DTYPE)[None, :]
    # Inactive channels hold exact zeros (masked weights and bias contribute 0.0).
    store_output_tile(y_ptr, acc, n, offs_co, oh, ow, p_mask[:, None] & (offs_co < C_out)[None, :],
                      s_yn, s_yc, s_yh, s_yw, INDEX64)


@triton.jit
def slim_conv2d_dgrad_kernel(
    dy_ptr, w_ptr, in_width_ptr, out_width_ptr, dx_ptr,
    C_in, H, W, C_out, H_out, W_out, stride: tl.constexpr, padding, C_out_alloc,
    s_dyn, s_dyc, s_dyh, s_dyw, s_xn, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, INDEX64: tl.constexpr,
):
    pid_p, pid_ci, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    k_in = tl.minimum(tl.load(in_width_ptr + n), C_in)
    k_out = tl.minimum(tl.load(out_width_ptr + n), C_out)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    p_mask, ci_active = offs_p < H * W, offs_ci < k_in
    ih, iw = offs_p // W, offs_p % W
    co_end = tl.where(pid_ci * BLOCK_CI < k_in, k_out, 0)

    acc = conv_dgrad_tile(dy_ptr + n * s_dyn, w_ptr, w_ptr, 1.0, ih, iw, p_mask, offs_ci, ci_active, co_end, C_out_alloc,
                          H_out, W_out, stride, padding, s_dyc, s_dyh, s_dyw, s_wo, s_wi, s_wh, s_ww,
                          KH, KW, False, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_CI, INDEX64)
    store_output_tile(dx_ptr, acc, n, offs_ci, ih, iw, p_mask[:, None] & (offs_ci < C_in)[None, :],
                      s_xn, s_xc, s_xh, s_xw, INDEX64)


@triton.jit
def slim_conv2d_wgrad_kernel(
    dy_ptr, x_ptr, in_width_ptr, out_width_ptr, dw_part_ptr, dbias_part_ptr,
    N, C_in, H, W, C_out, H_out, W_out, stride: tl.constexpr, padding, n_split, C_in_alloc, C_out_alloc,
    s_dyn, s_dyc, s_dyp, s_xn, s_xc, s_xh, s_xw,
    KH: tl.constexpr, KW: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    INDEX64: tl.constexpr,
):
    """One program owns a [BLOCK_M (tap, ci) rows, BLOCK_CO] tile of dW and a
    1/n_split share of every sample's pixels; samples whose widths leave the whole
    tile inactive cost two width loads. Inside a live tile the loads are masked
    by the tensor bounds only (so they vectorise) and each sample's product is
    masked to its active rows and columns before it is added."""
    pid_co, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < C_out
    # x and dy are read up to the channels their buffers hold (whole vectors); each
    # sample's product is masked to its active rows and columns below.
    ci_row, tap_row, r_row, s_row, row_mask, row_read = wgrad_rows(pid_m, C_in, C_in_alloc, KH, KW,
                                                                   BLOCK_M, BLOCK_CI)
    co_read = offs_co < C_out_alloc
    ci_begin = tl.min(ci_row, axis=0)
    owns_bias = pid_m == 0  # one program per co block reduces the bias gradient

    dw = tl.zeros((BLOCK_M, BLOCK_CO), dtype=ACC_DTYPE)
    dbias = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
    n_pix_blocks = tl.cdiv(H_out * W_out, BLOCK_P)
    for n in range(N):
        n64 = tl.cast(n, tl.int64)
        k_in = tl.minimum(tl.load(in_width_ptr + n), C_in)
        k_out = tl.minimum(tl.load(out_width_ptr + n), C_out)
        # The bias-owning program also reduces a sample with no active input channel
        # (k_in <= 0 after clamping): its output is the bias alone, so dbias still gets
        # its dy; the masks below keep its x out of dW.
        live = (pid_co * BLOCK_CO < k_out) & ((ci_begin < k_in) | owns_bias)
        pb_end = tl.where(live, n_pix_blocks, 0)
        g, db = conv_wgrad_tile(dy_ptr + n64 * s_dyn, x_ptr + n64 * s_xn, offs_co, co_read, ci_row, r_row, s_row,
                                row_read, pid_s, pb_end, n_split, H, W, W_out, H_out * W_out, stride, padding,
                                s_dyc, s_dyp, s_xc, s_xh, s_xw,
                                ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_M, BLOCK_CO, INDEX64)
        co_active = offs_co < k_out
        dw += tl.where((ci_row < k_in)[:, None] & co_active[None, :], g, 0.0)
        dbias += tl.where(co_active, db, 0.0)

    # Partial buffers are [SPLIT, C_out, C_in, KH, KW] and [SPLIT, C_out].
    w_mask = row_mask[:, None] & co_mask[None, :]
    store_weight_partials(dw_part_ptr, dw, pid_s, offs_co, ci_row, tap_row, w_mask, C_out, C_in, KH, KW)
    tl.store(dbias_part_ptr + pid_s * C_out + offs_co, dbias, mask=co_mask & owns_bias)


# --------------------------------------------------------------------- launchers
def forward(x, weight, bias, in_width, out_width, stride, padding):
    """y [N, C_out, Ho, Wo] in the layout of x; widths are int32 tensors [N]."""
    x = dense(x)
    w = pack_weight(weight, 1)  # C_in innermost: the forward's reduction dimension
    # The kernel indexes the bias with unit stride: a strided view must be made dense.
    op_args = (w, bias.contiguous() if bias is not None else w, in_width.contiguous(), out_width.contiguous())
    return launch_forward(slim_conv2d_fwd_kernel, x, w, op_args, stride, padding, GRANULARITY,
                          HAS_BIAS=bias is not None)


def backward(grad_out, x, weight, bias, in_width, out_width, stride, padding, needs):
    """Gradients for (x, weight, bias); None where not needed (or bias is None)."""
    # dy in the layout the kernels read (``vector_layout``) once, for both gradients.
    x, grad_out = dense(x), vector_layout(dense(grad_out))[0]
    in_width, out_width = in_width.contiguous(), out_width.contiguous()
    grads = [None, None, None]
    if needs[0]:
        grads[0] = _grad_input(grad_out, x, weight, in_width, out_width, stride, padding)
    if needs[1] or (needs[2] and bias is not None):
        dw, db = _grad_params(grad_out, x, weight, in_width, out_width, stride, padding)
        grads[1] = dw if needs[1] else None
        grads[2] = db if (needs[2] and bias is not None) else None
    return grads


def _grad_input(grad_out, x, weight, in_width, out_width, stride, padding):
    w = pack_weight(weight, 0)  # C_out innermost: the input gradient's reduction dimension
    return launch_grad_input(slim_conv2d_dgrad_kernel, grad_out, x, w, (w, in_width, out_width),
                             stride, padding, GRANULARITY)


def _grad_params(grad_out, x, weight, in_width, out_width, stride, padding):
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = grad_out.shape[2:]
    tile = wgrad_tile(x.dtype, c_in, c_out, GRANULARITY)
    grid_co = triton.cdiv(c_out, tile["BLOCK_CO"])
    grid_m = triton.cdiv(c_in, tile["BLOCK_CI"]) * triton.cdiv(kh * kw, tile["BLOCK_M"] // tile["BLOCK_CI"])
    split = split_count(grid_co * grid_m, triton.cdiv(h_out * w_out, tile["BLOCK_P"]), x.device)
    zeros = dict(dtype=accumulator_dtype(x.dtype), device=x.device)
    dw_part = torch.zeros((split, c_out, c_in, kh, kw), **zeros)
    dbias_part = torch.zeros((split, c_out), **zeros)
    if n > 0:
        (dy, c_out_alloc), (xv, c_in_alloc) = vector_layout(grad_out), vector_layout(x)
        args = (dy, xv, in_width, out_width, dw_part, dbias_part,
                n, c_in, h, w, c_out, h_out, w_out, stride, padding, split, c_in_alloc, c_out_alloc,
                *pixel_strides(dy), *xv.stride())
        launch(slim_conv2d_wgrad_kernel, lambda meta: (grid_co, grid_m, split), args,
               dict(KH=kh, KW=kw, INDEX64=index64(dy, xv), **numerics(x.dtype)),
               gpu_configs("wgrad", x.dtype, c_in, c_out, GRANULARITY), tile)
    return dw_part.sum(0), dbias_part.sum(0)
