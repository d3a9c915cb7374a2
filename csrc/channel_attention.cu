// channel_attention / scaled_residual CUDA kernels: NAFBlock's simplified
// channel attention (of the simple gate) and its scaled residual. C API and
// math: channel_attention.h.
//
// Two kinds of kernel, both memory-bound:
//   element-wise  one thread per element of the [n, c, h, w] output, grid-stride;
//                 the flat index runs fastest along the output's innermost dim
//                 (channels for channels_last, w otherwise) so warps coalesce.
//   reduction     a block of 256 threads owns a tile of channels and a split of
//                 the pixels (per sample for the attention, over all samples for
//                 the residual): each thread sums its channel over a stride of
//                 pixels, the block adds its lanes through shared memory in a
//                 fixed order and writes one partial sum per channel; a second
//                 kernel adds the splits in order. No atomics, no warp shuffles.
// The tile is 32 channels x 8 pixel lanes when channels are innermost, 8 x 32
// otherwise: consecutive threads read consecutive addresses either way.
//
// Accumulation is float32 (float64 for double), memory offsets int64.
#include "channel_attention.h"

#include <climits>

#include "common.cuh"

namespace restorenet {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSplits = 64;        // pixel splits per (sample,) channel tile
constexpr int64_t kMaxGridBlocks = 1 << 20;  // element-wise grids stride beyond this

struct Index4 {
  int64_t n, c, h, w;
};

__host__ __device__ __forceinline__ int64_t offset(Strides4 s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

// Element e of an [n, c, h, w] iteration space, channels fastest or w fastest.
__device__ __forceinline__ Index4 unflatten(int64_t e, int64_t c, int64_t h, int64_t w, bool channels_inner) {
  Index4 i{};
  if (channels_inner) {
    i.c = e % c;
    e /= c;
    i.w = e % w;
    e /= w;
    i.h = e % h;
    i.n = e / h;
  } else {
    i.w = e % w;
    e /= w;
    i.h = e % h;
    e /= h;
    i.c = e % c;
    i.n = e / c;
  }
  return i;
}

// The channel-by-pixel tile of a reduction block (see the file comment).
struct ReduceTile {
  int tile_c, lanes, c_local, lane;
  __device__ __forceinline__ explicit ReduceTile(bool channels_inner) {
    tile_c = channels_inner ? 32 : 8;
    lanes = kThreads / tile_c;
    const int tid = static_cast<int>(threadIdx.x);
    c_local = channels_inner ? tid % tile_c : tid / lanes;
    lane = channels_inner ? tid / tile_c : tid % lanes;
  }
};

// Adds the block's per-thread sums of each channel over its lanes, in lane
// order. Valid in threads c_local < tile_c of lane 0, i.e. threadIdx.x < tile_c
// holds channel threadIdx.x's sum. Every thread must call it (barriers).
template <typename acc_t>
__device__ __forceinline__ acc_t block_channel_sum(acc_t value, const ReduceTile& tile) {
  __shared__ acc_t sums[kThreads];
  sums[tile.c_local * tile.lanes + tile.lane] = value;
  __syncthreads();
  acc_t total = acc_t(0);
  if (static_cast<int>(threadIdx.x) < tile.tile_c) {
    const acc_t* row = sums + threadIdx.x * tile.lanes;
    for (int l = 0; l < tile.lanes; ++l) total += row[l];
  }
  __syncthreads();  // `sums` is reused by the next block (and the next call)
  return total;
}

template <typename T, bool kGated>
__device__ __forceinline__ typename AccType<T>::type gate_value(const T* x, Strides4 xs, int64_t channels,
                                                                const Index4& i) {
  const auto a = to_acc(x[offset(xs, i.n, i.c, i.h, i.w)]);
  if constexpr (kGated) {
    return a * to_acc(x[offset(xs, i.n, i.c + channels, i.h, i.w)]);
  } else {
    return a;
  }
}

// ------------------------------------------------------------ channel attention
// Block b: split b % splits, channel tile (b / splits) % c_tiles, sample b / (splits * c_tiles).
template <typename T, bool kGated, bool kWithGrad>
__global__ void __launch_bounds__(kThreads)
    channel_attention_reduce_kernel(ChannelAttentionShape s, const T* x, Strides4 xs, const T* du, Strides4 dus,
                     typename AccType<T>::type* partial, int64_t splits, int64_t chunk, bool channels_inner) {
  using acc_t = typename AccType<T>::type;
  const ReduceTile tile(channels_inner);
  const int64_t c_tiles = ceil_div(s.c, tile.tile_c);
  const int64_t split = blockIdx.x % splits;
  const int64_t n = blockIdx.x / splits / c_tiles;
  const int64_t c = (blockIdx.x / splits) % c_tiles * tile.tile_c + tile.c_local;
  const int64_t hw = s.h * s.w;
  const int64_t end = min64(hw, (split + 1) * chunk);
  acc_t acc = acc_t(0);
  if (c < s.c) {
    for (int64_t p = split * chunk + tile.lane; p < end; p += tile.lanes) {
      const Index4 i{n, c, p / s.w, p % s.w};
      acc_t v = gate_value<T, kGated>(x, xs, s.c, i);
      if constexpr (kWithGrad) v *= to_acc(du[offset(dus, i.n, i.c, i.h, i.w)]);
      acc += v;
    }
  }
  const acc_t total = block_channel_sum(acc, tile);
  const int64_t c_out = (blockIdx.x / splits) % c_tiles * tile.tile_c + threadIdx.x;
  if (static_cast<int>(threadIdx.x) < tile.tile_c && c_out < s.c) partial[(split * s.n + n) * s.c + c_out] = total;
}

template <typename T, bool kGated>
__global__ void __launch_bounds__(kThreads)
    channel_attention_apply_kernel(ChannelAttentionShape s, const T* x, Strides4 xs, const typename AccType<T>::type* scale, T* u,
                    Strides4 us, bool channels_inner) {
  const int64_t total = s.n * s.c * s.h * s.w;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const Index4 i = unflatten(e, s.c, s.h, s.w, channels_inner);
    const auto t = gate_value<T, kGated>(x, xs, s.c, i);
    store_as(u + offset(us, i.n, i.c, i.h, i.w), t * scale[i.n * s.c + i.c]);
  }
}

template <typename T, bool kGated>
__global__ void __launch_bounds__(kThreads)
    channel_attention_backward_input_kernel(ChannelAttentionShape s, const T* du, Strides4 dus, const T* x, Strides4 xs,
                             const typename AccType<T>::type* scale, const typename AccType<T>::type* q, T* dx,
                             Strides4 dxs, bool channels_inner) {
  const int64_t total = s.n * s.c * s.h * s.w;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const Index4 i = unflatten(e, s.c, s.h, s.w, channels_inner);
    const int64_t nc = i.n * s.c + i.c;
    const auto dt = to_acc(du[offset(dus, i.n, i.c, i.h, i.w)]) * scale[nc] + q[nc];
    if constexpr (kGated) {
      const int64_t off_a = offset(xs, i.n, i.c, i.h, i.w), off_b = offset(xs, i.n, i.c + s.c, i.h, i.w);
      const auto a = to_acc(x[off_a]), b = to_acc(x[off_b]);
      store_as(dx + offset(dxs, i.n, i.c, i.h, i.w), dt * b);
      store_as(dx + offset(dxs, i.n, i.c + s.c, i.h, i.w), dt * a);
    } else {
      store_as(dx + offset(dxs, i.n, i.c, i.h, i.w), dt);
    }
  }
}

// ------------------------------------------------------------- scaled residual
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scaled_residual_forward_kernel(ScaledResidualShape s, const T* inp, Strides4 is, const typename AccType<T>::type* beta,
                      const T* z, Strides4 zs, T* y, Strides4 ys, bool channels_inner) {
  const int64_t total = s.n * s.c * s.h * s.w;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const Index4 i = unflatten(e, s.c, s.h, s.w, channels_inner);
    const auto v = to_acc(inp[offset(is, i.n, i.c, i.h, i.w)]) + beta[i.c] * to_acc(z[offset(zs, i.n, i.c, i.h, i.w)]);
    store_as(y + offset(ys, i.n, i.c, i.h, i.w), v);
  }
}

// Block b: split b % splits of the n*h*w pixels, channel tile b / splits.
// partial == nullptr: dz only; dz == nullptr: the reduction only.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scaled_residual_backward_kernel(ScaledResidualShape s, const T* g, Strides4 gs, const typename AccType<T>::type* beta,
                       const T* z, Strides4 zs, T* dz, Strides4 dzs, typename AccType<T>::type* partial,
                       int64_t splits, int64_t chunk, bool channels_inner) {
  using acc_t = typename AccType<T>::type;
  const ReduceTile tile(channels_inner);
  const int64_t split = blockIdx.x % splits;
  const int64_t c0 = blockIdx.x / splits * tile.tile_c;
  const int64_t c = c0 + tile.c_local;
  const int64_t hw = s.h * s.w;
  const int64_t end = min64(s.n * hw, (split + 1) * chunk);
  acc_t acc = acc_t(0);
  if (c < s.c) {
    const acc_t b = beta[c];
    for (int64_t m = split * chunk + tile.lane; m < end; m += tile.lanes) {
      int64_t n, p, h, w;  // divmod: 32-bit division when it fits (the 64-bit one's call made ptxas spill)
      divmod(m, hw, n, p);
      divmod(p, s.w, h, w);
      const acc_t gv = to_acc(g[offset(gs, n, c, h, w)]);
      if (dz != nullptr) store_as(dz + offset(dzs, n, c, h, w), b * gv);
      if (partial != nullptr) acc += gv * to_acc(z[offset(zs, n, c, h, w)]);
    }
  }
  if (partial == nullptr) return;  // uniform across the block: no barrier is skipped by some threads only
  const acc_t total = block_channel_sum(acc, tile);
  if (static_cast<int>(threadIdx.x) < tile.tile_c && c0 + threadIdx.x < s.c) {
    partial[split * s.c + c0 + threadIdx.x] = total;
  }
}

// ------------------------------------------------------------------ launchers
bool valid(int64_t n, int64_t c, int64_t h, int64_t w) { return n >= 0 && c >= 1 && h >= 1 && w >= 1; }

// The flat iteration order follows the output: channels innermost for channels_last.
bool is_channels_inner(Strides4 out, int64_t c) { return c > 1 && out.c == 1; }

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(max64(1, min64(ceil_div(total, kThreads), kMaxGridBlocks)));
}

int tile_channels(bool inner) { return inner ? 32 : 8; }

// Pixel splits of a reduction over `pixels` with `tiles` blocks per split:
// enough blocks to fill the device about four times, at most kMaxSplits.
cudaError_t choose_splits(int64_t pixels, int64_t tiles, int64_t lanes, int64_t* splits, int64_t* chunk) {
  int sms = 1;
  const cudaError_t err = current_sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t want = ceil_div(4 * int64_t(sms), max64(tiles, 1));
  const int64_t most = max64(1, ceil_div(pixels, lanes));
  *splits = max64(1, min64(min64(want, kMaxSplits), most));
  *chunk = max64(1, ceil_div(pixels, *splits));
  *splits = max64(1, ceil_div(pixels, *chunk));
  return cudaSuccess;
}

// The geometry of a per-channel reduction over `pixels` pixels, done
// separately for each of `samples` samples (the attention: samples = n, pixels
// = h * w; the residual: one "sample" of n * h * w pixels). The layout decides
// the tile; the partial sums fill splits x samples x channels accumulators.
struct ReduceGeometry {
  bool inner;
  int64_t c_tiles, splits, chunk;
};

cudaError_t reduce_geometry(int64_t channels, int64_t pixels, int64_t samples, bool inner, ReduceGeometry* g) {
  g->inner = inner;
  const int tile_c = tile_channels(inner);
  g->c_tiles = ceil_div(channels, tile_c);
  return choose_splits(pixels, samples * g->c_tiles, kThreads / tile_c, &g->splits, &g->chunk);
}

// The workspace of such a reduction under either layout's geometry (the
// caller need not say which layout it will pass), rounded up to 256 bytes.
cudaError_t reduce_workspace_size(DType dtype, int64_t channels, int64_t pixels, int64_t samples, size_t* bytes) {
  size_t most = 0;
  for (bool inner : {false, true}) {
    ReduceGeometry g{};
    const cudaError_t err = reduce_geometry(channels, pixels, samples, inner, &g);
    if (err != cudaSuccess) return err;
    const size_t need = size_t(g.splits * samples * channels) * acc_bytes(dtype);
    most = most > need ? most : need;
  }
  *bytes = align256(most);
  return cudaSuccess;
}

// Channel attention: a per-sample reduction over h * w pixels.
cudaError_t ca_reduce_geometry(const ChannelAttentionShape& s, bool inner, ReduceGeometry* g) {
  return reduce_geometry(s.c, s.h * s.w, s.n, inner, g);
}

// Scaled residual: one reduction over all n * h * w pixels.
cudaError_t sr_geometry(const ScaledResidualShape& s, bool inner, ReduceGeometry* g) {
  return reduce_geometry(s.c, s.n * s.h * s.w, 1, inner, g);
}

// Adds the splits' rows of partial sums in order (sum_partial_rows, common.cuh).
template <typename acc_t>
cudaError_t sum_splits(const acc_t* partial, int64_t splits, int64_t count, void* out, cudaStream_t stream) {
  return sum_partial_rows<acc_t>(partial, splits, count, static_cast<acc_t*>(out), elementwise_blocks(count), stream);
}

}  // namespace

cudaError_t channel_attention_reduce_workspace_size(DType dtype, const ChannelAttentionShape& s, size_t* bytes) {
  if (!valid(s.n, s.c, s.h, s.w) || bytes == nullptr) return cudaErrorInvalidValue;
  return reduce_workspace_size(dtype, s.c, s.h * s.w, s.n, bytes);
}

cudaError_t channel_attention_reduce(DType dtype, const ChannelAttentionShape& s, const void* x, Strides4 xs,
                                     const void* grad_u, Strides4 dus, void* sums, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(s.n, s.c, s.h, s.w)) return cudaErrorInvalidValue;
  if (s.n == 0) return cudaSuccess;  // nothing to sum, nothing to write (empty tensors may be nullptr)
  if (x == nullptr || sums == nullptr) return cudaErrorInvalidValue;
  ReduceGeometry g{};
  cudaError_t err = ca_reduce_geometry(s, is_channels_inner(xs, s.gated ? 2 * s.c : s.c), &g);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using acc_t = typename AccType<T>::type;
    if (workspace == nullptr || workspace_bytes < size_t(g.splits * s.n * s.c) * sizeof(acc_t)) {
      return cudaErrorInvalidValue;
    }
    auto* partial = static_cast<acc_t*>(workspace);
    const int64_t blocks = g.splits * g.c_tiles * s.n;
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    const auto* xt = static_cast<const T*>(x);
    const auto* dut = static_cast<const T*>(grad_u);
    const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
    cudaError_t e;
    if (s.gated && grad_u != nullptr) {
      e = launch(channel_attention_reduce_kernel<T, true, true>, grid, block, stream, s, xt, xs, dut, dus, partial, g.splits, g.chunk, g.inner);
    } else if (s.gated) {
      e = launch(channel_attention_reduce_kernel<T, true, false>, grid, block, stream, s, xt, xs, dut, dus, partial, g.splits, g.chunk, g.inner);
    } else if (grad_u != nullptr) {
      e = launch(channel_attention_reduce_kernel<T, false, true>, grid, block, stream, s, xt, xs, dut, dus, partial, g.splits, g.chunk, g.inner);
    } else {
      e = launch(channel_attention_reduce_kernel<T, false, false>, grid, block, stream, s, xt, xs, dut, dus, partial, g.splits, g.chunk, g.inner);
    }
    if (e != cudaSuccess) return e;
    return sum_splits<acc_t>(partial, g.splits, s.n * s.c, sums, stream);
  });
}

cudaError_t channel_attention_apply(DType dtype, const ChannelAttentionShape& s, const void* x, Strides4 xs,
                                    const void* scale, void* u, Strides4 us, cudaStream_t stream) {
  if (!valid(s.n, s.c, s.h, s.w)) return cudaErrorInvalidValue;
  const int64_t total = s.n * s.c * s.h * s.w;
  if (total == 0) return cudaSuccess;
  if (x == nullptr || scale == nullptr || u == nullptr) return cudaErrorInvalidValue;
  const bool inner = is_channels_inner(us, s.c);
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using acc_t = typename AccType<T>::type;
    const dim3 grid(elementwise_blocks(total)), block(kThreads);
    const auto* xt = static_cast<const T*>(x);
    const auto* sc = static_cast<const acc_t*>(scale);
    auto* ut = static_cast<T*>(u);
    return s.gated ? launch(channel_attention_apply_kernel<T, true>, grid, block, stream, s, xt, xs, sc, ut, us, inner)
                   : launch(channel_attention_apply_kernel<T, false>, grid, block, stream, s, xt, xs, sc, ut, us, inner);
  });
}

cudaError_t channel_attention_backward_input(DType dtype, const ChannelAttentionShape& s, const void* grad_u,
                                             Strides4 dus, const void* x, Strides4 xs, const void* scale,
                                             const void* q, void* grad_x, Strides4 dxs, cudaStream_t stream) {
  if (!valid(s.n, s.c, s.h, s.w)) return cudaErrorInvalidValue;
  const int64_t total = s.n * s.c * s.h * s.w;
  if (total == 0) return cudaSuccess;
  if (grad_u == nullptr || x == nullptr || scale == nullptr || q == nullptr || grad_x == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool inner = is_channels_inner(dxs, s.gated ? 2 * s.c : s.c);
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using acc_t = typename AccType<T>::type;
    const dim3 grid(elementwise_blocks(total)), block(kThreads);
    const auto* dut = static_cast<const T*>(grad_u);
    const auto* xt = static_cast<const T*>(x);
    const auto* sc = static_cast<const acc_t*>(scale);
    const auto* qt = static_cast<const acc_t*>(q);
    auto* dxt = static_cast<T*>(grad_x);
    return s.gated
               ? launch(channel_attention_backward_input_kernel<T, true>, grid, block, stream, s, dut, dus, xt, xs, sc, qt, dxt, dxs, inner)
               : launch(channel_attention_backward_input_kernel<T, false>, grid, block, stream, s, dut, dus, xt, xs, sc, qt, dxt, dxs, inner);
  });
}

cudaError_t scaled_residual_forward(DType dtype, const ScaledResidualShape& s, const void* inp, Strides4 is,
                                    const void* beta, const void* z, Strides4 zs, void* y, Strides4 ys,
                                    cudaStream_t stream) {
  if (!valid(s.n, s.c, s.h, s.w)) return cudaErrorInvalidValue;
  const int64_t total = s.n * s.c * s.h * s.w;
  if (total == 0) return cudaSuccess;
  if (inp == nullptr || beta == nullptr || z == nullptr || y == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using acc_t = typename AccType<T>::type;
    return launch(scaled_residual_forward_kernel<T>, dim3(elementwise_blocks(total)), dim3(kThreads), stream, s,
                  static_cast<const T*>(inp), is, static_cast<const acc_t*>(beta), static_cast<const T*>(z), zs,
                  static_cast<T*>(y), ys, is_channels_inner(ys, s.c));
  });
}

cudaError_t scaled_residual_backward_workspace_size(DType dtype, const ScaledResidualShape& s, size_t* bytes) {
  if (!valid(s.n, s.c, s.h, s.w) || bytes == nullptr) return cudaErrorInvalidValue;
  return reduce_workspace_size(dtype, s.c, s.n * s.h * s.w, 1, bytes);
}

cudaError_t scaled_residual_backward(DType dtype, const ScaledResidualShape& s, const void* grad_y, Strides4 gs,
                                     const void* beta, const void* z, Strides4 zs, void* grad_z, Strides4 dzs,
                                     void* grad_beta, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(s.n, s.c, s.h, s.w) || beta == nullptr) return cudaErrorInvalidValue;
  if (grad_z == nullptr && grad_beta == nullptr) return cudaSuccess;
  if (s.n > 0 && (grad_y == nullptr || z == nullptr)) return cudaErrorInvalidValue;  // empty ones may be nullptr
  ReduceGeometry g{};
  cudaError_t err = sr_geometry(s, is_channels_inner(gs, s.c), &g);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using acc_t = typename AccType<T>::type;
    acc_t* partial = nullptr;
    if (grad_beta != nullptr) {
      if (workspace == nullptr || workspace_bytes < size_t(g.splits * s.c) * sizeof(acc_t)) return cudaErrorInvalidValue;
      partial = static_cast<acc_t*>(workspace);
    }
    const int64_t blocks = g.splits * g.c_tiles;
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    if (s.n > 0) {
      const cudaError_t e = launch(scaled_residual_backward_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), stream,
                                   s, static_cast<const T*>(grad_y), gs, static_cast<const acc_t*>(beta),
                                   static_cast<const T*>(z), zs, static_cast<T*>(grad_z), dzs, partial, g.splits,
                                   g.chunk, g.inner);
      if (e != cudaSuccess) return e;
    }
    if (grad_beta == nullptr) return cudaSuccess;
    // An empty batch sums zero rows: grad_beta = 0.
    return sum_splits<acc_t>(partial, s.n > 0 ? g.splits : int64_t(0), s.c, grad_beta, stream);
  });
}

}  // namespace restorenet
