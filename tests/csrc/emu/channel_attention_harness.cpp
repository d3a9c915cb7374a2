// Emulation build of csrc/channel_attention.cu for
// tests/csrc/test_channel_attention_emulated.py: the kernels compiled as C++20
// with RN_CUDA_EMULATION (see cuda_emu.h) into a shared library with a flat
// extern "C" API that ctypes calls on host memory (CPU torch tensors).
//
// The launchers query the SM count (runtime_stubs.h: RN_EMU_SM_COUNT, default
// 2), which sets the number of pixel splits of the reductions.
#include "channel_attention.cu"

#include "harness_args.h"
#include "runtime_stubs.h"

namespace {
using rn_harness::dtype_of;
using rn_harness::strides_of;

restorenet::ChannelAttentionShape ca_shape(const int64_t* s, int gated) {
  return restorenet::ChannelAttentionShape{s[0], s[1], s[2], s[3], gated != 0};
}
restorenet::ScaledResidualShape sr_shape(const int64_t* s) { return restorenet::ScaledResidualShape{s[0], s[1], s[2], s[3]}; }
}  // namespace

// shape: n, c, h, w of t (channel attention) or of inp (scaled residual).
extern "C" {
int emu_ca_reduce_workspace_size(int dtype, const int64_t* shape, int gated, int64_t* bytes) {
  size_t b = 0;
  const cudaError_t err = restorenet::channel_attention_reduce_workspace_size(dtype_of(dtype), ca_shape(shape, gated), &b);
  *bytes = int64_t(b);
  return err;
}

int emu_ca_reduce(int dtype, const int64_t* shape, int gated, const void* x, const int64_t* x_st, const void* du,
                  const int64_t* du_st, void* sums, void* workspace, int64_t workspace_bytes) {
  return restorenet::channel_attention_reduce(dtype_of(dtype), ca_shape(shape, gated), x, strides_of(x_st), du,
                                              strides_of(du_st), sums, workspace, size_t(workspace_bytes), nullptr);
}

int emu_ca_apply(int dtype, const int64_t* shape, int gated, const void* x, const int64_t* x_st, const void* scale,
                 void* u, const int64_t* u_st) {
  return restorenet::channel_attention_apply(dtype_of(dtype), ca_shape(shape, gated), x, strides_of(x_st), scale, u,
                                             strides_of(u_st), nullptr);
}

int emu_ca_backward_input(int dtype, const int64_t* shape, int gated, const void* du, const int64_t* du_st,
                          const void* x, const int64_t* x_st, const void* scale, const void* q, void* dx,
                          const int64_t* dx_st) {
  return restorenet::channel_attention_backward_input(dtype_of(dtype), ca_shape(shape, gated), du, strides_of(du_st), x,
                                                      strides_of(x_st), scale, q, dx, strides_of(dx_st), nullptr);
}

int emu_sr_forward(int dtype, const int64_t* shape, const void* inp, const int64_t* inp_st, const void* beta,
                   const void* z, const int64_t* z_st, void* y, const int64_t* y_st) {
  return restorenet::scaled_residual_forward(dtype_of(dtype), sr_shape(shape), inp, strides_of(inp_st), beta, z,
                                             strides_of(z_st), y, strides_of(y_st), nullptr);
}

int emu_sr_backward_workspace_size(int dtype, const int64_t* shape, int64_t* bytes) {
  size_t b = 0;
  const cudaError_t err = restorenet::scaled_residual_backward_workspace_size(dtype_of(dtype), sr_shape(shape), &b);
  *bytes = int64_t(b);
  return err;
}

int emu_sr_backward(int dtype, const int64_t* shape, const void* g, const int64_t* g_st, const void* beta,
                    const void* z, const int64_t* z_st, void* dz, const int64_t* dz_st, void* dbeta, void* workspace,
                    int64_t workspace_bytes) {
  return restorenet::scaled_residual_backward(dtype_of(dtype), sr_shape(shape), g, strides_of(g_st), beta, z,
                                              strides_of(z_st), dz, strides_of(dz_st), dbeta, workspace,
                                              size_t(workspace_bytes), nullptr);
}
}
