// Helpers shared by the per-op bindings in this folder: dtype and layout
// mapping, argument checks that raise ValueError/TypeError naming the argument,
// and CUDA error reporting. Host compiler only; the kernels never see torch.
#pragma once

#include <torch/extension.h>

// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h: the same
// current-stream API without pulling in the cuBLAS/cuSPARSE/cuSOLVER headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "api.h"

namespace restorenet::binding {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

inline restorenet::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return restorenet::DType::kFloat32;
    case at::kHalf: return restorenet::DType::kFloat16;
    case at::kBFloat16: return restorenet::DType::kBFloat16;
    case at::kDouble: return restorenet::DType::kFloat64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "x must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  return restorenet::DType::kFloat32;  // unreachable
}

inline restorenet::Strides4 strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Outputs follow the input's layout, as F.conv2d does (and as
// restorenet.ops.hyper_conv2d.output_memory_format says).
inline at::MemoryFormat layout_of(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

inline void check_is_cuda(const Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
}

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "restorenet._C.", what, " failed: ", cudaGetErrorString(err));
}

// A 4-d CUDA activation the kernels can index: contiguous or channels_last are
// used in place (the kernels take strides), anything else is copied.
inline Tensor activation(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == x.device(), name, " must be on ", x.device(), ", got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-d [N, C, H, W], got ", t.dim(), "-d");
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

// A weight or bias: on x's device, x's dtype, `dim`-d, made contiguous.
inline Tensor parameter(const Tensor& t, const Tensor& x, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == x.device(), name, " must be on ", x.device(), ", got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-d, got ", t.dim(), "-d");
  return t.contiguous();
}

inline const void* data_or_null(const OptionalTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace restorenet::binding
