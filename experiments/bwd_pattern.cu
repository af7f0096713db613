// The backward's memory pattern without its arithmetic: what rate DRAM gives the 16-bit G = C
// backward's loads and stores alone (docs/kernel_notes.md, "What bounds the 16-bit G = C
// backward"). Standalone; on the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/bwdpat experiments/bwd_pattern.cu && /tmp/bwdpat
//
// As the kernel's plans for the G = C backwards (C = 1152, bfloat16 or float32): a block owns one
// slab of kLanes 16-byte vectors of one image and scans its kW lines in reverse, one or two
// positions per thread, one block per multiprocessor. Per thread, position and line it loads x,
// lam, dh, h (16 bytes each) and the 3 gate vectors (48 bytes, at a 48-byte thread stride) one
// line ahead into registers, with the L2::256B hint, optionally prefetches line t - 2 into L2,
// and stores dlam, dx and the 3 gate-gradient vectors (formed from the loaded bits, so every load
// is waited for), then a block barrier. Rows: the plans of the benchmark's two large shapes,
// reads only, other slab widths and positions per thread, blocks in clusters, and the loads
// staged through shared memory by cp.async; each as % of the copy bandwidth measured in the same
// run.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "cuda_check.h"


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

// kVecs: 16-byte vectors per pixel (144: bfloat16, 288: float32, C = 1152); kLanes: vectors of
// a block's slab; kW: the image side (lines and positions); kP: positions per thread (the block
// has kLanes * kW / kP threads; a thread owns positions pl, pl + kW / kP, ...). kCluster > 1:
// launched in clusters of that many blocks (neighbouring slabs) that end every line at a cluster
// barrier instead of a block barrier, so that the pieces of one 128-byte line, which different
// blocks own, are requested and written at the same time. kSlack: the cluster barrier's wait
// comes one line after its arrival (the block barrier stays): the blocks of a cluster stay within
// a line of each other without waiting for each other's last line, as the kernel could afford.
template <int kVecs, int kLanes, int kW, int kP, bool kStores, bool kPrefetch, int kCluster = 1,
          bool kSlack = false>
__global__ void __launch_bounds__(kLanes * kW / kP) BwdPattern(Arrays a, uint32_t* out) {
  constexpr int kSlabs = kVecs / kLanes, kPt = kW / kP;
  const int img = blockIdx.x / kSlabs, slab = blockIdx.x % kSlabs;
  const int pl = threadIdx.x / kLanes, vl = threadIdx.x % kLanes;
  const size_t v = size_t(slab) * kLanes + vl;
  auto pix = [&](int t, int j) { return (size_t(img) * kW + t) * kW + pl + j * kPt; };
  auto issue = [&](uint4 (&r)[kP][7], int t) {
#pragma unroll
    for (int j = 0; j < kP; ++j) {
      const size_t c = pix(t, j) * kVecs + v, g = pix(t, j) * 3 * kVecs + 3 * v;
      r[j][0] = Load(a.x + c);
      r[j][1] = Load(a.lam + c);
      r[j][2] = Load(a.dh + c);
      r[j][3] = Load(a.h + c);
#pragma unroll
      for (int k = 0; k < 3; ++k) r[j][4 + k] = Load(a.w + g + k);
    }
  };
  uint32_t acc = 0;
  uint4 r[2][kP][7];
  issue(r[0], kW - 1);
  for (int t0 = kW - 1; t0 >= 0; t0 -= 2) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int t = t0 - s;
      if (t < 0) break;
      if (t > 0) issue(r[s ^ 1], t - 1);
#pragma unroll
      for (int j = 0; j < kP; ++j) {
        if (kPrefetch && t > 1) {
          const size_t c = pix(t - 2, j) * kVecs + v, g = pix(t - 2, j) * 3 * kVecs + 3 * v;
          for (const uint4* q : {a.x + c, a.lam + c, a.dh + c, a.h + c, a.w + g, a.w + g + 1,
                                 a.w + g + 2})
            asm volatile("prefetch.global.L2 [%0];" ::"l"(q));
        }
        const uint4* q = r[s][j];
        if constexpr (kStores) {
          const size_t c = pix(t, j) * kVecs + v, g = pix(t, j) * 3 * kVecs + 3 * v;
          a.dlam[c] = Mix(q[0], q[2]);
          a.dx[c] = Mix(q[1], q[2]);
#pragma unroll
          for (int k = 0; k < 3; ++k) a.dw[g + k] = Mix(q[4 + k], q[3]);
        } else {
#pragma unroll
          for (int k = 0; k < 7; ++k) acc ^= q[k].x ^ q[k].y ^ q[k].z ^ q[k].w;
        }
      }
      if constexpr (kCluster > 1 && !kSlack) {
        asm volatile("barrier.cluster.arrive.release.aligned;\n"
                     "barrier.cluster.wait.acquire.aligned;" ::: "memory");
      } else {
        __syncthreads();
        if constexpr (kCluster > 1) {  // wait for the previous line's phase, arrive for this one
          if (t < kW - 1) asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
          asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
        }
      }
    }
  }
  if constexpr (kCluster > 1 && kSlack)
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
  if (acc == 0x12345678u) out[0] = acc;  // keeps the loads of the reads-only rows alive
}

// The same pattern (one position per thread, bfloat16 or float32 layout), with the loads staged
// through shared memory by cp.async (kStages line slots per thread, each 7 x 16 bytes, laid out
// piece-major so that a warp's 16-byte accesses are contiguous) instead of a register set: what a
// kernel that frees those registers for a wider block would stream. Needs kStages * 7 * 16 bytes
// of dynamic shared memory per thread.
template <int kVecs, int kLanes, int kW, int kStages>
__global__ void __launch_bounds__(kLanes * kW) BwdPatternStaged(Arrays a, uint32_t* out) {
  extern __shared__ uint4 slots[];  // [kStages][7][threads]
  constexpr int kSlabs = kVecs / kLanes, kThreads = kLanes * kW;
  const int img = blockIdx.x / kSlabs, slab = blockIdx.x % kSlabs;
  const int pl = threadIdx.x / kLanes, vl = threadIdx.x % kLanes;
  const size_t v = size_t(slab) * kLanes + vl;
  auto pix = [&](int t) { return (size_t(img) * kW + t) * kW + pl; };
  auto slot = [&](int t, int k) {
    return slots + ((t % kStages) * 7 + k) * kThreads + threadIdx.x;
  };
  auto issue = [&](int t) {  // one commit group per line, empty past the first line
    if (t >= 0) {
      const size_t c = pix(t) * kVecs + v, g = pix(t) * 3 * kVecs + 3 * v;
      const uint4* src[7] = {a.x + c, a.lam + c, a.dh + c, a.h + c, a.w + g, a.w + g + 1,
                             a.w + g + 2};
#pragma unroll
      for (int k = 0; k < 7; ++k)
        asm volatile("cp.async.ca.shared.global.L2::256B [%0], [%1], 16;"
                     ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(slot(t, k)))),
                     "l"(src[k]) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(kW - 1 - i);
  for (int t = kW - 1; t >= 0; --t) {
    issue(t - (kStages - 1));
    asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 1) : "memory");  // line t's is in
    uint4 q[7];
#pragma unroll
    for (int k = 0; k < 7; ++k) q[k] = *slot(t, k);
    const size_t c = pix(t) * kVecs + v, g = pix(t) * 3 * kVecs + 3 * v;
    a.dlam[c] = Mix(q[0], q[2]);
    a.dx[c] = Mix(q[1], q[2]);
#pragma unroll
    for (int k = 0; k < 3; ++k) a.dw[g + k] = Mix(q[4 + k], q[3]);
    __syncthreads();
  }
  (void)out;  // the stores keep the loads alive
}

using Kernel = void (*)(Arrays, uint32_t*);
struct Row {
  const char* name;
  Kernel kernel;
  int vecs, lanes, width, p;
  bool stores;
  int cluster;
  int stages;  // BwdPatternStaged's line slots (their shared memory); 0: register staging
};
// A row of each kernel, its fields read off the template arguments.
template <int kVecs, int kLanes, int kW, int kP, bool kStores, bool kPrefetch, int kCluster = 1,
          bool kSlack = false>
Row Pattern(const char* name) {
  return {name, BwdPattern<kVecs, kLanes, kW, kP, kStores, kPrefetch, kCluster, kSlack>, kVecs,
          kLanes, kW, kP, kStores, kCluster, 0};
}
template <int kVecs, int kLanes, int kW, int kStages>
Row Staged(const char* name) {
  return {name, BwdPatternStaged<kVecs, kLanes, kW, kStages>, kVecs, kLanes, kW, 1, true, 1,
          kStages};
}

int main() {
  // 32 images of 64 x 64 (the same pixels as 8 of 128 x 128), float32's size: 1152 x 4 bytes.
  const size_t pixels = size_t(32) * 64 * 64, plane = pixels * 288 * 16;  // bytes of x
  char* mem;
  CHECK(cudaMalloc(&mem, 12 * plane));  // x, lam, dh, h, dlam, dx: 1 plane each; w, dw: 3
  CHECK(cudaMemset(mem, 1, 12 * plane));
  auto at = [&](int i) { return reinterpret_cast<uint4*>(mem + i * plane); };
  const Arrays arr{at(0), at(1), at(2), at(3), at(4), at(7), at(8), at(9)};
  uint32_t* out;
  CHECK(cudaMalloc(&out, 4));
  auto median_ms = [](auto&& launch) { return MedianMs(15, 3, [&](int) { launch(); }); };
  // Copy bandwidth (read + write) as the benchmark measures it: one device-to-device copy.
  const double copy_ms = median_ms([&] {
    CHECK(cudaMemcpyAsync(mem + 6 * plane, mem, 6 * plane, cudaMemcpyDeviceToDevice));
  });
  const double copy_bw = 2.0 * 6 * plane / (copy_ms * 1e-3);
  std::printf("copy: %.3f TB/s\n\n| pattern | blocks | threads | ms | GB moved | %% of copy |\n"
              "|---|---|---|---|---|---|\n", copy_bw / 1e12);

  // One block per multiprocessor, as the kernel's registers allow.
  const int kOneBlockPerSm = 120 * 1024;
  // The plans of the benchmark's G = C backwards (v16), then what else each shape could run.
  const Row rows[] = {
      Pattern<144, 4, 64, 1, true, true>("bf16 64x64, 4 lanes, P 1 (the plan), L2 prefetch"),
      Pattern<144, 4, 64, 1, true, false>("bf16 64x64, 4 lanes, P 1, no prefetch"),
      Pattern<144, 4, 64, 1, false, true>("bf16 64x64, 4 lanes, P 1, reads only"),
      Pattern<144, 8, 64, 1, true, true>("bf16 64x64, 8 lanes (128 B), P 1, prefetch"),
      Pattern<144, 8, 64, 2, true, true>("bf16 64x64, 8 lanes (128 B), P 2, prefetch"),
      Staged<144, 4, 64, 2>("bf16 64x64, 4 lanes, P 1, cp.async 2 stages"),
      Staged<144, 8, 64, 2>("bf16 64x64, 8 lanes (128 B), P 1, cp.async 2 stages"),
      Staged<144, 8, 64, 3>("bf16 64x64, 8 lanes (128 B), P 1, cp.async 3 stages"),
      Pattern<144, 4, 64, 1, true, true, 2>(
          "bf16 64x64, 4 lanes, P 1, prefetch, clusters of 2 in step"),
      Pattern<144, 4, 64, 1, true, true, 2, true>(
          "bf16 64x64, 4 lanes, P 1, prefetch, clusters of 2 within a line"),
      Pattern<144, 2, 128, 1, true, false>("bf16 128x128, 2 lanes, P 1 (the plan)"),
      Pattern<144, 2, 128, 1, false, false>("bf16 128x128, 2 lanes, P 1, reads only"),
      Pattern<144, 4, 128, 1, true, true>("bf16 128x128, 4 lanes (64 B), P 1, prefetch"),
      Pattern<144, 2, 128, 1, true, false, 4>("bf16 128x128, 2 lanes, P 1, clusters of 4 in step"),
      Pattern<144, 2, 128, 1, true, false, 4, true>(
          "bf16 128x128, 2 lanes, P 1, clusters of 4 within a line"),
      Pattern<144, 4, 128, 2, true, true>("bf16 128x128, 4 lanes (64 B), P 2, prefetch"),
      Staged<144, 4, 128, 2>("bf16 128x128, 4 lanes (64 B), P 1, cp.async 2 stages"),
      Pattern<288, 8, 64, 2, true, false>("f32 64x64, 8 lanes (128 B), P 2 (the plan)"),
      Pattern<288, 4, 64, 1, true, false>("f32 64x64, 4 lanes (64 B), P 1"),
      Pattern<288, 4, 128, 2, true, false>("f32 128x128, 4 lanes (64 B), P 2 (the plan)"),
      Pattern<288, 8, 128, 2, true, false>("f32 128x128, 8 lanes (128 B), P 2"),
      Pattern<288, 4, 128, 2, true, false, 2>("f32 128x128, 4 lanes, P 2, clusters of 2 in step"),
  };
  for (const Row& row : rows) {
    const int threads = row.lanes * row.width / row.p;
    const int smem = std::max(kOneBlockPerSm, row.stages * 7 * 16 * threads);
    CHECK(cudaFuncSetAttribute(row.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const int blocks = int(pixels / (size_t(row.width) * row.width)) * (row.vecs / row.lanes);
    const double ms = median_ms(
        [&] {
          cudaLaunchConfig_t cfg{};
          cfg.gridDim = dim3(blocks);
          cfg.blockDim = dim3(threads);
          cfg.dynamicSmemBytes = smem;
          cudaLaunchAttribute cluster{};
          cluster.id = cudaLaunchAttributeClusterDimension;
          cluster.val.clusterDim.x = row.cluster;
          cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
          cfg.attrs = &cluster;
          cfg.numAttrs = 1;
          CHECK(cudaLaunchKernelEx(&cfg, row.kernel, arr, out));
        });
    // Bytes per pixel and vector: 7 loads, and 5 stores when the row stores.
    const double moved = double(pixels) * row.vecs * 16 * (row.stores ? 12 : 7);
    std::printf("| %s | %d | %d | %.3f | %.2f | %.1f |\n", row.name, blocks, threads, ms,
                moved / 1e9, 100.0 * moved / (ms * 1e-3) / copy_bw);
  }
  return 0;
}
