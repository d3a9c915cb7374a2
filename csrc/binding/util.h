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
#include <vector>

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
inline void* data_or_null(OptionalTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// The strides of an optional tensor; zeros for an absent one (never indexed).
inline restorenet::Strides4 strides_or_zero(const OptionalTensor& t) {
  return t.has_value() ? strides_of(*t) : restorenet::Strides4{0, 0, 0, 0};
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The kernels' accumulation dtype for activations like x, also that of their
// per-channel parameters, statistics and parameter gradients: float64 for
// float64 x, float32 otherwise.
inline at::ScalarType acc_scalar_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// An op's first activation, which the others are checked against: a 4-d CUDA
// tensor of a supported dtype, used in place when contiguous or channels_last.
inline Tensor primary_activation(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-d [N, C, H, W], got ", t.dim(), "-d");
  dtype_of(t);
  return activation(t, t, name);
}

// activation() of exactly the shape `sizes`.
inline Tensor activation_of_shape(const Tensor& t, const Tensor& x, at::IntArrayRef sizes, const char* name) {
  Tensor a = activation(t, x, name);
  TORCH_CHECK_VALUE(a.sizes() == sizes, name, " must have the shape ", sizes, ", got ", a.sizes());
  return a;
}

// A floating-point vector of shape `sizes` on x's device (per channel [C] or
// per sample and channel [N, C]), converted to acc_scalar_type(x), contiguous.
inline Tensor acc_parameter(const Tensor& t, const Tensor& x, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
  return t.to(acc_scalar_type(x)).contiguous();
}

// An uninitialised output of `sizes` with x's dtype and device, in x's layout.
inline Tensor new_output(at::IntArrayRef sizes, const Tensor& x) {
  return at::empty(sizes, x.options().memory_format(layout_of(x)));
}

// A kernel workspace of `bytes` bytes on x's device (from the caching
// allocator, so 256-byte aligned).
inline Tensor new_workspace(size_t bytes, const Tensor& x) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

// ---------------------------------------------------------------- convolutions
// A backward's `needs` flags: one per differentiable input.
inline void check_needs(const std::vector<bool>& needs, size_t inputs) {
  TORCH_CHECK_VALUE(needs.size() == inputs, "needs must have ", inputs, " entries, got ", needs.size());
}

// Fills the sizes of a convolution of x [N, C_in, H, W] with weight
// [c_out, *, kh, kw] (HyperConv2dShape, SlimConv2dShape: the same fields).
template <typename ConvShape>
void fill_conv_shape(ConvShape& s, const Tensor& x, const Tensor& weight, int64_t c_out, int64_t stride,
                     int64_t padding) {
  TORCH_CHECK_VALUE(stride >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding >= 0, "padding must be >= 0, got ", padding);
  s.n = x.size(0);
  s.c_in = x.size(1);
  s.h = x.size(2);
  s.w = x.size(3);
  s.c_out = c_out;
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  TORCH_CHECK_VALUE(s.h + 2 * padding >= s.kh && s.w + 2 * padding >= s.kw, "x is too small for the kernel");
  s.h_out = (s.h + 2 * padding - s.kh) / stride + 1;
  s.w_out = (s.w + 2 * padding - s.kw) / stride + 1;
  s.stride = stride;
  s.padding = padding;
}

// The output gradient of a convolution of shape s, as an activation like x.
template <typename ConvShape>
Tensor conv_grad_out(const Tensor& grad_out_in, const Tensor& x, const ConvShape& s) {
  const Tensor grad_out = activation(grad_out_in, x, "grad_out");
  const std::vector<int64_t> out_sizes{s.n, s.c_out, s.h_out, s.w_out};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_sizes), "grad_out must have the output's shape [", s.n,
                    ", ", s.c_out, ", ", s.h_out, ", ", s.w_out, "], got ", grad_out.sizes());
  return grad_out;
}

}  // namespace restorenet::binding
