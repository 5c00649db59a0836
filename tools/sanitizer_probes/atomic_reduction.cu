// Does compute-sanitizer's racecheck model a reduction ordered by a fence and an atomic counter?
// The pattern of gemm_4bit_ws.cu's one-octet reduction, alone: each of 4 warps stores 32 partial sums
// to shared memory, orders them with __syncwarp and __threadfence_block (a release with lane 0's
// atomicAdd on a shared counter), and the warp whose increment is the last reads every warp's sums
// after its own fence (the acquire). The same kernel with __syncthreads in place of the counter is the
// control. Each checks its sums on the host, so a real race would also show as a wrong result.
//   nvcc -arch=sm_90a -lineinfo -o probe atomic_reduction.cu
//   compute-sanitizer --tool racecheck ./probe atomic; compute-sanitizer --tool racecheck ./probe barrier
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
  const bool atomic = argc > 1 && std::strcmp(argv[1], "atomic") == 0;
  const int blocks = 8, n = blocks * kRounds * 32;
  float* d = nullptr;
  cudaMalloc(&d, n * sizeof(float));
  if (atomic) reduce_atomic<<<blocks, kWarps * 32>>>(d);
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
  std::printf("%s: %d wrong sums of %d (%s)\n", atomic ? "atomic counter" : "barrier", wrong, n,
              cudaGetErrorString(cudaGetLastError()));
  cudaFree(d);
  return wrong != 0;
}
