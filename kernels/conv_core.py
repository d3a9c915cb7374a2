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
* ``conv_wgrad_tile``  g[(tap, ci), co] = sum_p x[n, ci, p*stride + tap - pad] dy[n, co, p] over
  the pixel blocks of one program's share, plus db[co] = sum_p dy[n, co, p].

The mainloops are shaped for the tensor cores and the copy engines:

* forward / input gradient: ONE flattened reduction loop over (channel block,
  tap); the channel block and tap are scalars of the loop counter (divisions by
  constants), pixel coordinates are formed once per program, so no ``//`` or
  ``%`` runs per element in the loop. Whole channel blocks are loaded without a
  channel mask, so a contiguous channel dimension (channels_last activations;
  the weights, which the launchers pack reduction-dimension-contiguous) gives
  16-byte vector loads that Triton's pipeliner turns into ``cp.async``
  (``num_stages`` buffers deep). A last partial block runs in a second, masked
  loop of ``TAIL``-channel chunks (so channel work follows the bound at
  16-channel granularity). In NCHW the activation tile is contiguous along
  pixels, but each tap shifts it by one element, so 16-bit activations there
  would load 2 bytes at a time, synchronously (cp.async moves 4-16 aligned
  bytes; fp32 gets 4-byte cp.async): the launchers hand 16-bit activations to
  the kernels channels-innermost in 16-channel rows (``vector_layout``: in place
  for channels_last with C % 16 == 0, else one zero-padded copy), so every
  16-bit mainloop loads whole vectors with cp.async. The masked tails read the
  activation as whole vectors too (up to the buffer's channels, zeroed past the
  bound in registers); their weight loads are masked exactly at the bound, so
  they vectorise only where it is a multiple of 16.
* weight gradient: the GEMM's M side is ``BLOCK_M = 64`` (tap, input channel)
  rows, ``64 // BLOCK_CI`` taps of ``BLOCK_CI`` channels, so even 16-channel
  tiles fill wgmma's M = 64 (a 3x3 conv at 16 channels: three programs of 4, 4
  and 1 taps; 12 rows of 9 are live). Pixels (the reduction) advance by a fixed
  step with an incremental (row, column) carry instead of a division per element.

Plus the host-side helpers both launchers use (tile configurations, numerics,
layouts, the launch itself). Tensors are addressed through their strides (NCHW
and channels_last run without a copy); the sample offset is int64, offsets
inside a sample are int32 unless a tensor holds 2**31 elements or more
(``INDEX64``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from restorenet_kernels._launch import canonical_strides, interpreter_takes_scalar_bounds, interpreting

# Channel chunk of the masked tail loops: the smallest tile tl.dot accepts.
TAIL = tl.constexpr(16)


# ------------------------------------------------------------------ device code
@triton.jit
def offset(v, INDEX64: tl.constexpr):
    """``v`` as an element offset: int64 only where a tensor needs it, so the
    mainloop keeps int32 registers and the compiler its alignment facts."""
    if INDEX64:
        return v.to(tl.int64)
    else:
        return v


@triton.jit
def weight_tile(w_ptr, wb_ptr, offs, mask, c, OUT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                GENERATED: tl.constexpr):
    """A weight tile at element offsets ``offs``. GENERATED: ``c * W + B`` formed in
    the accumulator dtype and rounded once to the operand dtype; otherwise ``W``
    as stored (``wb_ptr``, ``c`` unused)."""
    if GENERATED:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        wb = tl.load(wb_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        return (c * w + wb).to(OUT_DTYPE)
    else:
        return tl.load(w_ptr + offs, mask=mask, other=0.0).to(OUT_DTYPE)


@triton.jit
def _gemm_step(acc, a_n, pix, pix_ok, s_ac, k0, k_end, k_alloc, w_ptr, wb_ptr, c, offs_n, n_mask, s_wk, s_wn, w_tap,
               GENERATED: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_K: tl.constexpr, MASKED: tl.constexpr, INDEX64: tl.constexpr):
    """acc += A[pixels, k0 + (0..BLOCK_K)] @ K[k0 + .., n]: the activation tile at
    pixel offsets ``pix`` (read where ``pix_ok``) with channels ``s_ac`` apart, the
    weight tile at ``w_tap + k * s_wk + n * s_wn``. MASKED: channels from ``k_end`` on
    count as zero (a whole block is not masked, so its loads can vectorise). The
    activation is read up to ``k_alloc``, the channels its buffer holds (a multiple of
    16 in the 16-bit layout, see ``vector_layout``), so the masked loads still move
    whole vectors; what lies from ``k_end`` on is zeroed in registers. The weights are
    masked exactly."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a_mask = pix_ok[:, None]
    w_mask = n_mask[None, :]
    if MASKED:
        k_live = offs_k < k_end
        a_mask = a_mask & (offs_k < k_alloc)[None, :]
        w_mask = w_mask & k_live[:, None]
    at = tl.load(a_n + pix[:, None] + offset(offs_k, INDEX64)[None, :] * s_ac, mask=a_mask, other=0.0)
    if MASKED:
        at = tl.where(k_live[None, :], at, 0.0)
    w_offs = offs_k[:, None] * s_wk + offs_n[None, :] * s_wn + w_tap
    kt = weight_tile(w_ptr, wb_ptr, w_offs, w_mask, c, at.dtype, ACC_DTYPE, GENERATED)
    return tl.dot(at, kt, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _tap(k, KH: tl.constexpr, KW: tl.constexpr):
    """(r, s) of reduction step k: the tap runs fastest (divisions by constants)."""
    tap = k % (KH * KW)
    r = tap // KW
    return r, tap - r * KW


@triton.jit
def _fwd_step(acc, x_n, w_ptr, wb_ptr, c, ih0, iw0, p_mask, offs_co, co_mask, ci0, ci_end, ci_alloc, k,
              H, W, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
              KH: tl.constexpr, KW: tl.constexpr, GENERATED: tl.constexpr, ACC_DTYPE: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, MASKED: tl.constexpr,
              INDEX64: tl.constexpr):
    """acc += x[pixels, ci0 + (0..BLOCK_K), tap k % (KH*KW)] @ K[ci0 + .., co, tap]."""
    r, s = _tap(k, KH, KW)
    ih, iw = ih0 + r, iw0 + s
    x_ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    pix = offset(ih, INDEX64) * s_xh + offset(iw, INDEX64) * s_xw
    return _gemm_step(acc, x_n, pix, x_ok, s_xc, ci0, ci_end, ci_alloc, w_ptr, wb_ptr, c, offs_co, co_mask, s_wi, s_wo,
                      r * s_wh + s * s_ww, GENERATED, ACC_DTYPE, DOT_PRECISION, BLOCK_K, MASKED, INDEX64)


@triton.jit
def conv_fwd_tile(x_n, w_ptr, wb_ptr, c, oh, ow, p_mask, offs_co, co_mask, ci_end, ci_alloc,
                  H, W, stride, padding, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
                  KH: tl.constexpr, KW: tl.constexpr, GENERATED: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
                  INDEX64: tl.constexpr):
    """[BLOCK_P, BLOCK_CO] output tile of sample ``x_n``, reducing input channels
    ``0 .. ci_end`` (and every tap); x's buffer holds ``ci_alloc`` channels. Output
    channels outside ``co_mask`` get 0."""
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC_DTYPE)
    ih0, iw0 = oh * stride - padding, ow * stride - padding
    taps: tl.constexpr = KH * KW
    full = ci_end // BLOCK_CI
    for k in range(0, full * taps):  # whole channel blocks: no channel mask
        acc = _fwd_step(acc, x_n, w_ptr, wb_ptr, c, ih0, iw0, p_mask, offs_co, co_mask,
                        (k // taps) * BLOCK_CI, ci_end, ci_alloc, k, H, W, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
                        KH, KW, GENERATED, ACC_DTYPE, DOT_PRECISION, BLOCK_CI, False, INDEX64)
    tail0 = full * BLOCK_CI
    for k in range(0, tl.cdiv(ci_end - tail0, TAIL) * taps):  # the rest, in masked 16-chunks
        acc = _fwd_step(acc, x_n, w_ptr, wb_ptr, c, ih0, iw0, p_mask, offs_co, co_mask,
                        tail0 + (k // taps) * TAIL, ci_end, ci_alloc, k, H, W, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww,
                        KH, KW, GENERATED, ACC_DTYPE, DOT_PRECISION, TAIL, True, INDEX64)
    return acc


@triton.jit
def _dgrad_step(acc, dy_n, w_ptr, wb_ptr, c, ih, iw, p_mask, offs_ci, ci_mask, co0, co_end, co_alloc, k,
                H_out, W_out, stride, padding, s_dyc, s_dyh, s_dyw, s_wo, s_wi, s_wh, s_ww,
                KH: tl.constexpr, KW: tl.constexpr, GENERATED: tl.constexpr, ACC_DTYPE: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, MASKED: tl.constexpr,
                INDEX64: tl.constexpr):
    """acc += dy[(q + pad - tap) / stride, co0 + (0..BLOCK_K)] @ K[co0 + .., ci, tap]."""
    r, s = _tap(k, KH, KW)
    # Input pixel q gets tap (r, s) from output pixel (q + pad - (r, s)) / stride,
    # when that is a whole number inside the output (the stride is a compile-time
    # constant: no division at stride 1, a shift at 2).
    th, tw = ih + padding - r, iw + padding - s
    th_c, tw_c = tl.maximum(th, 0), tl.maximum(tw, 0)  # keep // and % on non-negatives
    oh, ow = th_c // stride, tw_c // stride
    hit = (p_mask & (th >= 0) & (tw >= 0) & (th_c % stride == 0) & (tw_c % stride == 0)
           & (oh < H_out) & (ow < W_out))
    pix = offset(oh, INDEX64) * s_dyh + offset(ow, INDEX64) * s_dyw
    return _gemm_step(acc, dy_n, pix, hit, s_dyc, co0, co_end, co_alloc, w_ptr, wb_ptr, c, offs_ci, ci_mask, s_wo, s_wi,
                      r * s_wh + s * s_ww, GENERATED, ACC_DTYPE, DOT_PRECISION, BLOCK_K, MASKED, INDEX64)


@triton.jit
def conv_dgrad_tile(dy_n, w_ptr, wb_ptr, c, ih, iw, p_mask, offs_ci, ci_mask, co_end, co_alloc,
                    H_out, W_out, stride, padding, s_dyc, s_dyh, s_dyw, s_wo, s_wi, s_wh, s_ww,
                    KH: tl.constexpr, KW: tl.constexpr, GENERATED: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
                    INDEX64: tl.constexpr):
    """[BLOCK_P, BLOCK_CI] input-gradient tile at input pixels (ih, iw), reducing
    output channels ``0 .. co_end``; dy's buffer holds ``co_alloc`` channels. Input
    channels outside ``ci_mask`` get 0."""
    acc = tl.zeros((BLOCK_P, BLOCK_CI), dtype=ACC_DTYPE)
    taps: tl.constexpr = KH * KW
    full = co_end // BLOCK_CO
    for k in range(0, full * taps):  # whole channel blocks: no channel mask
        acc = _dgrad_step(acc, dy_n, w_ptr, wb_ptr, c, ih, iw, p_mask, offs_ci, ci_mask,
                          (k // taps) * BLOCK_CO, co_end, co_alloc, k, H_out, W_out, stride, padding,
                          s_dyc, s_dyh, s_dyw, s_wo, s_wi, s_wh, s_ww,
                          KH, KW, GENERATED, ACC_DTYPE, DOT_PRECISION, BLOCK_CO, False, INDEX64)
    tail0 = full * BLOCK_CO
    for k in range(0, tl.cdiv(co_end - tail0, TAIL) * taps):  # the rest, in masked 16-chunks
        acc = _dgrad_step(acc, dy_n, w_ptr, wb_ptr, c, ih, iw, p_mask, offs_ci, ci_mask,
                          tail0 + (k // taps) * TAIL, co_end, co_alloc, k, H_out, W_out, stride, padding,
                          s_dyc, s_dyh, s_dyw, s_wo, s_wi, s_wh, s_ww,
                          KH, KW, GENERATED, ACC_DTYPE, DOT_PRECISION, TAIL, True, INDEX64)
    return acc


@triton.jit
def wgrad_rows(pid_m, C_in, C_in_alloc, KH: tl.constexpr, KW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr):
    """The (input channel, tap) pair of each of the BLOCK_M rows that program
    ``pid_m`` owns: ``BLOCK_M // BLOCK_CI`` consecutive taps of one channel block.
    Returns (ci, tap, r, s, valid, readable) per row: ``valid`` rows are weights of
    the op (ci < C_in); ``readable`` rows may be read from x, whose buffer holds
    ``C_in_alloc`` channels (whole vectors in the 16-bit layout, ``vector_layout``)."""
    taps_per_tile: tl.constexpr = BLOCK_M // BLOCK_CI
    groups: tl.constexpr = (KH * KW + taps_per_tile - 1) // taps_per_tile
    rows = tl.arange(0, BLOCK_M)
    ci = (pid_m // groups) * BLOCK_CI + rows % BLOCK_CI
    tap = (pid_m % groups) * taps_per_tile + rows // BLOCK_CI
    r = tap // KW
    tap_ok = tap < KH * KW
    return ci, tap, r, tap - r * KW, (ci < C_in) & tap_ok, (ci < C_in_alloc) & tap_ok


@triton.jit
def conv_wgrad_tile(dy_n, x_n, offs_co, co_mask, ci_row, r_row, s_row, row_mask, pb_begin, pb_end, n_split,
                    H, W, W_out, P_out, stride, padding, s_dyc, s_dyp, s_xc, s_xh, s_xw,
                    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr,
                    INDEX64: tl.constexpr):
    """One sample's share (pixel blocks ``pb_begin, pb_begin + n_split, .. < pb_end``) of
    ``g[m, co] = sum_p x[ci_m, p*stride + (r_m, s_m) - pad] dy[co, p]`` and ``db[co] = sum_p dy[co, p]``.
    x is read only where ``row_mask`` holds and dy only where ``co_mask`` holds: the
    callers pass the channels the buffers hold (``vector_layout``: whole vectors in
    16-bit) and drop the rows and columns beyond their own channel bounds.
    dy is dense (NCHW or channels-innermost), so pixel p is at ``p * s_dyp``."""
    g = tl.zeros((BLOCK_M, BLOCK_CO), dtype=ACC_DTYPE)
    # db accumulates per pixel lane and is reduced once after the loop: a row sum
    # inside the loop (used again after it) trips Triton 3.6's
    # TritonGPUOptimizeThreadLocality pass (``loopResult.hasOneUse()``) for fp32/fp64.
    db_lanes = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC_DTYPE)
    row_off = offset(ci_row, INDEX64) * s_xc + offset(r_row, INDEX64) * s_xh + offset(s_row, INDEX64) * s_xw
    # Pixel coordinates once; then advanced by a fixed step with one carry.
    offs_p = pb_begin * BLOCK_P + tl.arange(0, BLOCK_P)
    oh = offs_p // W_out
    ow = offs_p - oh * W_out
    step = n_split * BLOCK_P
    step_h = step // W_out
    step_w = step - step_h * W_out
    for _ in range(pb_begin, pb_end, n_split):
        p_mask = offs_p < P_out
        ih, iw = oh * stride - padding, ow * stride - padding
        h_in = ih[None, :] + r_row[:, None]
        w_in = iw[None, :] + s_row[:, None]
        x_mask = (row_mask[:, None] & p_mask[None, :] & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W))
        pix = offset(ih, INDEX64) * s_xh + offset(iw, INDEX64) * s_xw
        xt = tl.load(x_n + row_off[:, None] + pix[None, :], mask=x_mask, other=0.0)
        dy_offs = offset(offs_p, INDEX64)[:, None] * s_dyp + offset(offs_co, INDEX64)[None, :] * s_dyc
        dyt = tl.load(dy_n + dy_offs, mask=p_mask[:, None] & co_mask[None, :], other=0.0)
        g = tl.dot(xt, dyt, g, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        db_lanes += dyt.to(ACC_DTYPE)
        offs_p += step
        ow += step_w
        wrap = ow >= W_out
        ow = tl.where(wrap, ow - W_out, ow)
        oh += step_h + wrap.to(tl.int32)
    return g, tl.sum(db_lanes, axis=0)


@triton.jit
def store_output_tile(y_ptr, acc, n, offs_co, oh, ow, mask, s_yn, s_yc, s_yh, s_yw, INDEX64: tl.constexpr):
    offs = (offset(offs_co, INDEX64)[None, :] * s_yc
            + (offset(oh, INDEX64) * s_yh + offset(ow, INDEX64) * s_yw)[:, None])
    tl.store(y_ptr + n * s_yn + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_weight_partials(part_ptr, value, pid_s, offs_co, ci_row, tap_row, mask,
                          C_out, C_in, KH: tl.constexpr, KW: tl.constexpr):
    """Partial weight-gradient buffers are [SPLIT, C_out, C_in, KH, KW]; ``value``
    is a [(tap, ci) rows, co] tile."""
    offs = (pid_s * C_out * C_in * KH * KW + offs_co[None, :] * (C_in * KH * KW)
            + ci_row[:, None] * (KH * KW) + tap_row[:, None])
    tl.store(part_ptr + offs, value, mask=mask)


# -------------------------------------------------------------------- host code
def pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


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


def is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def empty_like_layout(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def dense(x: torch.Tensor) -> torch.Tensor:
    """Any 4-D layout the kernels address by strides: NCHW or channels_last."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def pixel_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, pixel) element strides of a dense NCHW / channels_last tensor,
    or of a ``vector_layout`` one (channels innermost, pixels ``c_alloc`` apart)."""
    if t.is_contiguous() or is_channels_last(t):
        return canonical_strides(t.shape, is_channels_last(t))
    return t.stride(0), t.stride(1), t.stride(3)


# Channels per pixel row in the 16-bit layout: Triton proves a vector's alignment
# only from integer arguments divisible by 16 (its specialisation), so the row
# length is a multiple of 16 elements (32 bytes).
VECTOR_CHANNELS = 16


def _padded_channels(c: int) -> int:
    return triton.cdiv(c, VECTOR_CHANNELS) * VECTOR_CHANNELS


def _vector_rows(t: torch.Tensor) -> bool:
    """Whether each pixel's channels of ``t`` are contiguous, start 32-byte aligned and
    lie a multiple of 16 elements from the next pixel's (a channels_last tensor
    with C % 16 == 0, or a ``vector_layout`` copy)."""
    _, c, h, w = t.shape
    row = t.stride(3)
    return (t.stride(1) == 1 and row >= c and row % VECTOR_CHANNELS == 0 and t.stride(2) == w * row
            and t.stride(0) == h * w * row and t.data_ptr() % 32 == 0)


def vector_layout(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A dense [N, C, H, W] activation as the conv kernels read it, and the channels
    per pixel its buffer holds (``c_alloc``: the masked channel tails read up to there).

    16-bit data is read channels-innermost in rows of a multiple of 16 elements:
    cp.async (and TMA) move 4-16 aligned bytes, so a 2-byte element read alone --
    NCHW, where each tap shifts the pixel tile by one element, or channels_last
    with a channel count that leaves the rows unaligned -- is a synchronous load
    and the mainloop does not pipeline. Such a tensor is copied once into a
    channels_last buffer whose rows are padded with zeros to 16 channels (cuDNN
    likewise transforms NCHW to NHWC before its tensor-core kernels); one already
    laid out so is used in place. fp32 / fp64 are used as they are: cp.async moves
    their elements one at a time, in any layout."""
    c = t.shape[1]
    if t.element_size() != 2:
        return t, c
    if _vector_rows(t):
        return t, t.stride(3)
    n, _, h, w = t.shape
    c_alloc = _padded_channels(c)
    rows = t.new_empty((n, h, w, c_alloc))
    rows[..., c:].zero_()
    staged = rows.permute(0, 3, 1, 2)[:, :c]
    staged.copy_(t)
    return staged, c_alloc


def pack_weight(weight: torch.Tensor, contiguous_dim: int) -> torch.Tensor:
    """``weight`` [C_out, C_in, KH, KW] viewed in the same index order but stored
    with ``contiguous_dim`` (0: C_out, 1: C_in) innermost, in rows padded to 16
    elements, so that tiles along the GEMM's reduction dimension load as aligned
    16-byte vectors whatever the channel count. A few KB per call."""
    inner_last = (2, 3, 1 - contiguous_dim, contiguous_dim)  # taps, other channel dim, contiguous dim
    shape = [weight.shape[d] for d in inner_last]
    rows = weight.new_zeros(shape[:3] + [_padded_channels(shape[3])])
    packed = rows[..., :shape[3]]
    packed.copy_(weight.permute(*inner_last))
    return packed.permute(*[inner_last.index(d) for d in range(4)])


def index64(*tensors: torch.Tensor) -> bool:
    """Whether offsets inside one sample can reach 2**31 (the sample offset is always int64).
    Measured on the strides, so a ``vector_layout`` copy counts its padded rows."""
    return any(t.numel() > 0 and sum((size - 1) * st for size, st in zip(t.shape[1:], t.stride()[1:])) >= 2 ** 31 - 1
               for t in tensors)


def split_count(tiles_in_grid: int, pixel_blocks: int, device: torch.device) -> int:
    """How many programs share one weight tile's pixel reduction: enough to
    fill the GPU about twice, never more than there are pixel blocks."""
    if device.type != "cuda":
        return max(1, min(2, pixel_blocks))  # exercise the split path in the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(pixel_blocks, triton.cdiv(2 * sms, tiles_in_grid)))


# ------------------------------------------------------------- launch choices
# One place for every launch configuration of the conv kernels. On a GPU each
# kernel is a ``triton.autotune`` over ``gpu_configs(...)`` (keyed on the
# shape); under the interpreter it runs ``interpreter_config(...)``, one fixed
# config with big pixel tiles (the interpreter pays per program). The GPU lists
# hold only configs the compile check (``python -m restorenet.aot``) shows to
# compile without spills for sm_80 and sm_90a.
AUTOTUNE_KEY = ["C_in", "C_out", "H", "W", "H_out", "W_out", "s_xc"]


def _config(num_warps: int, num_stages: int, **tile) -> triton.Config:
    return triton.Config(tile, num_warps=num_warps, num_stages=num_stages)


def gpu_configs(kind: str, dtype: torch.dtype, c_in: int, c_out: int, granularity: int | None = None):
    """GPU launch configurations of a conv kernel (the autotuner's choices).

    kind: "fwd" (tiles BLOCK_P x BLOCK_CO, reduction BLOCK_CI), "dgrad" (BLOCK_P x
    BLOCK_CI, reduction BLOCK_CO) or "wgrad" (BLOCK_M (tap, ci) rows x BLOCK_CO,
    reduction BLOCK_P; its channel tiles are fixed, only BLOCK_P and the
    stages vary, since the grid and partial buffers follow the channel tiles).
    granularity: channel tiles of exactly this size (slim_conv2d: 16, so that work
    follows the widths); None: as wide as the channels allow (64; 32 for fp64).

    Every config here compiles without spills for sm_90a and sm_80 at every spec
    the ops launch, with Triton 3.8 and 3.6 (docs/kernel_report.md,
    docs/kernel_report_triton36.md); the ones that spilled were pruned: 256-pixel
    tiles of the input gradient (its per-tap hit masks and addresses; 128 in fp64),
    fp32 256 x 64 tiles, 4-stage fp32 pipelines of wide tiles, fp32 32-pixel
    weight-gradient steps at 8 warps, 4-stage narrow 16-bit tiles at 4 warps, 64-pixel steps of
    the 64 x 64 weight-gradient tile, fp64 weight-gradient steps of 32 pixels.

    Forward / input gradient: for ``hyper_conv2d`` the generated weight tile costs
    2 loads per element (W and B): loads per MAC = 1/BLOCK_CO + 2/BLOCK_P (see
    ``hyper_conv2d_fwd_kernel``). 16-bit forward tiles are 256 x 64 (weight loads
    half the activation loads); fp32 offers 128 x 64 (fewest loads per MAC) and
    256 x 32 (weight loads a quarter of the activation loads).
    The reduction step is 32 channels for 16-bit data and 16 for fp32 / fp64,
    which keeps 3-4 pipeline stages within sm_80's shared memory.
    """
    bits = torch.finfo(dtype).bits
    widest = 32 if bits == 64 else 64
    n_out = granularity or pow2_clamp(c_out if kind != "dgrad" else c_in, 16, widest)
    n_red = granularity or pow2_clamp(c_in if kind != "dgrad" else c_out, 16, widest)
    if kind == "wgrad":
        tile = dict(BLOCK_CO=n_out, BLOCK_CI=n_red, BLOCK_M=64)
        # 8 warps: the gathered [64 rows, BLOCK_P] activation tile needs an address per
        # element where it cannot vectorise (NCHW, odd channel counts), per stage.
        if bits == 64:
            steps = [(16, 8, 2)]
        elif n_out > 32:  # a 64 x 64 accumulator: 64-pixel steps spill
            steps = [(32, 8, 3), (16, 8, 4)] if bits == 16 else [(32, 8, 2), (16, 8, 3)]
        elif bits == 16:
            steps = [(64, 8, 3), (32, 8, 4)]
        else:  # fp32's 32-pixel step at 8 warps stops at 128 registers on sm_80 and spills
            steps = [(64, 8, 3), (32, 4, 3)]  # (4 stages with Triton 3.6, 3 or 2 with 3.8)
        return [_config(w, st, BLOCK_P=p, **tile) for p, w, st in steps]
    out_name, red_name = ("BLOCK_CO", "BLOCK_CI") if kind == "fwd" else ("BLOCK_CI", "BLOCK_CO")
    red = min(n_red, 32 if bits == 16 else 16)
    if bits == 64:  # (64 pixels at 4 warps leaves one 4-byte spill with Triton 3.6's slim fp64, and
        # so does a 128-pixel input gradient at 8 warps on sm_80: its hit masks and addresses)
        sizes = [(128 if kind == "fwd" else 64, n_out, 8, 2)]
    elif n_out > 32 and bits == 16:
        sizes = [(256 if kind == "fwd" else 128, n_out, 8, stages) for stages in (3, 4)]
    elif n_out > 32:
        sizes = [(128, n_out, 8, 3), (256, 32, 8, 3)]
    elif bits == 16:  # narrow tiles: the weight tile still spreads in cp.async-sized pieces at 4 warps
        # (256 pixels at 4 warps spill at odd channel counts; a 4th stage at 4 warps spills on sm_80)
        sizes = [(128, n_out, 4, 3), (128, n_out, 8, 4)]
    else:
        sizes = [(256, n_out, 8, 3), (128 if kind == "fwd" else 64, n_out, 4, 3)]
    return [_config(w, st, BLOCK_P=p, **{out_name: out, red_name: red}) for p, out, w, st in sizes]


def interpreter_config(kind: str, c_in: int, c_out: int, granularity: int | None = None) -> dict:
    """The one tile the interpreter runs (numpy pays per program and per step, not
    per element). The reduction block of the forward and input gradient ignores
    ``granularity``: the masked 16-channel tail keeps their work at 16 channels."""
    n_out = granularity or pow2_clamp(c_out if kind != "dgrad" else c_in, 16, 64)
    n_red = pow2_clamp(c_in if kind != "dgrad" else c_out, 16, 32)
    if kind == "wgrad":
        n_red = granularity or n_red
        return dict(BLOCK_CO=n_out, BLOCK_CI=n_red, BLOCK_M=256, BLOCK_P=64)  # a 3x3 conv: 1-2 tap groups
    out_name, red_name = ("BLOCK_CO", "BLOCK_CI") if kind == "fwd" else ("BLOCK_CI", "BLOCK_CO")
    return {"BLOCK_P": 128, out_name: n_out, red_name: n_red}


def wgrad_tile(dtype: torch.dtype, c_in: int, c_out: int, granularity: int | None = None) -> dict:
    """The channel tiles of the weight-gradient kernel (fixed per shape: they set its grid)."""
    if interpreting():
        return interpreter_config("wgrad", c_in, c_out, granularity)
    return dict(gpu_configs("wgrad", dtype, c_in, c_out, granularity)[0].kwargs)


@functools.lru_cache(maxsize=None)
def _autotuned(kernel, configs: tuple):
    return triton.autotune(configs=[_config(w, st, **dict(tile)) for tile, w, st in configs],
                           key=AUTOTUNE_KEY)(kernel)


def launch(kernel, grid, args, constexprs: dict, configs, interp_tile: dict):
    """Run ``kernel``: autotuned over ``configs`` on a GPU, ``interp_tile`` under the
    interpreter. ``grid(meta)`` maps a config's constexprs to the launch grid."""
    if interpreting():
        interpreter_takes_scalar_bounds()
        kernel[grid(interp_tile)](*args, **constexprs, **interp_tile)
        return
    frozen = tuple((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in configs)
    _autotuned(kernel, frozen)[grid](*args, **constexprs)


# Each op's forward and input-gradient kernels take (activation, *op-specific
# pointers, output, <shared shape/stride arguments>, ...): one launcher each.
def launch_forward(kernel, x, weight, op_args, stride, padding, granularity=None, **constexprs):
    """Allocate y (in the layout of x) and run an op's forward kernel over it.
    ``weight`` gives the shape and the strides (the op's packed weight)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = out_hw(h, w, kh, kw, stride, padding)
    y = empty_like_layout((n, c_out, h_out, w_out), x)
    if y.numel() == 0:
        return y
    xv, c_in_alloc = vector_layout(x)

    def grid(meta):
        return triton.cdiv(h_out * w_out, meta["BLOCK_P"]), triton.cdiv(c_out, meta["BLOCK_CO"]), n

    args = (xv, *op_args, y, c_in, h, w, c_out, h_out, w_out, stride, padding, c_in_alloc,
            *xv.stride(), *y.stride(), *weight.stride())
    launch(kernel, grid, args, dict(KH=kh, KW=kw, INDEX64=index64(xv, y), **numerics(x.dtype), **constexprs),
           gpu_configs("fwd", x.dtype, c_in, c_out, granularity),
           interpreter_config("fwd", c_in, c_out, granularity))
    return y


def launch_grad_input(kernel, grad_out, x, weight, op_args, stride, padding, granularity=None):
    """Allocate dx (in the layout of x) and run an op's input-gradient kernel over it."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    dx = empty_like_layout(x.shape, x)
    if dx.numel() == 0:
        return dx
    dy, c_out_alloc = vector_layout(grad_out)

    def grid(meta):
        return triton.cdiv(h * w, meta["BLOCK_P"]), triton.cdiv(c_in, meta["BLOCK_CI"]), n

    args = (dy, *op_args, dx, c_in, h, w, c_out, dy.shape[2], dy.shape[3], stride, padding, c_out_alloc,
            *dy.stride(), *dx.stride(), *weight.stride())
    launch(kernel, grid, args, dict(KH=kh, KW=kw, INDEX64=index64(dy, dx), **numerics(x.dtype)),
           gpu_configs("dgrad", x.dtype, c_in, c_out, granularity),
           interpreter_config("dgrad", c_in, c_out, granularity))
    return dx
