// Decoding of the flat extern "C" arguments of the emulation harnesses: ctypes
// passes every shape and stride quadruple as an int64 array and a dtype as its
// restorenet::DType code (the DTYPE_CODE tables of the Python tests).
#pragma once

#include <cstdint>

#include "api.h"

namespace rn_harness {

// [n, c, h, w] element strides.
inline restorenet::Strides4 strides_of(const int64_t* s) { return restorenet::Strides4{s[0], s[1], s[2], s[3]}; }

inline restorenet::DType dtype_of(int d) { return static_cast<restorenet::DType>(d); }

// A convolution's sizes: n, c_in, h, w, c_out, kh, kw, h_out, w_out, stride,
// padding (HyperConv2dShape, SlimConv2dShape: the same fields in this order).
template <typename ConvShape>
ConvShape conv_shape_of(const int64_t* s) {
  return ConvShape{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10]};
}

}  // namespace rn_harness
