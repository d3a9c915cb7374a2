"""Addressing shared by the memory-bound kernels.

They view an NCHW or channels_last tensor as a [C, M = N*H*W] matrix and walk
it in (channel block, pixel block) tiles through the tensor's own strides, so
both layouts run without a copy.
"""
import triton
import triton.language as tl


@triton.jit
def channel_pixel_tile(offs_c, offs_m, C, HW, M, s_n, s_c, s_p):
    """Element offsets (int64) and the in-bounds mask of tile [offs_c, offs_m].
    Pixel m = n*HW + p with p = h*W + w, so ``s_p`` (the W stride) addresses p
    as long as the H stride is W * s_p: true of NCHW and channels_last alike."""
    n = offs_m // HW
    p = offs_m - n * HW
    off = offs_c[:, None].to(tl.int64) * s_c + (n * s_n + p * s_p)[None, :]
    mask = (offs_c < C)[:, None] & (offs_m < M)[None, :]
    return off, mask


@triton.jit
def pixel_block(pid, it, iters, BLOCK: tl.constexpr):
    """Pixel indices (int64) of block ``it`` of the ``iters`` consecutive
    BLOCK-pixel blocks that program ``pid`` walks: programs own contiguous
    pixel ranges, so the partial-sum order depends on the grid only."""
    return (pid.to(tl.int64) * iters + it) * BLOCK + tl.arange(0, BLOCK)
