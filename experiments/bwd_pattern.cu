// The backward's memory pattern without its arithmetic: what rate DRAM gives the 16-bit G = C
// backward's loads and stores alone (docs/kernel_notes.md, "What bounds the 16-bit G = C
// backward"). Standalone; on the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/bwdpat experiments/bwd_pattern.cu && /tmp/bwdpat
//
// As the kernel's plan for bfloat16, C = 1152, G = C: a block owns one slab of kLanes 16-byte
// vectors of one image and scans its kW lines in reverse, one position per thread, one block per
// multiprocessor. Per thread and line it loads x, lam, dh, h (16 bytes each) and the 3 gate
// vectors (48 bytes, at a 48-byte thread stride) one line ahead into registers, with the L2::256B
// hint, optionally prefetches line t - 2 into L2, and stores dlam, dx and the 3 gate-gradient
// vectors (formed from the loaded bits, so every load is waited for), then a block barrier.
// Rows: the benchmark's two large bfloat16 G = C shapes with the kernel's slabs, reads only,
// and 128-byte slabs (8 lanes) for comparison; each as % of the copy bandwidth measured here.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.h"

constexpr int kVec = 144;  // 16-byte vectors of a pixel: 1152 bfloat16 channels

struct Arrays {
  const uint4 *x, *lam, *dh, *h, *w;
  uint4 *dlam, *dx, *dw;
};

__device__ __forceinline__ uint4 Load(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 Mix(uint4 a, uint4 b) {
  return make_uint4(a.x ^ b.x, a.y ^ b.y, a.z ^ b.z, a.w ^ b.w);
}

template <int kLanes, int kW, bool kStores, bool kPrefetch>
__global__ void __launch_bounds__(kLanes * kW) BwdPattern(Arrays a, uint32_t* out) {
  constexpr int kSlabs = kVec / kLanes;
  const int img = blockIdx.x / kSlabs, slab = blockIdx.x % kSlabs;
  const int p = threadIdx.x / kLanes, vl = threadIdx.x % kLanes;
  const size_t v = size_t(slab) * kLanes + vl;
  auto pix = [&](int t) { return (size_t(img) * kW + t) * kW + p; };
  auto issue = [&](uint4 (&r)[7], int t) {
    const size_t c = pix(t) * kVec + v, g = pix(t) * 3 * kVec + 3 * v;
    r[0] = Load(a.x + c);
    r[1] = Load(a.lam + c);
    r[2] = Load(a.dh + c);
    r[3] = Load(a.h + c);
#pragma unroll
    for (int k = 0; k < 3; ++k) r[4 + k] = Load(a.w + g + k);
  };
  uint32_t acc = 0;
  uint4 r[2][7];
  issue(r[0], kW - 1);
  for (int t0 = kW - 1; t0 >= 0; t0 -= 2) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int t = t0 - s;
      if (t < 0) break;
      if (t > 0) issue(r[s ^ 1], t - 1);
      if (kPrefetch && t > 1) {
        const size_t c = pix(t - 2) * kVec + v, g = pix(t - 2) * 3 * kVec + 3 * v;
        for (const uint4* q : {a.x + c, a.lam + c, a.dh + c, a.h + c, a.w + g, a.w + g + 1,
                               a.w + g + 2})
          asm volatile("prefetch.global.L2 [%0];" ::"l"(q));
      }
      const uint4* q = r[s];
      if constexpr (kStores) {
        const size_t c = pix(t) * kVec + v, g = pix(t) * 3 * kVec + 3 * v;
        a.dlam[c] = Mix(q[0], q[2]);
        a.dx[c] = Mix(q[1], q[2]);
#pragma unroll
        for (int k = 0; k < 3; ++k) a.dw[g + k] = Mix(q[4 + k], q[3]);
      } else {
#pragma unroll
        for (int k = 0; k < 7; ++k) acc ^= q[k].x ^ q[k].y ^ q[k].z ^ q[k].w;
      }
      __syncthreads();
    }
  }
  if (acc == 0x12345678u) out[0] = acc;  // keeps the loads of the reads-only rows alive
}

int main() {
  // The largest case: 32 images of 64 x 64 (the same elements as 8 of 128 x 128).
  const size_t pixels = size_t(32) * 64 * 64, plane = pixels * kVec * 16;  // bytes of x
  char* mem;
  CHECK(cudaMalloc(&mem, 12 * plane));  // x, lam, dh, h, dlam, dx: 1 plane each; w, dw: 3
  CHECK(cudaMemset(mem, 1, 12 * plane));
  auto at = [&](int i) { return reinterpret_cast<uint4*>(mem + i * plane); };
  const Arrays arr{at(0), at(1), at(2), at(3), at(4), at(7), at(8), at(9)};
  uint32_t* out;
  CHECK(cudaMalloc(&out, 4));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  auto median_ms = [&](auto&& launch) {
    std::vector<float> ms;
    for (int rep = 0; rep < 15; ++rep) {
      CHECK(cudaEventRecord(e0));
      launch();
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      CHECK(cudaGetLastError());
      float t;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      if (rep >= 3) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  };
  // Copy bandwidth (read + write) as the benchmark measures it: one device-to-device copy.
  const double copy_ms = median_ms([&] {
    CHECK(cudaMemcpyAsync(mem + 6 * plane, mem, 6 * plane, cudaMemcpyDeviceToDevice));
  });
  const double copy_bw = 2.0 * 6 * plane / (copy_ms * 1e-3);
  std::printf("copy: %.3f TB/s\n\n| pattern | blocks | threads | ms | GB moved | %% of copy |\n"
              "|---|---|---|---|---|---|\n", copy_bw / 1e12);

  // One block per multiprocessor, as the kernel's registers allow.
  const int kOneBlockPerSm = 120 * 1024;
  using Kernel = void (*)(Arrays, uint32_t*);
  struct Row { const char* name; Kernel kernel; int lanes, width; bool stores; };
  const Row rows[] = {
      {"64x64, 4 lanes (the plan), L2 prefetch", BwdPattern<4, 64, true, true>, 4, 64, true},
      {"64x64, 4 lanes, no prefetch", BwdPattern<4, 64, true, false>, 4, 64, true},
      {"64x64, 4 lanes, reads only", BwdPattern<4, 64, false, true>, 4, 64, false},
      {"64x64, 8 lanes (128-byte slabs), L2 prefetch", BwdPattern<8, 64, true, true>, 8, 64, true},
      {"128x128, 2 lanes (the plan), no prefetch", BwdPattern<2, 128, true, false>, 2, 128, true},
      {"128x128, 2 lanes, reads only", BwdPattern<2, 128, false, false>, 2, 128, false},
      {"128x128, 4 lanes (64-byte slabs), L2 prefetch", BwdPattern<4, 128, true, true>, 4, 128,
       true},
  };
  for (const Row& row : rows) {
    CHECK(cudaFuncSetAttribute(row.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               kOneBlockPerSm));
    const int threads = row.lanes * row.width;
    const int blocks = int(pixels / (size_t(row.width) * row.width)) * (kVec / row.lanes);
    const double ms = median_ms(
        [&] { row.kernel<<<blocks, threads, kOneBlockPerSm>>>(arr, out); });
    // Bytes per pixel and vector: 7 loads, and 5 stores when the row stores.
    const double moved = double(pixels) * kVec * 16 * (row.stores ? 12 : 7);
    std::printf("| %s | %d | %d | %.3f | %.2f | %.1f |\n", row.name, blocks, threads, ms,
                moved / 1e9, 100.0 * moved / (ms * 1e-3) / copy_bw);
  }
  return 0;
}
