"""Triton kernels for ``hyper_conv2d``: convolution with a per-sample kernel
``K_n = c_n * W + B`` generated tile by tile inside the implicit GEMM.

Three kernels, all implicit GEMMs over the same index space
(sample n, pixel, output channel co, input channel ci, tap (r, s)):

* ``hyper_conv2d_fwd_kernel``    y[n, co, p]  = sum_{ci,r,s} x[n, ci, p*stride + (r,s) - pad] K_n[co, ci, r, s]
* ``hyper_conv2d_dgrad_kernel``   dx[n, ci, q] = sum_{co,r,s} dy[n, co, (q + pad - (r,s)) / stride] K_n[co, ci, r, s]
* ``hyper_conv2d_wgrad_kernel``  G_n[co, ci, r, s] = sum_p dy[n, co, p] x[n, ci, p*stride + (r,s) - pad],
  reduced on the fly into dW = sum_n c_n G_n, dB = sum_n G_n and dc_n = <G_n, W> (+ bias terms),
  so that neither K_n nor G_n ever reaches global memory.

Tensors are addressed through their strides, so NCHW and channels_last both
run without a copy. Offsets that scale with the tensor size are int64.
The launchers ``forward`` and ``backward`` are what ``restorenet.ops`` calls.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------- kernels
@triton.jit
def _generated_kernel_tile(w_ptr, wb_ptr, c, offs_co, offs_ci, r, s, co_mask, ci_mask,
                           s_wo, s_wi, s_wh, s_ww, OUT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                           TRANSPOSED: tl.constexpr):
    """The tile K_n[co, ci, r, s] = c * W + B, formed in the accumulator dtype
    (fp32; fp64 for fp64) and rounded once to the operand dtype.
    [BLOCK_CI, BLOCK_CO], or [BLOCK_CO, BLOCK_CI] if TRANSPOSED."""
    if TRANSPOSED:
        offs = offs_co[:, None] * s_wo + offs_ci[None, :] * s_wi + r * s_wh + s * s_ww
        mask = co_mask[:, None] & ci_mask[None, :]
    else:
        offs = offs_ci[:, None] * s_wi + offs_co[None, :] * s_wo + r * s_wh + s * s_ww
        mask = ci_mask[:, None] & co_mask[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    wb = tl.load(wb_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    return (c * w + wb).to(OUT_DTYPE)


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
    x_n = x_ptr + n * s_xn

    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC_DTYPE)
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            ih, iw = oh * stride - padding + r, ow * stride - padding + s
            in_mask = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = ih.to(tl.int64) * s_xh + iw.to(tl.int64) * s_xw
            for ci0 in range(0, C_in, BLOCK_CI):
                offs_ci = ci0 + tl.arange(0, BLOCK_CI)
                ci_mask = offs_ci < C_in
                xt = tl.load(x_n + pix[:, None] + offs_ci[None, :].to(tl.int64) * s_xc,
                             mask=in_mask[:, None] & ci_mask[None, :], other=0.0)
                kt = _generated_kernel_tile(w_ptr, wb_ptr, c, offs_co, offs_ci, r, s, co_mask, ci_mask,
                                            s_wo, s_wi, s_wh, s_ww, xt.dtype, ACC_DTYPE, False)
                acc += tl.dot(xt, kt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        acc += c * tl.load(bias_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BIAS_BASE:
        acc += tl.load(bias_base_ptr + offs_co, mask=co_mask, other=0.0).to(ACC_DTYPE)[None, :]
    y_offs = (n * s_yn + offs_co[None, :].to(tl.int64) * s_yc
              + oh[:, None].to(tl.int64) * s_yh + ow[:, None].to(tl.int64) * s_yw)
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & co_mask[None, :])


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
    dy_n = dy_ptr + n * s_dyn

    acc = tl.zeros((BLOCK_P, BLOCK_CI), dtype=ACC_DTYPE)
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            # Input pixel q gets tap (r, s) from output pixel (q + pad - (r, s)) / stride,
            # when that is a whole number inside the output.
            th, tw = ih + padding - r, iw + padding - s
            th_c, tw_c = tl.maximum(th, 0), tl.maximum(tw, 0)  # keep // and % on non-negatives
            oh, ow = th_c // stride, tw_c // stride
            hit = (p_mask & (th >= 0) & (tw >= 0) & (th_c % stride == 0) & (tw_c % stride == 0)
                   & (oh < H_out) & (ow < W_out))
            pix = oh.to(tl.int64) * s_dyh + ow.to(tl.int64) * s_dyw
            for co0 in range(0, C_out, BLOCK_CO):
                offs_co = co0 + tl.arange(0, BLOCK_CO)
                co_mask = offs_co < C_out
                dyt = tl.load(dy_n + pix[:, None] + offs_co[None, :].to(tl.int64) * s_dyc,
                              mask=hit[:, None] & co_mask[None, :], other=0.0)
                kt = _generated_kernel_tile(w_ptr, wb_ptr, c, offs_co, offs_ci, r, s, co_mask, ci_mask,
                                            s_wo, s_wi, s_wh, s_ww, dyt.dtype, ACC_DTYPE, True)
                acc += tl.dot(dyt, kt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    dx_offs = (n * s_xn + offs_ci[None, :].to(tl.int64) * s_xc
               + ih[:, None].to(tl.int64) * s_xh + iw[:, None].to(tl.int64) * s_xw)
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & ci_mask[None, :])


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
        g = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
        db = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
        for pb in range(pid_s, n_pix_blocks, SPLIT):
            offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
            p_mask = offs_p < H_out * W_out
            oh, ow = offs_p // W_out, offs_p % W_out
            ih, iw = oh * stride - padding + r, ow * stride - padding + s
            in_mask = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            dy_offs = (n64 * s_dyn + offs_co[:, None].to(tl.int64) * s_dyc
                       + oh[None, :].to(tl.int64) * s_dyh + ow[None, :].to(tl.int64) * s_dyw)
            dyt = tl.load(dy_ptr + dy_offs, mask=co_mask[:, None] & p_mask[None, :], other=0.0)
            x_offs = (n64 * s_xn + offs_ci[None, :].to(tl.int64) * s_xc
                      + ih[:, None].to(tl.int64) * s_xh + iw[:, None].to(tl.int64) * s_xw)
            xt = tl.load(x_ptr + x_offs, mask=in_mask[:, None] & ci_mask[None, :], other=0.0)
            g += tl.dot(dyt, xt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            db += tl.sum(dyt.to(ACC_DTYPE), axis=1)
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
    part_offs = (pid_s * C_out * C_in * KH * KW + offs_co[:, None] * (C_in * KH * KW)
                 + offs_ci[None, :] * (KH * KW) + r * KW + s)
    tl.store(dw_part_ptr + part_offs, dw, mask=w_mask)
    tl.store(dwb_part_ptr + part_offs, dwb, mask=w_mask)
    bias_mask = co_mask & owns_bias
    tl.store(dbias_part_ptr + pid_s * C_out + offs_co, dbias, mask=bias_mask)
    tl.store(dbias_base_part_ptr + pid_s * C_out + offs_co, dbias_base, mask=bias_mask)


# --------------------------------------------------------------------- launchers
def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def _tiles(c_in: int, c_out: int) -> dict:
    # tl.dot needs every dimension >= 16; small channel counts are masked.
    return dict(BLOCK_P=64, BLOCK_CO=_pow2_clamp(c_out, 16, 64), BLOCK_CI=_pow2_clamp(c_in, 16, 32))


def _launch_opts() -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return {}
    return dict(num_warps=4, num_stages=3)


def _numerics(dtype: torch.dtype) -> dict:
    # float64 stays float64 end to end; every other dtype accumulates in fp32.
    # fp32 operands use Triton's default dot precision (TF32 on GPU), like cuDNN's default.
    if dtype == torch.float64:
        return dict(ACC_DTYPE=tl.float64, DOT_PRECISION="ieee")
    return dict(ACC_DTYPE=tl.float32, DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee")


def _out_hw(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def _empty_like_layout(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    channels_last = not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """Any 4-D layout the kernels address by strides: NCHW or channels_last."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def forward(x, level, weight, weight_base, bias, bias_base, stride, padding):
    x = _dense(x)
    weight, weight_base = weight.contiguous(), weight_base.contiguous()
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = _out_hw(h, w, kh, kw, stride, padding)
    y = _empty_like_layout((n, c_out, h_out, w_out), x)
    if y.numel() == 0:
        return y
    tiles = _tiles(c_in, c_out)
    grid = (triton.cdiv(h_out * w_out, tiles["BLOCK_P"]), triton.cdiv(c_out, tiles["BLOCK_CO"]), n)
    hyper_conv2d_fwd_kernel[grid](
        x, level.contiguous(), weight, weight_base,
        bias if bias is not None else weight, bias_base if bias_base is not None else weight, y,
        c_in, h, w, c_out, h_out, w_out, stride, padding,
        *x.stride(), *y.stride(), *weight.stride(),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_BIAS_BASE=bias_base is not None,
        **_numerics(x.dtype), **tiles, **_launch_opts(),
    )
    return y


def backward(grad_out, x, level, weight, weight_base, bias, bias_base, stride, padding, needs):
    """Gradients for (x, level, weight, weight_base, bias, bias_base); None where not needed."""
    x, grad_out = _dense(x), _dense(grad_out)
    weight, weight_base, level = weight.contiguous(), weight_base.contiguous(), level.contiguous()
    grads = [None] * 6
    if needs[0]:
        grads[0] = _grad_input(grad_out, x, level, weight, weight_base, stride, padding)
    if any(needs[1:]):
        grads[1:] = _grad_params(grad_out, x, level, weight, bias, stride, padding)
        if bias_base is None:
            grads[5] = None
    return grads


def _grad_input(grad_out, x, level, weight, weight_base, stride, padding):
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    dx = _empty_like_layout(x.shape, x)
    if dx.numel() == 0:
        return dx
    tiles = _tiles(c_in, c_out)
    grid = (triton.cdiv(h * w, tiles["BLOCK_P"]), triton.cdiv(c_in, tiles["BLOCK_CI"]), n)
    hyper_conv2d_dgrad_kernel[grid](
        grad_out, level, weight, weight_base, dx,
        c_in, h, w, c_out, grad_out.shape[2], grad_out.shape[3], stride, padding,
        *grad_out.stride(), *dx.stride(), *weight.stride(),
        KH=kh, KW=kw, **_numerics(x.dtype), **tiles, **_launch_opts(),
    )
    return dx


def _split_count(tiles_in_grid: int, pixel_blocks: int, device: torch.device) -> int:
    """How many programs share one weight tile's pixel reduction: enough to
    fill the GPU about twice, never more than there are pixel blocks."""
    if device.type != "cuda":
        return max(1, min(2, pixel_blocks))  # exercise the split path in the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(pixel_blocks, triton.cdiv(2 * sms, tiles_in_grid)))


def _grad_params(grad_out, x, level, weight, bias, stride, padding):
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = grad_out.shape[2:]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tiles = _tiles(c_in, c_out)
    grid_co = triton.cdiv(c_out, tiles["BLOCK_CO"])
    grid_k = triton.cdiv(c_in, tiles["BLOCK_CI"]) * kh * kw
    split = _split_count(grid_co * grid_k, triton.cdiv(h_out * w_out, tiles["BLOCK_P"]), x.device)
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
            **_numerics(x.dtype), **tiles, **_launch_opts(),
        )
    return [dlevel_part.sum(0), dw_part.sum(0), dwb_part.sum(0),
            dbias_part.sum(0) if bias is not None else None, dbias_base_part.sum(0)]
