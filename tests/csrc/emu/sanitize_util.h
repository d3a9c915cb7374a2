// Buffers for the sanitizer mains of the emulation harnesses (sanitize_check.cpp,
// channel_attention_harness.cpp, elementwise_harness.cpp): exactly-sized
// random host buffers, so AddressSanitizer sees any access past an end, and
// [n, c, h, w] element strides of either layout.
#pragma once

#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace rn_harness {

template <typename T>
std::vector<T> random_buffer(size_t size, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<T> v(size);
  for (auto& e : v) e = T(uniform(rng));
  return v;
}

// Element strides of a dense [n, ch, h, w] tensor, NCHW or channels_last.
inline void dense_strides(bool channels_last, int64_t ch, int64_t h, int64_t w, int64_t* out) {
  if (channels_last) {
    out[0] = h * w * ch, out[1] = 1, out[2] = w * ch, out[3] = ch;
  } else {
    out[0] = ch * h * w, out[1] = h * w, out[2] = w, out[3] = 1;
  }
}

// "quick": the run under ThreadSanitizer (slow), fewer cases.
inline bool quick_run(int argc, char** argv) { return argc > 1 && std::string(argv[1]) == "quick"; }

// A sanitizer main's exit: tests/csrc/emu_build.py's run_sanitized looks for "all cases ran".
inline int report_cases(int failures) {
  if (failures != 0) {
    std::printf("%d cases returned a CUDA error\n", failures);
    return 1;
  }
  std::printf("all cases ran\n");
  return 0;
}

}  // namespace rn_harness
