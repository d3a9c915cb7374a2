// Emulation build of csrc/tiles.cu for tests/csrc/test_tiles_emulated.py: the
// kernels compiled as C++20 with RN_CUDA_EMULATION (see cuda_emu.h) into a
// shared library with a flat extern "C" API that ctypes calls on host memory
// (CPU torch tensors).
#include <cstring>

#include "tiles.cu"
#include "harness_args.h"
#include "runtime_stubs.h"  // the launchers call none today; kept like every harness

namespace {
using rn_harness::dtype_of;
using rn_harness::strides_of;
}  // namespace

extern "C" {
// shape: num_boxes, channels, tile_h, tile_w. sources: int64 [images, 4]
// (address, stride_c, stride_h, stride_w), the layout of restorenet::TileSource.
int emu_tile_gather_forward(int dtype, const int64_t* shape, const int64_t* sources, const int64_t* boxes,
                            void* out) {
  const restorenet::TileGatherShape s{shape[0], shape[1], shape[2], shape[3]};
  return restorenet::tile_gather_forward(dtype_of(dtype), s, reinterpret_cast<const restorenet::TileSource*>(sources),
                                         boxes, out, nullptr);
}

// shape: num_tiles, channels, tile_h, tile_w, num_pixels, cover_h, cover_w.
int emu_tile_blend_forward(int dtype, const int64_t* shape, const void* tiles, const int64_t* tiles_strides,
                           const int64_t* slots, const int64_t* layout, const void* row_weight,
                           const void* col_weight, void* out) {
  const restorenet::TileBlendShape s{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6]};
  return restorenet::tile_blend_forward(dtype_of(dtype), s, tiles, strides_of(tiles_strides), slots, layout,
                                        row_weight, col_weight, out, nullptr);
}

// The C layout column called `name` (restorenet.ops.tiles.LAYOUT_COLUMNS), -1
// for an unknown name; "count" gives the number of columns.
int emu_tile_layout_column(const char* name) {
  using namespace restorenet;
  static const struct {
    const char* name;
    int column;
  } columns[] = {{"image", kTileImage},       {"y", kTileY},           {"x", kTileX},
                 {"row", kTileRow},           {"col", kTileCol},       {"grid_w", kTileGridW},
                 {"cell_h", kTileCellH},      {"cell_w", kTileCellW},  {"pix_base", kTilePixBase},
                 {"height", kTileHeight},     {"width", kTileWidth},   {"row_id", kTileRowId},
                 {"col_id", kTileColId},      {"count", kTileLayoutColumns}};
  for (const auto& c : columns) {
    if (std::strcmp(c.name, name) == 0) return c.column;
  }
  return -1;
}
}

#if defined(RN_TILES_SANITIZE_MAIN)
// A main for the sanitizer tests of tests/csrc/test_tiles_emulated.py: runs
// both kernels on small ragged plans in exactly-sized buffers. Built with
// -fsanitize=address every load and store must stay in bounds; with
// -fsanitize=thread a shared-memory race (a missing __syncthreads) aborts.
// Values are checked by the Python tests.
#include <cstdio>
#include <string>
#include <vector>

namespace {

std::vector<int64_t> starts(int64_t length, int64_t tile, int64_t overlap) {
  std::vector<int64_t> s;
  for (int64_t p = 0; p < length - tile; p += tile - overlap) s.push_back(p);
  s.push_back(length - tile);
  return s;
}

struct Image {
  int64_t h, w;
};

// The plan's layout table (restorenet.ops.tiles.TilePlan.layout) and the
// number of tile rows / columns of all images (the weight tables' heights).
std::vector<int64_t> layout_of(const std::vector<Image>& images, int64_t tile, int64_t overlap, int64_t* rows,
                               int64_t* cols) {
  std::vector<int64_t> t;
  int64_t row_id = 0, col_id = 0, pix_base = 0;
  for (size_t b = 0; b < images.size(); ++b) {
    const auto ys = starts(images[b].h, tile, overlap), xs = starts(images[b].w, tile, overlap);
    for (size_t r = 0; r < ys.size(); ++r) {
      for (size_t c = 0; c < xs.size(); ++c) {
        const int64_t cell_h = (r + 1 < ys.size() ? ys[r + 1] : images[b].h) - ys[r];
        const int64_t cell_w = (c + 1 < xs.size() ? xs[c + 1] : images[b].w) - xs[c];
        const int64_t row[] = {int64_t(b), ys[r], xs[c], int64_t(r), int64_t(c), int64_t(xs.size()), cell_h, cell_w,
                               pix_base, images[b].h, images[b].w, row_id + int64_t(r), col_id + int64_t(c)};
        t.insert(t.end(), row, row + restorenet::kTileLayoutColumns);
      }
    }
    row_id += int64_t(ys.size()), col_id += int64_t(xs.size()), pix_base += images[b].h * images[b].w;
  }
  *rows = row_id, *cols = col_id;
  return t;
}

template <typename T>
int run(int dtype, const std::vector<Image>& images, int64_t channels, int64_t tile, int64_t overlap, int64_t cover,
        bool channels_last) {
  int64_t n_rows = 0, n_cols = 0;
  const std::vector<int64_t> layout = layout_of(images, tile, overlap, &n_rows, &n_cols);
  const int64_t n = int64_t(layout.size()) / restorenet::kTileLayoutColumns;
  int rc = 0;
  // gather at scale 1 and 2, every image its own exactly-sized buffer
  for (int64_t scale : {1, 2}) {
    std::vector<std::vector<T>> feats;
    std::vector<int64_t> sources;
    for (const Image& im : images) {
      const int64_t h = im.h / scale, w = im.w / scale;
      feats.emplace_back(size_t(channels * h * w), T(1.0f));
      const int64_t st[3] = {channels_last ? 1 : h * w, channels_last ? w * channels : w, channels_last ? channels : 1};
      sources.insert(sources.end(), {reinterpret_cast<int64_t>(feats.back().data()), st[0], st[1], st[2]});
    }
    std::vector<int64_t> boxes;
    for (int64_t t = n - 1; t >= 0; --t) {  // reversed: any order
      const int64_t* row = &layout[size_t(t * restorenet::kTileLayoutColumns)];
      boxes.insert(boxes.end(), {row[restorenet::kTileImage], row[restorenet::kTileY] / scale,
                                 row[restorenet::kTileX] / scale});
    }
    std::vector<T> out(size_t(n * channels * (tile / scale) * (tile / scale)));
    const int64_t shape[4] = {n, channels, tile / scale, tile / scale};
    rc |= emu_tile_gather_forward(dtype, shape, sources.data(), boxes.data(), out.data());
  }
  // blend
  using acc_t = typename restorenet::AccType<T>::type;
  std::vector<T> tiles(size_t(n * channels * tile * tile), T(1.0f));
  std::vector<int64_t> slots(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) slots[size_t(t)] = n - 1 - t;
  std::vector<acc_t> row_weight(size_t(n_rows * tile), acc_t(1)), col_weight(size_t(n_cols * tile), acc_t(1));
  int64_t pixels = 0;
  for (const Image& im : images) pixels += im.h * im.w;
  std::vector<T> out(size_t(channels * pixels));
  const int64_t t_st[4] = {channels * tile * tile, channels_last ? 1 : tile * tile,
                           channels_last ? tile * channels : tile, channels_last ? channels : 1};
  const int64_t shape[7] = {n, channels, tile, tile, pixels, cover, cover};
  rc |= emu_tile_blend_forward(dtype, shape, tiles.data(), t_st, slots.data(), layout.data(), row_weight.data(),
                               col_weight.data(), out.data());
  return rc;
}

}  // namespace

// "quick" (for ThreadSanitizer, whose threads are slow to start): one case,
// a channels_last one, whose loads and stores walk the staging buffer in
// different orders.
int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  const std::vector<Image> ragged{{32, 40}, {32, 40}, {24, 16}};
  const std::vector<Image> deep{{32, 50}, {24, 24}};
  int rc = run<__half>(1, ragged, 5, 16, 8, 2, true);
  if (!quick) {
    rc |= run<float>(0, ragged, 3, 16, 8, 2, false);
    rc |= run<double>(3, deep, 33, 24, 16, 4, true);
    rc |= run<__nv_bfloat16>(2, deep, 2, 24, 16, 4, false);
  }
  if (rc != 0) {
    std::printf("a launch failed\n");
    return 1;
  }
  std::printf("all cases ran\n");
  return 0;
}
#endif
