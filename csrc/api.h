// Types shared by the C APIs of restorenet's kernels and by the torch binding.
// Plain C++ (no CUDA keywords): compiled by nvcc and by the host compiler.
#pragma once

#include <cstdint>

namespace restorenet {

// Element type of an op's activations and weights. Scalar op parameters such
// as hyper_conv2d's `level` are float32, or float64 when this is kFloat64.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Strides of a 4-d tensor indexed [n][c][h][w], in elements (not bytes):
// contiguous NCHW and channels_last (NHWC in memory) are both just strides.
struct Strides4 {
  int64_t n, c, h, w;
};

}  // namespace restorenet
