// C API of the hyper_conv2d CUDA kernels (csrc/hyper_conv2d.cu).
//
//   y[n] = conv2d(x[n], c_n * W + B, c_n * bias + bias_base, stride, padding),  c_n = level[n]
//
// Torch-free: raw device pointers, sizes and element strides. Activations
// (x, y, grad_out, grad_x) are indexed [n][c][h][w] through Strides4, so
// contiguous and channels_last tensors both work without copies. Weights are
// contiguous [c_out][c_in][kh][kw], biases contiguous [c_out]. `level` is [n]
// contiguous float32 (float64 for DType::kFloat64). Every function is
// asynchronous on `stream` and returns the first CUDA error (launch or
// configuration); cudaErrorInvalidValue for sizes the kernels do not support.
//
// Accumulation is float32 (float64 for kFloat64); the per-sample kernel
// c_n * W + B is formed in that precision as it is loaded and never written to
// memory. float16/bfloat16 on sm_80+ multiply on tensor cores, with the formed
// kernel rounded to the 16-bit type (set RESTORENET_CUDA_TENSOR_CORES=0 for
// the fp32 SIMT kernels). Results are deterministic (no atomics) for a given
// device; the split of the parameter-gradient sums depends on its SM count.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "api.h"

namespace restorenet {

struct HyperConv2dShape {
  int64_t n, c_in, h, w;     // x: [n, c_in, h, w]
  int64_t c_out, kh, kw;     // weight: [c_out, c_in, kh, kw]
  int64_t h_out, w_out;      // y: [n, c_out, h_out, w_out] = (h + 2p - kh) / stride + 1, ...
  int64_t stride, padding;   // stride >= 1, padding >= 0
};

// y = hyper_conv2d(x, ...). bias and bias_base may each be nullptr (zero).
cudaError_t hyper_conv2d_forward(DType dtype, const HyperConv2dShape& shape,
                                 const void* x, Strides4 x_strides, const void* level,
                                 const void* weight, const void* weight_base,
                                 const void* bias, const void* bias_base,
                                 void* y, Strides4 y_strides, cudaStream_t stream);

// grad_x = conv_transpose(grad_out, c_n * W + B) per sample.
cudaError_t hyper_conv2d_backward_input(DType dtype, const HyperConv2dShape& shape,
                                        const void* grad_out, Strides4 grad_out_strides,
                                        const void* level, const void* weight,
                                        const void* weight_base,
                                        void* grad_x, Strides4 grad_x_strides, cudaStream_t stream);

// Outputs of hyper_conv2d_backward_params; nullptr = not wanted. With
// G_n = corr(grad_out_n, x_n) and db_n = sum over pixels of grad_out_n:
//   weight      = sum_n c_n G_n        weight_base = sum_n G_n        (dtype, [c_out, c_in, kh, kw])
//   bias        = sum_n c_n db_n       bias_base   = sum_n db_n       (dtype, [c_out])
//   level[n]    = <G_n, W> + <db_n, bias>                             (level's dtype, [n])
struct HyperConv2dParamGrads {
  void* level;
  void* weight;
  void* weight_base;
  void* bias;
  void* bias_base;
};

// Bytes of device workspace that hyper_conv2d_backward_params needs for these
// arguments (same dtype, shape, wanted grads and bias presence) on the current
// device. `bias` is the forward's bias pointer (only whether it is nullptr matters).
cudaError_t hyper_conv2d_backward_params_workspace_size(DType dtype, const HyperConv2dShape& shape,
                                                        const HyperConv2dParamGrads& grads,
                                                        const void* bias, size_t* bytes);

// The parameter and level gradients. `weight` and `bias` (the forward's
// parameters; bias may be nullptr) are only read for grads.level. `workspace`
// must hold hyper_conv2d_backward_params_workspace_size bytes, 256-byte aligned.
cudaError_t hyper_conv2d_backward_params(DType dtype, const HyperConv2dShape& shape,
                                         const void* grad_out, Strides4 grad_out_strides,
                                         const void* x, Strides4 x_strides, const void* level,
                                         const void* weight, const void* bias,
                                         const HyperConv2dParamGrads& grads,
                                         void* workspace, size_t workspace_bytes,
                                         cudaStream_t stream);

}  // namespace restorenet
