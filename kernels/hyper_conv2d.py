"""Triton kernels for ``hyper_conv2d``: convolution with a per-sample kernel
``K_n = c_n * W + B`` generated tile by tile inside the implicit GEMM.

Three kernels, all implicit GEMMs over the same index space
(sample n, pixel, output channel co, input channel ci, tap (r, s)):

* ``hyper_conv2d_fwd_kernel``    y[n, co, p]  = sum_{ci,r,s} x[n, ci, p*stride + (r,s) - pad] K_n[co, ci, r, s]
* ``hyper_conv2d_dgrad_kernel``   dx[n, ci, q] = sum_{co,r,s} dy[n, co, (q + pad - (r,s)) / stride] K_n[co, ci, r, s]
* ``hyper_conv2d_wgrad_kernel``  G_n[co, ci, r, s] = sum_p dy[n, co, p] x[n, ci, p*stride + (r,s) - pad],
  reduced on the fly into dW = sum_n c_n G_n, dB = sum_n G_n and dc_n = <G_n, W> (+ bias terms),
  so that neither K_n nor G_n ever reaches global memory.

The loops themselves are the implicit-GEMM core shared with ``slim_conv2d``
(``conv_core.py``, run with ``GENERATED=True``); these kernels add the
per-op prologue (load c_n) and epilogue (biases, the level reductions).
The launchers ``forward`` and ``backward`` are what ``restorenet.ops`` calls.
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


# ----------------------------------------------------------------------- kernels
# Thin wrappers: the per-op prologue (load c_n) and epilogue (bias, the three
# reductions) around the shared core, with GENERATED=True (K_n = c_n W + B).
@triton.jit
def hyper_conv2d_fwd_kernel(
    x_ptr, level_ptr, w_ptr, wb_ptr, bias_ptr, bias_base_ptr, y_ptr,
    C_in, H, W, C_out, H_out, W_out, stride: tl.constexpr, padding, C_in_alloc,
    s_xn, s_xc, s_xh, s_xw, s_yn, s_yc, s_yh, s_yw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_BASE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, INDEX64: tl.constexpr,
):
    """y tile [BLOCK_P pixels, BLOCK_CO channels] of sample n.

    Loads per reduction step of BLOCK_CI channels (one tap): BLOCK_P * BLOCK_CI
    activations and 2 * BLOCK_CI * BLOCK_CO weights (W and B, from which
    c_n W + B is formed) for 2 * BLOCK_P * BLOCK_CI * BLOCK_CO FLOPs, so

        loads / FLOP = 1 / (2 BLOCK_CO) + 1 / BLOCK_P

    the weight share (2 BLOCK_CO / BLOCK_P of the activation loads) falls below the
    activation loads once BLOCK_P > 2 BLOCK_CO: the 16-bit GPU tiles are 256 x 64
    (weights 1/2 of the activation loads, 1/3 of all loads; 0.0117 loads per
    FLOP, against 0.0234 for the 64 x 64 tile that generated 2 of every 3 loads);
    fp32 autotunes between 256 x 32 (weights 1/4 of the activation loads, 0.0195
    loads per FLOP) and 128 x 64 (weights equal to them, 0.0156) -- its 256 x 64
    tile spills (``conv_core.gpu_configs``)."""
    pid_p, pid_co, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    p_mask, co_mask = offs_p < H_out * W_out, offs_co < C_out
    oh, ow = offs_p // W_out, offs_p % W_out
    c = tl.load(level_ptr + n).to(ACC_DTYPE)

    acc = conv_fwd_tile(x_ptr + n * s_xn, w_ptr, wb_ptr, c, oh, ow, p_mask, offs_co, co_mask, C_in, C_in_alloc,
                        H, W, stride, padding, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
                        KH, KW, True, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_CI, INDEX64)
    if HAS_BIAS:
        acc += c * tl.load(bias_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BIAS_BASE:
        acc += tl.load(bias_base_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)[None, :]
    store_output_tile(y_ptr, acc, n, offs_co, oh, ow, p_mask[:, None] & co_mask[None, :],
                      s_yn, s_yc, s_yh, s_yw, INDEX64)


@triton.jit
def hyper_conv2d_dgrad_kernel(
    dy_ptr, level_ptr, w_ptr, wb_ptr, dx_ptr,
    C_in, H, W, C_out, H_out, W_out, stride: tl.constexpr, padding, C_out_alloc,
    s_dyn, s_dyc, s_dyh, s_dyw, s_xn, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, INDEX64: tl.constexpr,
):
    pid_p, pid_ci, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    p_mask, ci_mask = offs_p < H * W, offs_ci < C_in
    ih, iw = offs_p // W, offs_p % W
    c = tl.load(level_ptr + n).to(ACC_DTYPE)

    acc = conv_dgrad_tile(dy_ptr + n * s_dyn, w_ptr, wb_ptr, c, ih, iw, p_mask, offs_ci, ci_mask, C_out, C_out_alloc,
                          H_out, W_out, stride, padding, s_dyc, s_dyh, s_dyw, s_wo, s_wi, s_wh, s_ww,
                          KH, KW, True, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_CI, INDEX64)
    store_output_tile(dx_ptr, acc, n, offs_ci, ih, iw, p_mask[:, None] & ci_mask[None, :],
                      s_xn, s_xc, s_xh, s_xw, INDEX64)


@triton.jit
def hyper_conv2d_wgrad_kernel(
    dy_ptr, x_ptr, level_ptr, w_ptr, bias_ptr,
    dw_part_ptr, dwb_part_ptr, dlevel_part_ptr, dbias_part_ptr, dbias_base_part_ptr,
    N, C_in, H, W, C_out, H_out, W_out, stride: tl.constexpr, padding, n_split, C_in_alloc, C_out_alloc,
    s_dyn, s_dyc, s_dyp, s_xn, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
    INDEX64: tl.constexpr,
):
    """One program owns a [BLOCK_M (tap, ci) rows, BLOCK_CO] tile of the weight
    gradient and a 1/n_split share of every sample's pixels. Per sample it forms its
    share of G_n in registers and folds it straight into the three reductions. Each
    program writes its own partial sums (no atomics): the result is deterministic."""
    pid_co, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < C_out
    # x and dy are read up to the channels their buffers hold (whole vectors): the
    # 16-bit layout's extra channels are zeros, so they add nothing to G_n.
    ci_row, tap_row, r_row, s_row, row_mask, row_read = wgrad_rows(pid_m, C_in, C_in_alloc, KH, KW,
                                                                   BLOCK_M, BLOCK_CI)
    co_read = offs_co < C_out_alloc
    w_mask = row_mask[:, None] & co_mask[None, :]
    w_offs = offs_co[None, :] * s_wo + (ci_row * s_wi + r_row * s_wh + s_row * s_ww)[:, None]
    w_tile = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0).to(ACC_DTYPE)
    owns_bias = pid_m == 0  # one program per co block reduces the bias gradients
    if HAS_BIAS:
        bias_tile = tl.load(bias_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)

    dw = tl.zeros((BLOCK_M, BLOCK_CO), dtype=ACC_DTYPE)
    dwb = tl.zeros((BLOCK_M, BLOCK_CO), dtype=ACC_DTYPE)
    dbias = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
    dbias_base = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
    n_pix_blocks = tl.cdiv(H_out * W_out, BLOCK_P)
    part = (pid_s * tl.num_programs(0) + pid_co) * tl.num_programs(1) + pid_m
    for n in range(N):
        n64 = tl.cast(n, tl.int64)
        c = tl.load(level_ptr + n).to(ACC_DTYPE)
        g, db = conv_wgrad_tile(dy_ptr + n64 * s_dyn, x_ptr + n64 * s_xn, offs_co, co_read, ci_row, r_row, s_row,
                                row_read, pid_s, n_pix_blocks, n_split, H, W, W_out, H_out * W_out, stride, padding,
                                s_dyc, s_dyp, s_xc, s_xh, s_xw,
                                ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_M, BLOCK_CO, INDEX64)
        dw += c * g
        dwb += g
        dlevel = tl.sum(tl.sum(g * w_tile, axis=1), axis=0)
        if HAS_BIAS:
            dlevel += tl.where(owns_bias, tl.sum(db * bias_tile, axis=0), 0.0)
        dbias += c * db
        dbias_base += db
        tl.store(dlevel_part_ptr + part * N + n, dlevel)

    # Partial buffers are [SPLIT, C_out, C_in, KH, KW] and [SPLIT, C_out].
    store_weight_partials(dw_part_ptr, dw, pid_s, offs_co, ci_row, tap_row, w_mask, C_out, C_in, KH, KW)
    store_weight_partials(dwb_part_ptr, dwb, pid_s, offs_co, ci_row, tap_row, w_mask, C_out, C_in, KH, KW)
    bias_mask = co_mask & owns_bias
    tl.store(dbias_part_ptr + pid_s * C_out + offs_co, dbias, mask=bias_mask)
    tl.store(dbias_base_part_ptr + pid_s * C_out + offs_co, dbias_base, mask=bias_mask)


# --------------------------------------------------------------------- launchers
def _packed(weight, weight_base, contiguous_dim):
    return pack_weight(weight, contiguous_dim), pack_weight(weight_base, contiguous_dim)


def forward(x, level, weight, weight_base, bias, bias_base, stride, padding):
    x = dense(x)
    # Weights stored C_in-innermost: the forward's reduction dimension (see pack_weight).
    w, wb = _packed(weight, weight_base, 1)
    # The kernels index the biases with unit stride: a strided view must be made dense.
    op_args = (level.contiguous(), w, wb,
               bias.contiguous() if bias is not None else w,
               bias_base.contiguous() if bias_base is not None else w)
    return launch_forward(hyper_conv2d_fwd_kernel, x, w, op_args, stride, padding,
                          HAS_BIAS=bias is not None, HAS_BIAS_BASE=bias_base is not None)


def backward(grad_out, x, level, weight, weight_base, bias, bias_base, stride, padding, needs):
    """Gradients for (x, level, weight, weight_base, bias, bias_base); None where not needed."""
    # dy in the layout the kernels read (``vector_layout``) once, for both gradients.
    x, grad_out = dense(x), vector_layout(dense(grad_out))[0]
    weight, weight_base, level = weight.contiguous(), weight_base.contiguous(), level.contiguous()
    grads = [None] * 6
    if needs[0]:
        grads[0] = _grad_input(grad_out, x, level, weight, weight_base, stride, padding)
    if any(needs[1:]):
        bias = bias.contiguous() if bias is not None else None  # read with unit stride
        grads[1:] = _grad_params(grad_out, x, level, weight, bias, stride, padding)
        if bias_base is None:
            grads[5] = None
    return grads


def _grad_input(grad_out, x, level, weight, weight_base, stride, padding):
    # Weights stored C_out-innermost: the input gradient's reduction dimension.
    w, wb = _packed(weight, weight_base, 0)
    return launch_grad_input(hyper_conv2d_dgrad_kernel, grad_out, x, w, (level, w, wb), stride, padding)


def _grad_params(grad_out, x, level, weight, bias, stride, padding):
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = grad_out.shape[2:]
    tile = wgrad_tile(x.dtype, c_in, c_out)
    grid_co = triton.cdiv(c_out, tile["BLOCK_CO"])
    grid_m = triton.cdiv(c_in, tile["BLOCK_CI"]) * triton.cdiv(kh * kw, tile["BLOCK_M"] // tile["BLOCK_CI"])
    split = split_count(grid_co * grid_m, triton.cdiv(h_out * w_out, tile["BLOCK_P"]), x.device)
    zeros = dict(dtype=accumulator_dtype(x.dtype), device=x.device)
    dw_part = torch.zeros((split, c_out, c_in, kh, kw), **zeros)
    dwb_part = torch.zeros((split, c_out, c_in, kh, kw), **zeros)
    dlevel_part = torch.zeros((split * grid_co * grid_m, n), **zeros)
    dbias_part = torch.zeros((split, c_out), **zeros)
    dbias_base_part = torch.zeros((split, c_out), **zeros)
    if n > 0:
        (dy, c_out_alloc), (xv, c_in_alloc) = vector_layout(grad_out), vector_layout(x)
        args = (dy, xv, level, weight, bias if bias is not None else weight,
                dw_part, dwb_part, dlevel_part, dbias_part, dbias_base_part,
                n, c_in, h, w, c_out, h_out, w_out, stride, padding, split, c_in_alloc, c_out_alloc,
                *pixel_strides(dy), *xv.stride(), *weight.stride())
        launch(hyper_conv2d_wgrad_kernel, lambda meta: (grid_co, grid_m, split), args,
               dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, INDEX64=index64(dy, xv), **numerics(x.dtype)),
               gpu_configs("wgrad", x.dtype, c_in, c_out), tile)
    return [dlevel_part.sum(0), dw_part.sum(0), dwb_part.sum(0),
            dbias_part.sum(0) if bias is not None else None, dbias_base_part.sum(0)]
