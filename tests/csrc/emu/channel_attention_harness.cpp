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

#if defined(RN_SANITIZE_MAIN)
// A main for tests/csrc/test_channel_attention_emulated.py's sanitizer tests:
// the kernels that sum through shared memory (the reduction, and the scaled
// residual's beta gradient), plus the element-wise ones, on exactly-sized
// buffers. Built with -fsanitize=thread a race between the emulated threads
// of a block on the shared sums aborts; values are checked elsewhere.
// "quick" (ThreadSanitizer, slow): fewer launches that still take both
// layouts, gating and a 16-bit type.
#include "sanitize_util.h"

namespace {
template <typename T>
int run_case(int dtype, int64_t n, int64_t c, int64_t h, int64_t w, bool channels_last, bool gated, bool full,
             std::mt19937& rng) {
  using acc_t = typename restorenet::AccType<T>::type;
  const int64_t shape[4] = {n, c, h, w}, cx = gated ? 2 * c : c;
  auto x = rn_harness::random_buffer<T>(n * cx * h * w, rng), du = rn_harness::random_buffer<T>(n * c * h * w, rng);
  auto scale = rn_harness::random_buffer<acc_t>(n * c, rng), q = rn_harness::random_buffer<acc_t>(n * c, rng);
  std::vector<acc_t> sums(n * c);
  std::vector<T> u(n * c * h * w), dx(x.size());
  int64_t xs[4], ts[4];
  rn_harness::dense_strides(channels_last, cx, h, w, xs);
  rn_harness::dense_strides(channels_last, c, h, w, ts);
  int64_t bytes = 0;
  int rc = emu_ca_reduce_workspace_size(dtype, shape, gated, &bytes);
  std::vector<char> workspace(bytes);
  rc |= emu_ca_reduce(dtype, shape, gated, x.data(), xs, du.data(), ts, sums.data(), workspace.data(), bytes);
  if (!full) return rc;
  rc |= emu_ca_reduce(dtype, shape, gated, x.data(), xs, nullptr, ts, sums.data(), workspace.data(), bytes);
  rc |= emu_ca_apply(dtype, shape, gated, x.data(), xs, scale.data(), u.data(), ts);
  rc |= emu_ca_backward_input(dtype, shape, gated, du.data(), ts, x.data(), xs, scale.data(), q.data(), dx.data(),
                              xs);
  // Scaled residual on t's shape: y = inp + beta * z, and its backward (beta's gradient is a shared-memory sum).
  auto beta = rn_harness::random_buffer<acc_t>(c, rng);
  std::vector<acc_t> dbeta(c);
  rc |= emu_sr_forward(dtype, shape, du.data(), ts, beta.data(), du.data(), ts, u.data(), ts);
  rc |= emu_sr_backward_workspace_size(dtype, shape, &bytes);
  std::vector<char> sr_workspace(bytes);
  rc |= emu_sr_backward(dtype, shape, du.data(), ts, beta.data(), u.data(), ts, dx.data(), ts, dbeta.data(),
                        sr_workspace.data(), bytes);
  return rc;
}
}  // namespace

int main(int argc, char** argv) {
  const bool quick = rn_harness::quick_run(argc, argv);
  std::mt19937 rng(0);
  int failures = 0;
  failures += run_case<float>(0, 2, 5, 7, 9, false, true, true, rng) != 0;
  failures += run_case<float>(0, 2, 37, 5, 6, true, false, true, rng) != 0;  // two channel tiles of 32
  failures += run_case<__half>(1, 1, 6, 9, 5, true, true, !quick, rng) != 0;
  if (!quick) {
    failures += run_case<double>(3, 3, 9, 4, 11, false, false, true, rng) != 0;
    failures += run_case<__nv_bfloat16>(2, 2, 40, 3, 3, false, true, true, rng) != 0;
  }
  return rn_harness::report_cases(failures);
}
#endif
