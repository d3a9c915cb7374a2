// C API of the NAFBlock element-wise CUDA kernels (csrc/naf_elementwise.cu).
//
//   layer_norm2d   per pixel (n, h, w), over the channels:
//                    mean = mean_C(x),  rstd = 1 / sqrt(mean_C((x - mean)^2) + eps)   (two-pass variance)
//                    y = (x - mean) * rstd * weight[c] + bias[c]
//                  backward, xhat = (x - mean) * rstd, g = dy * weight[c]:
//                    dx = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat))
//                    dweight = sum_{n,h,w} dy * xhat,   dbias = sum_{n,h,w} dy
//   simple_gate    y = x[:, :C/2] * x[:, C/2:];   dx = cat(dy * x[:, C/2:], dy * x[:, :C/2])
//
// Torch-free: raw device pointers, sizes and element strides. Activations are
// indexed [n][c][h][w] through Strides4, each tensor its own: contiguous NCHW
// and channels_last work without copies (any strides do where h and w merge
// into one pixel index: h == 1, w == 1 or stride_h == w * stride_w). The
// shape is that of x. weight, bias, dweight, dbias are contiguous [c] and
// mean, rstd contiguous [n, h, w], all in the compute type: float32 (float64
// for DType::kFloat64). Arithmetic is in the compute type; each output element
// is rounded once to `dtype`. Every function is asynchronous on `stream` and
// returns the first CUDA error; cudaErrorInvalidValue for unsupported
// arguments (layer_norm2d: more channels than one pixel's column fits in
// 32 KiB of shared memory: backward 4096 for float32, 8192 for float16 and
// bfloat16, 2048 for float64; the forward twice as many).
//
// Memory traffic (for achieved GB/s; E = bytes of one element of `dtype`, per
// element of x; per-channel and per-pixel vectors are O(c + n h w) and left out):
//   layer_norm2d_forward    2 E   (read x; write y)                 + 8 bytes per pixel (mean, rstd)
//   layer_norm2d_backward   3 E   (read x, dy; write dx)            + 8 bytes per pixel (mean, rstd read)
//   simple_gate_forward     1.5 E (read x; write y, half of x's size)
//   simple_gate_backward    2.5 E (read x and dy (half); write dx)
// (float64: mean/rstd are 16 bytes per pixel.)
//
// Determinism: dweight/dbias are reduced without atomics: each block adds its
// tiles into its own row of `workspace`, a second kernel adds the rows in a
// fixed order. The split depends on the shape and layout only, never on the
// device: the same call gives bitwise-equal results run to run.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "api.h"

namespace restorenet {

struct NafShape {
  int64_t n, c, h, w;  // x: [n, c, h, w]
};

cudaError_t layer_norm2d_forward(DType dtype, const NafShape& shape, const void* x, Strides4 x_strides,
                                 const void* weight, const void* bias, double eps, void* y, Strides4 y_strides,
                                 void* mean, void* rstd, cudaStream_t stream);

// Bytes of device workspace layer_norm2d_backward needs for `channels` channels.
size_t layer_norm2d_backward_workspace_size(DType dtype, int64_t channels);

// `workspace` must hold layer_norm2d_backward_workspace_size bytes, 16-byte aligned.
cudaError_t layer_norm2d_backward(DType dtype, const NafShape& shape, const void* dy, Strides4 dy_strides,
                                  const void* x, Strides4 x_strides, const void* weight, const void* mean,
                                  const void* rstd, void* dx, Strides4 dx_strides, void* dweight, void* dbias,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream);

// x: [n, c, h, w] with c even; y: [n, c / 2, h, w].
cudaError_t simple_gate_forward(DType dtype, const NafShape& shape, const void* x, Strides4 x_strides, void* y,
                                Strides4 y_strides, cudaStream_t stream);

// dy: [n, c / 2, h, w]; dx like x.
cudaError_t simple_gate_backward(DType dtype, const NafShape& shape, const void* dy, Strides4 dy_strides,
                                 const void* x, Strides4 x_strides, void* dx, Strides4 dx_strides,
                                 cudaStream_t stream);

}  // namespace restorenet
