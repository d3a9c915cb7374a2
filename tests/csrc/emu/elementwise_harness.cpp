// Emulation build of csrc/reversible.cu and csrc/naf_elementwise.cu for
// tests/csrc/test_elementwise_emulated.py: the kernels compiled as C++20 with
// RN_CUDA_EMULATION (see cuda_emu.h) into one shared library with a flat
// extern "C" API that ctypes calls on host memory (CPU torch tensors).
//
// The launchers of these ops call no CUDA runtime function on the emulated
// path (no device queries: their grids depend on the shape only); the stubs
// are linked in like every harness's, so a future query still links.
#include "naf_elementwise.cu"
#include "reversible.cu"

#include "harness_args.h"
#include "runtime_stubs.h"

namespace {
using rn_harness::dtype_of;
using rn_harness::strides_of;

// shape: n, c, h, w; strides: one [n, c, h, w] quadruple per tensor.
restorenet::RevCouplingShape rev_shape(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }
restorenet::NafShape naf_shape(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }
}  // namespace

extern "C" {
int emu_rev_coupling_forward(int dtype, const int64_t* shape, const void* x, const int64_t* x_st, const void* f,
                             const int64_t* f_st, const void* alpha, void* out, const int64_t* out_st) {
  return restorenet::rev_coupling_forward(dtype_of(dtype), rev_shape(shape), x, strides_of(x_st), f,
                                          strides_of(f_st), alpha, out, strides_of(out_st), nullptr);
}

int64_t emu_rev_coupling_invert_workspace_size(int dtype, int64_t channels) {
  return int64_t(restorenet::rev_coupling_invert_workspace_size(dtype_of(dtype), channels));
}

int emu_rev_coupling_invert(int dtype, const int64_t* shape, const void* x, const int64_t* x_st, const void* f,
                            const int64_t* f_st, const void* alpha, const void* g, const int64_t* g_st, void* c_out,
                            const int64_t* c_st, void* grad_c, const int64_t* gc_st, void* grad_alpha,
                            void* workspace, int64_t workspace_bytes) {
  return restorenet::rev_coupling_invert(dtype_of(dtype), rev_shape(shape), x, strides_of(x_st), f,
                                         strides_of(f_st), alpha, g, strides_of(g_st), c_out, strides_of(c_st),
                                         grad_c, strides_of(gc_st), grad_alpha, workspace,
                                         size_t(workspace_bytes), nullptr);
}

int emu_layer_norm2d_forward(int dtype, const int64_t* shape, const void* x, const int64_t* x_st,
                             const void* weight, const void* bias, double eps, void* y, const int64_t* y_st,
                             void* mean, void* rstd) {
  return restorenet::layer_norm2d_forward(dtype_of(dtype), naf_shape(shape), x, strides_of(x_st), weight, bias, eps,
                                          y, strides_of(y_st), mean, rstd, nullptr);
}

int64_t emu_layer_norm2d_backward_workspace_size(int dtype, int64_t channels) {
  return int64_t(restorenet::layer_norm2d_backward_workspace_size(dtype_of(dtype), channels));
}

int emu_layer_norm2d_backward(int dtype, const int64_t* shape, const void* dy, const int64_t* dy_st,
                              const void* x, const int64_t* x_st, const void* weight, const void* mean,
                              const void* rstd, void* dx, const int64_t* dx_st, void* dweight, void* dbias,
                              void* workspace, int64_t workspace_bytes) {
  return restorenet::layer_norm2d_backward(dtype_of(dtype), naf_shape(shape), dy, strides_of(dy_st), x,
                                           strides_of(x_st), weight, mean, rstd, dx, strides_of(dx_st), dweight,
                                           dbias, workspace, size_t(workspace_bytes), nullptr);
}

int emu_simple_gate_forward(int dtype, const int64_t* shape, const void* x, const int64_t* x_st, void* y,
                            const int64_t* y_st) {
  return restorenet::simple_gate_forward(dtype_of(dtype), naf_shape(shape), x, strides_of(x_st), y,
                                         strides_of(y_st), nullptr);
}

int emu_simple_gate_backward(int dtype, const int64_t* shape, const void* dy, const int64_t* dy_st, const void* x,
                             const int64_t* x_st, void* dx, const int64_t* dx_st) {
  return restorenet::simple_gate_backward(dtype_of(dtype), naf_shape(shape), dy, strides_of(dy_st), x,
                                          strides_of(x_st), dx, strides_of(dx_st), nullptr);
}
}

#if defined(RN_SANITIZE_MAIN)
// A main for tests/csrc/test_elementwise_emulated.py's sanitizer tests: the
// kernels that sum through shared memory (layer_norm2d's per-pixel channel
// statistics and its weight/bias gradients; rev_coupling_invert's alpha
// gradient in both layouts) on exactly-sized buffers. Built with
// -fsanitize=thread a race between the emulated threads of a block aborts;
// values are checked elsewhere. "quick" (ThreadSanitizer, slow): fewer launches.
#include "sanitize_util.h"

namespace {
template <typename T>
int layer_norm(int dtype, int64_t n, int64_t c, int64_t h, int64_t w, bool channels_last, std::mt19937& rng) {
  using acc_t = typename restorenet::AccType<T>::type;
  const int64_t shape[4] = {n, c, h, w}, size = n * c * h * w;
  auto x = rn_harness::random_buffer<T>(size, rng), dy = rn_harness::random_buffer<T>(size, rng);
  auto weight = rn_harness::random_buffer<acc_t>(c, rng), bias = rn_harness::random_buffer<acc_t>(c, rng);
  std::vector<T> y(size), dx(size);
  std::vector<acc_t> mean(n * h * w), rstd(n * h * w), dweight(c), dbias(c);
  int64_t st[4];
  rn_harness::dense_strides(channels_last, c, h, w, st);
  int rc = emu_layer_norm2d_forward(dtype, shape, x.data(), st, weight.data(), bias.data(), 1e-6, y.data(), st,
                                    mean.data(), rstd.data());
  const int64_t bytes = emu_layer_norm2d_backward_workspace_size(dtype, c);
  std::vector<acc_t> workspace((bytes + sizeof(acc_t) - 1) / sizeof(acc_t));  // acc_t-aligned (16 bytes by malloc)
  rc |= emu_layer_norm2d_backward(dtype, shape, dy.data(), st, x.data(), st, weight.data(), mean.data(), rstd.data(),
                                  dx.data(), st, dweight.data(), dbias.data(), workspace.data(), bytes);
  return rc;
}

template <typename T>
int rev_invert(int dtype, int64_t n, int64_t c, int64_t h, int64_t w, bool channels_last, std::mt19937& rng) {
  using acc_t = typename restorenet::AccType<T>::type;
  const int64_t shape[4] = {n, c, h, w}, size = n * c * h * w;
  auto x = rn_harness::random_buffer<T>(size, rng), f = rn_harness::random_buffer<T>(size, rng);
  auto g = rn_harness::random_buffer<T>(size, rng);
  std::vector<acc_t> alpha(c, acc_t(0.75)), grad_alpha(c);
  std::vector<T> c_out(size), grad_c(size);
  int64_t st[4];
  rn_harness::dense_strides(channels_last, c, h, w, st);
  const int64_t bytes = emu_rev_coupling_invert_workspace_size(dtype, c);
  std::vector<acc_t> workspace((bytes + sizeof(acc_t) - 1) / sizeof(acc_t));
  return emu_rev_coupling_invert(dtype, shape, x.data(), st, f.data(), st, alpha.data(), g.data(), st, c_out.data(),
                                 st, grad_c.data(), st, grad_alpha.data(), workspace.data(), bytes);
}
}  // namespace

int main(int argc, char** argv) {
  const bool quick = rn_harness::quick_run(argc, argv);
  std::mt19937 rng(0);
  int failures = 0;
  failures += layer_norm<float>(0, 2, 5, 6, 7, false, rng) != 0;
  failures += layer_norm<__half>(1, 1, 19, 3, 5, true, rng) != 0;
  failures += rev_invert<float>(0, 2, 6, 5, 7, false, rng) != 0;
  failures += rev_invert<float>(0, 2, 8, 5, 3, true, rng) != 0;
  if (!quick) {
    failures += layer_norm<double>(3, 3, 33, 4, 4, true, rng) != 0;
    failures += rev_invert<__nv_bfloat16>(2, 3, 16, 4, 9, true, rng) != 0;
    failures += rev_invert<double>(3, 2, 3, 9, 9, false, rng) != 0;
  }
  return rn_harness::report_cases(failures);
}
#endif
