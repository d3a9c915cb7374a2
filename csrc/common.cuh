// Shared helpers for restorenet's CUDA kernels. Torch-free on purpose: the
// kernels compile (and are tested) without a CUDA build of PyTorch; only
// csrc/binding/ knows about tensors.
//
// With RN_CUDA_EMULATION defined the same sources compile as plain C++ and the
// kernels run on CPU threads (tests/csrc/emu/cuda_emu.h): that is how the
// indexing is tested on machines without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "api.h"

#if defined(RN_CUDA_EMULATION)
#include "cuda_emu.h"
#endif

namespace restorenet {

// ---------------------------------------------------------------- dtypes
// Accumulation type: fp32 for every 16/32-bit type, fp64 for fp64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__host__ __device__ __forceinline__ float to_acc(float v) { return v; }
__host__ __device__ __forceinline__ double to_acc(double v) { return v; }
__host__ __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Stores an accumulator value into an element of type T (round to nearest even).
__host__ __device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
__host__ __device__ __forceinline__ void store_as(double* p, double v) { *p = v; }
__host__ __device__ __forceinline__ void store_as(__half* p, float v) { *p = __float2half_rn(v); }
__host__ __device__ __forceinline__ void store_as(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Calls `body(scalar_t{})` with the element type of `dtype`, e.g.
//   dispatch_dtype(dtype, [&](auto tag) { using scalar_t = decltype(tag); ... });
template <typename Body>
inline cudaError_t dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::kFloat32: return body(float{});
    case DType::kFloat16: return body(__half{});
    case DType::kBFloat16: return body(__nv_bfloat16{});
    case DType::kFloat64: return body(double{});
  }
  return cudaErrorInvalidValue;
}

// Bytes of one accumulator element: fp64 for fp64 tensors, else fp32.
inline size_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// ---------------------------------------------------------------- integer math
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Workspace regions start on 256-byte boundaries (the allocator's alignment),
// so every region is aligned for any vector access.
inline size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// q = a / b, r = a % b for a >= 0, b > 0; in 32 bits when both fit, because a
// 64-bit division is many times slower than a 32-bit one on the GPU.
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (a <= 0xffffffffLL && b <= 0xffffffffLL) {
    const uint32_t q32 = uint32_t(a) / uint32_t(b);
    q = q32;
    r = a - int64_t(q32) * b;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// ---------------------------------------------------------------- launches
// A grid cap. An emulation build lowers it to RN_EMU_GRID_CAP when that is set,
// so tests reach the grid-stride loops and multi-row partial sums with small
// shapes; a CUDA build returns `cap` unchanged.
inline int64_t grid_cap(int64_t cap) {
#if defined(RN_CUDA_EMULATION)
  if (const char* env = std::getenv("RN_EMU_GRID_CAP")) return min64(cap, max64(1, std::atoll(env)));
#endif
  return cap;
}

// Launches `kernel` on `stream` and returns the launch error (kernels report
// nothing else). Under emulation the blocks run on CPU threads.
template <typename... KernelArgs, typename... Args>
inline cudaError_t launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, cudaStream_t stream,
                          Args&&... args) {
#if defined(RN_CUDA_EMULATION)
  (void)stream;
  return rn_emu::launch(kernel, grid, block, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

// Number of SMs of the current device (to size split reductions).
inline cudaError_t current_sm_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

// ---------------------------------------------------------------- asynchronous copies
// cp.async (sm_80+): a thread copies 4, 8 or 16 bytes from global to shared
// memory without passing them through registers. Copies are grouped:
// cp_async_commit() closes the thread's current group, cp_async_wait<N>()
// blocks until at most the N most recently committed groups of THIS thread
// are still in flight. Other threads see the data only after a barrier that
// follows the wait. `zero_fill` copies no byte from `gmem` and fills the
// destination with zeros (cp.async's src-size 0 form: padding, masked
// elements); `gmem` must still be a valid address, e.g. the tensor's base.
// Both addresses must be aligned to kBytes. Before Ampere the copy is a plain
// synchronous one (same results, no overlap). Under emulation the copies are
// recorded and done at the wait that covers them (cuda_emu.h), so a kernel
// that reads a stage before waiting for it reads stale data.
template <int kBytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool zero_fill) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(RN_CUDA_EMULATION)
  rn_emu::cp_async(smem, gmem, kBytes, zero_fill ? 0 : kBytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = zero_fill ? 0 : kBytes;
  if constexpr (kBytes == 16) {  // .cg: cache in L2 only (streamed tiles); only 16-byte copies have it
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem), "n"(kBytes),
                 "r"(src_bytes) : "memory");
  }
#else
  using word_t = std::conditional_t<kBytes == 16, int4, std::conditional_t<kBytes == 8, int2, int>>;
  word_t v{};
  if (!zero_fill) v = *static_cast<const word_t*>(gmem);
  *static_cast<word_t*>(smem) = v;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(RN_CUDA_EMULATION)
  rn_emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0, "a group count");
#if defined(RN_CUDA_EMULATION)
  rn_emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ---------------------------------------------------------------- deterministic reductions
// Sums without atomics: each block writes its own row of partial sums, then
// sum_partial_rows adds the rows in a fixed order, so results are bitwise
// reproducible run to run.

// Fixed-shape tree sum of one value per thread over a block of kBlockThreads
// (a power of two) threads; sums[0] holds the total after the last barrier.
// Block-collective: every thread must call it.
template <int kBlockThreads, typename acc_t>
__device__ __forceinline__ void block_tree_sum(acc_t* sums, int tid, acc_t v) {
  static_assert((kBlockThreads & (kBlockThreads - 1)) == 0, "a power of two");
  sums[tid] = v;
  __syncthreads();
  for (int half = kBlockThreads / 2; half > 0; half /= 2) {
    if (tid < half) sums[tid] += sums[tid + half];
    __syncthreads();
  }
}

constexpr int kSumRowsThreads = 256;

// out[i] = sum_{r < rows} partial[r * count + i], r in increasing order; one
// thread per output, grid-stride.
template <typename acc_t>
__global__ void __launch_bounds__(kSumRowsThreads)
    sum_partial_rows_kernel(const acc_t* partial, int64_t rows, int64_t count, acc_t* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t total = acc_t(0);
    for (int64_t r = 0; r < rows; ++r) total += partial[r * count + i];
    out[i] = total;
  }
}

// Launches sum_partial_rows_kernel on `blocks` blocks (any number >= 1: the
// result does not depend on it). rows == 0 writes zeros.
template <typename acc_t>
inline cudaError_t sum_partial_rows(const acc_t* partial, int64_t rows, int64_t count, acc_t* out, int64_t blocks,
                                    cudaStream_t stream) {
  return launch(sum_partial_rows_kernel<acc_t>, dim3(unsigned(blocks), 1, 1), dim3(kSumRowsThreads), stream,
                partial, rows, count, out);
}

}  // namespace restorenet
