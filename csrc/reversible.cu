// rev_coupling CUDA kernels: AdaRevD's coupling c' = a * c + f, its backward
// and its one-pass inverse. C API and memory traffic: reversible.h.
//
// Memory-bound, so the design is about bytes. Every tensor [n, c, h, w] is
// seen as a rows x cols matrix whose columns run along the unit-stride
// dimension of the layout, so consecutive threads touch consecutive addresses:
//
//   layout          rows             cols        channel of (row, col)
//   NCHW            (n, c)           h * w       row % c
//   channels_last   (n, h * w)       c           col
//
// A block of 256 threads is `tpr` lanes along the columns times `rpb` rows
// (tpr a power of two covering the columns, so a channels_last tensor with 64
// channels still fills the block: 16 lanes x 16 pixels). Each lane moves V
// elements with one 16-byte load/store when every tensor allows it (unit
// column stride, row strides and pointers 16-byte aligned, cols % V == 0),
// else one element (V = 1). Grids are capped and the kernels loop (grid-stride).
//
// grad_alpha needs a per-channel sum over all pixels; no atomics, no warp
// shuffles: each block sums its share in registers, then in shared memory in
// a fixed order, and writes one row of partial sums; sum_partial_rows
// (common.cuh) adds the rows in order.
//
//   channels_last: a block owns a fixed channel tile (blockIdx.x) and a
//     strided set of row groups (blockIdx.y); each thread keeps V sums.
//   NCHW: a block owns one channel (blockIdx.y) and a strided set of
//     (sample group, pixel tile) items (blockIdx.x); one sum per thread.
#include "reversible.h"

#include "common.cuh"
#include "elementwise.cuh"

namespace restorenet {
namespace reversible_detail {

// Views, vector packs, the thread tiling and the grid: elementwise.cuh.
using namespace elementwise;

constexpr int64_t kMaxChunks = 1024;  // partial-sum rows per channel (bounds the workspace)

// The shared rows x cols plan plus what the kernels need of the [n, c, h, w] shape.
struct Plan : RowPlan {
  int64_t samples, channels;
  bool channel_is_col;
};

// ------------------------------------------------------------------ forward
template <typename T>
struct ForwardArgs {
  using acc_t = typename AccType<T>::type;
  const T* x;
  const T* f;
  const acc_t* alpha;
  T* out;
  View xv, fv, ov;
  Plan p;
};

// out = alpha[channel] * x + f. blockIdx.x: column tiles, blockIdx.y: row groups.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) rev_coupling_forward_kernel(ForwardArgs<T> a) {
  using acc_t = typename AccType<T>::type;
  const bool channel_is_col = a.p.channel_is_col;
  for_each_pack<V>(a.p, [&](int64_t ro, int64_t ri, int64_t col) {
    acc_t x[V], f[V], y[V];
    load_pack<T, V>(a.x + at(a.xv, ro, ri, col), x);
    load_pack<T, V>(a.f + at(a.fv, ro, ri, col), f);
#pragma unroll
    for (int k = 0; k < V; ++k) y[k] = a.alpha[channel_is_col ? col + k : ri] * x[k] + f[k];
    store_pack<T, V>(a.out + at(a.ov, ro, ri, col), y);
  });
}

// ------------------------------------------------------------------ invert
template <typename T>
struct InvertArgs {
  using acc_t = typename AccType<T>::type;
  const T* x;  // c' (kRebuild) or c
  const T* f;  // kRebuild only
  const T* g;
  const acc_t* alpha;
  T* c_out;  // kRebuild only
  T* grad_c;
  acc_t* partial;  // [chunks][channels]
  View xv, fv, gv, cv, gcv;
  Plan p;
};

// One pack of V elements at (ro, ri, col) whose channels have alphas `alpha`:
// writes c (kRebuild) and grad_c, returns g * c per element in `contrib`.
template <typename T, int V, bool kRebuild>
__device__ __forceinline__ void invert_pack(const InvertArgs<T>& a, int64_t ro, int64_t ri, int64_t col,
                                            const typename AccType<T>::type (&alpha)[V],
                                            typename AccType<T>::type (&contrib)[V]) {
  using acc_t = typename AccType<T>::type;
  acc_t c[V], g[V], gc[V];
  load_pack<T, V>(a.x + at(a.xv, ro, ri, col), c);
  if constexpr (kRebuild) {
    acc_t f[V];
    load_pack<T, V>(a.f + at(a.fv, ro, ri, col), f);
#pragma unroll
    for (int k = 0; k < V; ++k) c[k] = (c[k] - f[k]) / alpha[k];  // a division, as the spec: not * (1 / a)
    store_pack<T, V>(a.c_out + at(a.cv, ro, ri, col), c);
  }
  load_pack<T, V>(a.g + at(a.gv, ro, ri, col), g);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    gc[k] = alpha[k] * g[k];
    contrib[k] = g[k] * c[k];  // from the unrounded c, as the spec
  }
  store_pack<T, V>(a.grad_c + at(a.gcv, ro, ri, col), gc);
}

// channels_last: channels along the columns. blockIdx.x: a fixed channel
// tile, blockIdx.y: chunk (row groups blockIdx.y, + gridDim.y, ...).
template <typename T, int V, bool kRebuild>
__global__ void __launch_bounds__(kThreads) rev_coupling_invert_channels_last_kernel(InvertArgs<T> a) {
  using acc_t = typename AccType<T>::type;
  __shared__ acc_t sums[kThreads * V];
  const Plan& p = a.p;
  const int tid = int(threadIdx.x), lane = tid % p.tpr, sub = tid / p.tpr;
  const int64_t col = (int64_t(blockIdx.x) * p.tpr + lane) * V;
  const bool col_ok = col < p.cols;
  acc_t alpha[V], acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    alpha[k] = col_ok ? a.alpha[col + k] : acc_t(1);  // V > 1 only when cols % V == 0
    acc[k] = acc_t(0);
  }
  for (int64_t rg = blockIdx.y; rg < p.row_groups; rg += gridDim.y) {
    const int64_t row = rg * p.rpb + sub;
    if (!col_ok || row >= p.rows) continue;
    int64_t ro, ri;
    divmod(row, p.row_inner, ro, ri);
    acc_t contrib[V];
    invert_pack<T, V, kRebuild>(a, ro, ri, col, alpha, contrib);
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] += contrib[k];
  }
  // Rows of the block summed in order 0..rpb-1 per channel (tid = sub * tpr + lane).
#pragma unroll
  for (int k = 0; k < V; ++k) sums[tid * V + k] = acc[k];
  __syncthreads();
  if (sub == 0 && col_ok) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t s = acc_t(0);
      for (int j = 0; j < p.rpb; ++j) s += sums[(j * p.tpr + lane) * V + k];
      a.partial[int64_t(blockIdx.y) * p.channels + col + k] = s;
    }
  }
}

// NCHW: channels along the rows. blockIdx.y: channel (strided by gridDim.y),
// blockIdx.x: chunk of (sample group, column tile) items.
template <typename T, int V, bool kRebuild>
__global__ void __launch_bounds__(kThreads) rev_coupling_invert_nchw_kernel(InvertArgs<T> a) {
  using acc_t = typename AccType<T>::type;
  __shared__ acc_t sums[kThreads];
  const Plan& p = a.p;
  const int tid = int(threadIdx.x), lane = tid % p.tpr, sub = tid / p.tpr;
  const int64_t items = ceil_div(p.samples, p.rpb) * p.col_tiles;
  for (int64_t c = blockIdx.y; c < p.channels; c += gridDim.y) {
    acc_t alpha[V], acc = acc_t(0);
#pragma unroll
    for (int k = 0; k < V; ++k) alpha[k] = a.alpha[c];
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
      int64_t group, tile;
      divmod(item, p.col_tiles, group, tile);
      const int64_t n = group * p.rpb + sub, col = (tile * p.tpr + lane) * V;
      if (n >= p.samples || col >= p.cols) continue;
      acc_t contrib[V];
      invert_pack<T, V, kRebuild>(a, n, c, col, alpha, contrib);
#pragma unroll
      for (int k = 0; k < V; ++k) acc += contrib[k];
    }
    block_tree_sum<kThreads>(sums, tid, acc);
    if (tid == 0) a.partial[int64_t(blockIdx.x) * p.channels + c] = sums[0];
  }
}

// ------------------------------------------------------------------ host side
// Strides of size-1 dimensions are never multiplied by a non-zero index:
// zero them so they cannot spoil the vector-alignment test.
bool view_of(const RevCouplingShape& s, const Strides4& st, bool channel_is_col, View& v) {
  int64_t pix = 0;
  if (!merged_pixel_stride(s.h, s.w, st, pix)) return false;
  const int64_t sn = s.n > 1 ? st.n : 0, sc = s.c > 1 ? st.c : 0;
  v = channel_is_col ? View{sn, pix, sc} : View{sn, sc, pix};
  return true;
}

Plan make_plan(const RevCouplingShape& s, const Strides4& primary, int vec) {
  const int64_t hw = s.h * s.w;
  const bool channel_is_col = channels_along_cols(s.c, hw, primary.c);
  Plan p{};
  static_cast<RowPlan&>(p) = make_row_plan(s.n, s.c, hw, channel_is_col, vec);
  p.samples = s.n;
  p.channels = s.c;
  p.channel_is_col = channel_is_col;
  return p;
}

bool valid_shape(const RevCouplingShape& s) { return s.n >= 0 && s.c >= 0 && s.h >= 0 && s.w >= 0; }

// Views of `count` tensors under the plan of the first; false if one does not merge its pixels.
bool views_for(const RevCouplingShape& s, const Strides4* strides, View* views, int count, bool channel_is_col) {
  for (int i = 0; i < count; ++i) {
    if (!view_of(s, strides[i], channel_is_col, views[i])) return false;
  }
  return true;
}

template <typename T, int V>
cudaError_t launch_forward(const ForwardArgs<T>& a, cudaStream_t stream) {
  return launch(rev_coupling_forward_kernel<T, V>, elementwise_grid(a.p), dim3(kThreads), stream, a);
}

template <typename T>
cudaError_t forward_typed(const RevCouplingShape& s, const void* x, Strides4 xs, const void* f, Strides4 fs,
                          const void* alpha, void* out, Strides4 os, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  ForwardArgs<T> a{static_cast<const T*>(x), static_cast<const T*>(f), static_cast<const acc_t*>(alpha),
                   static_cast<T*>(out), {}, {}, {}, {}};
  Plan p = make_plan(s, xs, 1);
  const Strides4 strides[3] = {xs, fs, os};
  View views[3];
  if (!views_for(s, strides, views, 3, p.channel_is_col)) return cudaErrorInvalidValue;
  a.xv = views[0];
  a.fv = views[1];
  a.ov = views[2];
  const int vec = vector_width<T>(p, {{a.xv, x}, {a.fv, f}, {a.ov, out}});
  a.p = make_plan(s, xs, vec);
  constexpr int kVec = int(16 / sizeof(T));
  return vec == kVec ? launch_forward<T, kVec>(a, stream) : launch_forward<T, 1>(a, stream);
}

template <typename T, int V, bool kRebuild>
cudaError_t launch_invert(const InvertArgs<T>& a, int64_t& chunks, cudaStream_t stream) {
  const Plan& p = a.p;
  if (p.channel_is_col) {
    chunks = min64(p.row_groups, grid_cap(kMaxChunks));
    if (p.col_tiles > kMaxGridY) return cudaErrorInvalidValue;  // > 500k channels
    const dim3 grid(unsigned(p.col_tiles), unsigned(chunks), 1);
    return launch(rev_coupling_invert_channels_last_kernel<T, V, kRebuild>, grid, dim3(kThreads), stream, a);
  }
  chunks = min64(ceil_div(p.samples, p.rpb) * p.col_tiles, grid_cap(kMaxChunks));
  const dim3 grid(unsigned(chunks), unsigned(min64(p.channels, grid_cap(kMaxGridY))), 1);
  return launch(rev_coupling_invert_nchw_kernel<T, V, kRebuild>, grid, dim3(kThreads), stream, a);
}

template <typename T, int V>
cudaError_t launch_invert(const InvertArgs<T>& a, bool rebuild, int64_t& chunks, cudaStream_t stream) {
  return rebuild ? launch_invert<T, V, true>(a, chunks, stream) : launch_invert<T, V, false>(a, chunks, stream);
}

template <typename T>
cudaError_t invert_typed(const RevCouplingShape& s, const void* x, Strides4 xs, const void* f, Strides4 fs,
                         const void* alpha, const void* g, Strides4 gs, void* c_out, Strides4 cs, void* grad_c,
                         Strides4 gcs, void* grad_alpha, void* workspace, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const bool rebuild = f != nullptr;
  InvertArgs<T> a{};
  a.x = static_cast<const T*>(x);
  a.f = static_cast<const T*>(f);
  a.g = static_cast<const T*>(g);
  a.alpha = static_cast<const acc_t*>(alpha);
  a.c_out = static_cast<T*>(c_out);
  a.grad_c = static_cast<T*>(grad_c);
  a.partial = static_cast<acc_t*>(workspace);
  int64_t chunks = 0;
  if (s.n * s.h * s.w > 0) {
    Plan p = make_plan(s, xs, 1);
    // Without a rebuild, f and c_out are absent: their views repeat x's.
    const Strides4 strides[5] = {xs, rebuild ? fs : xs, gs, rebuild ? cs : xs, gcs};
    View views[5];
    if (!views_for(s, strides, views, 5, p.channel_is_col)) return cudaErrorInvalidValue;
    a.xv = views[0];
    a.fv = views[1];
    a.gv = views[2];
    a.cv = views[3];
    a.gcv = views[4];
    const int vec = vector_width<T>(p, {{a.xv, x}, {a.fv, f}, {a.gv, g}, {a.cv, c_out}, {a.gcv, grad_c}});
    a.p = make_plan(s, xs, vec);
    constexpr int kVec = int(16 / sizeof(T));
    const cudaError_t err = vec == kVec ? launch_invert<T, kVec>(a, rebuild, chunks, stream)
                                        : launch_invert<T, 1>(a, rebuild, chunks, stream);
    if (err != cudaSuccess) return err;
  }
  // No pixels: chunks == 0 and grad_alpha comes out zero.
  const int64_t blocks = min64(ceil_div(s.c, kSumRowsThreads), grid_cap(kMaxBlocks));
  return sum_partial_rows<acc_t>(a.partial, chunks, s.c, static_cast<acc_t*>(grad_alpha), blocks, stream);
}

}  // namespace reversible_detail

cudaError_t rev_coupling_forward(DType dtype, const RevCouplingShape& shape, const void* x, Strides4 x_strides,
                                 const void* f, Strides4 f_strides, const void* alpha, void* out,
                                 Strides4 out_strides, cudaStream_t stream) {
  using namespace reversible_detail;
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  if (shape.n * shape.c * shape.h * shape.w == 0) return cudaSuccess;
  if (x == nullptr || f == nullptr || alpha == nullptr || out == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return forward_typed<T>(shape, x, x_strides, f, f_strides, alpha, out, out_strides, stream);
  });
}

size_t rev_coupling_invert_workspace_size(DType dtype, int64_t channels) {
  using namespace reversible_detail;
  return size_t(kMaxChunks) * size_t(channels > 0 ? channels : 0) * acc_bytes(dtype);
}

cudaError_t rev_coupling_invert(DType dtype, const RevCouplingShape& shape, const void* x, Strides4 x_strides,
                                const void* f, Strides4 f_strides, const void* alpha, const void* g,
                                Strides4 g_strides, void* c_out, Strides4 c_out_strides, void* grad_c,
                                Strides4 grad_c_strides, void* grad_alpha, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  using namespace reversible_detail;
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  if (shape.c == 0) return cudaSuccess;
  if ((f == nullptr) != (c_out == nullptr)) return cudaErrorInvalidValue;
  if (alpha == nullptr || grad_alpha == nullptr || workspace == nullptr ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0 ||
      workspace_bytes < rev_coupling_invert_workspace_size(dtype, shape.c)) {
    return cudaErrorInvalidValue;
  }
  // Empty activations may come with null pointers; only grad_alpha (zeros) is written then.
  if (shape.n * shape.h * shape.w > 0 && (x == nullptr || g == nullptr || grad_c == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return invert_typed<T>(shape, x, x_strides, f, f_strides, alpha, g, g_strides, c_out, c_out_strides, grad_c,
                           grad_c_strides, grad_alpha, workspace, stream);
  });
}

}  // namespace restorenet
