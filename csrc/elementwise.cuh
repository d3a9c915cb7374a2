// Building blocks of the memory-bound element-wise kernels (naf_elementwise.cu,
// reversible.cu): a 4-d tensor seen as a rows x cols matrix whose columns run
// along the layout's unit-stride dimension, 16-byte vector loads and stores,
// and the thread tiling of a 256-thread block over that matrix.
//
//   layout          rows             cols        row r = (outer, inner)
//   NCHW            (n, c)           h * w       (r / c, r % c)
//   channels_last   (n, h * w)       c           (r / hw, r % hw)
//
// A block is `tpr` lanes along the columns times `rpb` rows (tpr a power of two
// covering the columns, so a channels_last tensor with 64 channels still fills
// the block: 16 lanes x 16 pixels). Each lane moves V elements at once: one
// 16-byte access when every tensor allows it, else V = 1.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "common.cuh"

namespace restorenet {
namespace elementwise {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;  // grid cap of the element-wise passes (they grid-stride)
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y

// ---------------------------------------------------------------- vector access
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// The V elements at p (16-byte aligned when V > 1) in the accumulation type.
template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* p, typename AccType<T>::type (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_acc(*p);
  } else {
    const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = to_acc(pack.v[k]);
  }
}

// Rounds V accumulator values to T and stores them at p in one access.
template <typename T, int V, typename A>
__device__ __forceinline__ void store_pack(T* p, const A (&in)[V]) {
  if constexpr (V == 1) {
    store_as(p, in[0]);
  } else {
    Pack<T, V> pack;
#pragma unroll
    for (int k = 0; k < V; ++k) store_as(&pack.v[k], in[k]);
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
  }
}

// ---------------------------------------------------------------- rows x cols
// The stride of the merged (h, w) pixel index of a tensor [*, *, h, w], or
// false when h and w do not merge into one index (neither layout).
inline bool merged_pixel_stride(int64_t h, int64_t w, const Strides4& st, int64_t& stride) {
  if (h * w <= 1) {
    stride = 0;
  } else if (w == 1) {
    stride = st.h;
  } else if (h == 1 || st.h == w * st.w) {
    stride = st.w;
  } else {
    return false;
  }
  return true;
}

// Whether the channels run along the columns: where the channel is the
// unit-stride dimension (channels_last), or when there is a single pixel.
inline bool channels_along_cols(int64_t channels, int64_t hw, int64_t stride_c) {
  return hw == 1 || (channels > 1 && stride_c == 1);
}

// Element strides of one tensor as rows x cols: row r = (outer, inner).
struct View {
  int64_t outer, inner, col;
};

__device__ __forceinline__ int64_t at(const View& v, int64_t outer, int64_t inner, int64_t col) {
  return outer * v.outer + inner * v.inner + col * v.col;
}

// The rows x cols shape shared by every tensor of a call, and the thread tiling.
struct RowPlan {
  int64_t rows, cols, row_inner;  // row r -> (r / row_inner, r % row_inner)
  int tpr, rpb;                   // lanes per row, rows per block (tpr * rpb == kThreads)
  int64_t col_tiles, row_groups;  // tiles of tpr * V columns, groups of rpb rows
};

// The plan of an [n, c, h, w] call: channels along the columns or along the rows.
inline RowPlan make_row_plan(int64_t n, int64_t c, int64_t hw, bool channel_is_col, int vec) {
  RowPlan p{};
  p.rows = channel_is_col ? n * hw : n * c;
  p.cols = channel_is_col ? c : hw;
  p.row_inner = channel_is_col ? hw : c;
  const int64_t packs = ceil_div(p.cols, vec);
  p.tpr = 1;
  while (p.tpr < packs && p.tpr < kThreads) p.tpr *= 2;
  p.rpb = kThreads / p.tpr;
  p.col_tiles = ceil_div(packs, p.tpr);
  p.row_groups = ceil_div(p.rows, p.rpb);
  return p;
}

// 16-byte packs (16 / sizeof(T) elements) if every (view, pointer) pair allows
// them, else 1. Absent tensors (null pointers) do not count.
template <typename T>
int vector_width(const RowPlan& p, std::initializer_list<std::pair<View, const void*>> tensors) {
  constexpr int kVec = int(16 / sizeof(T));
  if (p.cols % kVec != 0) return 1;
  for (const auto& t : tensors) {
    const View& v = t.first;
    if (t.second == nullptr) continue;
    if (v.col != 1 || v.outer % kVec != 0 || v.inner % kVec != 0 ||
        reinterpret_cast<uintptr_t>(t.second) % 16 != 0) {
      return 1;
    }
  }
  return kVec;
}

// blockIdx.x: column tiles, blockIdx.y: row groups; both capped (the kernels grid-stride).
inline dim3 elementwise_grid(const RowPlan& p) {
  const int64_t blocks = grid_cap(kMaxBlocks);
  const int64_t x = min64(p.col_tiles, blocks);
  const int64_t y = min64(min64(p.row_groups, max64(1, blocks / x)), grid_cap(kMaxGridY));
  return dim3(unsigned(x), unsigned(y), 1);
}

// Calls body(outer, inner, col) for each pack of V columns this thread owns
// under an elementwise_grid launch: row groups blockIdx.y, + gridDim.y, ...,
// column tiles blockIdx.x, + gridDim.x, ... No barriers: threads past the
// matrix simply skip.
template <int V, typename Body>
__device__ __forceinline__ void for_each_pack(const RowPlan& p, Body&& body) {
  const int lane = int(threadIdx.x) % p.tpr, sub = int(threadIdx.x) / p.tpr;
  for (int64_t rg = blockIdx.y; rg < p.row_groups; rg += gridDim.y) {
    const int64_t row = rg * p.rpb + sub;
    if (row >= p.rows) continue;
    int64_t ro, ri;
    divmod(row, p.row_inner, ro, ri);
    for (int64_t ct = blockIdx.x; ct < p.col_tiles; ct += gridDim.x) {
      const int64_t col = (ct * p.tpr + lane) * V;
      if (col >= p.cols) continue;
      body(ro, ri, col);
    }
  }
}

}  // namespace elementwise
}  // namespace restorenet
