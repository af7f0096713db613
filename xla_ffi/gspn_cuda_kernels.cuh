// The CUDA kernels of gspn_scan (device code): the forward, the backward and the backward's small
// second launch. Part of gspn_cuda.cu's translation unit, which includes it once and holds the
// launch plans and the FFI handlers.
//
// Layout of the work. A thread block owns whole lines: for one image b and one slab of Cs
// consecutive channels it scans all T lines of a direction, and on each line all L positions.
// Threads are laid out as Vs "vector lanes" (fastest) by Pt "position lanes"; a thread owns one
// vector of V consecutive channels (16 bytes: 4 float32 or 8 bfloat16/float16, or a single
// channel on the scalar path) at P positions p = pl, pl + Pt, ... of every line. Because the
// arrays are channels-last, the lanes of a warp read consecutive 16-byte pieces of each pixel:
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
// the thread wait for them at the end of line t. Where the launch plan asks, those of line
// t + 2 are prefetched into L2 at the same time (no registers), so that the register loads
// wait for L2, not DRAM.
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

#include "gspn.h"

namespace cgspn {
namespace {

// Threads per block (__launch_bounds__): the forward holds less state per thread, so it may use
// 512 threads (<= 128 registers); the backward keeps <= 256 so that it may use up to 255
// registers without spilling. With at most 8 positions per thread, these bound the line length.
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
    T e[N];
    memcpy(e, &r, sizeof(R));
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = ToF<T>(e[i]);
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
  bool prefetch;             // the forward's L2 prefetch (16-bit types; the plan chooses)
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

// ------------------------------------------------------------------ forward

// The P positions of a line that one thread owns, p = pl + j * Pt: whether each lies in the
// line (and the thread in the channels), and its pixel offset from the line's first position.
template <int P>
struct Positions {
  int pos[P];
  bool act[P];
  int64_t poff[P];
  __device__ __forceinline__ Positions(int pl, int Pt, bool lane_ok, int L, int64_t pos_stride) {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      pos[j] = pl + j * Pt;
      act[j] = lane_ok && pos[j] < L;
      poff[j] = int64_t(pos[j]) * pos_stride;
    }
  }
};

template <typename T, int V, int NG>
struct FwdIn {
  Pack<T, V> x, lam;
  Pack<T, NG> g[3];  // 3 * NG consecutive gates: group-major, neighbour-minor
};

// Threads per block of a forward instance: 768 (at most 85 registers each) where a thread
// holds few: float32 with one gate group per vector, 80 registers. Lines of 128 positions then
// get 96-byte slabs and 768 resident threads per multiprocessor instead of 64-byte slabs and 512
// (8 x 1152 x 128 x 128 G = 72: 22 KB of loads in flight per multiprocessor, against 34 KB at
// 64 x 64, where 384-thread blocks fit twice).
template <typename T, int V, int NG, int P>
constexpr int kFwdMaxThreads = (sizeof(T) == 4 && V > 1 && NG == 1 && P == 1) ? 768 : kFwdThreads;

template <typename T, int V, int NG, int P>
__global__ void __launch_bounds__(kFwdMaxThreads<T, V, NG, P>)
    GspnFwdKernel(const T* __restrict__ x, const T* __restrict__ lam, const T* __restrict__ w,
                  T* __restrict__ h, const Launch a) {
  extern __shared__ float4 smem_raw[];
  // [warps][2 line parities] mbarriers, then the tiles [2][Lmax][Cs].
  uint64_t* mbar = reinterpret_cast<uint64_t*>(smem_raw);
  float* tile = reinterpret_cast<float*>(smem_raw) +
               MbarBytes(kFwdMaxThreads<T, V, NG, P>) / sizeof(float);
  const BlockSlab bs = SlabOfBlock(a, V);
  // Tile rows are a whole slab wide in every block (a narrower block uses the first bs.Vs
  // lanes): a stride from the kernel's parameters, not one more register.
  const int Cs = a.Vs * V;
  const int64_t tile_size = int64_t(a.Lmax) * Cs;

  const int64_t blk = bs.index / a.nslab;
  const int64_t b = blk % a.B;
  const int d = int(blk / a.B);
  const LineGeometry geo = LineGeometry::Make(a.Direction(d), a.H, a.W);
  const int L = int(geo.length), T_steps = int(geo.steps);
  const int vl = threadIdx.x % bs.Vs, pl = threadIdx.x / bs.Vs;
  const int64_t c0 = bs.c_first + int64_t(vl) * V;
  const bool lane_ok = pl < a.Pt && c0 < a.C;
  const int64_t bhw = a.B * a.H * a.W;
  const int64_t C = a.C, G3 = a.G * 3;

  const T* xd = x + c0;
  const T* lamd = lam + d * bhw * C + c0;
  const T* wd = w + (d * bhw * a.G + c0 / a.S) * 3;
  T* hd = h + d * bhw * C + c0;

  const Positions<P> ps(pl, a.Pt, lane_ok, L, geo.pos_stride);
  const auto& pos = ps.pos;
  const auto& act = ps.act;
  const auto& poff = ps.poff;

  // The inputs of line t at this thread's positions: op(pack of the set `in`, its address) for
  // each. Loading fills the packs; the L2 prefetch only uses the addresses.
  auto for_inputs = [&](FwdIn<T, V, NG>(&in)[P], int t, auto&& op) {
    const int64_t line = b * geo.image + geo.base + int64_t(t) * geo.step_stride;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if (!act[j]) continue;
      const int64_t pix = line + poff[j];
      op(in[j].x, xd + pix * C);
      op(in[j].lam, lamd + pix * C);
#pragma unroll
      for (int k = 0; k < 3; ++k) op(in[j].g[k], wd + pix * G3 + k * NG);
    }
  };
  auto load = [&](FwdIn<T, V, NG>(&in)[P], int t) {
    for_inputs(in, t, [](auto& pack, const T* p) { pack.Load(p); });
  };
  auto prefetch = [&](FwdIn<T, V, NG>(&in)[P], int t) {
    for_inputs(in, t, [](auto&, const T* p) { PrefetchL2(p); });
  };

  float hown[P][V];  // this thread's h of the previous line
#pragma unroll
  for (int j = 0; j < P; ++j)
#pragma unroll
    for (int i = 0; i < V; ++i) hown[j][i] = 0.f;

  // CGSPN_CUDA_FWD_SYNC=block: one barrier per line instead (MakePlan).
  const bool neighbour_sync =
      NeighbourSyncCompiled(false, sizeof(T), NG, P) && a.neighbour_sync;
  const NeighbourSync sync(mbar, bs.Vs, a.Pt, P);

  // One line: issue the loads of line t + 1 into `ahead` (the set line t - 1 used), then scan
  // line t from `cur`.
  auto step = [&](int t, const FwdIn<T, V, NG>(&cur)[P], FwdIn<T, V, NG>(&ahead)[P]) {
    if (t + 1 < T_steps) load(ahead, t + 1);
    if constexpr (kPrefetchL2<T>)
      if (a.prefetch && t + 2 < T_steps) prefetch(ahead, t + 2);
    if (neighbour_sync && t > 0) sync.WaitFor(t - 1);
    const bool restart = LineGeometry::Restarts(t, a.chunk);
    const float* prev = tile + ((t + 1) & 1) * tile_size;  // written by line t - 1
    float* now = tile + (t & 1) * tile_size;
    const int64_t line = b * geo.image + geo.base + int64_t(t) * geo.step_stride;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if (!act[j]) continue;
      const int p = pos[j];
      float xv[V], lv[V], gv[3 * NG], hv[V];
      cur[j].x.Unpack(xv);
      cur[j].lam.Unpack(lv);
#pragma unroll
      for (int k = 0; k < 3; ++k) cur[j].g[k].Unpack(gv + k * NG);
#pragma unroll
      for (int i = 0; i < V; ++i) hv[i] = lv[i] * xv[i];
      if (!restart) {
        float left[V], right[V];
        if (p > 0) LoadF<V>(prev + (p - 1) * Cs + vl * V, left);
        if (p + 1 < L) LoadF<V>(prev + (p + 1) * Cs + vl * V, right);
#pragma unroll
        for (int g = 0; g < NG; ++g) {
          float wa[3], wc[3];
          Weights(gv + 3 * g, p > 0, p + 1 < L, a.normalize, wa, wc);
#pragma unroll
          for (int i = g * (V / NG); i < (g + 1) * (V / NG); ++i) {
            float acc = hv[i] + wa[1] * hown[j][i];
            if (p > 0) acc += wa[0] * left[i];
            if (p + 1 < L) acc += wa[2] * right[i];
            hv[i] = acc;
          }
        }
      }
      Pack<T, V>::Store(hd + (line + poff[j]) * C, hv);
      StoreF<V>(now + p * Cs + vl * V, hv);
#pragma unroll
      for (int i = 0; i < V; ++i) hown[j][i] = hv[i];
    }
    if (neighbour_sync)
      sync.Arrive(t);
    else
      __syncthreads();
  };

  // The two register sets swap roles by unrolling, never by copying: a copy of a set whose loads
  // are in flight would wait for them there. (Measured: this also let ptxas allocate the
  // backward better than v3's copy did. A third set, two lines ahead, gained nothing in v5:
  // docs/kernel_notes.md.)
  FwdIn<T, V, NG> r0[P], r1[P];
  load(r0, 0);
  for (int t = 0; t < T_steps; t += 2) {
    step(t, r0, r1);
    if (t + 1 < T_steps) step(t + 1, r1, r0);
  }
}

// ------------------------------------------------------------------ backward

// kAcc: D > 1, the directions' dx contributions are summed through the running float32 sum
// (without it, those registers would be held for nothing).
template <typename T, int V, int NG, bool kAcc>
struct BwdIn {
  Pack<T, V> x, lam, dh, hm;  // hm: the saved h of line t - 1 at this position
  Pack<T, NG> g[3];
  float acc[kAcc ? V : 1];    // running float32 dx sum of the earlier directions
};

// kPrefetch: the L2 prefetch of line t - 2 (chosen by the launch plan; see PrefetchL2).
template <typename T, int V, int NG, int P, bool kAcc, bool kPrefetch>
__global__ void __launch_bounds__(kBwdThreads)
    GspnBwdKernel(const T* __restrict__ x, const T* __restrict__ lam, const T* __restrict__ w,
                  const T* __restrict__ h, const T* __restrict__ dh, T* __restrict__ dx,
                  T* __restrict__ dlam, T* __restrict__ dw, float* acc, float* __restrict__ part,
                  const Launch a) {
  extern __shared__ float4 smem_raw[];
  // [warps][2 line parities] mbarriers, then the tiles [2 or 3 kinds][2 parities][Lmax][Cs]
  // (BwdTiles: the saved-h tile only where the gate gradient is formed one line late).
  uint64_t* mbar = reinterpret_cast<uint64_t*>(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw) + MbarBytes(kBwdThreads) / sizeof(float);
  const BlockSlab bs = SlabOfBlock(a, V);
  const int Cs = a.Vs * V;  // tile rows: a whole slab wide in every block (as in the forward)
  const int64_t tile_size = int64_t(a.Lmax) * Cs;
  auto tile = [&](int kind, int parity) { return smem + (2 * kind + parity) * tile_size; };
  enum { kU0 = 0, kU2 = 1, kH = 2 };

  const int64_t b = bs.index / a.nslab;
  const int vl = threadIdx.x % bs.Vs, pl = threadIdx.x / bs.Vs;
  const int64_t c0 = bs.c_first + int64_t(vl) * V;
  const bool lane_ok = pl < a.Pt && c0 < a.C;
  const int64_t bhw = a.B * a.H * a.W;
  const int64_t C = a.C, G3 = a.G * 3;
  const int64_t g0 = c0 / a.S;                    // first group of this thread's vector
  const bool leader = (vl % a.nsub) == 0;         // stores the group's reduced gate gradient
  const int64_t sub = ((c0 % a.S) / V) / a.nsub;  // which partial sum, when npart > 1
  // CGSPN_CUDA_BWD_SYNC=block: one barrier per line instead (MakePlan).
  const bool neighbour_sync = NeighbourSyncCompiled(true, sizeof(T), NG, P) && a.neighbour_sync;
  const NeighbourSync sync(mbar, bs.Vs, a.Pt, P);
  // The gate gradient formed in its own line (BwdSameLineDw) or one line late.
  constexpr bool kSame = BwdSameLineDw(sizeof(T), NG);
  static_assert(!kSame || NG > 1, "the same-line form has no lane reduction");
  int nline = 0;  // lines scanned so far, over all directions: the mbarrier phase

  const T* xd = x + c0;
  T* dxd = dx + c0;
  float* accd = acc != nullptr ? acc + c0 : nullptr;  // null when D == 1 and not float32

  for (int d = 0; d < a.D; ++d) {
    const LineGeometry geo = LineGeometry::Make(a.Direction(d), a.H, a.W);
    const int L = int(geo.length), T_steps = int(geo.steps);
    const bool first_dir = d == 0, last_dir = d == a.D - 1;
    const T* lamd = lam + d * bhw * C + c0;
    const T* hd = h + d * bhw * C + c0;
    const T* dhd = dh + d * bhw * C + c0;
    T* dlamd = dlam + d * bhw * C + c0;
    const T* wd = w + (d * bhw * a.G + g0) * 3;
    T* dwd = dw + (d * bhw * a.G + g0) * 3;
    float* partd = part + ((sub * a.D + d) * bhw * a.G + g0) * 3;

    const Positions<P> ps(pl, a.Pt, lane_ok, L, geo.pos_stride);
    const auto& pos = ps.pos;
    const auto& act = ps.act;
    const auto& poff = ps.poff;
    auto line_of = [&](int t) { return b * geo.image + geo.base + int64_t(t) * geo.step_stride; };

    // The read-only inputs of line t at this thread's positions: op(pack of the set `in`, its
    // address) for each, then after(j, pixel). Loading fills the packs; the L2 prefetch only
    // uses the addresses.
    auto for_inputs = [&](BwdIn<T, V, NG, kAcc>(&in)[P], int t, auto&& op, auto&& after) {
      const int64_t line = line_of(t);
      const bool need_h = !LineGeometry::Restarts(t, a.chunk);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        if (!act[j]) continue;
        const int64_t pix = line + poff[j];
        op(in[j].x, xd + pix * C);
        op(in[j].lam, lamd + pix * C);
        op(in[j].dh, dhd + pix * C);
        if (need_h) op(in[j].hm, hd + (pix - geo.step_stride) * C);
#pragma unroll
        for (int k = 0; k < 3; ++k) op(in[j].g[k], wd + pix * G3 + k * NG);
        after(j, pix);
      }
    };
    auto load = [&](BwdIn<T, V, NG, kAcc>(&in)[P], int t) {
      for_inputs(in, t, [](auto& pack, const T* p) { pack.Load(p); }, [&](int j, int64_t pix) {
        // The running dx sum, written by this block's previous direction (other threads,
        // before a barrier): an ordinary coherent load, not the read-only path.
        if constexpr (kAcc)
          if (!first_dir) LoadF<V>(accd + pix * C, in[j].acc);
      });
    };
    auto prefetch = [&](BwdIn<T, V, NG, kAcc>(&in)[P], int t) {
      for_inputs(in, t, [](auto&, const T* p) { PrefetchL2(p); }, [](int, int64_t) {});
    };

    // One group's gate gradient (into out) from its weight gradient da, at position p of a line
    // whose gates are graw (group g of the vector).
    auto finish_dw = [&](int p, const Pack<T, NG> (&graw)[3], int g,
                         const float (&da)[3], float* out) {
      float gv[3 * NG], wa[3], wc[3];
#pragma unroll
      for (int k = 0; k < 3; ++k) graw[k].Unpack(gv + k * NG);
      Weights(gv + 3 * g, p > 0, p + 1 < L, a.normalize, wa, wc);
      GateGrad(da, wa, wc, a.normalize, out + 3 * g);
    };

    // State of line t + 1 at this thread's positions: a_1 z and, for the one-line-late gate
    // gradient, its adjoint z and its gates. (That form reads the saved h of line t at p, loaded
    // with line t + 1, back from the shared tile: fewer registers.)
    float zold[P][V], u1[P][V];
    Pack<T, NG> gold[P][3];
#pragma unroll
    for (int j = 0; j < P; ++j)
#pragma unroll
      for (int i = 0; i < V; ++i) zold[j][i] = u1[j][i] = 0.f;

    // One line of the reverse scan: issue the loads of line t - 1 into `ahead` (the set line
    // t + 1 used), then process line t from `cur`.
    auto step = [&](int t, const BwdIn<T, V, NG, kAcc>(&cur)[P], BwdIn<T, V, NG, kAcc>(&ahead)[P]) {
      if (t > 0) load(ahead, t - 1);
      if constexpr (kPrefetch)
        if (t > 1) prefetch(ahead, t - 2);
      // Line t + 1 (this block's previous line, unless t is a direction's first) must be in
      // the tiles. (The same-line form first issues loads that do not need it, below.)
      if constexpr (!kSame)
        if (neighbour_sync && t + 1 < T_steps) sync.WaitFor(nline - 1);
      // Line t + 1 fed line t unless it restarted (or does not exist).
      const bool has_next = t + 1 < T_steps;
      const bool coupled = has_next && !LineGeometry::Restarts(t + 1, a.chunk);
      const bool restart = LineGeometry::Restarts(t, a.chunk);
      const int q = (t + 1) & 1, now = t & 1;
      const float* u0_in = tile(kU0, q);
      const float* u2_in = tile(kU2, q);
      const float* h_in = kSame ? nullptr : tile(kH, q);  // 4 tiles only in the same-line form
      const int64_t line = line_of(t), next_line = line_of(t + 1);

      // Same-line gate gradient: line t's needs h_{t-1} at p - 1 and p + 1. The threads of those
      // positions loaded the same pixels (as their hm) one line ahead, so these loads find them
      // in L1; issued before the wait for the neighbours, they arrive while it lasts.
      Pack<T, V> hm_left[kSame ? P : 1], hm_right[kSame ? P : 1];
      if constexpr (kSame) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
          if (!act[j] || restart) continue;
          const T* hm = hd + (line + poff[j] - geo.step_stride) * C;
          if (pos[j] > 0) hm_left[j].Load(hm - geo.pos_stride * C);
          if (pos[j] + 1 < L) hm_right[j].Load(hm + geo.pos_stride * C);
        }
        if (neighbour_sync && t + 1 < T_steps) sync.WaitFor(nline - 1);
      }

      float z[P][V];
      float da1[P][3];  // NG == 1: the group's weight gradient, before the lane reduction
#pragma unroll
      for (int j = 0; j < P; ++j) {
        da1[j][0] = da1[j][1] = da1[j][2] = 0.f;
        if (!act[j]) continue;
        const int p = pos[j];
        cur[j].dh.Unpack(z[j]);
        if (!coupled) continue;
        float r[V], l[V], hl[V], hr[V], hown[V];
#pragma unroll
        for (int i = 0; i < V; ++i) l[i] = r[i] = hl[i] = hr[i] = 0.f;
        if constexpr (!kSame) LoadF<V>(h_in + p * Cs + vl * V, hown);
        if (p + 1 < L) {
          LoadF<V>(u0_in + (p + 1) * Cs + vl * V, r);
          if constexpr (!kSame) LoadF<V>(h_in + (p + 1) * Cs + vl * V, hr);
        }
        if (p > 0) {
          LoadF<V>(u2_in + (p - 1) * Cs + vl * V, l);
          if constexpr (!kSame) LoadF<V>(h_in + (p - 1) * Cs + vl * V, hl);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) z[j][i] += u1[j][i] + r[i] + l[i];
        if constexpr (kSame) continue;  // its gate gradient comes with the u's below
        // Weight gradient of line t + 1: da_k = sum over the group of z_{t+1} h_t[p + k - 1].
        if constexpr (NG == 1) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            da1[j][0] += zold[j][i] * hl[i];
            da1[j][1] += zold[j][i] * hown[i];
            da1[j][2] += zold[j][i] * hr[i];
          }
        } else {  // several groups per vector: no lane reduction, finish here
          float out[3 * NG];
#pragma unroll
          for (int g = 0; g < NG; ++g) {
            float da[3] = {0.f, 0.f, 0.f};
#pragma unroll
            for (int i = g * (V / NG); i < (g + 1) * (V / NG); ++i) {
              da[0] += zold[j][i] * hl[i];
              da[1] += zold[j][i] * hown[i];
              da[2] += zold[j][i] * hr[i];
            }
            finish_dw(p, gold[j], g, da, out);
          }
          const int64_t pix = next_line + poff[j];
#pragma unroll
          for (int k = 0; k < 3; ++k) Pack<T, NG>::Store(dwd + pix * G3 + k * NG, out + k * NG);
        }
      }
      if constexpr (kSame) {
        // Line t's gate gradient is formed and stored with its u's, below.
      } else if constexpr (NG == 1) {
        // Reduce over the group's lanes (uniform across the block: all lanes take part) and
        // store, or hand partial sums to the second launch. Lines that restart get da = 0.
        if (has_next) {
#pragma unroll
          for (int j = 0; j < P; ++j) {
#pragma unroll
            for (int k = 0; k < 3; ++k)
              for (int off = a.nsub >> 1; off > 0; off >>= 1)
                da1[j][k] += __shfl_xor_sync(0xffffffffu, da1[j][k], off);
            if (!act[j] || !leader) continue;
            const int64_t pix = next_line + poff[j];
            if (a.npart > 1) {
#pragma unroll
              for (int k = 0; k < 3; ++k) partd[pix * G3 + k] = da1[j][k];
            } else {
              float out[3] = {0.f, 0.f, 0.f};
              if (coupled) finish_dw(pos[j], gold[j], 0, da1[j], out);
              Pack<T, 1>::Store(dwd + pix * G3 + 0, out + 0);
              Pack<T, 1>::Store(dwd + pix * G3 + 1, out + 1);
              Pack<T, 1>::Store(dwd + pix * G3 + 2, out + 2);
            }
          }
        }
      } else if (has_next && !coupled) {  // line t + 1 restarted: zero gate gradient
#pragma unroll
        for (int j = 0; j < P; ++j) {
          if (!act[j]) continue;
          const float zero[3 * NG] = {};
          const int64_t pix = next_line + poff[j];
#pragma unroll
          for (int k = 0; k < 3; ++k) Pack<T, NG>::Store(dwd + pix * G3 + k * NG, zero + k * NG);
        }
      }

#pragma unroll
      for (int j = 0; j < P; ++j) {
        if (!act[j]) continue;
        const int p = pos[j];
        const int64_t pix = line + poff[j];
        float xv[V], lv[V], out[V];
        cur[j].x.Unpack(xv);
        cur[j].lam.Unpack(lv);
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = z[j][i] * xv[i];
        Pack<T, V>::Store(dlamd + pix * C, out);
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = z[j][i] * lv[i];
        if constexpr (kAcc)
          if (!first_dir)
#pragma unroll
            for (int i = 0; i < V; ++i) out[i] += cur[j].acc[i];
        if (last_dir)
          Pack<T, V>::Store(dxd + pix * C, out);
        else
          StoreF<V>(accd + pix * C, out);

        // Same-line form: line t's gate gradient (zero where line t restarts: h_t did not
        // depend on h_{t-1}).
        float dwv[kSame ? 3 * NG : 1] = {};
        if (!restart) {  // publish a_0 z, a_2 z (and h_{t-1}) for line t - 1
          float gv[3 * NG], hm[V], u0[V], u2[V];
#pragma unroll
          for (int k = 0; k < 3; ++k) cur[j].g[k].Unpack(gv + k * NG);
          cur[j].hm.Unpack(hm);
          float hlv[V], hrv[V];
          if constexpr (kSame) {
#pragma unroll
            for (int i = 0; i < V; ++i) hlv[i] = hrv[i] = 0.f;
            if (p > 0) hm_left[j].Unpack(hlv);
            if (p + 1 < L) hm_right[j].Unpack(hrv);
          }
#pragma unroll
          for (int g = 0; g < NG; ++g) {
            float wa[3], wc[3], da[3] = {0.f, 0.f, 0.f};
            Weights(gv + 3 * g, p > 0, p + 1 < L, a.normalize, wa, wc);
#pragma unroll
            for (int i = g * (V / NG); i < (g + 1) * (V / NG); ++i) {
              u0[i] = wa[0] * z[j][i];
              u1[j][i] = wa[1] * z[j][i];
              u2[i] = wa[2] * z[j][i];
              if constexpr (kSame) {
                da[0] += z[j][i] * hlv[i];
                da[1] += z[j][i] * hm[i];
                da[2] += z[j][i] * hrv[i];
              }
            }
            if constexpr (kSame) GateGrad(da, wa, wc, a.normalize, dwv + 3 * g);
          }
          StoreF<V>(tile(kU0, now) + p * Cs + vl * V, u0);
          StoreF<V>(tile(kU2, now) + p * Cs + vl * V, u2);
          if constexpr (!kSame) {
            StoreF<V>(tile(kH, now) + p * Cs + vl * V, hm);
#pragma unroll
            for (int i = 0; i < V; ++i) zold[j][i] = z[j][i];
#pragma unroll
            for (int k = 0; k < 3; ++k) gold[j][k] = cur[j].g[k];
          }
        }
        if constexpr (kSame) {  // several groups per vector: no lane reduction
#pragma unroll
          for (int k = 0; k < 3; ++k) Pack<T, NG>::Store(dwd + pix * G3 + k * NG, dwv + k * NG);
        }
      }
      if (neighbour_sync)
        sync.Arrive(nline);
      else
        __syncthreads();
      ++nline;
    };

    // The two register sets swap roles by unrolling, never by copying (see the forward).
    BwdIn<T, V, NG, kAcc> r0[P], r1[P];
    load(r0, T_steps - 1);
    for (int t = T_steps - 1; t >= 0; t -= 2) {
      step(t, r0, r1);
      if (t > 0) step(t - 1, r1, r0);
    }
    // Line 0 always restarts: its gate gradient is zero (partial sums too: the second launch
    // skips restarting lines, but every partial it might read is then defined). The same-line
    // form wrote it in line 0.
    if constexpr (!kSame) {
#pragma unroll
      for (int j = 0; j < P; ++j) {
        if (!act[j] || !leader) continue;
        const int64_t pix = line_of(0) + poff[j];
        if (a.npart > 1) {
#pragma unroll
          for (int k = 0; k < 3; ++k) partd[pix * G3 + k] = 0.f;
        } else {
          const float zero[3 * NG] = {};
#pragma unroll
          for (int k = 0; k < 3; ++k) Pack<T, NG>::Store(dwd + pix * G3 + k * NG, zero + k * NG);
        }
      }
    }
    // The next direction reuses the shared tiles and reads this one's running dx sum, at pixels
    // that other threads owned when the scan axis changes.
    __syncthreads();
  }
}

// Second launch of the uncommon group sizes: adds the npart partial weight gradients of each
// (direction, pixel, group) in a fixed order and applies the normalisation's chain rule.
template <typename T>
__global__ void GspnDwReduceKernel(const float* __restrict__ part, const T* __restrict__ w,
                                   T* __restrict__ dw, const Launch a) {
  const int64_t bhw = a.B * a.H * a.W;
  const int64_t n = a.D * bhw * a.G;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int d = int(idx / (bhw * a.G));
    const int64_t pix = (idx / a.G) % bhw;
    const int64_t i = (pix / a.W) % a.H, jj = pix % a.W;
    int64_t t, p, L;
    switch (a.Direction(d)) {
      case kTopBottom: t = i; p = jj; L = a.W; break;
      case kBottomTop: t = a.H - 1 - i; p = jj; L = a.W; break;
      case kLeftRight: t = jj; p = i; L = a.H; break;
      default: t = a.W - 1 - jj; p = i; L = a.H; break;
    }
    float out[3] = {0.f, 0.f, 0.f};
    if (!LineGeometry::Restarts(t, a.chunk)) {
      float da[3] = {0.f, 0.f, 0.f}, g[3], wa[3], wc[3];
      for (int r = 0; r < a.npart; ++r)
        for (int k = 0; k < 3; ++k) da[k] += part[(r * n + idx) * 3 + k];
      for (int k = 0; k < 3; ++k) g[k] = ToF<T>(w[idx * 3 + k]);
      Weights(g, p > 0, p + 1 < L, a.normalize, wa, wc);
      GateGrad(da, wa, wc, a.normalize, out);
    }
    for (int k = 0; k < 3; ++k) dw[idx * 3 + k] = FromF<T>(out[k]);
  }
}

}  // namespace
}  // namespace cgspn
