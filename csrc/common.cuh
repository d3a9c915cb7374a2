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

// ---------------------------------------------------------------- misc
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

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

}  // namespace restorenet
