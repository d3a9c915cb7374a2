// NAFBlock element-wise CUDA kernels: LayerNorm2d (forward, backward) and
// SimpleGate (forward, backward). C API, math and memory traffic: naf_elementwise.h.
//
// SimpleGate is a pure element-wise map over the [n, c/2, h, w] output: the
// two halves of x are the same tensor at a channel offset. The tensors are
// seen as rows x cols with the columns along the layout's unit-stride
// dimension (pixels for NCHW, channels for channels_last); a block of 256
// threads is `tpr` lanes along the columns times `rpb` rows, and each lane
// moves 16 bytes per access when every tensor allows it (else one element).
//
// LayerNorm2d reduces over the channels of each pixel, which for NCHW is the
// strided direction. Re-reading x from global memory for the two-pass
// variance would triple the traffic once the working set leaves L2, so each
// block stages a tile of P pixels x all C channels in shared memory (x, and
// dy for the backward): one coalesced read from global, every pass from
// shared memory, one coalesced write. The tile is loaded along the unit-stride
// dimension of the layout (pixels for NCHW, channels for channels_last) and
// kept [C][P] in shared memory. P is the largest power of two <= 256 whose
// tile(s) fit in 32 KiB. Per pixel, 256 / P threads each sum a strided subset
// of the channels and a fixed-shape tree adds them.
//
// dweight/dbias (sums over every pixel, per channel) are deterministic without
// atomics: a block owns the pixel tiles blockIdx.x, + gridDim.x, ... and, for
// each, thread c adds the tile's sum for channel c (fixed order over the tile's
// pixels) into the block's own row of a partial buffer; sum_partial_rows
// (common.cuh) adds the rows in order.
#include "naf_elementwise.h"

#include <cmath>

#include "common.cuh"
#include "elementwise.cuh"

namespace restorenet {
namespace naf_detail {

// The rows x cols machinery of the simple gate, and the 256-thread blocks
// (elementwise::kThreads) that the LayerNorm kernels use as well.
using namespace elementwise;

constexpr int kMaxPixels = 256;          // pixels per LayerNorm tile (a power of two)
constexpr int kTileBytes = 32 * 1024;    // shared memory for the staged tile(s)
constexpr int64_t kMaxChunks = 1024;     // LayerNorm grid cap = partial-sum rows

__device__ __forceinline__ float reciprocal_sqrt(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double reciprocal_sqrt(double v) { return 1.0 / sqrt(v); }

// Element strides of one tensor by (sample, channel, pixel); zero for size-1 dims.
struct PixelView {
  int64_t n, c, p;
};

bool pixel_view(const NafShape& s, const Strides4& st, PixelView& v) {
  int64_t pix = 0;
  if (!merged_pixel_stride(s.h, s.w, st, pix)) return false;
  v = PixelView{s.n > 1 ? st.n : 0, s.c > 1 ? st.c : 0, pix};
  return true;
}

// ============================================================ simple_gate
bool channels_along_cols(const NafShape& s, const PixelView& v) {
  return elementwise::channels_along_cols(s.c, s.h * s.w, v.c);
}

View view_of(const PixelView& v, bool channel_is_col) {
  return channel_is_col ? View{v.n, v.p, v.c} : View{v.n, v.c, v.p};
}

RowPlan make_plan(const NafShape& s, bool channel_is_col, int vec) {
  return make_row_plan(s.n, s.c, s.h * s.w, channel_is_col, vec);
}

template <typename T>
struct GateArgs {
  const T* a;   // x[:, :C/2]
  const T* b;   // x[:, C/2:]
  const T* dy;  // backward only
  T* y;         // forward: y; backward: dx[:, :C/2]
  T* y2;        // backward: dx[:, C/2:]
  View av, bv, dyv, yv, y2v;
  RowPlan p;
};

// forward: y = a * b;  backward: dx_a = dy * b, dx_b = dy * a.
// blockIdx.x: column tiles, blockIdx.y: row groups (both grid-strided).
template <typename T, int V, bool kBackward>
__global__ void __launch_bounds__(kThreads) simple_gate_kernel(GateArgs<T> g) {
  using acc_t = typename AccType<T>::type;
  for_each_pack<V>(g.p, [&](int64_t ro, int64_t ri, int64_t col) {
    acc_t a[V], b[V];
    load_pack<T, V>(g.a + at(g.av, ro, ri, col), a);
    load_pack<T, V>(g.b + at(g.bv, ro, ri, col), b);
    if constexpr (kBackward) {
      acc_t dy[V], da[V], db[V];
      load_pack<T, V>(g.dy + at(g.dyv, ro, ri, col), dy);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        da[k] = dy[k] * b[k];
        db[k] = dy[k] * a[k];
      }
      store_pack<T, V>(g.y + at(g.yv, ro, ri, col), da);
      store_pack<T, V>(g.y2 + at(g.y2v, ro, ri, col), db);
    } else {
      acc_t y[V];
#pragma unroll
      for (int k = 0; k < V; ++k) y[k] = a[k] * b[k];
      store_pack<T, V>(g.y + at(g.yv, ro, ri, col), y);
    }
  });
}

template <typename T, bool kBackward>
cudaError_t gate_typed(const NafShape& s, const void* dy, Strides4 dys, const void* x, Strides4 xs, void* out,
                       Strides4 outs, cudaStream_t stream) {
  const int64_t half = s.c / 2;
  const NafShape hs{s.n, half, s.h, s.w};  // every tensor the kernel sees is half of x
  PixelView xv{}, outv{}, dyv{};
  if (!pixel_view(hs, xs, xv) || !pixel_view(hs, outs, outv) || (kBackward && !pixel_view(hs, dys, dyv))) {
    return cudaErrorInvalidValue;
  }
  const bool channel_is_col = channels_along_cols(hs, xv);
  GateArgs<T> g{};
  g.a = static_cast<const T*>(x);
  g.b = g.a + half * xs.c;
  g.av = g.bv = view_of(xv, channel_is_col);
  if constexpr (kBackward) {
    g.dy = static_cast<const T*>(dy);
    g.dyv = view_of(dyv, channel_is_col);
    g.y = static_cast<T*>(out);
    g.y2 = g.y + half * outs.c;
    g.yv = g.y2v = view_of(outv, channel_is_col);
  } else {
    g.y = static_cast<T*>(out);
    g.yv = view_of(outv, channel_is_col);
  }
  const RowPlan scalar = make_plan(hs, channel_is_col, 1);
  const int vec = kBackward ? vector_width<T>(scalar, {{g.av, g.a}, {g.bv, g.b}, {g.dyv, g.dy}, {g.yv, g.y},
                                                       {g.y2v, g.y2}})
                            : vector_width<T>(scalar, {{g.av, g.a}, {g.bv, g.b}, {g.yv, g.y}});
  g.p = make_plan(hs, channel_is_col, vec);
  constexpr int kVec = int(16 / sizeof(T));
  const dim3 grid = elementwise_grid(g.p);
  return vec == kVec ? launch(simple_gate_kernel<T, kVec, kBackward>, grid, dim3(kThreads), stream, g)
                     : launch(simple_gate_kernel<T, 1, kBackward>, grid, dim3(kThreads), stream, g);
}

// ============================================================ layer_norm2d
// Pixel tiles of one sample each: tile t covers pixels [tp * P, tp * P + P)
// of sample t / tiles_per_sample.
struct NormPlan {
  int64_t n, c, hw;
  bool channels_last;  // load along the channels (else along the pixels)
  int pixels, log2_pixels;
  int64_t tiles_per_sample, tiles;
};

bool make_norm_plan(const NafShape& s, const PixelView& x, int tensors, size_t elem_bytes, NormPlan& p) {
  p.n = s.n;
  p.c = s.c;
  p.hw = s.h * s.w;
  p.channels_last = channels_along_cols(s, x);
  const int64_t budget = int64_t(kTileBytes) / (int64_t(tensors) * s.c * int64_t(elem_bytes));
  if (budget < 1) return false;
  p.pixels = 1;
  p.log2_pixels = 0;
  while (2 * p.pixels <= budget && p.pixels < kMaxPixels && p.pixels < p.hw) {
    p.pixels *= 2;
    ++p.log2_pixels;
  }
  p.tiles_per_sample = ceil_div(p.hw, p.pixels);
  p.tiles = p.n * p.tiles_per_sample;
  return true;
}

// Element e of a C x P tile as (channel, pixel): consecutive e are adjacent in
// global memory (channel-fastest for channels_last, pixel-fastest for NCHW).
__device__ __forceinline__ void tile_slot(const NormPlan& p, int e, int& c, int& pl) {
  if (p.channels_last) {
    pl = e / int(p.c);
    c = e - pl * int(p.c);
  } else {
    c = e >> p.log2_pixels;
    pl = e & (p.pixels - 1);
  }
}

// Calls body(c, pl) for each element of the C x P tile starting at pixel p0
// that lies inside the image, spread over the block's threads in tile_slot
// order (so the global-memory accesses coalesce). No barriers. kUnroll: how
// many iterations each thread unrolls (4 keeps several loads in flight).
template <int kUnroll = 4, typename Body>
__device__ __forceinline__ void for_each_tile_element(const NormPlan& p, int64_t p0, Body&& body) {
  const int count = int(p.c) * p.pixels;
#pragma unroll kUnroll
  for (int e = int(threadIdx.x); e < count; e += kThreads) {
    int c, pl;
    tile_slot(p, e, c, pl);
    if (p0 + pl < p.hw) body(c, pl);
  }
}

// tile[c * P + pl] = src[n, c, p0 + pl] for the pixels inside the image; the
// others are left as they are (never read for an output).
template <typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, const PixelView& v, const NormPlan& p, int64_t n,
                                          int64_t p0) {
  for_each_tile_element(p, p0, [&](int c, int pl) {
    tile[c * p.pixels + pl] = src[n * v.n + int64_t(c) * v.c + (p0 + pl) * v.p];
  });
}

// A thread's role in the per-pixel reductions: pixel pl of the tile, and the
// share `part` (of `parts`) of its channels, thread = part * P + pl.
struct NormLane {
  int tid, pl, part, parts;
};

__device__ __forceinline__ NormLane norm_lane(const NormPlan& p) {
  const int tid = int(threadIdx.x);
  return NormLane{tid, tid & (p.pixels - 1), tid >> p.log2_pixels, kThreads >> p.log2_pixels};
}

// Tile t of the plan: sample n, first pixel p0.
struct TileOrigin {
  int64_t n, p0;
};

__device__ __forceinline__ TileOrigin tile_origin(const NormPlan& p, int64_t t) {
  int64_t n, tp;
  divmod(t, p.tiles_per_sample, n, tp);
  return TileOrigin{n, tp * p.pixels};
}

// red[tid] holds a thread's share of its pixel's sum (thread = part * P + pl);
// adds the shares of each pixel in a fixed tree, so red[pl] is the pixel's
// total afterwards. Block-collective.
template <typename acc_t>
__device__ __forceinline__ void reduce_parts(acc_t* red, const NormPlan& p) {
  __syncthreads();
  const int tid = int(threadIdx.x), part = tid >> p.log2_pixels;
  for (int half = (kThreads >> p.log2_pixels) / 2; half > 0; half /= 2) {
    if (part < half) red[tid] += red[tid + half * p.pixels];
    __syncthreads();
  }
}

template <typename T>
struct NormForwardArgs {
  using acc_t = typename AccType<T>::type;
  const T* x;
  const acc_t* weight;
  const acc_t* bias;
  T* y;
  acc_t* mean;
  acc_t* rstd;
  acc_t eps;
  PixelView xv, yv;
  NormPlan p;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm2d_forward_kernel(NormForwardArgs<T> a) {
  using acc_t = typename AccType<T>::type;
  __shared__ __align__(16) unsigned char raw[kTileBytes];
  __shared__ acc_t red[2][kThreads];
  __shared__ acc_t tile_mean[kMaxPixels], tile_rstd[kMaxPixels];
  T* xt = reinterpret_cast<T*>(raw);
  const NormPlan& p = a.p;
  const NormLane lane = norm_lane(p);
  const int tid = lane.tid, pl = lane.pl, part = lane.part, parts = lane.parts;
  const int P = p.pixels;
  for (int64_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
    const TileOrigin origin = tile_origin(p, t);
    const int64_t n = origin.n, p0 = origin.p0;
    const bool pixel_ok = p0 + pl < p.hw;
    load_tile(xt, a.x, a.xv, p, n, p0);
    __syncthreads();
    acc_t s = acc_t(0);
    if (pixel_ok) {
      for (int c = part; c < p.c; c += parts) s += to_acc(xt[c * P + pl]);
    }
    red[0][tid] = s;
    reduce_parts(red[0], p);
    const acc_t mean = red[0][pl] / acc_t(p.c);
    acc_t q = acc_t(0);
    if (pixel_ok) {
      for (int c = part; c < p.c; c += parts) {
        const acc_t d = to_acc(xt[c * P + pl]) - mean;
        q += d * d;
      }
    }
    red[1][tid] = q;
    reduce_parts(red[1], p);
    if (part == 0) {
      const acc_t rstd = reciprocal_sqrt(red[1][pl] / acc_t(p.c) + a.eps);
      tile_mean[pl] = mean;
      tile_rstd[pl] = rstd;
      if (pixel_ok) {
        a.mean[n * p.hw + p0 + pl] = mean;
        a.rstd[n * p.hw + p0 + pl] = rstd;
      }
    }
    __syncthreads();
    for_each_tile_element(p, p0, [&](int c, int q) {
      const acc_t v = (to_acc(xt[c * P + q]) - tile_mean[q]) * tile_rstd[q] * a.weight[c] + a.bias[c];
      store_as(a.y + n * a.yv.n + int64_t(c) * a.yv.c + (p0 + q) * a.yv.p, v);
    });
    __syncthreads();  // the next tile overwrites xt, red and the tile statistics
  }
}

template <typename T>
struct NormBackwardArgs {
  using acc_t = typename AccType<T>::type;
  const T* dy;
  const T* x;
  const acc_t* weight;
  const acc_t* mean;
  const acc_t* rstd;
  T* dx;
  acc_t* partial_w;  // [gridDim.x][c]
  acc_t* partial_b;
  PixelView dyv, xv, dxv;
  NormPlan p;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm2d_backward_kernel(NormBackwardArgs<T> a) {
  using acc_t = typename AccType<T>::type;
  __shared__ __align__(16) unsigned char raw[kTileBytes];
  __shared__ acc_t red[2][kThreads];
  // tile_c[0] = c1 = mean(g * xhat), tile_c[1] = c2 = mean(g) over the channels of each pixel.
  __shared__ acc_t tile_mean[kMaxPixels], tile_rstd[kMaxPixels], tile_c[2][kMaxPixels];
  const NormPlan& p = a.p;
  const NormLane lane = norm_lane(p);
  const int tid = lane.tid, pl = lane.pl, part = lane.part, parts = lane.parts;
  const int P = p.pixels;
  T* xt = reinterpret_cast<T*>(raw);
  T* dyt = xt + p.c * P;
  acc_t* row_w = a.partial_w + int64_t(blockIdx.x) * p.c;
  acc_t* row_b = a.partial_b + int64_t(blockIdx.x) * p.c;
  for (int64_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
    const TileOrigin origin = tile_origin(p, t);
    const int64_t n = origin.n, p0 = origin.p0;
    const bool pixel_ok = p0 + pl < p.hw;
    load_tile(xt, a.x, a.xv, p, n, p0);
    load_tile(dyt, a.dy, a.dyv, p, n, p0);
    if (tid < P) {
      const bool ok = p0 + tid < p.hw;
      tile_mean[tid] = ok ? a.mean[n * p.hw + p0 + tid] : acc_t(0);
      tile_rstd[tid] = ok ? a.rstd[n * p.hw + p0 + tid] : acc_t(0);
    }
    __syncthreads();
    acc_t s1 = acc_t(0), s2 = acc_t(0);
    if (pixel_ok) {
      const acc_t m = tile_mean[pl], r = tile_rstd[pl];
      for (int c = part; c < p.c; c += parts) {
        const acc_t g = to_acc(dyt[c * P + pl]) * a.weight[c];
        s1 += g * ((to_acc(xt[c * P + pl]) - m) * r);
        s2 += g;
      }
    }
    red[0][tid] = s1;
    red[1][tid] = s2;
    reduce_parts(red[0], p);  // its barriers also order red[1]'s writes
    reduce_parts(red[1], p);
    if (part == 0) {
      // One division site in a loop that is not unrolled: two inlined IEEE divisions
      // back to back (each with its slow-path subroutine call) made ptxas save
      // registers to the stack (16 B for double on sm_90a); the quotients are the same.
#pragma unroll 1
      for (int k = 0; k < 2; ++k) tile_c[k][pl] = red[k][pl] / acc_t(p.c);
    }
    __syncthreads();
    // Not unrolled: unrolled, ptxas hoisted the tile offsets of 4 iterations out of the
    // tile loop and kept 3 of them on the stack (float on sm_80, 12 B of spills at 64
    // registers). The loop only stores to global memory: nothing waits on it.
    for_each_tile_element<1>(p, p0, [&](int c, int q) {
      const acc_t r = tile_rstd[q];
      const acc_t xhat = (to_acc(xt[c * P + q]) - tile_mean[q]) * r;
      const acc_t g = to_acc(dyt[c * P + q]) * a.weight[c];
      store_as(a.dx + n * a.dxv.n + int64_t(c) * a.dxv.c + (p0 + q) * a.dxv.p,
               r * (g - tile_c[1][q] - xhat * tile_c[0][q]));
    });
    // Parameter gradients: thread c owns channel c of the block's partial rows.
    const bool first = t == int64_t(blockIdx.x);
    const int valid = int(min64(P, p.hw - p0));
    for (int c = tid; c < p.c; c += kThreads) {
      acc_t sw = acc_t(0), sb = acc_t(0);
      for (int q = 0; q < valid; ++q) {
        const acc_t d = to_acc(dyt[c * P + q]);
        sw += d * ((to_acc(xt[c * P + q]) - tile_mean[q]) * tile_rstd[q]);
        sb += d;
      }
      row_w[c] = first ? sw : row_w[c] + sw;
      row_b[c] = first ? sb : row_b[c] + sb;
    }
    __syncthreads();  // the next tile overwrites the tiles and statistics
  }
}

template <typename T>
cudaError_t norm_forward_typed(const NafShape& s, const void* x, Strides4 xs, const void* weight, const void* bias,
                               double eps, void* y, Strides4 ys, void* mean, void* rstd, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  NormForwardArgs<T> a{};
  if (!pixel_view(s, xs, a.xv) || !pixel_view(s, ys, a.yv) || !make_norm_plan(s, a.xv, 1, sizeof(T), a.p)) {
    return cudaErrorInvalidValue;
  }
  a.x = static_cast<const T*>(x);
  a.weight = static_cast<const acc_t*>(weight);
  a.bias = static_cast<const acc_t*>(bias);
  a.y = static_cast<T*>(y);
  a.mean = static_cast<acc_t*>(mean);
  a.rstd = static_cast<acc_t*>(rstd);
  a.eps = acc_t(eps);
  if (a.p.tiles == 0) return cudaSuccess;
  const dim3 grid(unsigned(min64(a.p.tiles, grid_cap(kMaxBlocks))), 1, 1);
  return launch(layer_norm2d_forward_kernel<T>, grid, dim3(kThreads), stream, a);
}

template <typename T>
cudaError_t norm_backward_typed(const NafShape& s, const void* dy, Strides4 dys, const void* x, Strides4 xs,
                                const void* weight, const void* mean, const void* rstd, void* dx, Strides4 dxs,
                                void* dweight, void* dbias, void* workspace, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  NormBackwardArgs<T> a{};
  if (!pixel_view(s, dys, a.dyv) || !pixel_view(s, xs, a.xv) || !pixel_view(s, dxs, a.dxv) ||
      !make_norm_plan(s, a.xv, 2, sizeof(T), a.p)) {
    return cudaErrorInvalidValue;
  }
  a.dy = static_cast<const T*>(dy);
  a.x = static_cast<const T*>(x);
  a.weight = static_cast<const acc_t*>(weight);
  a.mean = static_cast<const acc_t*>(mean);
  a.rstd = static_cast<const acc_t*>(rstd);
  a.dx = static_cast<T*>(dx);
  a.partial_w = static_cast<acc_t*>(workspace);
  a.partial_b = a.partial_w + kMaxChunks * s.c;
  const int64_t chunks = min64(a.p.tiles, grid_cap(kMaxChunks));
  if (chunks > 0) {
    const cudaError_t err = launch(layer_norm2d_backward_kernel<T>, dim3(unsigned(chunks), 1, 1), dim3(kThreads),
                                   stream, a);
    if (err != cudaSuccess) return err;
  }
  // No pixels: chunks == 0 and the parameter gradients come out zero.
  const int64_t blocks = min64(ceil_div(s.c, kSumRowsThreads), grid_cap(kMaxBlocks));
  const cudaError_t err = sum_partial_rows<acc_t>(a.partial_w, chunks, s.c, static_cast<acc_t*>(dweight), blocks,
                                                  stream);
  if (err != cudaSuccess) return err;
  return sum_partial_rows<acc_t>(a.partial_b, chunks, s.c, static_cast<acc_t*>(dbias), blocks, stream);
}

bool valid_shape(const NafShape& s) { return s.n >= 0 && s.c >= 1 && s.h >= 0 && s.w >= 0; }

}  // namespace naf_detail

cudaError_t layer_norm2d_forward(DType dtype, const NafShape& shape, const void* x, Strides4 x_strides,
                                 const void* weight, const void* bias, double eps, void* y, Strides4 y_strides,
                                 void* mean, void* rstd, cudaStream_t stream) {
  using namespace naf_detail;
  if (!valid_shape(shape) || !(eps >= 0.0)) return cudaErrorInvalidValue;
  if (shape.n * shape.h * shape.w == 0) return cudaSuccess;
  if (x == nullptr || weight == nullptr || bias == nullptr || y == nullptr || mean == nullptr || rstd == nullptr) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return norm_forward_typed<T>(shape, x, x_strides, weight, bias, eps, y, y_strides, mean, rstd, stream);
  });
}

size_t layer_norm2d_backward_workspace_size(DType dtype, int64_t channels) {
  using namespace naf_detail;
  return 2 * size_t(kMaxChunks) * size_t(channels > 0 ? channels : 0) * acc_bytes(dtype);
}

cudaError_t layer_norm2d_backward(DType dtype, const NafShape& shape, const void* dy, Strides4 dy_strides,
                                  const void* x, Strides4 x_strides, const void* weight, const void* mean,
                                  const void* rstd, void* dx, Strides4 dx_strides, void* dweight, void* dbias,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using namespace naf_detail;
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  if (dweight == nullptr || dbias == nullptr || workspace == nullptr ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0 ||
      workspace_bytes < layer_norm2d_backward_workspace_size(dtype, shape.c)) {
    return cudaErrorInvalidValue;
  }
  const bool pixels = shape.n * shape.h * shape.w > 0;
  if (pixels && (dy == nullptr || x == nullptr || weight == nullptr || mean == nullptr || rstd == nullptr ||
                 dx == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return norm_backward_typed<T>(shape, dy, dy_strides, x, x_strides, weight, mean, rstd, dx, dx_strides, dweight,
                                  dbias, workspace, stream);
  });
}

cudaError_t simple_gate_forward(DType dtype, const NafShape& shape, const void* x, Strides4 x_strides, void* y,
                                Strides4 y_strides, cudaStream_t stream) {
  using namespace naf_detail;
  if (!valid_shape(shape) || shape.c % 2 != 0) return cudaErrorInvalidValue;
  if (shape.n * shape.h * shape.w == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return gate_typed<T, false>(shape, nullptr, Strides4{}, x, x_strides, y, y_strides, stream);
  });
}

cudaError_t simple_gate_backward(DType dtype, const NafShape& shape, const void* dy, Strides4 dy_strides,
                                 const void* x, Strides4 x_strides, void* dx, Strides4 dx_strides,
                                 cudaStream_t stream) {
  using namespace naf_detail;
  if (!valid_shape(shape) || shape.c % 2 != 0) return cudaErrorInvalidValue;
  if (shape.n * shape.h * shape.w == 0) return cudaSuccess;
  if (dy == nullptr || x == nullptr || dx == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return gate_typed<T, true>(shape, dy, dy_strides, x, x_strides, dx, dx_strides, stream);
  });
}

}  // namespace restorenet
