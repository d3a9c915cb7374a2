// Emulation build of csrc/slim_conv2d.cu for tests/csrc/test_slim_conv2d_emulated.py:
// the kernels compiled as C++20 with RN_CUDA_EMULATION (see cuda_emu.h) into
// a shared library with a flat extern "C" API that ctypes can call on host
// memory (CPU torch tensors). Same conventions as harness.cpp (hyper_conv2d).
#include "slim_conv2d.cu"

#include "harness_args.h"
#include "runtime_stubs.h"

namespace {
using rn_harness::dtype_of;
using rn_harness::strides_of;

// shape: n, c_in, h, w, c_out, kh, kw, h_out, w_out, stride, padding
restorenet::SlimConv2dShape shape_of(const int64_t* s) {
  return rn_harness::conv_shape_of<restorenet::SlimConv2dShape>(s);
}
}  // namespace

extern "C" {
int emu_slim_conv2d_forward(int dtype, const int64_t* shape, const void* x, const int64_t* x_st, const void* weight,
                            const void* bias, const int32_t* in_width, const int32_t* out_width, void* y,
                            const int64_t* y_st) {
  return restorenet::slim_conv2d_forward(dtype_of(dtype), shape_of(shape), x, strides_of(x_st), weight, bias,
                                         in_width, out_width, y, strides_of(y_st), nullptr);
}

int emu_slim_conv2d_backward_input(int dtype, const int64_t* shape, const void* dy, const int64_t* dy_st,
                                   const void* weight, const int32_t* in_width, const int32_t* out_width, void* dx,
                                   const int64_t* dx_st) {
  return restorenet::slim_conv2d_backward_input(dtype_of(dtype), shape_of(shape), dy, strides_of(dy_st), weight,
                                                in_width, out_width, dx, strides_of(dx_st), nullptr);
}

int emu_slim_conv2d_backward_params_workspace_size(int dtype, const int64_t* shape, void* d_weight, void* d_bias,
                                                   int64_t* bytes) {
  size_t b = 0;
  const restorenet::SlimConv2dParamGrads grads{d_weight, d_bias};
  const cudaError_t err =
      restorenet::slim_conv2d_backward_params_workspace_size(dtype_of(dtype), shape_of(shape), grads, &b);
  *bytes = int64_t(b);
  return err;
}

int emu_slim_conv2d_backward_params(int dtype, const int64_t* shape, const void* dy, const int64_t* dy_st,
                                    const void* x, const int64_t* x_st, const int32_t* in_width,
                                    const int32_t* out_width, void* d_weight, void* d_bias, void* workspace,
                                    int64_t workspace_bytes) {
  const restorenet::SlimConv2dParamGrads grads{d_weight, d_bias};
  return restorenet::slim_conv2d_backward_params(dtype_of(dtype), shape_of(shape), dy, strides_of(dy_st), x,
                                                 strides_of(x_st), in_width, out_width, grads, workspace,
                                                 size_t(workspace_bytes), nullptr);
}

// The GEMM work counter of conv_core.cuh (16-row tile slices x reduction steps).
long long emu_gemm_work_take(void) { return restorenet::conv_core::emu_gemm_work.exchange(0); }
// cp.async copies issued since the last call, of `bytes` bytes (0: zero-filling ones).
long long emu_async_copies_take(int bytes) { return rn_emu::async_copies[bytes].exchange(0); }
}
