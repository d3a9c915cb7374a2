// hyper_conv2d CUDA kernels: a convolution whose kernel is generated per
// sample, K_n = c_n * W + B (HyperRes). C API and math: hyper_conv2d.h.
//
// The convolution engine (tiling, tensor cores, reductions) is the implicit-GEMM
// core shared with slim_conv2d (conv_core.cuh). This file is the op's policy --
// the generated kernel tile c_n * W + B, formed in the accumulator type while it
// is loaded into shared memory; the generated bias; the parameter-gradient
// epilogue (partials scaled by c_n and plain, and the level gradient <G_n, W_ext>)
// -- and the launchers behind the C API. No per-sample kernel or per-sample
// gradient ever reaches global memory. Every sample uses every channel, so the
// policy's bounds are the full sizes.
#include "hyper_conv2d.h"

#include "conv_core.cuh"

namespace restorenet {
namespace {

using namespace conv_core;

template <typename T>
struct HyperPolicy {
  using scalar_t = T;
  using acc_t = typename AccType<T>::type;

  struct Params {
    const acc_t* level;        // [n]
    const scalar_t* weight;    // W, [c_out][c_in][kh][kw]
    const scalar_t* weight_base;  // B (conv passes only)
    const scalar_t* bias;      // forward: c_n * bias; params: read for the level gradient; nullptr = zero
    const scalar_t* bias_base; // forward only; nullptr = zero
    acc_t* ws_scaled;          // params: [splits][c_out][cols] sums of c_n G, or nullptr
    acc_t* ws_plain;           // params: [splits][c_out][cols] sums of G, or nullptr
    acc_t* ws_level;           // params: [items][tiles] partial <G, W_ext>, or nullptr
  };

  struct Sample {
    acc_t c;  // the level c_n
  };

  __device__ __forceinline__ static Sample sample(const Params& p, const Geometry&, int64_t n) {
    return Sample{p.level[n]};
  }
  __device__ __forceinline__ static Bounds conv_bounds(const Sample&, const Geometry& g, bool backward_input) {
    return backward_input ? Bounds{g.c_in, g.c_out} : Bounds{g.c_out, g.c_in};
  }
  __device__ __forceinline__ static Bounds param_bounds(const Sample&, const Geometry& g) {
    return Bounds{g.c_out, g.c_in};
  }
  // K_n at W index wi, formed in acc_t from W and B: the reads are issued a
  // pipeline stage before the FMA (conv_core's register-staged kernel tile).
  struct WeightRaw {
    scalar_t w, b;
  };
  __device__ __forceinline__ static WeightRaw load_weight(const Params& p, int64_t wi) {
    return WeightRaw{p.weight[wi], p.weight_base[wi]};
  }
  __device__ __forceinline__ static acc_t form_weight(const Sample& s, const WeightRaw& raw) {
    return s.c * to_acc(raw.w) + to_acc(raw.b);
  }
  __device__ __forceinline__ static acc_t bias(const Params& p, const Sample& s, int row) {
    acc_t b = acc_t(0);
    if (p.bias != nullptr) b += s.c * to_acc(p.bias[row]);
    if (p.bias_base != nullptr) b += to_acc(p.bias_base[row]);
    return b;
  }

  // Folds each item's G into sum_scaled += c_n G and sum_plain += G, and
  // writes the item's share of the level gradient, <G, W_ext> over the tile
  // (W_ext[co, R] = bias[co] on the ones column), to ws_level[item][tile].
  // Everything is linear in G, so chunk partials can be summed in any grouping.
  struct ParamEpilogue {
    acc_t sum_scaled[kMicro][kMicro], sum_plain[kMicro][kMicro];
    acc_t w_ext[kMicro][kMicro];  // W_ext at this thread's outputs (level gradient only)

    __device__ ParamEpilogue(const Params& p, const Geometry& g, const ReductionOrder& order, bool bias_column,
                             int co0, int col0, int tx, int ty) {
      zero_micro(sum_scaled);
      zero_micro(sum_plain);
      const int reduction = order.size();
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          const int co = co0 + ty + kSide * i, col = col0 + tx + kSide * j;
          acc_t v = acc_t(0);
          if (p.ws_level != nullptr && co < g.c_out) {
            if (col < reduction) {
              int ci, tap;
              order.decode(col, ci, tap);
              v = to_acc(p.weight[weight_index(g, co, ci, tap)]);
            } else if (col == reduction && bias_column && p.bias != nullptr) {
              v = to_acc(p.bias[co]);
            }
          }
          w_ext[i][j] = v;
        }
    }

    // Block-collective when ws_level is set (uniform over the block).
    __device__ __forceinline__ void fold(const Params& p, const Sample& s, const acc_t (&grad)[kMicro][kMicro],
                                         int64_t item, int64_t tiles, int64_t tile, acc_t* partial, int tid) {
      acc_t dot = acc_t(0);
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          sum_scaled[i][j] += s.c * grad[i][j];
          sum_plain[i][j] += grad[i][j];
          dot += grad[i][j] * w_ext[i][j];
        }
      if (p.ws_level != nullptr) {
        block_tree_sum<kThreads>(partial, tid, dot);  // the block's 256 partial dot products
        if (tid == 0) p.ws_level[item * tiles + tile] = partial[0];
        // partial[0] is rewritten only by thread 0, and not before the next
        // item's first __syncthreads, so no barrier is needed here.
      }
    }

    __device__ __forceinline__ void store(const Params& p, int64_t offset, int i, int j) const {
      if (p.ws_scaled != nullptr) p.ws_scaled[offset] = sum_scaled[i][j];
      if (p.ws_plain != nullptr) p.ws_plain[offset] = sum_plain[i][j];
    }
  };
};

// ================================================================== host side
template <typename scalar_t, bool kBackwardInput>
cudaError_t launch_hyper_conv(const HyperConv2dShape& shape, const void* src, Strides4 src_st, const void* level,
                              const void* weight, const void* weight_base, const void* bias, const void* bias_base,
                              void* dst, Strides4 dst_st, cudaStream_t stream) {
  using Policy = HyperPolicy<scalar_t>;
  using acc_t = typename Policy::acc_t;
  ConvGemmArgs<Policy> a{};
  a.src = static_cast<const scalar_t*>(src);
  a.src_st = src_st;
  a.dst = static_cast<scalar_t*>(dst);
  a.dst_st = dst_st;
  a.op.level = static_cast<const acc_t*>(level);
  a.op.weight = static_cast<const scalar_t*>(weight);
  a.op.weight_base = static_cast<const scalar_t*>(weight_base);
  a.op.bias = static_cast<const scalar_t*>(bias);
  a.op.bias_base = static_cast<const scalar_t*>(bias_base);
  return launch_conv_gemm<Policy, kBackwardInput>(shape, a, stream);
}

cudaError_t plan_hyper_param_grads(DType dtype, const HyperConv2dShape& s, const HyperConv2dParamGrads& grads,
                                   const void* bias, ParamPlan* plan) {
  const bool scaled = grads.weight != nullptr || grads.bias != nullptr;
  const bool plain = grads.weight_base != nullptr || grads.bias_base != nullptr;
  const bool level = grads.level != nullptr;
  const bool bias_column = grads.bias != nullptr || grads.bias_base != nullptr || (level && bias != nullptr);
  return plan_param_grads(dtype, s, scaled, plain, level, bias_column, plan);
}

template <typename scalar_t>
cudaError_t launch_hyper_param_grads(const ParamPlan& p, const HyperConv2dShape& shape, const void* dy,
                                     Strides4 dy_st, const void* x, Strides4 x_st, const void* level,
                                     const void* weight, const void* bias, const HyperConv2dParamGrads& grads,
                                     void* workspace, cudaStream_t stream) {
  using Policy = HyperPolicy<scalar_t>;
  using acc_t = typename Policy::acc_t;
  char* ws = static_cast<char*>(workspace);
  ParamGradArgs<Policy> a{};
  a.dy = static_cast<const scalar_t*>(dy);
  a.dy_st = dy_st;
  a.x = static_cast<const scalar_t*>(x);
  a.x_st = x_st;
  a.op.level = static_cast<const acc_t*>(level);
  a.op.weight = static_cast<const scalar_t*>(weight);
  a.op.bias = static_cast<const scalar_t*>(bias);
  a.op.ws_scaled = p.scaled ? reinterpret_cast<acc_t*>(ws + p.off_scaled) : nullptr;
  a.op.ws_plain = p.plain ? reinterpret_cast<acc_t*>(ws + p.off_plain) : nullptr;
  a.op.ws_level = p.per_item ? reinterpret_cast<acc_t*>(ws + p.off_per_item) : nullptr;

  cudaError_t err = launch_param_grad_kernel(p, shape, a, stream);
  if (err != cudaSuccess) return err;
  err = launch_reduce_param_grads<scalar_t>(p, shape, is_channels_last(x_st), a.op.ws_scaled, a.op.ws_plain,
                                            grads.weight, grads.weight_base, grads.bias, grads.bias_base, stream);
  if (err != cudaSuccess) return err;
  if (p.per_item && shape.n > 0) {
    err = launch(reduce_per_sample_kernel<acc_t>, dim3(grid_samples(shape.n)), dim3(kThreads), stream,
                 static_cast<const acc_t*>(a.op.ws_level), p.chunks * p.tiles_m * p.tiles_n, shape.n,
                 static_cast<acc_t*>(grads.level));
  }
  return err;
}

}  // namespace

// ================================================================== C API
cudaError_t hyper_conv2d_forward(DType dtype, const HyperConv2dShape& shape, const void* x, Strides4 x_strides,
                                 const void* level, const void* weight, const void* weight_base, const void* bias,
                                 const void* bias_base, void* y, Strides4 y_strides, cudaStream_t stream) {
  const cudaError_t err = check_conv_shape(shape);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return launch_hyper_conv<scalar_t, false>(shape, x, x_strides, level, weight, weight_base, bias, bias_base, y,
                                              y_strides, stream);
  });
}

cudaError_t hyper_conv2d_backward_input(DType dtype, const HyperConv2dShape& shape, const void* grad_out,
                                        Strides4 grad_out_strides, const void* level, const void* weight,
                                        const void* weight_base, void* grad_x, Strides4 grad_x_strides,
                                        cudaStream_t stream) {
  const cudaError_t err = check_conv_shape(shape);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return launch_hyper_conv<scalar_t, true>(shape, grad_out, grad_out_strides, level, weight, weight_base, nullptr,
                                             nullptr, grad_x, grad_x_strides, stream);
  });
}

cudaError_t hyper_conv2d_backward_params_workspace_size(DType dtype, const HyperConv2dShape& shape,
                                                        const HyperConv2dParamGrads& grads, const void* bias,
                                                        size_t* bytes) {
  ParamPlan p;
  const cudaError_t err = plan_hyper_param_grads(dtype, shape, grads, bias, &p);
  if (err != cudaSuccess) return err;
  *bytes = p.bytes;
  return cudaSuccess;
}

cudaError_t hyper_conv2d_backward_params(DType dtype, const HyperConv2dShape& shape, const void* grad_out,
                                         Strides4 grad_out_strides, const void* x, Strides4 x_strides,
                                         const void* level, const void* weight, const void* bias,
                                         const HyperConv2dParamGrads& grads, void* workspace,
                                         size_t workspace_bytes, cudaStream_t stream) {
  ParamPlan p;
  const cudaError_t err = plan_hyper_param_grads(dtype, shape, grads, bias, &p);
  if (err != cudaSuccess) return err;
  if (!p.scaled && !p.plain && !p.per_item) return cudaSuccess;
  if (workspace_bytes < p.bytes || (p.bytes > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return launch_hyper_param_grads<scalar_t>(p, shape, grad_out, grad_out_strides, x, x_strides, level, weight,
                                              bias, grads, workspace, stream);
  });
}

}  // namespace restorenet
