// C API of the rev_coupling CUDA kernels (csrc/reversible.cu): AdaRevD's
// reversible coupling c' = a * c + f, with a per-channel alpha a.
//
//   rev_coupling_forward   out = a[c] * x + f
//   rev_coupling_invert    c = (x - f) / a[c]          (only when f != nullptr; else x is c)
//                          grad_c = a[c] * g
//                          grad_alpha[c] = sum_{n,h,w} g * c   (from the unrounded c)
//
// Torch-free: raw device pointers, sizes and element strides. Activations are
// indexed [n][c][h][w] through Strides4, each tensor its own: contiguous NCHW
// and channels_last work without copies (any strides do, as long as h and w
// merge into one pixel index: h == 1, w == 1 or stride_h == w * stride_w).
// `alpha` and `grad_alpha` are contiguous [c] in the compute type: float32
// (float64 for DType::kFloat64). Arithmetic is in that compute type; each
// output element is rounded once to `dtype`. Every function is asynchronous on
// `stream` and returns the first CUDA error; cudaErrorInvalidValue for
// arguments the kernels do not support.
//
// Memory traffic (for achieved GB/s; E = bytes of one element of `dtype`, per
// element of the [n, c, h, w] tensor; alpha and the partial sums are O(c) and
// are left out):
//   rev_coupling_forward            3 E   (read x, f; write out)
//   rev_coupling_invert, with f     5 E   (read x, f, g; write c, grad_c)
//   rev_coupling_invert, f nullptr  3 E   (read x = c, g; write grad_c): the coupling's backward
//
// Determinism: grad_alpha is reduced without atomics. Each block writes its
// partial sums to its own row of `workspace`, a second kernel adds the rows
// in a fixed order. The split depends on the shape, the layout and whether
// the pointers allow 16-byte vector access, never on the device: the same
// call gives bitwise-equal results run to run.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "api.h"

namespace restorenet {

struct RevCouplingShape {
  int64_t n, c, h, w;  // every activation is [n, c, h, w]
};

cudaError_t rev_coupling_forward(DType dtype, const RevCouplingShape& shape, const void* x, Strides4 x_strides,
                                 const void* f, Strides4 f_strides, const void* alpha, void* out,
                                 Strides4 out_strides, cudaStream_t stream);

// Bytes of device workspace rev_coupling_invert needs for `channels` channels.
size_t rev_coupling_invert_workspace_size(DType dtype, int64_t channels);

// f == nullptr: x already is c (no rebuild, c_out must be nullptr too).
// `workspace` must hold rev_coupling_invert_workspace_size bytes, 16-byte aligned.
cudaError_t rev_coupling_invert(DType dtype, const RevCouplingShape& shape, const void* x, Strides4 x_strides,
                                const void* f, Strides4 f_strides, const void* alpha, const void* g,
                                Strides4 g_strides, void* c_out, Strides4 c_out_strides, void* grad_c,
                                Strides4 grad_c_strides, void* grad_alpha, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream);

}  // namespace restorenet
