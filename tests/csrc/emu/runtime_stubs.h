// The few CUDA runtime functions the kernels' launchers call, for a pretend
// device with RN_EMU_SM_COUNT (default 2) multiprocessors and compute
// capability RN_EMU_CC_MAJOR (default 8: tensor-core kernels for 16-bit
// types). Included once by every emulation harness (*_harness.cpp): each
// builds its own shared library.
#pragma once

#include <cstdlib>

#include <cuda_runtime.h>

extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  const char* env = nullptr;
  if (attr == cudaDevAttrMultiProcessorCount) {
    env = std::getenv("RN_EMU_SM_COUNT");
    *value = env != nullptr ? std::atoi(env) : 2;
  } else if (attr == cudaDevAttrComputeCapabilityMajor) {
    env = std::getenv("RN_EMU_CC_MAJOR");
    *value = env != nullptr ? std::atoi(env) : 8;
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "emulated CUDA error"; }
}
