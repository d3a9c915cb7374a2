// C API of the channel_attention / scaled_residual CUDA kernels
// (csrc/channel_attention.cu; the op and its math: restorenet/ops/channel_attention.py).
//
//   channel attention   t = SG(x) = x[:, :C] * x[:, C:] when gated, else t = x
//                       u = t * s[n, c]                 (s = W mean_hw(t) + b, formed by the caller)
//   scaled residual     y = inp + beta[c] * z
//
// Torch-free: raw device pointers, sizes and element strides. Activations are
// indexed [n][c][h][w] through Strides4 (contiguous and channels_last both
// work without copies; x has 2C channels when gated). Per-sample vectors
// (sums, scale, q: [n][c]) and per-channel ones (beta, grad_beta: [c]) are
// contiguous in the accumulation type: float32, float64 for DType::kFloat64.
// Every function is asynchronous on `stream` and returns the first CUDA error;
// cudaErrorInvalidValue for sizes the kernels do not support.
//
// Reductions are deterministic: each block writes its partial sums to the
// workspace and a second kernel adds them in a fixed order (no atomics). The
// number of partial sums depends on the device's SM count, so bits are
// reproducible per device type.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "api.h"

namespace restorenet {

struct ChannelAttentionShape {
  int64_t n, c, h, w;  // t: [n, c, h, w]; x: [n, gated ? 2c : c, h, w]
  bool gated;
};

// Bytes of workspace channel_attention_reduce needs for this shape on the current device.
cudaError_t channel_attention_reduce_workspace_size(DType dtype, const ChannelAttentionShape& shape, size_t* bytes);

// sums[n][c] = sum over h, w of t (grad_u == nullptr) or of grad_u * t.
// `workspace` holds channel_attention_reduce_workspace_size bytes, 256-byte aligned.
cudaError_t channel_attention_reduce(DType dtype, const ChannelAttentionShape& shape, const void* x,
                                     Strides4 x_strides, const void* grad_u, Strides4 grad_u_strides, void* sums,
                                     void* workspace, size_t workspace_bytes, cudaStream_t stream);

// u = t * scale[n][c].
cudaError_t channel_attention_apply(DType dtype, const ChannelAttentionShape& shape, const void* x,
                                    Strides4 x_strides, const void* scale, void* u, Strides4 u_strides,
                                    cudaStream_t stream);

// dt = grad_u * scale[n][c] + q[n][c];  grad_x = (dt * x[:, C:], dt * x[:, :C]) when gated, else dt.
cudaError_t channel_attention_backward_input(DType dtype, const ChannelAttentionShape& shape, const void* grad_u,
                                             Strides4 grad_u_strides, const void* x, Strides4 x_strides,
                                             const void* scale, const void* q, void* grad_x,
                                             Strides4 grad_x_strides, cudaStream_t stream);

struct ScaledResidualShape {
  int64_t n, c, h, w;
};

// y = inp + beta[c] * z.
cudaError_t scaled_residual_forward(DType dtype, const ScaledResidualShape& shape, const void* inp,
                                    Strides4 inp_strides, const void* beta, const void* z, Strides4 z_strides,
                                    void* y, Strides4 y_strides, cudaStream_t stream);

// Bytes of workspace scaled_residual_backward needs for this shape on the current device.
cudaError_t scaled_residual_backward_workspace_size(DType dtype, const ScaledResidualShape& shape, size_t* bytes);

// In one pass over (grad_y, z): grad_z = beta[c] * grad_y and grad_beta[c] =
// sum over n, h, w of grad_y * z. Either output may be nullptr (not wanted).
cudaError_t scaled_residual_backward(DType dtype, const ScaledResidualShape& shape, const void* grad_y,
                                     Strides4 grad_y_strides, const void* beta, const void* z, Strides4 z_strides,
                                     void* grad_z, Strides4 grad_z_strides, void* grad_beta, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream);

}  // namespace restorenet
