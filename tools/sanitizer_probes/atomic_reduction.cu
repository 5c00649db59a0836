// Does compute-sanitizer's racecheck model a reduction ordered by a fence and an atomic counter?
// The pattern of gemm_4bit_ws.cu's one-octet reduction, alone: each of 4 warps stores 32 partial sums
// to shared memory, orders them with __syncwarp and __threadfence_block (a release with lane 0's
// atomicAdd on a shared counter), and the warp whose increment is the last reads every warp's sums
// after its own fence (the acquire). The same kernel with __syncthreads in place of the counter is the
// control; an mbarrier in place of the counter is the alternative. Each checks its sums on the host,
// so a real race would also show as a wrong result.
//   nvcc -arch=sm_90a -lineinfo -o probe atomic_reduction.cu
//   compute-sanitizer --tool racecheck ./probe atomic   (and: barrier, mbarrier)
#include <cstdio>
#include <cstring>

constexpr int kWarps = 4;
constexpr int kRounds = 64;  // tiles a block goes through, reusing the buffer as the kernel does

__global__ void reduce_atomic(float* out) {
  __shared__ float partial[kWarps][32];
  __shared__ unsigned count;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  for (int round = 0; round < kRounds; ++round) {
    partial[warp][lane] = static_cast<float>(round * 1000 + warp * 32 + lane);
    __syncwarp();
    unsigned last = 0;
    if (lane == 0) {
      __threadfence_block();
      last = atomicAdd(&count, 1u) == kWarps - 1;
      if (last) __threadfence_block();
    }
    last = __shfl_sync(0xffffffffu, last, 0);
    if (last) {
      __syncwarp();
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += partial[w][lane];
      out[(blockIdx.x * kRounds + round) * 32 + lane] = s;
      if (lane == 0) count = 0;
    }
    // The kernel orders the next round's stores after this read through its stage barriers; here a
    // barrier stands in for them, so that only the counter's ordering is under test.
    __syncthreads();
  }
}

// The alternative that racecheck may model: each warp's lane 0 arrives on an mbarrier (a release)
// after the warp's stores, and warp 0 waits for the phase (an acquire) and reads every warp's sums.
__global__ void reduce_mbarrier(float* out) {
  __shared__ float partial[kWarps][32];
  __shared__ alignas(8) unsigned long long bar;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned bar_addr = static_cast<unsigned>(__cvta_generic_to_shared(&bar));
  if (threadIdx.x == 0) asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar_addr), "r"(kWarps) : "memory");
  __syncthreads();
  for (int round = 0; round < kRounds; ++round) {
    partial[warp][lane] = static_cast<float>(round * 1000 + warp * 32 + lane);
    __syncwarp();
    if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar_addr) : "memory");
    if (warp == 0) {
      asm volatile(
          "{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n@!done bra WAIT;\n}\n" ::"r"(
              bar_addr),
          "r"(round & 1)
          : "memory");
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += partial[w][lane];
      out[(blockIdx.x * kRounds + round) * 32 + lane] = s;
    }
    __syncthreads();  // as in reduce_atomic: stands in for the kernel's stage barriers
  }
}

__global__ void reduce_barrier(float* out) {
  __shared__ float partial[kWarps][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int round = 0; round < kRounds; ++round) {
    partial[warp][lane] = static_cast<float>(round * 1000 + warp * 32 + lane);
    __syncthreads();
    if (warp == 0) {
      float s = 0.f;
      for (int w = 0; w < kWarps; ++w) s += partial[w][lane];
      out[(blockIdx.x * kRounds + round) * 32 + lane] = s;
    }
    __syncthreads();
  }
}

int main(int argc, char** argv) {
  const char* kind = argc > 1 ? argv[1] : "barrier";
  const int blocks = 8, n = blocks * kRounds * 32;
  float* d = nullptr;
  cudaMalloc(&d, n * sizeof(float));
  if (std::strcmp(kind, "atomic") == 0) reduce_atomic<<<blocks, kWarps * 32>>>(d);
  else if (std::strcmp(kind, "mbarrier") == 0) reduce_mbarrier<<<blocks, kWarps * 32>>>(d);
  else reduce_barrier<<<blocks, kWarps * 32>>>(d);
  static float h[8 * kRounds * 32];
  cudaMemcpy(h, d, n * sizeof(float), cudaMemcpyDeviceToHost);
  int wrong = 0;
  for (int b = 0; b < blocks; ++b)
    for (int round = 0; round < kRounds; ++round)
      for (int lane = 0; lane < 32; ++lane) {
        float want = 0.f;
        for (int w = 0; w < kWarps; ++w) want += static_cast<float>(round * 1000 + w * 32 + lane);
        wrong += h[(b * kRounds + round) * 32 + lane] != want;
      }
  std::printf("%s: %d wrong sums of %d (%s)\n", kind, wrong, n,
              cudaGetErrorString(cudaGetLastError()));
  cudaFree(d);
  return wrong != 0;
}
