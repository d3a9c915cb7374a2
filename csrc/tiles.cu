// Ragged tile kernels: cut the tiles of a batch of images of any sizes (one
// launch per feature level) and blend tile outputs back into the images (one
// launch). C API and equations: tiles.h; spec: restorenet/ops/tiles.py.
//
// Both kernels are memory-bound copies. A block of 256 threads owns a chunk of
// kElems = 1024 (channel, pixel) elements of one tile: `cb` channels (the
// channel count rounded up to a power of two, at most 32) by kElems / cb
// pixels, so 3-channel images do not leave 90 % of a block idle. The chunk
// goes through shared memory, [channel][pixel] with one element of padding per
// row: the loads walk the source's unit-stride dimension (channels when a
// source is channels_last, pixels otherwise), the stores the destination's
// (pixels: the outputs are contiguous NCHW). Channels and in-tile coordinates
// are int; every memory offset is int64.
//
// The blend is output-stationary: a block owns pixels of one tile's *cell*,
// the part of its image from the tile's start to the next tiles' starts. The
// cells partition each image, so every output pixel is computed by exactly one
// thread, which visits the (at most cover_h x cover_w) tiles covering it in
// plan order: no atomics, no zero-filled accumulator, bitwise reproducible.
#include "tiles.h"

#include <climits>
#include <cstdint>

#include "common.cuh"

namespace restorenet {
namespace {

constexpr int kThreads = 256;
constexpr int kElems = 1024;                   // (channel, pixel) elements per block
constexpr int kPerThread = kElems / kThreads;  // elements each thread moves
constexpr int kMaxChannelBlock = 32;
constexpr int kStage = kElems + kMaxChannelBlock;  // cb rows of (kElems / cb + 1)
static_assert(kElems % kThreads == 0 && kElems % kMaxChannelBlock == 0, "whole rows per thread");

// How a block splits its kElems elements into channels x pixels (powers of two).
struct Chunk {
  int log_cb;        // channels per block = 1 << log_cb
  int log_pb;        // pixels per block   = 1 << log_pb
  int pixel_blocks;  // blocks along the pixels of one tile
};

// Element e of a block as (local channel, local pixel): consecutive e (i.e.
// consecutive threads) walk channels first when `channel_fast`, else pixels.
struct Local {
  int c, p;
};
__device__ __forceinline__ Local split(int e, const Chunk& k, bool channel_fast) {
  const int cb_mask = (1 << k.log_cb) - 1, pb_mask = (1 << k.log_pb) - 1;
  return channel_fast ? Local{e & cb_mask, e >> k.log_cb} : Local{e >> k.log_pb, e & pb_mask};
}

// Shared-memory slot of a local element: rows of one channel, padded by one so
// that a warp walking channels hits 32 different banks.
__device__ __forceinline__ int stage_index(Local l, const Chunk& k) { return l.c * ((1 << k.log_pb) + 1) + l.p; }

// A source is read along channels only where they are its unit-stride
// dimension (channels_last); a single channel counts as pixel-fast.
__device__ __forceinline__ bool channels_are_fast(int64_t stride_c, int64_t channels) {
  return stride_c == 1 && channels > 1;
}

// ------------------------------------------------------------------ gather
struct GatherArgs {
  const TileSource* sources;
  const int64_t* boxes;
  void* out;
  int channels, tile_h, tile_w;
  Chunk chunk;
};

// A copy moves raw words: one instantiation per element width, bitwise exact.
template <typename word_t>
__global__ void __launch_bounds__(kThreads) tile_gather_kernel(GatherArgs a) {
  __shared__ word_t stage[kStage];
  const Chunk& k = a.chunk;
  const int64_t box = blockIdx.x / k.pixel_blocks;
  const int pix0 = int(blockIdx.x % k.pixel_blocks) << k.log_pb;
  const int c0 = int(blockIdx.y) << k.log_cb;
  const int tile_pixels = a.tile_h * a.tile_w;
  const int64_t* b = a.boxes + 3 * box;
  const TileSource src = a.sources[b[0]];
  const word_t* image = static_cast<const word_t*>(src.data);
  const int64_t y0 = b[1], x0 = b[2];

  const bool channel_fast = channels_are_fast(src.stride_c, a.channels);
  for (int n = 0; n < kPerThread; ++n) {
    const Local l = split(n * kThreads + int(threadIdx.x), k, channel_fast);
    const int c = c0 + l.c, p = pix0 + l.p;
    if (c < a.channels && p < tile_pixels) {
      const int i = p / a.tile_w, j = p % a.tile_w;
      stage[stage_index(l, k)] = image[c * src.stride_c + (y0 + i) * src.stride_h + (x0 + j) * src.stride_w];
    }
  }
  __syncthreads();
  word_t* out = static_cast<word_t*>(a.out);
  for (int n = 0; n < kPerThread; ++n) {
    const Local l = split(n * kThreads + int(threadIdx.x), k, false);
    const int c = c0 + l.c, p = pix0 + l.p;
    if (c < a.channels && p < tile_pixels) {
      out[(box * a.channels + c) * tile_pixels + p] = stage[stage_index(l, k)];
    }
  }
}

// ------------------------------------------------------------------- blend
template <typename scalar_t>
struct BlendArgs {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* tiles;
  Strides4 ts;  // tiles' strides
  const int64_t* slots;
  const int64_t* layout;
  const acc_t* row_weight;
  const acc_t* col_weight;
  scalar_t* out;
  int channels, tile_h, tile_w, cover_h, cover_w;
  Chunk chunk;
};

// The normalised weighted sum at pixel (y, x) (level 0, in the image of plan
// tile t, inside t's cell) of channel c over the tiles (r - a, col - b) that
// cover it, in plan order: a and b count down, so the row above comes first.
template <typename scalar_t>
__device__ __forceinline__ typename AccType<scalar_t>::type blend_pixel(const BlendArgs<scalar_t>& a, int64_t t,
                                                                         int64_t r, int64_t col, int64_t grid_w,
                                                                         int64_t y, int64_t x, int c) {
  using acc_t = typename AccType<scalar_t>::type;
  acc_t sum = 0, weight_sum = 0;
  for (int da = a.cover_h - 1; da >= 0; --da) {
    if (r < da) continue;
    for (int db = a.cover_w - 1; db >= 0; --db) {
      if (col < db) continue;
      const int64_t other = t - da * grid_w - db;  // plan index of tile (r - da, col - db)
      const int64_t* row = a.layout + other * kTileLayoutColumns;
      // Starts increase along rows and columns, so these are >= 0.
      const int64_t ly = y - row[kTileY], lx = x - row[kTileX];
      if (ly >= a.tile_h || lx >= a.tile_w) continue;
      const acc_t w = a.row_weight[row[kTileRowId] * a.tile_h + ly] * a.col_weight[row[kTileColId] * a.tile_w + lx];
      const acc_t v = to_acc(a.tiles[a.slots[other] * a.ts.n + c * a.ts.c + ly * a.ts.h + lx * a.ts.w]);
      sum += v * w;
      weight_sum += w;
    }
  }
  return sum / weight_sum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) tile_blend_kernel(BlendArgs<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t stage[kStage];
  const Chunk& k = a.chunk;
  const int64_t t = blockIdx.x / k.pixel_blocks;
  const int pix0 = int(blockIdx.x % k.pixel_blocks) << k.log_pb;
  const int c0 = int(blockIdx.y) << k.log_cb;
  const int64_t* me = a.layout + t * kTileLayoutColumns;
  const int cell_w = int(me[kTileCellW]);
  const int cell_pixels = int(me[kTileCellH]) * cell_w;
  // Blocks are sized for a whole tile; a cell is smaller. The test is the same
  // for every thread of the block, so leaving here skips no one's barrier.
  if (pix0 >= cell_pixels) return;
  const int64_t y0 = me[kTileY], x0 = me[kTileX], r = me[kTileRow], col = me[kTileCol], grid_w = me[kTileGridW];
  // The output geometry is read here, not after the staging loop: keeping the
  // layout row pointer `me` live across that loop cost an 8 B spill (double, sm_80).
  const int64_t height = me[kTileHeight], width = me[kTileWidth];
  scalar_t* image = a.out + a.channels * me[kTilePixBase];

  const bool channel_fast = channels_are_fast(a.ts.c, a.channels);
  for (int n = 0; n < kPerThread; ++n) {
    const Local l = split(n * kThreads + int(threadIdx.x), k, channel_fast);
    const int c = c0 + l.c, p = pix0 + l.p;
    if (c < a.channels && p < cell_pixels) {
      stage[stage_index(l, k)] = blend_pixel(a, t, r, col, grid_w, y0 + p / cell_w, x0 + p % cell_w, c);
    }
  }
  __syncthreads();
  for (int n = 0; n < kPerThread; ++n) {
    const Local l = split(n * kThreads + int(threadIdx.x), k, false);
    const int c = c0 + l.c, p = pix0 + l.p;
    if (c < a.channels && p < cell_pixels) {
      const int64_t y = y0 + p / cell_w, x = x0 + p % cell_w;
      store_as(image + (c * height + y) * width + x, stage[stage_index(l, k)]);
    }
  }
}

// --------------------------------------------------------------- launchers
// The chunk shape and grid for tiles of `tile_pixels` pixels and `channels`
// channels, `count` tiles; false where the grid would exceed CUDA's limits.
bool plan_launch(int64_t count, int64_t channels, int64_t tile_pixels, Chunk* chunk, dim3* grid) {
  int log_cb = 0;
  while ((int64_t(1) << log_cb) < channels && (1 << log_cb) < kMaxChannelBlock) ++log_cb;
  int log_pb = 0;
  while ((1 << (log_pb + log_cb)) < kElems) ++log_pb;
  const int64_t pixel_blocks = ceil_div(tile_pixels, int64_t(1) << log_pb);
  const int64_t blocks_x = count * pixel_blocks, blocks_y = ceil_div(channels, int64_t(1) << log_cb);
  if (blocks_x > INT_MAX || blocks_y > 65535) return false;
  *chunk = Chunk{log_cb, log_pb, int(pixel_blocks)};
  *grid = dim3(unsigned(blocks_x), unsigned(blocks_y));
  return true;
}

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

template <int kBytes> struct Word;
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = uint64_t; };

}  // namespace

cudaError_t tile_gather_forward(DType dtype, const TileGatherShape& shape, const TileSource* sources,
                                const int64_t* boxes, void* out, cudaStream_t stream) {
  const int64_t tile_pixels = shape.tile_h * shape.tile_w;
  if (shape.num_boxes < 0 || shape.channels < 0 || shape.tile_h < 1 || shape.tile_w < 1 ||
      !fits_int(shape.channels) || !fits_int(shape.tile_h) || !fits_int(shape.tile_w) || !fits_int(tile_pixels)) {
    return cudaErrorInvalidValue;
  }
  if (shape.num_boxes == 0 || shape.channels == 0) return cudaSuccess;
  GatherArgs a{sources, boxes, out, int(shape.channels), int(shape.tile_h), int(shape.tile_w), Chunk{}};
  dim3 grid;
  if (!plan_launch(shape.num_boxes, shape.channels, tile_pixels, &a.chunk, &grid)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using word_t = typename Word<sizeof(decltype(tag))>::type;
    return launch(tile_gather_kernel<word_t>, grid, dim3(kThreads), stream, a);
  });
}

cudaError_t tile_blend_forward(DType dtype, const TileBlendShape& shape, const void* tiles, Strides4 tiles_strides,
                               const int64_t* slots, const int64_t* layout, const void* row_weight,
                               const void* col_weight, void* out, cudaStream_t stream) {
  const int64_t tile_pixels = shape.tile_h * shape.tile_w;
  if (shape.num_tiles < 0 || shape.channels < 0 || shape.num_pixels < 0 || shape.tile_h < 1 || shape.tile_w < 1 ||
      shape.cover_h < 1 || shape.cover_w < 1 || !fits_int(shape.channels) || !fits_int(tile_pixels) ||
      !fits_int(shape.cover_h) || !fits_int(shape.cover_w)) {
    return cudaErrorInvalidValue;
  }
  if (shape.num_tiles == 0 || shape.channels == 0 || shape.num_pixels == 0) return cudaSuccess;
  Chunk chunk;
  dim3 grid;
  if (!plan_launch(shape.num_tiles, shape.channels, tile_pixels, &chunk, &grid)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    BlendArgs<scalar_t> a{static_cast<const scalar_t*>(tiles), tiles_strides, slots, layout,
                          static_cast<const acc_t*>(row_weight), static_cast<const acc_t*>(col_weight),
                          static_cast<scalar_t*>(out), int(shape.channels), int(shape.tile_h), int(shape.tile_w),
                          int(shape.cover_h), int(shape.cover_w), chunk};
    return launch(tile_blend_kernel<scalar_t>, grid, dim3(kThreads), stream, a);
  });
}

}  // namespace restorenet
