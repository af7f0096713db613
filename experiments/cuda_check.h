// For the standalone measurement programs in experiments/ (sm_bandwidth.cu, bwd_pattern.cu):
// CHECK(call) exits with the file, line and CUDA's message when a runtime call fails; MedianMs
// times launches with CUDA events; SmemAddr and MbarWait are the device helpers of the programs
// that stage through shared memory behind mbarriers.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                             \
  do {                                                                       \
    cudaError_t e_ = (x);                                                    \
    if (e_ != cudaSuccess) {                                                 \
      std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                          \
    }                                                                        \
  } while (0)

// Median time in ms of reps calls of launch(rep) on the default stream, each between two events
// and checked for launch errors; the first `warmup` calls are left out.
template <class Launch>
float MedianMs(int reps, int warmup, Launch&& launch) {
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int rep = 0; rep < reps; ++rep) {
    CHECK(cudaEventRecord(e0));
    launch(rep);
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaGetLastError());
    float t;
    CHECK(cudaEventElapsedTime(&t, e0, e1));
    if (rep >= warmup) ms.push_back(t);
  }
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

#ifdef __CUDACC__
#include <cstdint>

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Waits until the mbarrier at `bar` completes the phase of the given parity.
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
        "selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(SmemAddr(bar)), "r"(parity)
        : "memory");
}
#endif
