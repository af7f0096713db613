// For the standalone measurement programs in experiments/ (sm_bandwidth.cu, bwd_pattern.cu):
// CHECK(call) exits with the file, line and CUDA's message when a runtime call fails; MedianMs
// times launches with CUDA events.
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
