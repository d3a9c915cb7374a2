"""Triton kernels for ``restorenet.ops.reversible`` (AdaRevD's reversible coupling).

Both kernels see an [N, C, H, W] tensor as a [C, M] matrix with M = N*H*W, and
index it through three element strides (per sample, per channel, per pixel), so
one kernel serves the contiguous and the channels_last layout. Every tensor a
launch touches shares one layout (the op makes sure of it).

* ``rev_coupling_forward_kernel``  out = a[c] * x + f, in the compute dtype.
* ``rev_coupling_invert_kernel``   one pass over memory for the reversible backward:
      c  = (x - f) / a[c]        (only with REBUILD; otherwise x already is c)
      gc = a[c] * g
      partial[chunk, c] = sum over the chunk's M of g * c
  Each program owns a fixed channel block and a fixed chunk of M and writes its
  partial sums to its own row: no atomics. The launcher adds the rows in order,
  so the reduction is deterministic and independent of the GPU it runs on (the
  grid depends on the shape only).

Arithmetic is fp32 for fp16/bf16/fp32 storage (fp64 for fp64). ``forward`` and
``invert`` are the launchers the op calls. Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from restorenet_kernels._addressing import channel_pixel_tile, pixel_block
from restorenet_kernels._launch import canonical_strides, compute_dtypes, interpreting, launch_options, layout_format
from restorenet_kernels._numerics import div_rn

# fp64 forward: 8 elements per thread of the 2 x 512 NCHW tile at 4 warps spilled 4 B
# on sm_90a with Triton 3.6 (72 registers); at 8 warps each thread holds 4.
FORWARD_FP64_WARPS = 8


# ----------------------------------------------------------------------- kernels
@triton.jit
def rev_coupling_forward_kernel(x_ptr, f_ptr, alpha_ptr, out_ptr, C, HW, M, s_n, s_c, s_p,
                                COMPUTE: tl.constexpr, ITERS: tl.constexpr,
                                BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    a = tl.load(alpha_ptr + offs_c, mask=offs_c < C, other=1.0).to(COMPUTE)
    for it in range(ITERS):
        off, mask = channel_pixel_tile(offs_c, pixel_block(pid_m, it, ITERS, BLOCK_M), C, HW, M, s_n, s_c, s_p)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(COMPUTE)
        f = tl.load(f_ptr + off, mask=mask, other=0.0).to(COMPUTE)
        tl.store(out_ptr + off, (a[:, None] * x + f).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rev_coupling_invert_kernel(x_ptr, f_ptr, alpha_ptr, g_ptr, c_out_ptr, gc_out_ptr, partial_ptr,
                               C, HW, M, s_n, s_c, s_p,
                               REBUILD: tl.constexpr, COMPUTE: tl.constexpr, ITERS: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    a = tl.load(alpha_ptr + offs_c, mask=offs_c < C, other=1.0).to(COMPUTE)
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=COMPUTE)
    for it in range(ITERS):
        off, mask = channel_pixel_tile(offs_c, pixel_block(pid_m, it, ITERS, BLOCK_M), C, HW, M, s_n, s_c, s_p)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(COMPUTE)
        if REBUILD:
            f = tl.load(f_ptr + off, mask=mask, other=0.0).to(COMPUTE)
            # Correctly rounded like csrc/reversible.cu's division: the backends agree bit for bit.
            x = div_rn(x - f, a[:, None])
            tl.store(c_out_ptr + off, x.to(c_out_ptr.dtype.element_ty), mask=mask)
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(COMPUTE)
        tl.store(gc_out_ptr + off, (a[:, None] * g).to(gc_out_ptr.dtype.element_ty), mask=mask)
        acc += g * x  # masked lanes load 0: they add nothing
    # The alpha gradient is summed from the unrounded fp32 c, as the reference does.
    tl.store(partial_ptr + pid_m.to(tl.int64) * C + offs_c, tl.sum(acc, axis=1), mask=offs_c < C)


# --------------------------------------------------------------------- launchers
def _geometry(x: torch.Tensor, channels_last: bool):
    """Element strides (sample, channel, pixel) of the canonical layout, and the tiling."""
    n, c, h, w = x.shape
    hw = h * w
    strides = canonical_strides(x.shape, channels_last)
    m = n * hw
    if interpreting():  # the interpreter pays per program: few, big tiles
        block_c = min(64, triton.next_power_of_2(c))
        block_m = min(16384 // block_c, triton.next_power_of_2(max(m, 1)))
        iters = 1
    elif channels_last:  # channels are contiguous: a wide channel block, few pixels
        block_c = min(64, triton.next_power_of_2(c))
        block_m = 64 if block_c == 64 else 256 // block_c
        iters = 4
    else:  # pixels are contiguous: long pixel rows, a few channels
        block_c, block_m, iters = 2, 512, 4
    chunks = triton.cdiv(m, block_m * iters)
    grid = (chunks, triton.cdiv(c, block_c))
    return c, hw, m, strides, grid, dict(ITERS=iters, BLOCK_C=block_c, BLOCK_M=block_m)


def forward(x: torch.Tensor, f: torch.Tensor, alpha: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """a * x + f; x, f share one layout (``channels_last`` says which)."""
    fmt = layout_format(channels_last)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    tl_dtype, torch_dtype = compute_dtypes(x.dtype)
    c, hw, m, (s_n, s_c, s_p), grid, blocks = _geometry(x, channels_last)
    rev_coupling_forward_kernel[grid](x, f, alpha.to(torch_dtype).contiguous(), out, c, hw, m,
                                      s_n, s_c, s_p, COMPUTE=tl_dtype, **blocks,
                                      **launch_options(FORWARD_FP64_WARPS if x.dtype == torch.float64 else 4))
    return out


def invert(x: torch.Tensor, f, alpha: torch.Tensor, g: torch.Tensor, channels_last: bool):
    """(c, a * g, sum_{n,h,w} g * c) with c = (x - f) / a, or c = x when ``f`` is None
    (then the returned c is None). Tensors share one layout."""
    fmt = layout_format(channels_last)
    tl_dtype, torch_dtype = compute_dtypes(x.dtype)
    rebuild = f is not None
    c_out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if rebuild else None
    gc = torch.empty(g.shape, dtype=g.dtype, device=g.device, memory_format=fmt)
    channels = x.shape[1]
    if x.numel() == 0:
        return c_out, gc, torch.zeros(channels, dtype=torch_dtype, device=x.device)
    c, hw, m, (s_n, s_c, s_p), grid, blocks = _geometry(x, channels_last)
    partial = torch.empty((grid[0], c), dtype=torch_dtype, device=x.device)
    rev_coupling_invert_kernel[grid](
        x, f if rebuild else x, alpha.to(torch_dtype).contiguous(), g,
        c_out if rebuild else gc, gc, partial, c, hw, m, s_n, s_c, s_p,
        REBUILD=rebuild, COMPUTE=tl_dtype, **blocks, **launch_options())
    # Rows added in order: a fixed reduction order (no atomics anywhere).
    return c_out, gc, partial.sum(0)
