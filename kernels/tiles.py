"""Triton kernels for the ragged tile ops of ``restorenet.ops.tiles`` (forward only).

* ``tile_gather_kernel``  out[p, c, i, j] = image_b[c, y + i, x + j],  (b, y, x) = boxes[p].
  One program per (output tile, pixel block, channel block). The images may all have
  different sizes and live in different tensors: a small table holds each image's
  address and strides, so one launch cuts a whole feature level of a ragged batch.
* ``tile_blend_kernel``   out_b(pixel) = sum_t w_t tile_t(pixel) / sum_t w_t.
  Output-stationary: a program owns pixels of one tile's *cell* (the part of the image
  from the tile's start to its neighbours' starts; the cells partition every image),
  reads every tile covering them -- at most ``COVER_H x COVER_W``, the tiles up and
  to the left in the same image -- and writes each output pixel once, normalised.
  No atomics, no zero-filled accumulator, deterministic; tiles are summed in plan
  order, as the plain path does.

Offsets that grow with the batch are int64. ``gather`` and ``blend`` are the
launchers ``restorenet.ops.tiles`` calls.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from restorenet.ops.tiles import LAYOUT_COLUMNS
from restorenet_kernels._launch import interpreting, launch_options
from restorenet_kernels._numerics import div_rn

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float32: tl.float32, torch.float64: tl.float64}
_COL = {f"COL_{name.upper()}": i for i, name in enumerate(LAYOUT_COLUMNS)}


# ----------------------------------------------------------------------- kernels
@triton.jit
def tile_gather_kernel(images_ptr, boxes_ptr, out_ptr, C, TH, TW,
                       DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    pid_pix, pid_c = tl.program_id(1), tl.program_id(2)
    b = tl.load(boxes_ptr + 3 * p)
    y0 = tl.load(boxes_ptr + 3 * p + 1)
    x0 = tl.load(boxes_ptr + 3 * p + 2)
    entry = images_ptr + 4 * b  # (address, stride_c, stride_h, stride_w) of image b
    src = tl.load(entry).to(tl.pointer_type(DTYPE), bitcast=True)
    s_c, s_h, s_w = tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3)

    offs_p = pid_pix * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask, c_mask = offs_p < TH * TW, offs_c < C
    i, j = offs_p // TW, offs_p % TW
    mask = c_mask[:, None] & p_mask[None, :]
    pix = (y0 + i) * s_h + (x0 + j) * s_w
    v = tl.load(src + offs_c[:, None].to(tl.int64) * s_c + pix[None, :], mask=mask)
    dst = out_ptr + p * C * TH * TW + offs_c[:, None].to(tl.int64) * (TH * TW) + offs_p[None, :]
    tl.store(dst, v, mask=mask)


@triton.jit
def tile_blend_kernel(tiles_ptr, slots_ptr, layout_ptr, row_w_ptr, col_w_ptr, out_ptr,
                      C, TH, TW, s_tn, s_tc, s_th, s_tw,
                      NCOLS: tl.constexpr, COL_Y: tl.constexpr, COL_X: tl.constexpr,
                      COL_ROW: tl.constexpr, COL_COL: tl.constexpr, COL_GRID_W: tl.constexpr,
                      COL_CELL_H: tl.constexpr, COL_CELL_W: tl.constexpr,
                      COL_PIX_BASE: tl.constexpr, COL_HEIGHT: tl.constexpr,
                      COL_WIDTH: tl.constexpr, COL_ROW_ID: tl.constexpr, COL_COL_ID: tl.constexpr,
                      COVER_H: tl.constexpr, COVER_W: tl.constexpr, ACC_DTYPE: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pid_pix, pid_c = tl.program_id(1), tl.program_id(2)
    me = layout_ptr + t * NCOLS
    y0, x0 = tl.load(me + COL_Y), tl.load(me + COL_X)
    r, c, grid_w = tl.load(me + COL_ROW), tl.load(me + COL_COL), tl.load(me + COL_GRID_W)
    cell_h, cell_w = tl.load(me + COL_CELL_H), tl.load(me + COL_CELL_W)
    pix_base, height, width = tl.load(me + COL_PIX_BASE), tl.load(me + COL_HEIGHT), tl.load(me + COL_WIDTH)

    # Pixels of this tile's cell, laid out with the tile's row pitch TW.
    offs_p = pid_pix * BLOCK_P + tl.arange(0, BLOCK_P)
    i, j = offs_p // TW, offs_p % TW
    p_mask = (i < cell_h) & (j < cell_w)
    y, x = y0 + i, x0 + j
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C

    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC_DTYPE)
    weight_sum = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    # Tiles (r - a, c - b), visited in plan order (a, b counting down to 0): the same
    # summation order as the plain path, so fp32 results agree to the last bits.
    for aa in tl.static_range(COVER_H):
        for bb in tl.static_range(COVER_W):
            a, b = COVER_H - 1 - aa, COVER_W - 1 - bb
            exists = (r >= a) & (c >= b)
            other = tl.where(exists, t - a * grid_w - b, t)  # plan index of tile (r-a, c-b)
            row = layout_ptr + other * NCOLS
            ly, lx = y - tl.load(row + COL_Y), x - tl.load(row + COL_X)  # >= 0: starts increase
            cover = p_mask & exists & (ly < TH) & (lx < TW)
            wy = tl.load(row_w_ptr + tl.load(row + COL_ROW_ID) * TH + ly, mask=cover, other=0.0)
            wx = tl.load(col_w_ptr + tl.load(row + COL_COL_ID) * TW + lx, mask=cover, other=0.0)
            w = wy.to(ACC_DTYPE) * wx.to(ACC_DTYPE)
            slot = tl.load(slots_ptr + other)
            src = (tiles_ptr + slot * s_tn + offs_c[:, None].to(tl.int64) * s_tc
                   + (ly * s_th + lx * s_tw)[None, :])
            v = tl.load(src, mask=c_mask[:, None] & cover[None, :], other=0.0).to(ACC_DTYPE)
            acc += v * w[None, :]
            weight_sum += w

    # Correctly rounded, as the division in csrc/tiles.cu.
    out = div_rn(acc, tl.where(p_mask, weight_sum, 1.0)[None, :])
    dst = (out_ptr + C * pix_base + offs_c[:, None].to(tl.int64) * (height * width)
           + (y * width + x)[None, :])
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=c_mask[:, None] & p_mask[None, :])


# --------------------------------------------------------------------- launchers
def _blocks(pixels: int, channels: int) -> dict:
    # The interpreter pays per program: give it big blocks. On a GPU 128 x 16 keeps
    # the blend's four cover tiles in registers at 4 warps (256 x 16 spilled in fp64
    # and took 221-255 registers otherwise; see docs/kernel_report.md).
    max_p, max_c = (4096, 64) if interpreting() else (128, 16)
    return dict(BLOCK_P=min(max_p, triton.next_power_of_2(max(pixels, 1))),
                BLOCK_C=min(max_c, triton.next_power_of_2(max(channels, 1))))


def _image_table(feats: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """[images, 4] int64: (address, stride_c, stride_h, stride_w) of every sample."""
    rows = []
    for f in feats:
        size = f.element_size()
        for s in range(f.shape[0]):
            rows.append((f.data_ptr() + s * f.stride(0) * size, f.stride(1), f.stride(2), f.stride(3)))
    table = torch.tensor(rows, dtype=torch.int64).view(-1, 4)
    # Staged at once and not waiting on the device (see restorenet.ops.tiles._to_device).
    return table if device.type == "cpu" else table.to(device, non_blocking=True)


def gather(feats, boxes, tile_h, tile_w):
    c = feats[0].shape[1]
    out = torch.empty((boxes.shape[0], c, tile_h, tile_w), dtype=feats[0].dtype, device=boxes.device)
    if out.numel() == 0:
        return out
    table = _image_table(feats, boxes.device)
    blocks = _blocks(tile_h * tile_w, c)
    grid = (boxes.shape[0], triton.cdiv(tile_h * tile_w, blocks["BLOCK_P"]),
            triton.cdiv(c, blocks["BLOCK_C"]))
    tile_gather_kernel[grid](table, boxes.contiguous(), out, c, tile_h, tile_w,
                             DTYPE=_TL_DTYPE[out.dtype], **blocks, **launch_options())
    return out


def blend(tiles, slots, layout, row_weight, col_weight, num_pixels, cover_h, cover_w):
    n, c, th, tw = tiles.shape
    out = torch.empty(c * num_pixels, dtype=tiles.dtype, device=tiles.device)
    if out.numel() == 0 or n == 0:
        return out
    blocks = _blocks(th * tw, c)
    grid = (n, triton.cdiv(th * tw, blocks["BLOCK_P"]), triton.cdiv(c, blocks["BLOCK_C"]))
    acc = tl.float64 if tiles.dtype == torch.float64 else tl.float32
    tile_blend_kernel[grid](
        tiles, slots.contiguous(), layout.contiguous(), row_weight.contiguous(), col_weight.contiguous(),
        out, c, th, tw, *tiles.stride(),
        NCOLS=len(LAYOUT_COLUMNS), **{k: v for k, v in _COL.items() if k != "COL_IMAGE"},
        COVER_H=cover_h, COVER_W=cover_w, ACC_DTYPE=acc, **blocks, **launch_options(),
    )
    return out
