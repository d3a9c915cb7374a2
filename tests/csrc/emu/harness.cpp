// Emulation build of csrc/hyper_conv2d.cu for tests/csrc/test_hyper_conv2d_emulated.py:
// the kernels compiled as C++20 with RN_CUDA_EMULATION (see cuda_emu.h) into
// a shared library with a flat extern "C" API that ctypes can call on host
// memory (CPU torch tensors).
#include "hyper_conv2d.cu"

#include "harness_args.h"
#include "runtime_stubs.h"

namespace {
using rn_harness::dtype_of;
using rn_harness::strides_of;

// shape: n, c_in, h, w, c_out, kh, kw, h_out, w_out, stride, padding
restorenet::HyperConv2dShape shape_of(const int64_t* s) {
  return rn_harness::conv_shape_of<restorenet::HyperConv2dShape>(s);
}
}  // namespace

extern "C" {
int emu_hyper_conv2d_forward(int dtype, const int64_t* shape, const void* x, const int64_t* x_st,
                             const void* level, const void* weight, const void* weight_base, const void* bias,
                             const void* bias_base, void* y, const int64_t* y_st) {
  return restorenet::hyper_conv2d_forward(dtype_of(dtype), shape_of(shape), x, strides_of(x_st), level, weight,
                                          weight_base, bias, bias_base, y, strides_of(y_st), nullptr);
}

int emu_hyper_conv2d_backward_input(int dtype, const int64_t* shape, const void* dy, const int64_t* dy_st,
                                    const void* level, const void* weight, const void* weight_base, void* dx,
                                    const int64_t* dx_st) {
  return restorenet::hyper_conv2d_backward_input(dtype_of(dtype), shape_of(shape), dy, strides_of(dy_st), level,
                                                 weight, weight_base, dx, strides_of(dx_st), nullptr);
}

int emu_hyper_conv2d_backward_params_workspace_size(int dtype, const int64_t* shape, void* d_level,
                                                    void* d_weight, void* d_weight_base, void* d_bias,
                                                    void* d_bias_base, const void* bias, int64_t* bytes) {
  size_t b = 0;
  const restorenet::HyperConv2dParamGrads grads{d_level, d_weight, d_weight_base, d_bias, d_bias_base};
  const cudaError_t err =
      restorenet::hyper_conv2d_backward_params_workspace_size(dtype_of(dtype), shape_of(shape), grads, bias, &b);
  *bytes = int64_t(b);
  return err;
}

int emu_hyper_conv2d_backward_params(int dtype, const int64_t* shape, const void* dy, const int64_t* dy_st,
                                     const void* x, const int64_t* x_st, const void* level, const void* weight,
                                     const void* bias, void* d_level, void* d_weight, void* d_weight_base,
                                     void* d_bias, void* d_bias_base, void* workspace, int64_t workspace_bytes) {
  const restorenet::HyperConv2dParamGrads grads{d_level, d_weight, d_weight_base, d_bias, d_bias_base};
  return restorenet::hyper_conv2d_backward_params(dtype_of(dtype), shape_of(shape), dy, strides_of(dy_st), x,
                                                  strides_of(x_st), level, weight, bias, grads, workspace,
                                                  size_t(workspace_bytes), nullptr);
}
}
