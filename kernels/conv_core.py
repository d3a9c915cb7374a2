"""The implicit-GEMM convolution core shared by ``hyper_conv2d`` and ``slim_conv2d``.

Both ops are a stride/padding 2-D convolution in which every sample n has its
own view of the weights; they differ only in a prologue:

* HyperRes (``GENERATED=True``): the weight tile is generated per sample,
  ``K_n = c_n * W + B``, inside the GEMM (never written to memory);
* slimmable nets (``GENERATED=False``): the weight is shared, but sample n only
  uses ``W[:out_width[n], :in_width[n]]``. The caller passes the per-sample
  channel bounds; the reduction loops stop at them and tiles wholly beyond them
  run zero iterations, so the work is proportional to the active channels.

Three ``@triton.jit`` building blocks, inlined into each op's kernels:

* ``conv_fwd_tile``    acc[p, co]  = sum_{ci < ci_end, r, s} x[n, ci, p*stride + (r,s) - pad] K[co, ci, r, s]
* ``conv_dgrad_tile``  acc[q, ci]  = sum_{co < co_end, r, s} dy[n, co, (q + pad - (r,s)) / stride] K[co, ci, r, s]
* ``conv_wgrad_tile``  g[co, ci] = sum_p dy[n, co, p] x[n, ci, p*stride + (r,s) - pad] over one
  (co, ci, tap) tile and a strided share of the pixel blocks; plus db[co] = sum_p dy[n, co, p].

Plus the host-side helpers both launchers use (tile sizes, numerics, layouts).
Tensors are addressed through their strides (NCHW and channels_last run
without a copy); offsets that scale with the tensor size are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from restorenet_kernels._launch import interpreting


# ------------------------------------------------------------------ device code
@triton.jit
def weight_tile(w_ptr, wb_ptr, c, offs_co, offs_ci, r, s, co_mask, ci_mask,
                s_wo, s_wi, s_wh, s_ww, OUT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                TRANSPOSED: tl.constexpr, GENERATED: tl.constexpr):
    """The weight tile at tap (r, s): [BLOCK_CI, BLOCK_CO], or [BLOCK_CO, BLOCK_CI]
    if TRANSPOSED. GENERATED: ``c * W + B`` formed in the accumulator dtype and
    rounded once to the operand dtype; otherwise ``W`` as stored (``wb_ptr``, ``c`` unused)."""
    if TRANSPOSED:
        offs = offs_co[:, None] * s_wo + offs_ci[None, :] * s_wi + r * s_wh + s * s_ww
        mask = co_mask[:, None] & ci_mask[None, :]
    else:
        offs = offs_ci[:, None] * s_wi + offs_co[None, :] * s_wo + r * s_wh + s * s_ww
        mask = ci_mask[:, None] & co_mask[None, :]
    if GENERATED:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        wb = tl.load(wb_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        return (c * w + wb).to(OUT_DTYPE)
    else:
        return tl.load(w_ptr + offs, mask=mask, other=0.0).to(OUT_DTYPE)


@triton.jit
def conv_fwd_tile(x_n, w_ptr, wb_ptr, c, oh, ow, p_mask, offs_co, co_mask, ci_end,
                  H, W, stride, padding, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
                  KH: tl.constexpr, KW: tl.constexpr, GENERATED: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    """[BLOCK_P, BLOCK_CO] output tile of sample ``x_n``, reducing input channels
    ``0 .. ci_end`` (and every tap). Output channels outside ``co_mask`` get 0."""
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC_DTYPE)
    for r in tl.static_range(KH):
        for s in tl.static_range(KW):
            ih, iw = oh * stride - padding + r, ow * stride - padding + s
            in_mask = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = ih.to(tl.int64) * s_xh + iw.to(tl.int64) * s_xw
            for ci0 in range(0, ci_end, BLOCK_CI):
                offs_ci = ci0 + tl.arange(0, BLOCK_CI)
                ci_mask = offs_ci < ci_end
                xt = tl.load(x_n + pix[:, None] + offs_ci[None, :].to(tl.int64) * s_xc,
                             mask=in_mask[:, None] & ci_mask[None, :], other=0.0)
                kt = weight_tile(w_ptr, wb_ptr, c, offs_co, offs_ci, r, s, co_mask, ci_mask,
                                 s_wo, s_wi, s_wh, s_ww, xt.dtype, ACC_DTYPE, False, GENERATED)
                acc += tl.dot(xt, kt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def conv_dgrad_tile(dy_n, w_ptr, wb_ptr, c, ih, iw, p_mask, offs_ci, ci_mask, co_end,
                    H_out, W_out, stride, padding, s_dyc, s_dyh, s_dyw, s_wo, s_wi, s_wh, s_ww,
                    KH: tl.constexpr, KW: tl.constexpr, GENERATED: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    """[BLOCK_P, BLOCK_CI] input-gradient tile at input pixels (ih, iw), reducing
    output channels ``0 .. co_end``. Input channels outside ``ci_mask`` get 0."""
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
            for co0 in range(0, co_end, BLOCK_CO):
                offs_co = co0 + tl.arange(0, BLOCK_CO)
                co_mask = offs_co < co_end
                dyt = tl.load(dy_n + pix[:, None] + offs_co[None, :].to(tl.int64) * s_dyc,
                              mask=hit[:, None] & co_mask[None, :], other=0.0)
                kt = weight_tile(w_ptr, wb_ptr, c, offs_co, offs_ci, r, s, co_mask, ci_mask,
                                 s_wo, s_wi, s_wh, s_ww, dyt.dtype, ACC_DTYPE, True, GENERATED)
                acc += tl.dot(dyt, kt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def conv_wgrad_tile(dy_n, x_n, offs_co, offs_ci, co_mask, ci_mask, r, s, pb_begin, pb_end,
                    H, W, W_out, P_out, stride, padding,
                    s_dyc, s_dyh, s_dyw, s_xc, s_xh, s_xw,
                    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    """One sample's share (pixel blocks ``pb_begin, pb_begin + SPLIT, .. < pb_end``)
    of ``g[co, ci] = sum_p dy[co, p] x[ci, p*stride + (r,s) - pad]`` and ``db[co] = sum_p dy[co, p]``.
    dy is read only where ``co_mask`` holds and x only where ``ci_mask`` holds."""
    g = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    # db accumulates per pixel lane and is reduced once after the loop: a row sum
    # inside the loop (used again after it) trips Triton 3.6's
    # TritonGPUOptimizeThreadLocality pass (``loopResult.hasOneUse()``) for fp32/fp64.
    db_lanes = tl.zeros((BLOCK_CO, BLOCK_P), dtype=ACC_DTYPE)
    for pb in range(pb_begin, pb_end, SPLIT):
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P_out
        oh, ow = offs_p // W_out, offs_p % W_out
        ih, iw = oh * stride - padding + r, ow * stride - padding + s
        in_mask = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        dy_offs = (offs_co[:, None].to(tl.int64) * s_dyc
                   + oh[None, :].to(tl.int64) * s_dyh + ow[None, :].to(tl.int64) * s_dyw)
        dyt = tl.load(dy_n + dy_offs, mask=co_mask[:, None] & p_mask[None, :], other=0.0)
        x_offs = (offs_ci[None, :].to(tl.int64) * s_xc
                  + ih[:, None].to(tl.int64) * s_xh + iw[:, None].to(tl.int64) * s_xw)
        xt = tl.load(x_n + x_offs, mask=in_mask[:, None] & ci_mask[None, :], other=0.0)
        g += tl.dot(dyt, xt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        db_lanes += dyt.to(ACC_DTYPE)
    return g, tl.sum(db_lanes, axis=1)


@triton.jit
def store_output_tile(y_ptr, acc, n, offs_co, oh, ow, mask, s_yn, s_yc, s_yh, s_yw):
    offs = (n * s_yn + offs_co[None, :].to(tl.int64) * s_yc
            + oh[:, None].to(tl.int64) * s_yh + ow[:, None].to(tl.int64) * s_yw)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_weight_partials(part_ptr, value, pid_s, offs_co, offs_ci, r, s, mask,
                          C_out, C_in, KH: tl.constexpr, KW: tl.constexpr):
    """Partial weight-gradient buffers are [SPLIT, C_out, C_in, KH, KW]."""
    offs = (pid_s * C_out * C_in * KH * KW + offs_co[:, None] * (C_in * KH * KW)
            + offs_ci[None, :] * (KH * KW) + r * KW + s)
    tl.store(part_ptr + offs, value, mask=mask)


# -------------------------------------------------------------------- host code
def pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


def tiles(c_in: int, c_out: int, max_co: int = 64) -> dict:
    # tl.dot needs every dimension >= 16; small channel counts are masked.
    return dict(BLOCK_P=64, BLOCK_CO=pow2_clamp(c_out, 16, max_co), BLOCK_CI=pow2_clamp(c_in, 16, 32))


def launch_opts() -> dict:
    return {} if interpreting() else dict(num_warps=4, num_stages=3)


def numerics(dtype: torch.dtype) -> dict:
    # float64 stays float64 end to end; every other dtype accumulates in fp32.
    # fp32 operands use Triton's default dot precision (TF32 on GPU), like cuDNN's default.
    if dtype == torch.float64:
        return dict(ACC_DTYPE=tl.float64, DOT_PRECISION="ieee")
    return dict(ACC_DTYPE=tl.float32, DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_hw(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def empty_like_layout(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    channels_last = not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def dense(x: torch.Tensor) -> torch.Tensor:
    """Any 4-D layout the kernels address by strides: NCHW or channels_last."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def split_count(tiles_in_grid: int, pixel_blocks: int, device: torch.device) -> int:
    """How many programs share one weight tile's pixel reduction: enough to
    fill the GPU about twice, never more than there are pixel blocks."""
    if device.type != "cuda":
        return max(1, min(2, pixel_blocks))  # exercise the split path in the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(pixel_blocks, triton.cdiv(2 * sms, tiles_in_grid)))


# Each op's forward and input-gradient kernels take (activation, *op-specific
# pointers, output, <shared shape/stride arguments>, ...): one launcher each.
def launch_forward(kernel, x, weight, op_args, stride, padding, tile, **constexprs):
    """Allocate y (in the layout of x) and run an op's forward kernel over it."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = out_hw(h, w, kh, kw, stride, padding)
    y = empty_like_layout((n, c_out, h_out, w_out), x)
    if y.numel() == 0:
        return y
    grid = (triton.cdiv(h_out * w_out, tile["BLOCK_P"]), triton.cdiv(c_out, tile["BLOCK_CO"]), n)
    kernel[grid](
        x, *op_args, y,
        c_in, h, w, c_out, h_out, w_out, stride, padding,
        *x.stride(), *y.stride(), *weight.stride(),
        KH=kh, KW=kw, **numerics(x.dtype), **tile, **launch_opts(), **constexprs,
    )
    return y


def launch_grad_input(kernel, grad_out, x, weight, op_args, stride, padding, tile):
    """Allocate dx (in the layout of x) and run an op's input-gradient kernel over it."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    dx = empty_like_layout(x.shape, x)
    if dx.numel() == 0:
        return dx
    grid = (triton.cdiv(h * w, tile["BLOCK_P"]), triton.cdiv(c_in, tile["BLOCK_CI"]), n)
    kernel[grid](
        grad_out, *op_args, dx,
        c_in, h, w, c_out, grad_out.shape[2], grad_out.shape[3], stride, padding,
        *grad_out.stride(), *dx.stride(), *weight.stride(),
        KH=kh, KW=kw, **numerics(x.dtype), **tile, **launch_opts(),
    )
    return dx
