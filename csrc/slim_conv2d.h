// C API of the slim_conv2d CUDA kernels (csrc/slim_conv2d.cu).
//
// Each sample n runs at its own channel widths, k = in_width[n], m = out_width[n]:
//
//   y[n, :m]  = conv2d(x[n, :k], weight[:m, :k], bias[:m], stride, padding),   y[n, m:] = 0
//
// Torch-free: raw device pointers, sizes and element strides. Activations
// (x, y, grad_out, grad_x) are indexed [n][c][h][w] through Strides4, so
// contiguous and channels_last tensors both work without copies. The weight is
// the full contiguous [c_out][c_in][kh][kw] tensor (slices are read in place,
// never copied), bias contiguous [c_out]. in_width and out_width are int32
// device arrays [n]; they are never read on the host, and the kernels clamp
// them to 0..c_in / 0..c_out, so a bad width cannot address memory outside
// the tensors (a width of 0 gives zeros). Every function is asynchronous on
// `stream` and returns the first CUDA error (launch or configuration);
// cudaErrorInvalidValue for sizes the kernels do not support.
//
// Work is proportional to the active channels: the reductions stop at the
// sample's width, and tiles (and 16-row slices of tiles) wholly past it run no
// products. Accumulation is float32 (float64 for kFloat64); float16/bfloat16
// on sm_80+ multiply on tensor cores (RESTORENET_CUDA_TENSOR_CORES=0 for the
// fp32 SIMT kernels). Results are deterministic (no atomics) for a given
// device; the split of the parameter-gradient sums depends on its SM count.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "api.h"

namespace restorenet {

struct SlimConv2dShape {
  int64_t n, c_in, h, w;     // x: [n, c_in, h, w] (c_in = the widest input)
  int64_t c_out, kh, kw;     // weight: [c_out, c_in, kh, kw]
  int64_t h_out, w_out;      // y: [n, c_out, h_out, w_out] = (h + 2p - kh) / stride + 1, ...
  int64_t stride, padding;   // stride >= 1, padding >= 0
};

// y = slim_conv2d(x, ...), every element written (zeros past out_width[n]).
// bias may be nullptr (zero).
cudaError_t slim_conv2d_forward(DType dtype, const SlimConv2dShape& shape, const void* x, Strides4 x_strides,
                                const void* weight, const void* bias, const int32_t* in_width,
                                const int32_t* out_width, void* y, Strides4 y_strides, cudaStream_t stream);

// grad_x[n, :k] = conv_transpose(grad_out[n, :m], weight[:m, :k]), grad_x[n, k:] = 0.
// grad_out's channels past out_width[n] are not read.
cudaError_t slim_conv2d_backward_input(DType dtype, const SlimConv2dShape& shape, const void* grad_out,
                                       Strides4 grad_out_strides, const void* weight, const int32_t* in_width,
                                       const int32_t* out_width, void* grad_x, Strides4 grad_x_strides,
                                       cudaStream_t stream);

// Outputs of slim_conv2d_backward_params; nullptr = not wanted. With
// G_n = corr(grad_out[n, :m], x[n, :k]):
//   weight[:m, :k] = sum_n G_n   (zero where no sample is that wide; dtype, [c_out, c_in, kh, kw])
//   bias[:m]       = sum_n sum over pixels of grad_out[n, :m]                (dtype, [c_out])
struct SlimConv2dParamGrads {
  void* weight;
  void* bias;
};

// Bytes of device workspace that slim_conv2d_backward_params needs for these
// arguments (same dtype, shape and wanted grads) on the current device.
cudaError_t slim_conv2d_backward_params_workspace_size(DType dtype, const SlimConv2dShape& shape,
                                                       const SlimConv2dParamGrads& grads, size_t* bytes);

// The parameter gradients. `workspace` must hold
// slim_conv2d_backward_params_workspace_size bytes, 256-byte aligned.
cudaError_t slim_conv2d_backward_params(DType dtype, const SlimConv2dShape& shape, const void* grad_out,
                                        Strides4 grad_out_strides, const void* x, Strides4 x_strides,
                                        const int32_t* in_width, const int32_t* out_width,
                                        const SlimConv2dParamGrads& grads, void* workspace, size_t workspace_bytes,
                                        cudaStream_t stream);

}  // namespace restorenet
