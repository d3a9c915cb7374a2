// C API of the ragged tile kernels (csrc/tiles.cu), forward only. The spec is
// restorenet/ops/tiles.py (tile_gather_reference, tile_blend_reference); the
// argument formats below are that module's.
//
//   gather   out[p, c, i, j] = image_b[c, y + i, x + j],   (b, y, x) = boxes[p]
//   blend    out_b(c, y, x)  = sum_t w_t(y, x) tile_t(c, y, x) / sum_t w_t(y, x)
//            w_t = row_weight[row_id_t][y - y_t] * col_weight[col_id_t][x - x_t]
//
// Torch-free: raw device pointers, sizes and element strides. Both functions
// are asynchronous on `stream`, launch one kernel, and return the first CUDA
// error (launch or configuration); cudaErrorInvalidValue for sizes the
// kernels do not support. Neither reads anything back to the host.
//
// Both kernels are pure data movement plus a few multiply-adds per element:
// a block moves 1024 (channel, pixel) elements through shared memory, read
// along the source's unit-stride dimension (channels for channels_last
// sources, pixels otherwise) and written along the destination's, so both
// sides stay coalesced. Offsets are int64.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "api.h"

namespace restorenet {

// ------------------------------------------------------------------ gather
// One sample of one feature tensor: its address and element strides. A ragged
// batch is an array of these (the b of a box indexes it), so the images may
// have different sizes, layouts and live in different allocations. The binding
// builds it as an int64 tensor [images, 4].
struct TileSource {
  const void* data;
  int64_t stride_c, stride_h, stride_w;
};
static_assert(sizeof(TileSource) == 4 * sizeof(int64_t), "TileSource is four int64 words");

struct TileGatherShape {
  int64_t num_boxes;        // S: tiles to cut (rows of boxes and of out)
  int64_t channels;         // C: of every source image
  int64_t tile_h, tile_w;   // at this level
};

// out (contiguous [S, C, tile_h, tile_w], `dtype`) = the boxes of the sources.
// `sources` and `boxes` (int64 [S, 3] contiguous: image, y, x) are device
// memory. Boxes are not checked: each must lie inside its image. Bitwise copy.
cudaError_t tile_gather_forward(DType dtype, const TileGatherShape& shape, const TileSource* sources,
                                const int64_t* boxes, void* out, cudaStream_t stream);

// ------------------------------------------------------------------- blend
// Columns of the plan's layout table (int64 [T, kTileLayoutColumns], contiguous,
// one row per tile in plan order): restorenet.ops.tiles.LAYOUT_COLUMNS, in order.
// A tile's *cell* (cell_h x cell_w from its top-left) runs to its neighbours'
// starts; the cells partition every image, so the blend gives each output pixel
// to exactly one block and writes it once.
enum TileLayoutColumn : int {
  kTileImage = 0,
  kTileY,        // top-left at level 0
  kTileX,
  kTileRow,      // place in the image's tile grid
  kTileCol,
  kTileGridW,    // tiles per row of the image
  kTileCellH,
  kTileCellW,
  kTilePixBase,  // pixels of all earlier images
  kTileHeight,   // of the tile's image
  kTileWidth,
  kTileRowId,    // rows of row_weight / col_weight
  kTileColId,
  kTileLayoutColumns
};

struct TileBlendShape {
  int64_t num_tiles;         // T: rows of tiles, slots and layout
  int64_t channels;          // C
  int64_t tile_h, tile_w;    // level-0 tile size
  int64_t num_pixels;        // sum of H * W over the images: out holds C * num_pixels
  int64_t cover_h, cover_w;  // most tiles covering one pixel along each axis (TilePlan.max_cover)
};

// out (contiguous, `dtype`, C * num_pixels: image after image, each [C, H, W])
// = the normalised ramp-weighted sum of the tiles covering each pixel.
// tiles: [T, C, tile_h, tile_w] through `tiles_strides` (any layout); plan tile
// t is tiles row slots[t] (int64 [T]). row_weight [*, tile_h] and col_weight
// [*, tile_w] are contiguous float32 (float64 for DType::kFloat64). The tiles
// covering a pixel of tile (r, c)'s cell are (r - a, c - b), a < cover_h,
// b < cover_w; they are summed in plan order, in float32 (float64), as the
// reference does, so the result is deterministic and needs no atomics.
cudaError_t tile_blend_forward(DType dtype, const TileBlendShape& shape, const void* tiles,
                               Strides4 tiles_strides, const int64_t* slots, const int64_t* layout,
                               const void* row_weight, const void* col_weight, void* out,
                               cudaStream_t stream);

}  // namespace restorenet
