// The CUDA kernels of gspn_scan (device code): their design, and the parts the forward
// (gspn_cuda_forward.cuh) and the backward (gspn_cuda_backward.cuh) share: storage packs, the
// L2 prefetch, the gate normalisation, the launch parameters, the mbarriers. Part of
// gspn_cuda.cu's translation unit, which holds the launch plans and the FFI handlers.
//
// Layout of the work. A thread block owns whole lines: for one image b and one slab of Cs
// consecutive channels it scans all T lines of a direction, and on each line all L positions.
// Threads are laid out as Vs "vector lanes" (fastest) by Pt "position lanes"; a thread owns one
// vector of V consecutive channels (16 bytes: 4 float32 or 8 bfloat16/float16; half of one, 4
// channels of 8 bytes, for 16-bit types where the plan asks: HalfVector in gspn_cuda.cu; or a
// single channel on the scalar path) at P positions p = pl, pl + Pt, ... of every line. Because
// the arrays are channels-last, the lanes of a warp read consecutive 16-byte pieces of each pixel:
// every load and store is coalesced whatever the direction; a direction is only a base offset
// and two strides (cgspn::LineGeometry), nothing is ever transposed in memory.
//
// Neighbour exchange. The state of line t-1 lives in registers (each thread keeps its own
// positions) and in a double-buffered shared-memory copy of the whole line tile, from which a
// thread reads positions p - 1 and p + 1. Mbarriers between neighbouring warps order it
// (NeighbourSync); a __syncthreads per line where a knob or the kernel instance asks for it.
//
// Latency. x, lam and the gates (and, in the backward, dh, the saved h and the running dx sum)
// of line t + 1 do not depend on the scan, so their loads are issued at the top of line t and
// held as raw bits in registers until line t + 1 uses them; converting them earlier would make
// the thread wait for them at the end of line t. (The backward's 16-bit G = C half-vector
// instances stage them in shared memory instead, by cp.async: BwdStaged.) Where the
// launch plan asks, those of line t + 2 are prefetched into L2 at the same time (no registers),
// so that the register loads wait for L2, not DRAM.
//
// Gates. Channel c uses group c / S (S = C / G). When S < V a vector spans NG = V / S groups
// whose 3 * NG gates are contiguous; otherwise the whole vector uses one group's 3 gates. The
// sigmoid normalisation is computed in registers (forward and backward); weights never reach
// device memory.
//
// Backward. One reverse scan per direction. The adjoint z_t needs a_{t+1} z_{t+1} at p-1, p,
// p+1: each thread publishes u0 = a_0 z and u2 = a_2 z of its positions in shared memory. The
// gate gradient of line t+1 needs h_t at p-1, p, p+1 (from the saved forward output), exchanged
// the same way, so it is formed one line late, after the same barrier (16-bit types with several
// groups per vector instead form line t's in line t: BwdSameLineDw). Its reduction over the
// channels of a group runs over the vector, then over the S / V lanes of the group by warp
// shuffles (butterfly: a fixed order, so deterministic). dx sums the D directions: the block
// (b, slab) runs the directions one after the other and carries the running float32 sum through
// memory it alone touches (dx itself for float32, a scratch buffer otherwise), in a fixed order,
// so no floating-point atomics and bitwise-deterministic results.
//
// Group sizes whose lane count is not a power of two dividing 32 (e.g. C / G = 72 with float32
// vectors of 4) cannot finish the group reduction inside a warp: the kernel then writes per-warp
// partial sums to a scratch buffer and a second small launch adds them in a fixed order and
// applies the normalisation's chain rule. The common cases (G = C, G = C / 16, ...) never take it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gspn.h"

namespace cgspn {
namespace {

// Threads per block (__launch_bounds__): the forward holds less state per thread, so it may use
// 512 threads (<= 128 registers); the backward keeps <= 256 so that it may use up to 255
// registers without spilling. With at most 8 positions per thread, these bound the line length.
// (Instances that hold fewer registers take larger blocks: kFwdMaxThreads, BwdMaxThreads.)
constexpr int kFwdThreads = 512;
constexpr int kBwdThreads = 256;
constexpr int kMaxPositions = 8;
static_assert(kFwdThreads * kMaxPositions >= kCudaMaxLineLength &&
                  kBwdThreads * kMaxPositions >= kCudaMaxLineLength,
              "the launch plans must cover the line length build_info() promises");

// ------------------------------------------------------------------ storage <-> float32

template <typename T> __device__ __forceinline__ float ToF(T v);
template <> __device__ __forceinline__ float ToF<float>(float v) { return v; }
template <> __device__ __forceinline__ float ToF<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float ToF<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T FromF(float v);
template <> __device__ __forceinline__ float FromF<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half FromF<__half>(float v) { return __float2half_rn(v); }

// The register type that holds kBytes of raw storage (one load or store instruction).
template <int kBytes> struct Raw;
template <> struct Raw<2> { using type = unsigned short; };
template <> struct Raw<4> { using type = unsigned int; };
template <> struct Raw<8> { using type = uint2; };
template <> struct Raw<16> { using type = uint4; };

// N elements of T as raw bits: loaded by one instruction, converted only where used.
template <typename T, int N>
struct Pack {
  using R = typename Raw<N * sizeof(T)>::type;
  R r;
  // Read-only loads that ask L2 to fetch the 256 bytes around the address from DRAM. A block
  // reads only its slab of each pixel (64 bytes at 128 x 128 bfloat16); the blocks of the
  // neighbouring slabs, which run at the same time, then find theirs in L2, and DRAM serves
  // fewer, longer bursts. (Measured on a model of the forward, experiments/sm_bandwidth.cu:
  // +4-7% at 64-byte slabs, neutral at 128; in the kernel +1-4% at 128 x 128; docs/kernel_notes.md,
  // v7.)
  __device__ __forceinline__ void Load(const T* p) {
    if constexpr (sizeof(R) == 16) {
      asm("ld.global.nc.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
          : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
          : "l"(p));
    } else if constexpr (sizeof(R) == 8) {
      asm("ld.global.nc.L2::256B.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    } else if constexpr (sizeof(R) == 4) {
      asm("ld.global.nc.L2::256B.u32 %0, [%1];" : "=r"(r) : "l"(p));
    } else {
      asm("ld.global.nc.L2::256B.u16 %0, [%1];" : "=h"(r) : "l"(p));
    }
  }
  __device__ __forceinline__ void Unpack(float* out) const {
    if constexpr (std::is_same_v<T, __nv_bfloat16> && N % 2 == 0) {
      // A bfloat16 is the top half of its float32: a word's two are one shift and one mask.
      // (Converted one by one, the high half took an extract and a shift: 12 instructions
      // where 8 do for 8 values, ~5% of the TMA backward's a line; v39.)
      unsigned w[N / 2];
      memcpy(w, &r, sizeof(R));
#pragma unroll
      for (int i = 0; i < N / 2; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      }
    } else {
      T e[N];
      memcpy(e, &r, sizeof(R));
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = ToF<T>(e[i]);
    }
  }
  // One store instruction of the whole pack. (A plain `*reinterpret_cast<R*>(p) = r` let NVVM
  // split the copy into N scalar stores: the forward's h and the backward's dx and dlam went out
  // as 4-byte pieces, 4 store instructions and L2 requests per 16 bytes instead of 1.)
  __device__ __forceinline__ static void Store(T* p, const float* in) {
    T e[N];
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = FromF<T>(in[i]);
    R r;
    memcpy(&r, e, sizeof(R));
    if constexpr (sizeof(R) == 16) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(r.x), "r"(r.y),
                   "r"(r.z), "r"(r.w)
                   : "memory");
    } else if constexpr (sizeof(R) == 8) {
      asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(r.x), "r"(r.y) : "memory");
    } else {
      *reinterpret_cast<R*>(p) = r;
    }
  }
};

// The 3 * NG gates that one vector uses at one pixel (3 * NG consecutive elements: group-major,
// neighbour-minor), as raw bits: three packs of NG. kPair (NG = 1, on the vector path, whose
// buffers are 16-byte aligned): two loads instead of three. Group n's gates start at element 3n,
// so the pair of elements from 3n + (n & 1) is aligned to two elements, and the one left is
// 3n + 2 or 3n; nothing past the group's 3 elements is read. Where it is used, by measurement
// (H100, docs/kernel_notes.md, v19): the 16-bit forward with whole vectors, where 32 x 1152 x 64 x
// 64 bfloat16 G = 72 ran 2-3% faster. Elsewhere it moved nothing or cost 1-2% (half vectors at
// 128 x 128, the backward).
template <typename T, int NG, bool kPair>
struct GatePack {
  Pack<T, NG> g[3];
  // op(pack, its address) for each load (Load, and the L2 prefetch, use it).
  template <typename F>
  __device__ __forceinline__ void ForLoads(const T* p, F&& op) {
#pragma unroll
    for (int k = 0; k < 3; ++k) op(g[k], p + k * NG);
  }
  __device__ __forceinline__ void Unpack(float* out) const {
#pragma unroll
    for (int k = 0; k < 3; ++k) g[k].Unpack(out + k * NG);
  }
};
template <typename T>
struct GatePack<T, 1, true> {
  Pack<T, 2> pair;
  Pack<T, 1> single;
  bool odd;  // group index n odd: the pair holds gates 1, 2 (else 0, 1)
  template <typename F>
  __device__ __forceinline__ void ForLoads(const T* p, F&& op) {
    // 3n and n have the same parity; the buffer starts 16-byte aligned.
    odd = (reinterpret_cast<uintptr_t>(p) / sizeof(T)) & 1;
    op(pair, p + odd);
    op(single, p + (odd ? 0 : 2));
  }
  __device__ __forceinline__ void Unpack(float* out) const {
    float two[2], one;
    pair.Unpack(two);
    single.Unpack(&one);
    out[0] = odd ? one : two[0];
    out[1] = odd ? two[0] : two[1];
    out[2] = odd ? two[1] : one;
  }
};

// Copies N (4, 8 or 16) bytes from global to shared memory asynchronously (cp.async, with the
// L2::256B hint of Pack::Load, allocating in L1 as Pack::Load does: the same-line form's loads of
// h at p -/+ 1 count on finding there what the neighbouring threads fetched); CopyCommit closes
// the copies a thread issued since its last commit into a group, CopyWait<N> waits until at most
// N of its groups are pending.
template <int N>
__device__ __forceinline__ void CopyAsync(void* smem_dst, const void* src) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
  asm volatile("cp.async.ca.shared.global.L2::256B [%0], [%1], %2;"
               ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem_dst))), "l"(src), "n"(N)
               : "memory");
}
__device__ __forceinline__ void CopyCommit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CopyWait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Asks L2 to fetch the sector at p from DRAM, holding no register: the lines two ahead are
// requested this way, so that the register loads one line ahead find them in L2.
__device__ __forceinline__ void PrefetchL2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
// Where it pays (measured on the H100, docs/kernel_notes.md, v8, v9 and v13): the float32
// forward lost 3-140% (the prefetches add requests where full waves are bound by bandwidth),
// so it is not compiled in; the 16-bit forward gained 5-18% in v8, but since v10's neighbour
// synchronisation only where a thread has few bytes in flight (one gate group per vector,
// 128-byte slabs), so the launch plan switches it (Launch::prefetch). The backward is compiled
// both ways (kPrefetch) and the launch plan chooses: it pays for 16-bit types and for float32
// with several channels per gate group, except with narrow slabs (MakePlan has the rules).
// Prefetching further ahead (3, 4, 6 lines) or from every 2nd or 4th lane only was measured
// too: never better, up to 1.5x slower at 6 lines (v9).
template <typename T>
constexpr bool kPrefetchL2 = sizeof(T) == 2;

// V float32 values in shared or global memory (16-byte pieces where V allows).
template <int V>
__device__ __forceinline__ void LoadF(const float* p, float* out) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      float4 v = *reinterpret_cast<const float4*>(p + i);
      out[i] = v.x; out[i + 1] = v.y; out[i + 2] = v.z; out[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = p[i];
  }
}
template <int V>
__device__ __forceinline__ void StoreF(float* p, const float* in) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4)
      *reinterpret_cast<float4*>(p + i) = make_float4(in[i], in[i + 1], in[i + 2], in[i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = in[i];
  }
}

// ------------------------------------------------------------------ gates

// The clamp keeps exp finite so that the normalising sum never underflows to 0 (which would turn
// three very negative logits into 0/0); it only changes gates below -80, where sigmoid < 2e-35.
__device__ __forceinline__ float Sigmoid(float v) {
  return 1.f / (1.f + __expf(-fmaxf(v, -80.f)));
}

// Weights a[k] of one (position, group) from its gates, and for the backward the factors
// c[k] = s_k (1 - s_k) / sum(s) of the normalisation's chain rule. has0 / has2: whether
// neighbours 0 / 2 lie inside the line. (A form with 3 exponentials and 1 reciprocal instead of
// 3 + 4 was measured in v5: no faster forward, and spills in the 16-bit backward.)
__device__ __forceinline__ void Weights(const float* g, bool has0, bool has2, bool normalize,
                                        float* a, float* c) {
  if (normalize) {
    float s0 = has0 ? Sigmoid(g[0]) : 0.f, s1 = Sigmoid(g[1]), s2 = has2 ? Sigmoid(g[2]) : 0.f;
    float inv = 1.f / (s0 + s1 + s2);
    a[0] = s0 * inv; a[1] = s1 * inv; a[2] = s2 * inv;
    // Below the clamp the weights do not depend on the logit: its gradient is 0 there.
    c[0] = g[0] >= -80.f ? s0 * (1.f - s0) * inv : 0.f;
    c[1] = g[1] >= -80.f ? s1 * (1.f - s1) * inv : 0.f;
    c[2] = g[2] >= -80.f ? s2 * (1.f - s2) * inv : 0.f;
  } else {
    a[0] = has0 ? g[0] : 0.f; a[1] = g[1]; a[2] = has2 ? g[2] : 0.f;
    c[0] = c[1] = c[2] = 0.f;  // unused: dw = da
  }
}

// Gate gradient from the weight gradient da (da[k] = 0 for invalid k).
__device__ __forceinline__ void GateGrad(const float* da, const float* a, const float* c,
                                         bool normalize, float* dw) {
  if (normalize) {
    float dot = a[0] * da[0] + a[1] * da[1] + a[2] * da[2];
#pragma unroll
    for (int k = 0; k < 3; ++k) dw[k] = c[k] * (da[k] - dot);
  } else {
#pragma unroll
    for (int k = 0; k < 3; ++k) dw[k] = da[k];
  }
}

// ------------------------------------------------------------------ launch parameters

struct Launch {
  int64_t B, H, W, C, G, S;  // S = C / G channels per group
  int D;
  int dir_bits;              // 2 bits per direction, direction d at bits 2d
  __host__ __device__ int Direction(int d) const { return (dir_bits >> (2 * d)) & 3; }
  int64_t chunk;             // 0 = global
  bool normalize;
  int Vs;                    // vector lanes per block (a multiple of nsub)
  int Pt;                    // position lanes per block
  int nslab;                 // channel slabs: ceil(C / (Vs * V))
  int Lmax;                  // longest line over the call's directions (rows of the smem tiles)
  int nsub;                  // lanes reduced by shuffles for one group: power of 2, <= 32
  int npart;                 // (S / V) / nsub partial gate sums per group (1: finished in-kernel)
  bool neighbour_sync;       // warps wait for their neighbours, not the block (NeighbourSync)
  bool prefetch;             // the L2 prefetch, as the plan chose it: read by the forward (16-bit
                             // types); the backward's is its instance (kPrefetch)
  // The tail split (SlabOfBlock): the slabs from this one on are scanned by tail_k blocks each,
  // of Vs / tail_k lanes. tail_start = the number of slabs (over images and directions): none.
  int64_t tail_start;
  int tail_k;
};

// The slab of one block. A block scans one slab of one image (and, in the forward, one
// direction) for all its lines: slabs are long-lived and few (288 at 8 x 1152 x 128 x 128
// bfloat16), so a grid of whole slabs ends in a partial last wave (2.18 waves there) whose
// lines, bound by latency and per-thread arithmetic rather than bandwidth, cost ~0.8 of a full
// wave (docs/kernel_notes.md, v5). So the slabs of that last wave are split among tail_k blocks
// each, of Vs / tail_k lanes: the same work over more multiprocessors. Threads of a narrower
// block past its Vs * Pt own nothing.
struct BlockSlab {
  int64_t index;    // slab index over (direction,) image, slab: as if nothing were split
  int Vs;           // vector lanes of this block
  int64_t c_first;  // its first channel
};
__device__ __forceinline__ BlockSlab SlabOfBlock(const Launch& a, int V) {
  int64_t blk = blockIdx.x;
  int k = 1, part = 0;
  if (blk >= a.tail_start) {
    const int64_t t = blk - a.tail_start;
    blk = a.tail_start + t / a.tail_k;
    part = int(t % a.tail_k);
    k = a.tail_k;
  }
  const int vs = a.Vs / k;
  return {blk, vs, (blk % a.nslab) * a.Vs * V + int64_t(part) * vs * V};
}

// ------------------------------------------------------------------ mbarriers

// Shared-memory barriers that a warp arrives at and others wait on, one phase per use: the
// forward's neighbour synchronisation. Arrive has release and the wait acquire semantics at
// block scope, so the shared-memory writes before an arrival are visible after the wait.
__device__ __forceinline__ unsigned SharedAddr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void MbarInit(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SharedAddr(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}"
               ::"r"(SharedAddr(bar)) : "memory");
}
// Waits until the phase of the given parity has completed (phases alternate 0, 1, 0, ...).
__device__ __forceinline__ void MbarWait(uint64_t* bar, unsigned parity) {
  unsigned done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done) : "r"(SharedAddr(bar)), "r"(parity) : "memory");
  } while (!done);
}

// Neighbour synchronisation, the forward's and the backward's. Line t only needs line t - 1 at
// positions p - 1, p, p + 1 (t + 1 in the backward's reverse scan). So instead of a block-wide
// barrier per line, each warp arrives at its own mbarrier (one per line parity) after publishing
// its positions in the tiles, and before a line waits only for the warps that own its positions'
// neighbours. A warp whose loads came early goes on instead of waiting for the slowest warp of
// the block. Waiting for the previous line also covers the reuse of the tile slot written two
// lines back: a neighbour finished reading it before it arrived. And no neighbour can get two
// phases ahead (which would make a parity wait ambiguous): it would need this warp's next line,
// since "neighbour" is symmetric.
//
// Which warps: thread (vl, pl) owns positions pl + j * Pt, j < P. A warp covers the position
// lanes [pfirst, plast]; its neighbours own the lanes pfirst - 1 and plast + 1, which wrap
// around (Pt - 1 and 0, of the next and the previous j) when P > 1. Warps wholly past the
// last position lane own nothing: they wait for nobody and nobody waits for them.
struct NeighbourSync {
  uint64_t* bar;   // [warps][2 line parities]
  unsigned mask;   // the warps this one waits for (itself included), bit w for warp w
  int warp;

  __device__ static unsigned WarpsOfLanes(int lo, int hi, int Vs) {  // position lanes [lo, hi]
    const int wlo = lo * Vs / 32, whi = (hi * Vs + Vs - 1) / 32;
    return (whi >= 31 ? ~0u : (2u << whi) - 1) & ~((1u << wlo) - 1);
  }
  // Initialises the barriers; all threads of the block must call it (it has a __syncthreads).
  __device__ NeighbourSync(uint64_t* bars, int Vs, int Pt, int P) : bar(bars) {
    warp = threadIdx.x / 32;
    const int pfirst = warp * 32 / Vs, plast = min((warp * 32 + 31) / Vs, Pt - 1);
    mask = 0;
    if (pfirst < Pt) {
      mask = WarpsOfLanes(max(pfirst - 1, 0), min(plast + 1, Pt - 1), Vs);
      if (P > 1 && pfirst == 0) mask |= WarpsOfLanes(Pt - 1, Pt - 1, Vs);
      if (P > 1 && plast == Pt - 1) mask |= WarpsOfLanes(0, 0, Vs);
    }
    if (threadIdx.x < 2 * blockDim.x / 32) MbarInit(bar + threadIdx.x, 32);
    __syncthreads();
  }
  // The n-th line this block scans (counting on across directions) uses barrier n & 1, phase
  // (n >> 1) & 1.
  __device__ __forceinline__ void Arrive(int n) const { MbarArrive(bar + 2 * warp + (n & 1)); }
  __device__ __forceinline__ void WaitFor(int n) const {
    for (unsigned m = mask; m != 0; m &= m - 1)
      MbarWait(bar + 2 * (__ffs(m) - 1) + (n & 1), (n >> 1) & 1);
  }
};

// Bytes of dynamic shared memory in front of the tiles: two mbarriers per warp.
__host__ __device__ constexpr int MbarBytes(int threads) { return threads / 32 * 2 * 8; }

// Whether a kernel instance has the neighbour synchronisation compiled in (else one barrier per
// line). Out where the barriers' state made ptxas spill: the forward with P > 1 (lines longer
// than 512; 44-120 more bytes) and the 16-bit backward with P = 2 and NG >= 4, already at 255
// registers (64 bytes more; the 64 x 64 and 128 x 128 bfloat16 G = C backwards ran 5-7% slower
// than v10's, docs/kernel_notes.md, v11). Measured again with the v12 same-line form, where
// they fit without spill: still 6% slower than the block barrier (v12). MakePlan asks too, so
// the plan says what runs.
__host__ __device__ constexpr bool NeighbourSyncCompiled(bool backward, int type_bytes, int NG,
                                                         int P) {
  return backward ? !(type_bytes == 2 && P == 2 && NG >= 4) : P == 1;
}

// Threads per block of the backward's wide instances (kWide: compiled where this exceeds 256, and
// launched only for plans of more than 256 threads; the others' bound is kBwdThreads). With one
// gate group per vector and one position per thread a thread holds few registers: float32 fits
// 512 threads (122-128 registers, no spill), 16-bit types 512 without the dx sum (128 registers,
// 56 bytes of local memory) and 384 with it (165, none). Lines of 128 positions then get 64-byte
// slabs and 512 resident threads per multiprocessor instead of 256: 8 x 1152 x 128 x 128 G = 72
// D = 1 ran 2.03 -> 1.60 ms in float32 and 1.24 -> 1.06 in bfloat16 (H100, docs/kernel_notes.md,
// v16). Measured and not taken: 384 threads for the instances with several groups per vector,
// which ptxas fits in 168 registers without spill (slabs of 6 lanes ran up to 1.5x slower).
// The 16-bit G = C half vectors (V = 4, staged: BwdStaged) take 512 too.
__host__ __device__ constexpr int BwdMaxThreads(int type_bytes, int V, int NG, int P, bool acc) {
  if (V > 1 && NG == V && P == 1) return V * type_bytes == 8 ? 512 : kBwdThreads;
  if (V == 1 || NG != 1 || P != 1) return kBwdThreads;
  return type_bytes == 4 || !acc ? 512 : 384;
}

// The 16-bit G = C backward with half vectors (4 channels of 8 bytes per thread: the plan's
// HalfVector in gspn_cuda.cu) stages its inputs (and, when D > 1, the running dx sum) through
// shared memory instead of two register sets: cp.async copies line t - 1's into a per-thread slot
// while line t reads its own from the other. Without the registers of the sets a thread holds 93
// (no spill): 512-thread blocks, 64-byte slabs at lines of 64 positions, 32-byte at 128. Each
// warp then does half the arithmetic of a line that the 8-channel vectors did: the latency of
// that per-line work, not the memory pattern, had bound them (v17). H100 (docs/kernel_notes.md,
// v18): 32 x 1152 x 64 x 64 bfloat16 1.51 -> 1.39-1.40 ms, 8 x 1152 x 128 x 128 1.82 -> 1.60.
// Measured and not taken: the 8-channel vectors staged in 512-thread blocks (v17, 128-byte slabs:
// 1.51 ms), half vectors in blocks of 768 (80 registers: 1.41-1.49 ms) or 1024 threads (64
// registers and 52 bytes of spill: 1.81), with the L2 prefetch (1.54; 128 x 128: 3.6), with the
// tail split (1.46), float32 staging (2-5% slower than two positions per thread, v17).
// BwdMaxThreads gives wide instances with NG = V only to half vectors, and only 16-bit ones are
// compiled.
__host__ __device__ constexpr bool BwdStaged(int V, int NG, int P, bool wide) {
  return wide && V > 1 && NG == V && P == 1;
}
// Bytes of one thread's slot (one line's inputs, BwdIn; acc: with the dx sum), in units of one
// pack (V channels: 16 bytes, or 8 for half vectors): rounded up to an odd number of units, so
// that the threads of one shared-memory wavefront (8 of 16 bytes, 16 of 8), accessing a unit each
// at this stride, hit distinct banks.
__host__ __device__ constexpr int BwdSlotBytes(int type_bytes, int V, int NG, bool acc) {
  const int unit = V * type_bytes;
  const int units = (4 * unit + 3 * NG * type_bytes + (acc ? 4 * V : 4) + unit - 1) / unit;
  return (units | 1) * unit;
}

// The backward's gate gradient. With 16-bit types and several gate groups per vector (NG > 1:
// G = C and the like) it is formed for line t in line t: one gate normalisation per line instead
// of two, h_{t-1} at p -/+ 1 read through L1 (the neighbouring threads loaded those pixels), 4
// shared tiles. Otherwise one line late, from a shared tile of the saved h (6 tiles). Measured
// (H100, docs/kernel_notes.md, v12): the same-line form is 2-7% faster for bfloat16 G = C and
// 1-12% slower for bfloat16 G = C/16 at 128 x 128 lines; for float32 (branch bwd-same-line-dw,
// v9) up to 8.5% slower, its h loads from L1 being twice the bytes.
__host__ __device__ constexpr bool BwdSameLineDw(int type_bytes, int NG) {
  return type_bytes == 2 && NG > 1;
}
__host__ __device__ constexpr int BwdTiles(int type_bytes, int NG) {
  return BwdSameLineDw(type_bytes, NG) ? 4 : 6;
}

}  // namespace
}  // namespace cgspn
