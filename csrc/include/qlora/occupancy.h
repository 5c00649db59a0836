// What the CUDA kernels' launches need to know of a device, and how many CTAs of a kernel fit one
// of its SMs: read once and cached (csrc/cuda/gemm_4bit.cu defines device_limits).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace qlora::cuda {

struct DeviceLimits {
  int major, minor;
  size_t smem_optin;  // shared memory a block may opt in to
  uint32_t reserved;  // shared memory the system keeps at the start of each block's window
  int sms;
};
DeviceLimits device_limits(int device);

// Whether `kernel` runs sm_90 code on `device`: its PTX version (a build whose targets lack 9.x runs an
// older target's PTX there, compiled by the driver). Cached by kernel and device.
inline bool runs_sm90_code(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, bool> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int current = 0;
    C10_CUDA_CHECK(cudaGetDevice(&current));
    C10_CUDA_CHECK(cudaSetDevice(device));
    cudaFuncAttributes attr{};
    const cudaError_t status = cudaFuncGetAttributes(&attr, kernel);
    C10_CUDA_CHECK(cudaSetDevice(current));
    C10_CUDA_CHECK(status);
    it = cache.emplace(key, attr.ptxVersion >= 90).first;
  }
  return it->second;
}

// CTAs of `kernel` that one SM of `device` holds at once with `threads` threads and `smem` bytes of
// dynamic shared memory; 0 where its shared memory does not fit a block. The kernel's dynamic
// shared-memory limit is first raised to all the device allows beside its static shared memory, so
// that a later launch with more (the tile's scales grow with K) needs no new call. Cached by
// kernel, device, threads and bytes.
inline int ctas_per_sm(const void* kernel, int threads, size_t smem, int device) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, threads, smem);
  auto it = cache.find(key);
  if (it == cache.end()) {
    const size_t optin = device_limits(device).smem_optin;
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    int per_sm = 0;
    if (smem + attr.sharedSizeBytes <= optin) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(optin - attr.sharedSizeBytes)));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    }
    it = cache.emplace(key, per_sm).first;
  }
  return it->second;
}
template <typename Kernel>
int ctas_per_sm(Kernel kernel, int threads, size_t smem, int device) {
  return ctas_per_sm(reinterpret_cast<const void*>(kernel), threads, smem, device);
}

// The CTAs of `kernel` resident on the device at once (one wave; at least one an SM), for the
// kernels whose grid strides over their tiles.
template <typename Kernel>
int64_t resident_ctas(Kernel kernel, int threads, size_t smem, int device) {
  const DeviceLimits lim = device_limits(device);
  TORCH_CHECK(smem <= lim.smem_optin, "gemm_4bit: needs ", smem, " bytes of shared memory, the GPU has ",
              lim.smem_optin);
  return int64_t{std::max(1, ctas_per_sm(kernel, threads, smem, device))} * lim.sms;
}

}  // namespace qlora::cuda
