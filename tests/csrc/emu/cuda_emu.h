// A CPU emulation of the small part of the CUDA execution model that
// restorenet's kernels use, so their indexing can be tested without a GPU.
//
// Included by csrc/common.cuh when RN_CUDA_EMULATION is defined and the .cu
// files are compiled as C++20 by the host compiler. Every block runs its
// threads as real OS threads (so __syncthreads is a real barrier and a missing
// one shows up as a wrong answer), blocks one after another. __shared__
// variables become function statics: shared by the threads of a block, reused
// by the next block, which is what shared memory is. A kernel whose threads
// call __syncthreads a different number of times fails the launch
// (cudaErrorLaunchFailure) instead of silently passing.
//
// Only what the kernels use is here: threadIdx/blockIdx/blockDim/gridDim,
// __syncthreads, __launch_bounds__, __shared__, cp.async (through
// common.cuh's cp_async / cp_async_commit / cp_async_wait) and WMMA
// (nvcuda::wmma) for 16x16x16 half/bfloat16 fragments. No other warp
// intrinsics, no atomics.
//
// cp.async: a copy is recorded in its thread's open group and done only when
// a cp_async_wait<N> of that thread retires its group (all but the N most
// recently committed groups), by that thread. So a kernel that reads a stage
// before waiting for it reads stale shared memory (a wrong answer), and one
// that reads another thread's copy without a barrier after the wait races
// (ThreadSanitizer reports it). Misaligned addresses abort, as they fault on
// the GPU; a kernel that ends with copies still in flight fails its launch.
//
// WMMA: every lane of a warp holds the whole 16 x 16 matrix of a fragment
// (the hardware spreads it over the lanes in an unspecified layout, which
// kernels must not rely on, so they cannot tell). load/store enforce the
// documented rules -- pointer 32-byte aligned, ldm a multiple of 16 bytes --
// and abort otherwise; store_matrix_sync writes from lane 0 only.
#pragma once

#if !defined(RN_CUDA_EMULATION) || defined(__CUDACC__)
#error "cuda_emu.h is for host-compiler emulation builds only"
#endif

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace rn_emu {

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local long sync_calls = 0;

inline void syncthreads() {
  ++sync_calls;
  block_barrier->arrive_and_wait();
}

// ---------------------------------------------------------------- cp.async
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;  // src_bytes < bytes: the rest is zero-filled
};
inline thread_local std::vector<PendingCopy> open_copies;                   // issued, not yet committed
inline thread_local std::deque<std::vector<PendingCopy>> committed_groups;  // oldest first
// Copies issued, by size (4, 8, 16 bytes; index 0: zero-filling ones), for
// tests that check which copies a kernel chooses.
inline std::atomic<long long> async_copies[17]{};

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    std::fprintf(stderr, "rn_emu: cp.async of %d bytes from %p to %p: address not aligned\n", bytes, src, dst);
    std::abort();
  }
  open_copies.push_back(PendingCopy{dst, src, bytes, src_bytes});
  ++async_copies[src_bytes == 0 ? 0 : bytes];
}

inline void cp_async_commit() {
  committed_groups.push_back(std::move(open_copies));
  open_copies.clear();
}

inline void cp_async_wait(int most_recent_in_flight) {
  while (committed_groups.size() > size_t(most_recent_in_flight)) {
    for (const PendingCopy& c : committed_groups.front()) {
      std::memcpy(c.dst, c.src, size_t(c.src_bytes));
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
    }
    committed_groups.pop_front();
  }
}

// Drops the copies a finished kernel never waited for; true if there were any.
inline bool discard_copies_in_flight() {
  bool any = !open_copies.empty();
  for (const auto& group : committed_groups) any = any || !group.empty();
  open_copies.clear();
  committed_groups.clear();
  return any;
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, Args&&... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    return cudaErrorInvalidConfiguration;
  }
  block_dim = block;
  grid_dim = grid;
  std::barrier<> barrier(threads);
  std::vector<long> calls(threads, 0);
  std::atomic<bool> mismatch{false}, copies_left{false};
  auto worker = [&](unsigned t) {
    block_barrier = &barrier;
    thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          block_idx = uint3{x, y, z};
          sync_calls = 0;
          kernel(args...);
          if (discard_copies_in_flight()) copies_left = true;
          calls[t] = sync_calls;
          barrier.arrive_and_wait();  // the block is done: every thread has returned
          if (t == 0) {
            for (unsigned u = 1; u < threads; ++u) {
              if (calls[u] != calls[0]) mismatch = true;
            }
          }
          barrier.arrive_and_wait();  // thread 0 has checked before `calls` is reused
        }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();
  if (mismatch) {
    std::fprintf(stderr, "rn_emu: threads of a block called __syncthreads a different number of times\n");
    return cudaErrorLaunchFailure;
  }
  if (copies_left) {
    std::fprintf(stderr, "rn_emu: a thread ended with cp.async copies it never waited for\n");
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace rn_emu

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];  // the fragment's matrix, [row][column]
};

namespace detail {
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check(const void* p, unsigned ldm, size_t element_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * element_bytes) % 16 != 0) {
    std::fprintf(stderr, "rn_emu: %s: pointer %p not 32-byte aligned or ldm %u not a multiple of 16 bytes\n",
                 what, p, ldm);
    std::abort();
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (auto& row : f.v)
    for (auto& e : row) e = value;
}

// matrix_a is 16 x K(=16) rows x columns, matrix_b K x 16; element (r, c) at
// p[r * ldm + c] (row_major) or p[c * ldm + r] (col_major).
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>, "operand layout");
  detail::check(p, ldm, sizeof(T), "load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = detail::to_float(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <typename TA, typename TB, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      out[i][j] = s;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = out[i][j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check(p, ldm, sizeof(float), "store_matrix_sync");
  if (::rn_emu::thread_idx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}

}  // namespace wmma
}  // namespace nvcuda

#define threadIdx (::rn_emu::thread_idx)
#define blockIdx (::rn_emu::block_idx)
#define blockDim (::rn_emu::block_dim)
#define gridDim (::rn_emu::grid_dim)
#define __syncthreads() ::rn_emu::syncthreads()
