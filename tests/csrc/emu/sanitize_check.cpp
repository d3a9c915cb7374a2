// Runs every hyper_conv2d kernel on a few shapes, in exactly-sized buffers,
// for tests/csrc/test_hyper_conv2d_emulated.py's sanitizer tests: built with
// -fsanitize=address any load or store out of bounds aborts, built with
// -fsanitize=thread a shared-memory race between the emulated threads of a
// block (a missing __syncthreads) aborts. Values are checked elsewhere.
#include <vector>

#include "harness.cpp"
#include "sanitize_util.h"

namespace {
using rn_harness::random_buffer;

struct Case {
  int64_t n, c_in, c_out, h, w, kh, kw, stride, padding;
  bool channels_last, bias;
};

template <typename T, typename Level>
int run(const Case& c, int dtype, std::mt19937& rng) {
  const int64_t ho = (c.h + 2 * c.padding - c.kh) / c.stride + 1, wo = (c.w + 2 * c.padding - c.kw) / c.stride + 1;
  const int64_t shape[11] = {c.n, c.c_in, c.h, c.w, c.c_out, c.kh, c.kw, ho, wo, c.stride, c.padding};
  const size_t nx = c.n * c.c_in * c.h * c.w, ny = c.n * c.c_out * ho * wo, nw = c.c_out * c.c_in * c.kh * c.kw;
  auto x = random_buffer<T>(nx, rng), dy = random_buffer<T>(ny, rng);
  auto weight = random_buffer<T>(nw, rng), weight_base = random_buffer<T>(nw, rng);
  auto bias = random_buffer<T>(c.c_out, rng), bias_base = random_buffer<T>(c.c_out, rng);
  auto level = random_buffer<Level>(c.n, rng);
  std::vector<T> y(ny), dx(nx), dw(nw), dwb(nw), db(c.c_out), dbb(c.c_out);
  std::vector<Level> dlevel(c.n);
  int64_t xs[4], ys[4];
  rn_harness::dense_strides(c.channels_last, c.c_in, c.h, c.w, xs);
  rn_harness::dense_strides(c.channels_last, c.c_out, ho, wo, ys);
  const void* b = c.bias ? bias.data() : nullptr;
  const void* bb = c.bias ? bias_base.data() : nullptr;
  void* d_b = c.bias ? db.data() : nullptr;
  void* d_bb = c.bias ? dbb.data() : nullptr;
  int rc = emu_hyper_conv2d_forward(dtype, shape, x.data(), xs, level.data(), weight.data(), weight_base.data(), b,
                                    bb, y.data(), ys);
  rc |= emu_hyper_conv2d_backward_input(dtype, shape, dy.data(), ys, level.data(), weight.data(),
                                        weight_base.data(), dx.data(), xs);
  int64_t bytes = 0;
  rc |= emu_hyper_conv2d_backward_params_workspace_size(dtype, shape, dlevel.data(), dw.data(), dwb.data(), d_b,
                                                        d_bb, b, &bytes);
  std::vector<char> workspace(bytes);
  rc |= emu_hyper_conv2d_backward_params(dtype, shape, dy.data(), ys, x.data(), xs, level.data(), weight.data(), b,
                                         dlevel.data(), dw.data(), dwb.data(), d_b, d_bb, workspace.data(), bytes);
  return rc;
}

}  // namespace

// With "quick" (ThreadSanitizer, ~10x slower): fewer runs that still take
// every code path (several tiles, items per block, both layouts, WMMA).
int main(int argc, char** argv) {
  const bool quick = rn_harness::quick_run(argc, argv);
  std::mt19937 rng(0);
  const Case cases[] = {
      {2, 5, 70, 9, 11, 3, 3, 2, 1, false, true},   // two c_out tiles, stride 2
      {2, 5, 70, 9, 11, 3, 3, 2, 1, true, false},
      {1, 66, 3, 17, 16, 3, 3, 1, 1, true, true},   // two c_in tiles, two pixel chunks
      {2, 2, 3, 13, 11, 2, 3, 3, 2, false, true},   // non-square kernel, stride 3, padding 2
  };
  int failures = 0;
  if (quick) {
    failures += run<float, float>(cases[0], 0, rng) != 0;
    failures += run<float, float>(cases[2], 0, rng) != 0;
    failures += run<__half, float>(cases[2], 1, rng) != 0;  // tensor cores
  } else {
    for (const Case& c : cases) {
      failures += run<float, float>(c, 0, rng) != 0;
      failures += run<__half, float>(c, 1, rng) != 0;  // tensor cores
    }
    failures += run<double, double>(cases[0], 3, rng) != 0;
    setenv("RESTORENET_CUDA_TENSOR_CORES", "0", 1);
    failures += run<__nv_bfloat16, float>(cases[0], 2, rng) != 0;  // SIMT
  }
  return rn_harness::report_cases(failures);
}
