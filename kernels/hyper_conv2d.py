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
    accumulator_dtype, conv_dgrad_tile, conv_fwd_tile, conv_wgrad_tile, dense, launch_forward,
    launch_grad_input, launch_opts, numerics, split_count, store_output_tile, store_weight_partials, tiles,
)


# ----------------------------------------------------------------------- kernels
# Thin wrappers: the per-op prologue (load c_n) and epilogue (bias, the three
# reductions) around the shared core, with GENERATED=True (K_n = c_n W + B).
@triton.jit
def hyper_conv2d_fwd_kernel(
    x_ptr, level_ptr, w_ptr, wb_ptr, bias_ptr, bias_base_ptr, y_ptr,
    C_in, H, W, C_out, H_out, W_out, stride, padding,
    s_xn, s_xc, s_xh, s_xw, s_yn, s_yc, s_yh, s_yw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_BASE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    pid_p, pid_co, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    p_mask, co_mask = offs_p < H_out * W_out, offs_co < C_out
    oh, ow = offs_p // W_out, offs_p % W_out
    c = tl.load(level_ptr + n).to(ACC_DTYPE)

    acc = conv_fwd_tile(x_ptr + n * s_xn, w_ptr, wb_ptr, c, oh, ow, p_mask, offs_co, co_mask, C_in,
                        H, W, stride, padding, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
                        KH, KW, True, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_CI)
    if HAS_BIAS:
        acc += c * tl.load(bias_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BIAS_BASE:
        acc += tl.load(bias_base_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)[None, :]
    store_output_tile(y_ptr, acc, n, offs_co, oh, ow, p_mask[:, None] & co_mask[None, :],
                      s_yn, s_yc, s_yh, s_yw)


@triton.jit
def hyper_conv2d_dgrad_kernel(
    dy_ptr, level_ptr, w_ptr, wb_ptr, dx_ptr,
    C_in, H, W, C_out, H_out, W_out, stride, padding,
    s_dyn, s_dyc, s_dyh, s_dyw, s_xn, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    pid_p, pid_ci, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    p_mask, ci_mask = offs_p < H * W, offs_ci < C_in
    ih, iw = offs_p // W, offs_p % W
    c = tl.load(level_ptr + n).to(ACC_DTYPE)

    acc = conv_dgrad_tile(dy_ptr + n * s_dyn, w_ptr, wb_ptr, c, ih, iw, p_mask, offs_ci, ci_mask, C_out,
                          H_out, W_out, stride, padding, s_dyc, s_dyh, s_dyw, s_wo, s_wi, s_wh, s_ww,
                          KH, KW, True, ACC_DTYPE, DOT_PRECISION, BLOCK_P, BLOCK_CO, BLOCK_CI)
    store_output_tile(dx_ptr, acc, n, offs_ci, ih, iw, p_mask[:, None] & ci_mask[None, :],
                      s_xn, s_xc, s_xh, s_xw)


@triton.jit
def hyper_conv2d_wgrad_kernel(
    dy_ptr, x_ptr, level_ptr, w_ptr, bias_ptr,
    dw_part_ptr, dwb_part_ptr, dlevel_part_ptr, dbias_part_ptr, dbias_base_part_ptr,
    N, C_in, H, W, C_out, H_out, W_out, stride, padding,
    s_dyn, s_dyc, s_dyh, s_dyw, s_xn, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """One program owns a (co block, ci block, tap) tile of the weight gradient
    and a 1/SPLIT share of every sample's pixels. Per sample it forms its share
    of G_n in registers and folds it straight into the three reductions. Each
    program writes its own partial sums (no atomics): the result is deterministic."""
    pid_co, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = (pid_k % (KH * KW)) // KW
    s = pid_k % KW
    pid_ci = pid_k // (KH * KW)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_mask, ci_mask = offs_co < C_out, offs_ci < C_in
    w_offs = offs_co[:, None] * s_wo + offs_ci[None, :] * s_wi + r * s_wh + s * s_ww
    w_mask = co_mask[:, None] & ci_mask[None, :]
    w_tile = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0).to(ACC_DTYPE)
    owns_bias = pid_k == 0  # one program per co block reduces the bias gradients
    if HAS_BIAS:
        bias_tile = tl.load(bias_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)

    dw = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    dwb = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    dbias = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
    dbias_base = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
    n_pix_blocks = tl.cdiv(H_out * W_out, BLOCK_P)
    n_progs_k = tl.num_programs(1)
    for n in range(N):
        n64 = tl.cast(n, tl.int64)
        c = tl.load(level_ptr + n).to(ACC_DTYPE)
        g, db = conv_wgrad_tile(dy_ptr + n64 * s_dyn, x_ptr + n64 * s_xn, offs_co, offs_ci, co_mask, ci_mask,
                                r, s, pid_s, n_pix_blocks, H, W, W_out, H_out * W_out, stride, padding,
                                s_dyc, s_dyh, s_dyw, s_xc, s_xh, s_xw,
                                ACC_DTYPE, DOT_PRECISION, SPLIT, BLOCK_P, BLOCK_CO, BLOCK_CI)
        dw += c * g
        dwb += g
        dlevel = tl.sum(tl.sum(g * w_tile, axis=1), axis=0)
        if HAS_BIAS:
            dlevel += tl.where(owns_bias, tl.sum(db * bias_tile, axis=0), 0.0)
        dbias += c * db
        dbias_base += db
        part = (pid_s * tl.num_programs(0) + pid_co) * n_progs_k + pid_k
        tl.store(dlevel_part_ptr + part * N + n, dlevel)

    # Partial buffers are [SPLIT, C_out, C_in, KH, KW] and [SPLIT, C_out].
    store_weight_partials(dw_part_ptr, dw, pid_s, offs_co, offs_ci, r, s, w_mask, C_out, C_in, KH, KW)
    store_weight_partials(dwb_part_ptr, dwb, pid_s, offs_co, offs_ci, r, s, w_mask, C_out, C_in, KH, KW)
    bias_mask = co_mask & owns_bias
    tl.store(dbias_part_ptr + pid_s * C_out + offs_co, dbias, mask=bias_mask)
    tl.store(dbias_base_part_ptr + pid_s * C_out + offs_co, dbias_base, mask=bias_mask)


# --------------------------------------------------------------------- launchers
def forward(x, level, weight, weight_base, bias, bias_base, stride, padding):
    x = dense(x)
    weight, weight_base = weight.contiguous(), weight_base.contiguous()
    # The kernels index the biases with unit stride: a strided view must be made dense.
    op_args = (level.contiguous(), weight, weight_base,
               bias.contiguous() if bias is not None else weight,
               bias_base.contiguous() if bias_base is not None else weight)
    return launch_forward(hyper_conv2d_fwd_kernel, x, weight, op_args, stride, padding,
                          tiles(x.shape[1], weight.shape[0]),
                          HAS_BIAS=bias is not None, HAS_BIAS_BASE=bias_base is not None)


def backward(grad_out, x, level, weight, weight_base, bias, bias_base, stride, padding, needs):
    """Gradients for (x, level, weight, weight_base, bias, bias_base); None where not needed."""
    x, grad_out = dense(x), dense(grad_out)
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
    return launch_grad_input(hyper_conv2d_dgrad_kernel, grad_out, x, weight, (level, weight, weight_base),
                             stride, padding, tiles(x.shape[1], weight.shape[0]))


def _grad_params(grad_out, x, level, weight, bias, stride, padding):
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = grad_out.shape[2:]
    acc_dtype = accumulator_dtype(x.dtype)
    tile = tiles(c_in, c_out)
    grid_co = triton.cdiv(c_out, tile["BLOCK_CO"])
    grid_k = triton.cdiv(c_in, tile["BLOCK_CI"]) * kh * kw
    split = split_count(grid_co * grid_k, triton.cdiv(h_out * w_out, tile["BLOCK_P"]), x.device)
    zeros = dict(dtype=acc_dtype, device=x.device)
    dw_part = torch.zeros((split, c_out, c_in, kh, kw), **zeros)
    dwb_part = torch.zeros((split, c_out, c_in, kh, kw), **zeros)
    dlevel_part = torch.zeros((split * grid_co * grid_k, n), **zeros)
    dbias_part = torch.zeros((split, c_out), **zeros)
    dbias_base_part = torch.zeros((split, c_out), **zeros)
    if n > 0:
        hyper_conv2d_wgrad_kernel[(grid_co, grid_k, split)](
            grad_out, x, level, weight, bias if bias is not None else weight,
            dw_part, dwb_part, dlevel_part, dbias_part, dbias_base_part,
            n, c_in, h, w, c_out, h_out, w_out, stride, padding,
            *grad_out.stride(), *x.stride(), *weight.stride(),
            KH=kh, KW=kw, HAS_BIAS=bias is not None, SPLIT=split,
            **numerics(x.dtype), **tile, **launch_opts(),
        )
    return [dlevel_part.sum(0), dw_part.sum(0), dwb_part.sum(0),
            dbias_part.sum(0) if bias is not None else None, dbias_base_part.sum(0)]
