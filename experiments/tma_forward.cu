// A forward of gspn_scan (top-to-bottom, normalised, 16-bit, one gate group per 8-channel vector)
// whose loads are tensor-memory-accelerator copies: per line, one producer thread copies the
// block's whole [W positions x S channels] box of x and of lam, and the box of the gates that
// cover those channels, into K shared-memory stages; the consumer warps scan from there. The
// question (docs/kernel_notes.md, "v20"): is the committed forward's rate on the 16-bit
// G = C / 16 cases (68% of copy at 8 x 1152 x 128 x 128) a limit of its per-thread register
// loads one line ahead, which K lines of whole-box copies in flight would lift?
// Results and what they say: docs/bench/tma_forward_h100.md, docs/kernel_notes.md ("v20").
// Standalone; on the GPU machine:
//   nvcc -O3 -std=c++17 --use_fast_math -arch=sm_90a -o /tmp/tmafwd experiments/tma_forward.cu && /tmp/tmafwd
// It checks every variant's h against a CPU loop (first image, all lines) before timing it, and
// times a device-to-device copy of the same bytes in the same run.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_check.h"

using bf16 = __nv_bfloat16;

__device__ __forceinline__ void MbarInit(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SmemAddr(bar)), "r"(count));
}
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(SmemAddr(bar)) : "memory");
}
__device__ __forceinline__ void MbarExpect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}
// Every thread of the cluster (the non-exited ones) arrives, then waits for all others.
__device__ __forceinline__ void ClusterSync() {
  asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}
// Box of a 3-D tensor map at (c0, c1, c2) into shared memory, completing on `bar`.
__device__ __forceinline__ void TmaLoad3d(void* dst, const CUtensorMap* map, int c0, int c1,
                                          int c2, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(SmemAddr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(SmemAddr(bar))
      : "memory");
}

struct Args {
  int B, H, W, C, G;
  int GB;        // gate elements per pixel in a box (a multiple of 8)
  int nslab;     // C / S
};

__host__ __device__ constexpr int Align128(int n) { return (n + 127) / 128 * 128; }

// Blocks: one per (image, slab of S channels); NCW consumer warps and one producer warp.
// Shared memory: K stages of {x [W][S], lam [W][S], gates [W][GB]} (bf16), the h tiles
// [2][W][S] (float, by line parity), K "full" and K "empty" mbarriers.
// kMode: 0 the forward; 1 the copies only (consumers wait for each stage and hand it back);
// 2 the copies of x and lam only (no gate box), as 1; 3 the arithmetic only (the producer
// arrives on the stages without copying: the consumers scan whatever the stages hold).
// kCluster > 0: blocks run in clusters of that many (neighbouring slabs of one image) that keep
// in lockstep: one cluster barrier per line, and line t + K is copied only once the whole
// cluster has finished line t, so that the cluster reads each line's pixels together.
// kLock = false: launched in clusters, but without the lockstep (co-scheduling only).
template <int S, int NCW, int K, int IPT, int kMode = 0, int kCluster = 0, bool kLock = true>
__global__ void __launch_bounds__(NCW * 32 + 32)
    TmaForward(const __grid_constant__ CUtensorMap xmap, const __grid_constant__ CUtensorMap lmap,
               const __grid_constant__ CUtensorMap gmap, bf16* __restrict__ h, const Args a) {
  constexpr int NV = S / 8, NCT = NCW * 32;
  extern __shared__ __align__(128) unsigned char smem[];
  const int W = a.W, Sg = a.C / a.G;
  const int xbytes = Align128(W * S * 2), gbytes = Align128(W * a.GB * 2);
  const int stage_bytes = 2 * xbytes + gbytes;
  float* tile = reinterpret_cast<float*>(smem + K * stage_bytes);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + K * stage_bytes + 2 * W * S * 4);
  uint64_t* empty = full + K;

  constexpr bool lock = kCluster > 0 && kLock;
  const int img = blockIdx.x / a.nslab, slab = blockIdx.x % a.nslab;
  const int c0 = slab * S;
  const int gfirst = (3 * (c0 / Sg)) & ~7;  // the gate box's first element (16-byte aligned)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < K; ++s) {
      MbarInit(&full[s], 1);
      MbarInit(&empty[s], NCW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  auto issue = [&](int t) {  // one thread: the copies of line t into stage t % K
    const int s = t % K;
    unsigned char* st = smem + s * stage_bytes;
    if (kMode == 3) {
      MbarArrive(&full[s]);
      return;
    }
    MbarExpect(&full[s], 2 * W * S * 2 + (kMode == 2 ? 0 : W * a.GB * 2));
    const int row = img * a.H + t;
    TmaLoad3d(st, &xmap, c0, 0, row, &full[s]);
    TmaLoad3d(st + xbytes, &lmap, c0, 0, row, &full[s]);
    if (kMode != 2) TmaLoad3d(st + 2 * xbytes, &gmap, gfirst, 0, row, &full[s]);
  };
  if (warp == NCW) {  // producer
    if (!lock) {
      if (lane == 0)
        for (int t = 0; t < a.H; ++t) {
          if (t >= K) MbarWait(&empty[t % K], ((t / K) - 1) & 1);
          issue(t);
        }
      return;
    }
    if (lane == 0)
      for (int t = 0; t < K && t < a.H; ++t) issue(t);
    for (int t = 0; t < a.H; ++t) {
      ClusterSync();  // the cluster finished line t
      if (lane == 0 && t + K < a.H) {
        MbarWait(&empty[t % K], (t / K) & 1);
        issue(t + K);
      }
      __syncwarp();
    }
    return;
  }

  // Consumers: item i = threadIdx.x + k * NCT is (position i / NV, vector i % NV), the same
  // items every line, so each thread keeps its own h of the previous line in registers.
  float hown[IPT][8];
#pragma unroll
  for (int k = 0; k < IPT; ++k)
#pragma unroll
    for (int i = 0; i < 8; ++i) hown[k][i] = 0.f;
  const int items = W * NV;
  for (int t = 0; t < a.H; ++t) {
    const int s = t % K;
    MbarWait(&full[s], (t / K) & 1);
    if (kMode == 1 || kMode == 2) {
      __syncwarp();
      if (lane == 0) MbarArrive(&empty[s]);
      if (lock)
        ClusterSync();
      else
        asm volatile("bar.sync 1, %0;" ::"r"(NCT) : "memory");
      continue;
    }
    const unsigned char* st = smem + s * stage_bytes;
    const bf16* xs = reinterpret_cast<const bf16*>(st);
    const bf16* ls = reinterpret_cast<const bf16*>(st + xbytes);
    const bf16* gs = reinterpret_cast<const bf16*>(st + 2 * xbytes);
    const float* prev = tile + ((t + 1) & 1) * W * S;
    float* now = tile + (t & 1) * W * S;
    float hv[IPT][8];
    int pk[IPT], vk[IPT];
#pragma unroll
    for (int k = 0; k < IPT; ++k) {
      const int it = threadIdx.x + k * NCT;
      pk[k] = it / NV;
      vk[k] = it % NV;
      if (it >= items) continue;
      const int p = pk[k], v = vk[k];
      const uint4 xr = *reinterpret_cast<const uint4*>(xs + p * S + v * 8);
      const uint4 lr = *reinterpret_cast<const uint4*>(ls + p * S + v * 8);
      const int ge = 3 * ((c0 + v * 8) / Sg) - gfirst;
      const bf16* gp = gs + p * a.GB + ge;
      float g[3] = {__bfloat162float(gp[0]), __bfloat162float(gp[1]), __bfloat162float(gp[2])};
      const bf16* xe = reinterpret_cast<const bf16*>(&xr);
      const bf16* le = reinterpret_cast<const bf16*>(&lr);
#pragma unroll
      for (int i = 0; i < 8; ++i) hv[k][i] = __bfloat162float(le[i]) * __bfloat162float(xe[i]);
      if (t > 0) {
        const bool has0 = p > 0, has2 = p + 1 < W;
        auto sig = [](float u) { return 1.f / (1.f + __expf(-fmaxf(u, -80.f))); };
        const float s0 = has0 ? sig(g[0]) : 0.f, s1 = sig(g[1]), s2 = has2 ? sig(g[2]) : 0.f;
        const float inv = 1.f / (s0 + s1 + s2);
        const float w0 = s0 * inv, w1 = s1 * inv, w2 = s2 * inv;
        float left[8], right[8];
        const float* lp = prev + (p - 1) * S + v * 8;
        const float* rp = prev + (p + 1) * S + v * 8;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const float4 l4 = has0 ? reinterpret_cast<const float4*>(lp)[q] : float4{};
          const float4 r4 = has2 ? reinterpret_cast<const float4*>(rp)[q] : float4{};
          left[4 * q] = l4.x; left[4 * q + 1] = l4.y; left[4 * q + 2] = l4.z; left[4 * q + 3] = l4.w;
          right[4 * q] = r4.x; right[4 * q + 1] = r4.y; right[4 * q + 2] = r4.z; right[4 * q + 3] = r4.w;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i)
          hv[k][i] += w0 * left[i] + w1 * hown[k][i] + w2 * right[i];
      }
    }
    // The stage is read: hand it back to the producer.
    __syncwarp();
    if (lane == 0) MbarArrive(&empty[s]);
#pragma unroll
    for (int k = 0; k < IPT; ++k) {
      const int it = threadIdx.x + k * NCT;
      if (it >= items) continue;
      const int p = pk[k], v = vk[k];
      uint4 o;
      uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __nv_bfloat162 two = __floats2bfloat162_rn(hv[k][2 * i], hv[k][2 * i + 1]);
        ow[i] = *reinterpret_cast<const uint32_t*>(&two);
      }
      const size_t pix = (size_t(img) * a.H + t) * W + p;
      *reinterpret_cast<uint4*>(h + pix * a.C + c0 + v * 8) = o;
      float4* nw = reinterpret_cast<float4*>(now + p * S + v * 8);
      nw[0] = make_float4(hv[k][0], hv[k][1], hv[k][2], hv[k][3]);
      nw[1] = make_float4(hv[k][4], hv[k][5], hv[k][6], hv[k][7]);
#pragma unroll
      for (int i = 0; i < 8; ++i) hown[k][i] = hv[k][i];
    }
    if (lock)
      ClusterSync();
    else
      asm volatile("bar.sync 1, %0;" ::"r"(NCT) : "memory");  // consumers only
  }
}

// ------------------------------------------------------------------ host

PFN_cuTensorMapEncodeTiled_v12000 EncodeFn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (!fn) {
    cudaDriverEntryPointQueryResult q;
    CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&fn), 12000,
                                  cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess) {
      std::printf("no cuTensorMapEncodeTiled\n");
      std::exit(1);
    }
  }
  return fn;
}

// [rows][W][inner] bf16 with box [1][W][box_inner].
CUtensorMap Map3d(const void* base, int inner, int W, int rows, int box_inner) {
  CUtensorMap m;
  const cuuint64_t dims[3] = {cuuint64_t(inner), cuuint64_t(W), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(inner) * 2, cuuint64_t(inner) * 2 * W};
  const cuuint32_t box[3] = {cuuint32_t(box_inner), cuuint32_t(W), 1};
  const cuuint32_t estr[3] = {1, 1, 1};
  const CUresult r = EncodeFn()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base),
                                dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::printf("cuTensorMapEncodeTiled failed (%d): inner %d W %d box %d\n", int(r), inner, W,
                box_inner);
    std::exit(1);
  }
  return m;
}

float Bf(bf16 v) { return __bfloat162float(v); }

// h of image 0 by a direct loop (float), as the reference does it.
std::vector<float> Reference(const std::vector<bf16>& x, const std::vector<bf16>& lam,
                             const std::vector<bf16>& w, int H, int W, int C, int G) {
  const int Sg = C / G;
  std::vector<float> h(size_t(H) * W * C), prev(size_t(W) * C, 0.f);
  for (int t = 0; t < H; ++t) {
    for (int p = 0; p < W; ++p)
      for (int c = 0; c < C; ++c) {
        const size_t e = (size_t(t) * W + p) * C + c;
        float v = Bf(lam[e]) * Bf(x[e]);
        if (t > 0) {
          const bf16* g = &w[((size_t(t) * W + p) * G + c / Sg) * 3];
          auto sig = [](float u) { return 1.f / (1.f + std::exp(-std::fmax(u, -80.f))); };
          const float s0 = p > 0 ? sig(Bf(g[0])) : 0.f, s1 = sig(Bf(g[1])),
                      s2 = p + 1 < W ? sig(Bf(g[2])) : 0.f;
          const float inv = 1.f / (s0 + s1 + s2);
          v += inv * ((p > 0 ? s0 * prev[(p - 1) * C + c] : 0.f) + s1 * prev[p * C + c] +
                      (p + 1 < W ? s2 * prev[(p + 1) * C + c] : 0.f));
        }
        h[e] = v;
      }
    std::copy(h.begin() + size_t(t) * W * C, h.begin() + size_t(t + 1) * W * C, prev.begin());
  }
  return h;
}

struct Case { int B, H, W, C, G; double v19_ms; };

template <int S, int NCW, int K, int IPT, int kMode = 0, int kCluster = 0, bool kLock = true>
void Run(const char* name, const Case& cs, const std::vector<bf16*>& in, bf16* h,
         const std::vector<float>& ref, double copy_tbs) {
  const int W = cs.W, C = cs.C, G = cs.G, Sg = C / G;
  // Gate elements of a slab: from its first group's, rounded down to 8, to its last group's end.
  int GB = 0;
  for (int c0 = 0; c0 < C; c0 += S) {
    const int first = (3 * (c0 / Sg)) & ~7, end = 3 * ((c0 + S - 1) / Sg) + 3;
    GB = std::max(GB, (end - first + 7) / 8 * 8);
  }
  if (W * (S / 8) > IPT * NCW * 32) {
    std::printf("%s: %d items, %d threads x %d\n", name, W * (S / 8), NCW * 32, IPT);
    return;
  }
  const Args a{cs.B, cs.H, W, C, G, GB, C / S};
  const int smem = K * (2 * Align128(W * S * 2) + Align128(W * GB * 2)) + 2 * W * S * 4 + 16 * K;
  auto kern = TmaForward<S, NCW, K, IPT, kMode, kCluster, kLock>;
  CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, NCW * 32 + 32, smem));
  const int blocks = cs.B * (C / S);
  // The launch configuration: in clusters of kCluster where asked.
  cudaLaunchAttribute cluster_attr;
  cluster_attr.id = cudaLaunchAttributeClusterDimension;
  cluster_attr.val.clusterDim.x = kCluster > 0 ? kCluster : 1;
  cluster_attr.val.clusterDim.y = cluster_attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(NCW * 32 + 32);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = &cluster_attr;
  cfg.numAttrs = kCluster > 0 ? 1 : 0;
  int resident = per_sm * 132;  // blocks resident at once (of clusters: whole clusters)
  if (kCluster > 0) {
    int clusters = 0;
    CHECK(cudaOccupancyMaxActiveClusters(&clusters, kern, &cfg));
    resident = clusters * kCluster;
  }
  const int rows = cs.B * cs.H;
  const size_t elems = size_t(rows) * W * C;
  auto launch = [&](int set) {
    const bf16* x = in[3 * set], *lam = in[3 * set + 1], *w = in[3 * set + 2];
    const CUtensorMap xm = Map3d(x, C, W, rows, S), lm = Map3d(lam, C, W, rows, S),
                      gm = Map3d(w, 3 * G, W, rows, GB);
    CHECK(cudaLaunchKernelEx(&cfg, kern, xm, lm, gm, h, a));
  };
  launch(0);
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaGetLastError());
  std::vector<bf16> got(size_t(cs.H) * W * C);
  CHECK(cudaMemcpy(got.data(), h, got.size() * 2, cudaMemcpyDeviceToHost));
  double err = 0;
  if (kMode == 0)
  for (size_t i = 0; i < got.size(); ++i)
    err = std::max(err, double(std::fabs(Bf(got[i]) - ref[i]) / (1.f + std::fabs(ref[i]))));
  const int nsets = int(in.size()) / 3;
  const double ms = MedianMs(20, 3, [&](int rep) { launch(rep % nsets); });
  const double floor_gb = (3.0 * elems + 3.0 * size_t(rows) * W * G) * 2 / 1e9;
  const double pct = floor_gb / ms / copy_tbs * 100;  // GB / ms = TB/s
  if (kMode != 0) {  // other bytes move: no percentage of the floor
    std::printf("| %dx%dx%dx%d G=%d | %s | %d | %d | %d | - | %.3f | - | |\n", cs.B, C, cs.H, W, G,
                name, blocks, resident, smem / 1024, ms);
    return;
  }
  std::printf("| %dx%dx%dx%d G=%d | %s | %d | %d | %d | %.2e | %.3f | %.1f | %.3f (%.1f) |\n",
              cs.B, C, cs.H, W, G, name, blocks, resident, smem / 1024, err, ms, pct, cs.v19_ms,
              floor_gb / cs.v19_ms / copy_tbs * 100);
}

int main() {
  const Case cases[] = {{8, 128, 128, 1152, 72, 0.468}, {32, 64, 64, 1152, 72, 0.370}};
  std::printf("| case | variant | blocks | resident blocks | smem KB | max rel err | ms | %% copy | "
              "v19 ms (%% copy) |\n|---|---|---|---|---|---|---|---|---|\n");
  for (const Case& cs : cases) {
    const size_t elems = size_t(cs.B) * cs.H * cs.W * cs.C, gel = size_t(cs.B) * cs.H * cs.W * cs.G * 3;
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    std::vector<bf16> x(elems), lam(elems), w(gel);
    for (auto& v : x) v = __float2bfloat16(nd(rng));
    for (auto& v : lam) v = __float2bfloat16(0.5f + 0.2f * nd(rng));
    for (auto& v : w) v = __float2bfloat16(2.f * nd(rng));
    // 4 input sets (the same values) so that L2 (50 MB) does not flatter the timings.
    std::vector<bf16*> in;
    for (int set = 0; set < 4; ++set)
      for (const auto* v : {&x, &lam, &w}) {
        bf16* d;
        CHECK(cudaMalloc(&d, v->size() * 2));
        CHECK(cudaMemcpy(d, v->data(), v->size() * 2, cudaMemcpyHostToDevice));
        in.push_back(d);
      }
    bf16* h;
    CHECK(cudaMalloc(&h, elems * 2));
    const std::vector<float> ref = Reference(x, lam, w, cs.H, cs.W, cs.C, cs.G);
    // Copy bandwidth of the same run: read + write of x's bytes.
    const double copy_ms = MedianMs(20, 3, [&](int rep) {
      CHECK(cudaMemcpyAsync(h, in[3 * (rep % 4)], elems * 2, cudaMemcpyDeviceToDevice));
    });
    const double copy_tbs = 2.0 * elems * 2 / copy_ms * 1e-9;
    std::printf("| %dx%dx%dx%d | copy | | | | | %.3f | %.2f TB/s | |\n", cs.B, cs.C, cs.H, cs.W,
                copy_ms, copy_tbs);
    if (cs.W == 128) {
      Run<72, 12, 2, 3>("S72 384t K2", cs, in, h, ref, copy_tbs);
      Run<72, 12, 2, 3, 0, 2>("S72 384t K2, cluster 2", cs, in, h, ref, copy_tbs);
      Run<72, 12, 2, 3, 0, 2, false>("S72 384t K2, cluster 2, no lockstep", cs, in, h, ref, copy_tbs);
      Run<48, 6, 2, 4, 0, 8>("S48 192t K2, cluster 8", cs, in, h, ref, copy_tbs);
      Run<48, 6, 2, 4, 0, 8, false>("S48 192t K2, cluster 8, no lockstep", cs, in, h, ref, copy_tbs);
      Run<48, 6, 2, 4, 0, 2>("S48 192t K2, cluster 2", cs, in, h, ref, copy_tbs);
      Run<48, 6, 2, 4, 0, 2, false>("S48 192t K2, cluster 2, no lockstep", cs, in, h, ref, copy_tbs);
      Run<48, 6, 2, 4>("S48 192t K2", cs, in, h, ref, copy_tbs);
      Run<48, 8, 2, 3, 0, 8>("S48 256t K2, cluster 8", cs, in, h, ref, copy_tbs);
      Run<48, 6, 2, 4, 1, 8>("S48 192t K2, copies only, cluster 8", cs, in, h, ref, copy_tbs);
      Run<48, 6, 2, 4, 3, 8>("S48 192t K2, arithmetic only, cluster 8", cs, in, h, ref, copy_tbs);
    } else {
      Run<144, 12, 2, 3>("S144 384t K2", cs, in, h, ref, copy_tbs);
      Run<144, 12, 2, 3, 0, 2>("S144 384t K2, cluster 2", cs, in, h, ref, copy_tbs);
      Run<144, 12, 2, 3, 0, 2, false>("S144 384t K2, cluster 2, no lockstep", cs, in, h, ref, copy_tbs);
      Run<144, 12, 2, 3, 1>("S144 384t K2, copies only", cs, in, h, ref, copy_tbs);
      Run<144, 12, 2, 3, 3>("S144 384t K2, arithmetic only", cs, in, h, ref, copy_tbs);
      Run<72, 6, 2, 3, 0, 2>("S72 192t K2, cluster 2", cs, in, h, ref, copy_tbs);
      Run<72, 6, 2, 3, 0, 2, false>("S72 192t K2, cluster 2, no lockstep", cs, in, h, ref, copy_tbs);
    }
    for (bf16* d : in) CHECK(cudaFree(d));
    CHECK(cudaFree(h));
  }
  return 0;
}
