// slim_conv2d CUDA kernels: a convolution that runs every sample at its own
// channel widths (slimmable networks, DDS-Net). C API and math: slim_conv2d.h.
//
// The convolution engine is the implicit-GEMM core shared with hyper_conv2d
// (conv_core.cuh). This file is the op's policy -- the weight read in place,
// W[:out_width[n], :in_width[n]], and the per-sample bounds that cut each
// pass's GEMM rows and reduction to the sample's active channels --
// and the launchers behind the C API:
//
//   pass            rows bound        reduction bound   outside the bounds
//   forward         out_width[n]      in_width[n]       y rows written as 0
//   backward-input  in_width[n]       out_width[n]      dx rows written as 0
//   backward-params out_width[n]      in_width[n]       dy / x not read (G = 0)
//
// The parameter epilogue keeps one plain partial sum, sum_n G_n, per block
// (reduced over splits in a fixed order afterwards: deterministic).
#include "slim_conv2d.h"

#include "conv_core.cuh"

namespace restorenet {
namespace {

using namespace conv_core;

template <typename T>
struct SlimPolicy {
  using scalar_t = T;
  using acc_t = typename AccType<T>::type;

  struct Params {
    const int32_t* in_width;   // [n]
    const int32_t* out_width;  // [n]
    const scalar_t* weight;    // [c_out][c_in][kh][kw], the widest layer's weight
    const scalar_t* bias;      // forward only; nullptr = zero
    acc_t* ws_plain;           // params: [splits][c_out][cols] sums of G
  };

  struct Sample {
    int k_in, k_out;  // the widths, clamped to the tensors' channel counts
  };

  __device__ __forceinline__ static int clamp_width(int32_t v, int max_width) {
    return v < 0 ? 0 : (v > max_width ? max_width : int(v));
  }
  __device__ __forceinline__ static Sample sample(const Params& p, const Geometry& g, int64_t n) {
    return Sample{clamp_width(p.in_width[n], g.c_in), clamp_width(p.out_width[n], g.c_out)};
  }
  __device__ __forceinline__ static Bounds conv_bounds(const Sample& s, const Geometry&, bool backward_input) {
    return backward_input ? Bounds{s.k_in, s.k_out} : Bounds{s.k_out, s.k_in};
  }
  __device__ __forceinline__ static Bounds param_bounds(const Sample& s, const Geometry&) {
    return Bounds{s.k_out, s.k_in};
  }
  // Called inside the bounds only: the slice is the full weight's prefix, read in place.
  using WeightRaw = scalar_t;
  __device__ __forceinline__ static WeightRaw load_weight(const Params& p, int64_t wi) { return p.weight[wi]; }
  __device__ __forceinline__ static acc_t form_weight(const Sample&, const WeightRaw& raw) { return to_acc(raw); }
  __device__ __forceinline__ static acc_t bias(const Params& p, const Sample&, int row) {
    return p.bias != nullptr ? to_acc(p.bias[row]) : acc_t(0);
  }

  // sum_plain += G. G is already zero outside the sample's bounds (the core
  // reads no dy past out_width and no x past in_width), so this is the sum
  // restricted to each sample's active ranges.
  struct ParamEpilogue {
    acc_t sum_plain[kMicro][kMicro];

    __device__ ParamEpilogue(const Params&, const Geometry&, const ReductionOrder&, bool, int, int, int, int) {
      zero_micro(sum_plain);
    }
    __device__ __forceinline__ void fold(const Params&, const Sample&, const acc_t (&grad)[kMicro][kMicro], int64_t,
                                         int64_t, int64_t, acc_t*, int) {
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) sum_plain[i][j] += grad[i][j];
    }
    __device__ __forceinline__ void store(const Params& p, int64_t offset, int i, int j) const {
      p.ws_plain[offset] = sum_plain[i][j];
    }
  };
};

// ================================================================== host side
template <typename scalar_t, bool kBackwardInput>
cudaError_t launch_slim_conv(const SlimConv2dShape& shape, const void* src, Strides4 src_st, const void* weight,
                             const void* bias, const int32_t* in_width, const int32_t* out_width, void* dst,
                             Strides4 dst_st, cudaStream_t stream) {
  using Policy = SlimPolicy<scalar_t>;
  ConvGemmArgs<Policy> a{};
  a.src = static_cast<const scalar_t*>(src);
  a.src_st = src_st;
  a.dst = static_cast<scalar_t*>(dst);
  a.dst_st = dst_st;
  a.op.in_width = in_width;
  a.op.out_width = out_width;
  a.op.weight = static_cast<const scalar_t*>(weight);
  a.op.bias = static_cast<const scalar_t*>(bias);
  return launch_conv_gemm<Policy, kBackwardInput>(shape, a, stream);
}

cudaError_t plan_slim_param_grads(DType dtype, const SlimConv2dShape& s, const SlimConv2dParamGrads& grads,
                                  ParamPlan* plan) {
  const bool plain = grads.weight != nullptr || grads.bias != nullptr;
  return plan_param_grads(dtype, s, /*scaled=*/false, plain, /*per_item=*/false, /*bias_column=*/grads.bias != nullptr,
                          plan);
}

template <typename scalar_t>
cudaError_t launch_slim_param_grads(const ParamPlan& p, const SlimConv2dShape& shape, const void* dy,
                                    Strides4 dy_st, const void* x, Strides4 x_st, const int32_t* in_width,
                                    const int32_t* out_width, const SlimConv2dParamGrads& grads, void* workspace,
                                    cudaStream_t stream) {
  using Policy = SlimPolicy<scalar_t>;
  using acc_t = typename Policy::acc_t;
  ParamGradArgs<Policy> a{};
  a.dy = static_cast<const scalar_t*>(dy);
  a.dy_st = dy_st;
  a.x = static_cast<const scalar_t*>(x);
  a.x_st = x_st;
  a.op.in_width = in_width;
  a.op.out_width = out_width;
  a.op.ws_plain = reinterpret_cast<acc_t*>(static_cast<char*>(workspace) + p.off_plain);
  const cudaError_t err = launch_param_grad_kernel(p, shape, a, stream);
  if (err != cudaSuccess) return err;
  return launch_reduce_param_grads<scalar_t>(p, shape, is_channels_last(x_st), nullptr, a.op.ws_plain, nullptr,
                                             grads.weight, nullptr, grads.bias, stream);
}

}  // namespace

// ================================================================== C API
cudaError_t slim_conv2d_forward(DType dtype, const SlimConv2dShape& shape, const void* x, Strides4 x_strides,
                                const void* weight, const void* bias, const int32_t* in_width,
                                const int32_t* out_width, void* y, Strides4 y_strides, cudaStream_t stream) {
  const cudaError_t err = check_conv_shape(shape);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return launch_slim_conv<scalar_t, false>(shape, x, x_strides, weight, bias, in_width, out_width, y, y_strides,
                                             stream);
  });
}

cudaError_t slim_conv2d_backward_input(DType dtype, const SlimConv2dShape& shape, const void* grad_out,
                                       Strides4 grad_out_strides, const void* weight, const int32_t* in_width,
                                       const int32_t* out_width, void* grad_x, Strides4 grad_x_strides,
                                       cudaStream_t stream) {
  const cudaError_t err = check_conv_shape(shape);
  if (err != cudaSuccess) return err;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return launch_slim_conv<scalar_t, true>(shape, grad_out, grad_out_strides, weight, nullptr, in_width, out_width,
                                            grad_x, grad_x_strides, stream);
  });
}

cudaError_t slim_conv2d_backward_params_workspace_size(DType dtype, const SlimConv2dShape& shape,
                                                       const SlimConv2dParamGrads& grads, size_t* bytes) {
  ParamPlan p;
  const cudaError_t err = plan_slim_param_grads(dtype, shape, grads, &p);
  if (err != cudaSuccess) return err;
  *bytes = p.bytes;
  return cudaSuccess;
}

cudaError_t slim_conv2d_backward_params(DType dtype, const SlimConv2dShape& shape, const void* grad_out,
                                        Strides4 grad_out_strides, const void* x, Strides4 x_strides,
                                        const int32_t* in_width, const int32_t* out_width,
                                        const SlimConv2dParamGrads& grads, void* workspace, size_t workspace_bytes,
                                        cudaStream_t stream) {
  ParamPlan p;
  const cudaError_t err = plan_slim_param_grads(dtype, shape, grads, &p);
  if (err != cudaSuccess) return err;
  if (!p.plain) return cudaSuccess;
  if (workspace_bytes < p.bytes || (p.bytes > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return launch_slim_param_grads<scalar_t>(p, shape, grad_out, grad_out_strides, x, x_strides, in_width, out_width,
                                             grads, workspace, stream);
  });
}

}  // namespace restorenet
