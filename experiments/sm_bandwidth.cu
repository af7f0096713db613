// How many bytes a second one SM pulls from DRAM, and how long a line of the forward takes, when
// 1, 36 (a partial last wave), 132 (one block per SM) or more blocks run: the questions behind
// the kernel's partial-wave cost (docs/kernel_notes.md, v7). Standalone; on the GPU machine:
//   nvcc -O3 -std=c++17 --use_fast_math -arch=sm_90 -o /tmp/smbw experiments/sm_bandwidth.cu && /tmp/smbw
// Rows:
//   ldg      - a contiguous stream, 512 threads loading 80 bytes each per line, one line ahead
//              into registers, one barrier per line (the kernel's loop without its arithmetic);
//   bulk5120 - the same lines through cp.async.bulk copies of 5 KB into 3 shared-memory stages,
//              issued by a producer warp (copies of 1 KB or less ran 3-50x slower: each bulk copy
//              costs ~30 ns to issue, so per-pixel copies of a 64-byte slab are out of the question);
//   model    - the forward's own addressing and arithmetic (LineModel below), with and without
//              the L2::256B prefetch hint, without the arithmetic, with the L2 prefetch of the
//              line two ahead, and with 3-lane slabs (equal, lighter waves: 2.91 instead of
//              2.18 at 128 x 128).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda_check.h"

constexpr int kThreads = 512;
constexpr int kPieces = 5;  // 16-byte pieces per thread and line
constexpr int kLineBytes = kThreads * kPieces * 16;
constexpr int kStages = 3;

// The plain stream: each thread loads its 5 x 16 bytes of a contiguous line one line ahead into
// registers.
__global__ void __launch_bounds__(kThreads) LdgStream(const uint4* in, int lines, uint32_t* out) {
  const uint4* base = in + size_t(blockIdx.x) * lines * (kLineBytes / 16);
  auto load = [&](uint4 (&r)[kPieces], int t) {
#pragma unroll
    for (int k = 0; k < kPieces; ++k)
      r[k] = __ldg(base + size_t(t) * (kLineBytes / 16) + k * kThreads + threadIdx.x);
  };
  uint32_t acc = 0;
  uint4 r[2][kPieces];
  load(r[0], 0);
  for (int t0 = 0; t0 < lines; t0 += 2) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int t = t0 + s;
      if (t >= lines) break;
      if (t + 1 < lines) load(r[s ^ 1], t + 1);
#pragma unroll
      for (int k = 0; k < kPieces; ++k) acc ^= r[s][k].x ^ r[s][k].y ^ r[s][k].z ^ r[s][k].w;
      __syncthreads();
    }
  }
  if (acc == 0x12345678u) out[0] = acc;  // keeps the loads alive
}

// A model of the forward's line loop, bf16, C = 1152, G = C: blocks of kLanes lanes of 16 bytes
// across channels by kW positions (a kW x kW image); block b reads slab b % nslab of image
// b / nslab, as the kernel does; per thread and line 5 x 16 bytes of x, lam and gates, loaded
// one line ahead into registers, then the forward's arithmetic (8 groups of gate normalisation
// and the 3-neighbour update) and the 16-byte h store.
// kHint: loads carry the L2::256B prefetch hint (one DRAM access fetches 256 bytes around the
// slab, so the blocks of the neighbouring slabs hit in L2). kPrefetch: line t + 2 is also
// prefetched into L2 at the top of line t (the kernel's 16-bit path since v8).
template <int kLanes, int kW, bool kHint, bool kWork, bool kPrefetch = false>
__global__ void __launch_bounds__(kThreads)
    LineModel(const uint4* in, uint4* hout, int images, uint32_t* out) {
  constexpr int W = kW, kSlabs = 144 / kLanes;
  constexpr size_t kPix = 144, kRow = W * kPix, kImage = W * kRow;  // 16-byte units
  const int img = blockIdx.x / kSlabs, slab = blockIdx.x % kSlabs;
  const int pos = threadIdx.x / kLanes, vl = threadIdx.x % kLanes;
  const size_t own = pos * kPix + slab * kLanes + vl;
  const uint4* x = in + img * kImage + own;
  const uint4* lam = in + (images + img) * kImage + own;
  const uint4* gates = in + 2 * images * kImage + 3 * (img * kImage + own);
  auto ld = [](const uint4* p) {
    uint4 v;
    if constexpr (kHint)
      asm volatile("ld.global.nc.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    else
      v = __ldg(p);
    return v;
  };
  auto issue = [&](uint4 (&r)[kPieces], int t) {
    const size_t row = size_t(t) * kRow;
    r[0] = ld(x + row);
    r[1] = ld(lam + row);
#pragma unroll
    for (int k = 0; k < 3; ++k) r[2 + k] = ld(gates + 3 * row + k);
  };
  float hprev[8] = {};
  uint32_t acc = 0;
  uint4 r[2][kPieces];
  issue(r[0], 0);
  for (int t0 = 0; t0 < W; t0 += 2) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int t = t0 + s;
      if (t + 1 < W) issue(r[s ^ 1], t + 1);
      if (kPrefetch && t + 2 < W) {
        const size_t row = size_t(t + 2) * kRow;
        for (const uint4* p : {x + row, lam + row, gates + 3 * row, gates + 3 * row + 1,
                               gates + 3 * row + 2})
          asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
      }
      const uint4* v = r[s];
      if constexpr (kWork) {
        auto lo = [](uint32_t u) { return __uint_as_float(u << 16); };
        auto hi = [](uint32_t u) { return __uint_as_float(u & 0xffff0000u); };
        const uint32_t* w = reinterpret_cast<const uint32_t*>(v);
        float h[8];
#pragma unroll
        for (int g = 0; g < 8; ++g) {
          const uint32_t xw = w[g / 2], lw = w[4 + g / 2];
          const float xv = g % 2 ? hi(xw) : lo(xw), lv = g % 2 ? hi(lw) : lo(lw);
          float sg[3];
#pragma unroll
          for (int k = 0; k < 3; ++k) {  // the kernel's form: 3 x (ex2 + rcp) + rcp
            const uint32_t gw = w[8 + (3 * g + k) / 2];
            sg[k] = 1.f / (1.f + __expf(-fmaxf((3 * g + k) % 2 ? hi(gw) : lo(gw), -80.f)));
          }
          const float inv = 1.f / (sg[0] + sg[1] + sg[2]);
          h[g] = lv * xv + inv * (sg[0] * hprev[(g + 7) % 8] + sg[1] * hprev[g] +
                                  sg[2] * hprev[(g + 1) % 8]);
        }
        uint32_t o[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          o[i] = (__float_as_uint(h[2 * i]) >> 16) | (__float_as_uint(h[2 * i + 1]) & 0xffff0000u);
          hprev[2 * i] = h[2 * i];
          hprev[2 * i + 1] = h[2 * i + 1];
        }
        hout[img * kImage + size_t(t) * kRow + own] = make_uint4(o[0], o[1], o[2], o[3]);
      } else {
#pragma unroll
        for (int k = 0; k < kPieces; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
      }
      __syncthreads();
    }
  }
  if (acc == 0x12345678u) out[0] = acc;  // keeps the loads alive
}

// Warp kThreads / 32 is the producer; warps 0 .. 15 consume.
__global__ void __launch_bounds__(kThreads + 32)
    BulkStream(const char* in, int lines, int piece, uint32_t* out) {
  extern __shared__ __align__(128) char smem[];
  __shared__ __align__(8) uint64_t full[kStages];
  const char* base = in + size_t(blockIdx.x) * lines * kLineBytes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0)
    for (int s = 0; s < kStages; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(SmemAddr(&full[s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();

  auto issue = [&](int t) {  // producer warp only
    const int s = t % kStages;
    const uint32_t bar = SmemAddr(&full[s]);
    if (lane == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
                   "r"(kLineBytes)
                   : "memory");
    const char* src = base + size_t(t) * kLineBytes;
    char* dst = smem + s * kLineBytes;
    // The last piece of a line is cut to what is left (a piece size need not divide the line).
    for (int off = lane * piece; off < kLineBytes; off += 32 * piece)
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
          "[%3];" ::"r"(SmemAddr(dst + off)),
          "l"(src + off), "r"(min(piece, kLineBytes - off)), "r"(bar)
          : "memory");
  };
  if (warp == kThreads / 32)
    for (int t = 0; t < kStages - 1 && t < lines; ++t) issue(t);

  uint32_t acc = 0;
  for (int t = 0; t < lines; ++t) {
    if (warp == kThreads / 32) {
      // Stage (t + K - 1) % K was read by line t - 1, which every thread finished (barrier).
      if (t + kStages - 1 < lines) issue(t + kStages - 1);
    } else {
      const int s = t % kStages;
      MbarWait(&full[s], (t / kStages) & 1);
      const uint4* line = reinterpret_cast<const uint4*>(smem + s * kLineBytes);
#pragma unroll
      for (int k = 0; k < kPieces; ++k) {
        uint4 v = line[k * kThreads + threadIdx.x];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
      }
    }
    __syncthreads();
  }
  if (acc == 0x12345678u) out[0] = acc;
}

int main() {
  int lines = 128;
  const int max_blocks = 132 * 4;
  const size_t per_block = size_t(lines) * kLineBytes;
  const int nbuf = 4;  // rotate buffers so that L2 (50 MB) never holds a block's data
  // The line model: 5 arrays' worth (x, lam, 3 gates) of 8 images of 128 x 128 x 1152 bf16.
  const size_t bytes = std::max(per_block * max_blocks, size_t(8) * 5 * 128 * 128 * 2304);
  std::vector<char*> bufs(nbuf);
  for (auto& b : bufs) {
    CHECK(cudaMalloc(&b, bytes));
    CHECK(cudaMemset(b, 1, bytes));
  }
  uint32_t* out;
  CHECK(cudaMalloc(&out, 4));
  const int smem = kStages * kLineBytes;
  CHECK(cudaFuncSetAttribute(BulkStream, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));

  uint4* hout;
  CHECK(cudaMalloc(&hout, bytes / 5));
  // Rows of the plain streams, then of the line model; kind: 0 = ldg, 1 = bulk, 2 = model.
  using Model = void (*)(const uint4*, uint4*, int, uint32_t*);
  struct Path { const char* name; int kind; int piece; Model model; int lanes, width; };
  const Path paths[] = {
      {"ldg", 0, 0, nullptr, 0, 0},
      {"bulk5120", 1, 5120, nullptr, 0, 0},
      {"model 64B slabs (128x128)", 2, 0, LineModel<4, 128, false, true>, 4, 128},
      {"model 64B slabs, L2::256B", 2, 0, LineModel<4, 128, true, true>, 4, 128},
      {"model 128B slabs (64x64)", 2, 0, LineModel<8, 64, false, true>, 8, 64},
      {"model 128B slabs, L2::256B", 2, 0, LineModel<8, 64, true, true>, 8, 64},
      {"model 64B slabs, no work", 2, 0, LineModel<4, 128, false, false>, 4, 128},
      {"model 64B slabs, L2::256B, no work", 2, 0, LineModel<4, 128, true, false>, 4, 128},
      // 128x128 again with 3-lane slabs (384 threads): 384 blocks, 2.91 waves of 75% fill
      // instead of 288 blocks in 2.18 waves (two full, one of 18%). Whether equal, lighter
      // waves beat full ones and a near-empty last one (docs/kernel_notes.md, next steps).
      {"model 48B slabs (128x128), L2::256B", 2, 0, LineModel<3, 128, true, true>, 3, 128},
      {"model 64B slabs, L2::256B, prefetch 2 ahead", 2, 0,
       LineModel<4, 128, true, true, true>, 4, 128},
      {"model 48B slabs, L2::256B, prefetch 2 ahead", 2, 0,
       LineModel<3, 128, true, true, true>, 3, 128},
  };
  std::printf("| path | blocks | ms | us per line | GB/s total | GB/s per busy SM |\n"
              "|---|---|---|---|---|---|\n");
  // Unused shared memory that keeps the models at one block per SM, as the kernel's registers do.
  const int kOneBlockPerSm = 120 * 1024;
  const int images = 8;  // of the models: the whole problem is images x (144 / lanes) blocks
  for (const Path& path : paths) {
    const bool model = path.kind == 2;
    if (model)
      CHECK(cudaFuncSetAttribute(path.model, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 kOneBlockPerSm));
    const int threads = model ? path.lanes * path.width : kThreads;
    const int n = model ? path.width : lines;  // lines per block
    const int all = model ? images * (144 / path.lanes) : 264;
    for (int blocks : {1, 36, 132, all}) {
      const double t = 1e-3 * MedianMs(12, 2, [&](int rep) {
        const char* buf = bufs[rep % nbuf];
        const uint4* b4 = reinterpret_cast<const uint4*>(buf);
        if (path.kind == 0)
          LdgStream<<<blocks, kThreads>>>(b4, lines, out);
        else if (path.kind == 1)
          BulkStream<<<blocks, kThreads + 32, smem>>>(buf, lines, path.piece, out);
        else
          path.model<<<blocks, threads, kOneBlockPerSm>>>(b4, hout, images, out);
      });
      const double total = double(n) * threads * kPieces * 16 * blocks / t / 1e9;
      std::printf("| %s | %d | %.3f | %.2f | %.0f | %.1f |\n", path.name, blocks, t * 1e3,
                  t * 1e6 / n / ((blocks + 131) / 132), total, total / std::min(blocks, 132));
    }
  }
  return 0;
}
