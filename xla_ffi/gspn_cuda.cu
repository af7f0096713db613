// The CUDA side of gspn_scan: launch plans (vector width, positions per thread, slab width) and
// the forward and backward FFI handlers, one main launch each. The kernels are in
// gspn_cuda_forward.cuh (and, for 16-bit calls on lines of 65-128 positions, the TMA forward of
// gspn_cuda_forward_tma.cuh, whose tensor maps and plan are made here) and
// gspn_cuda_backward.cuh, their design and shared parts in
// gspn_cuda_kernels.cuh; the measurements behind the plans in docs/kernel_notes.md.
#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "gspn.h"
#include "gspn_cuda_forward.cuh"
#include "gspn_cuda_backward.cuh"
#include "gspn_cuda_forward_tma.cuh"
#include "gspn_cuda_backward_tma.cuh"

namespace cgspn {
namespace {

// ------------------------------------------------------------------ host side

template <int N> using Int = std::integral_constant<int, N>;

// Calls f(Int<V>(), Int<NG>()) for a vector width and groups per vector.
template <typename T, typename F>
auto DispatchVNG(int V, int NG, F&& f) {
  constexpr int vec = 16 / int(sizeof(T));
  if (V == 1) return f(Int<1>(), Int<1>());
  switch (NG) {
    case 1: return f(Int<vec>(), Int<1>());
    case 2: return f(Int<vec>(), Int<2>());
    case 4: return f(Int<vec>(), Int<4>());
    default:
      if constexpr (vec == 8) return f(Int<vec>(), Int<8>());
      return f(Int<vec>(), Int<4>());  // unreachable: NG = V / S <= vec
  }
}

template <int V, typename F>
const void* ForP(int P, F&& pick) {
  if constexpr (V == 1) {
    switch (P) {
      case 1: return pick(Int<1>());
      case 2: return pick(Int<2>());
      case 4: return pick(Int<4>());
      default: return pick(Int<8>());
    }
  } else {
    return P == 1 ? pick(Int<1>()) : pick(Int<2>());
  }
}

// The kernel instance for (V, NG, P[, kAcc]). The scalar path (V = 1: odd channel counts,
// unaligned buffers) is compiled for 1 to 8 positions per thread, the vector path for 1 or 2.
template <typename T, int V, int NG>
const void* FwdKernelP(int P) {
  return ForP<V>(P, [](auto p) {
    return reinterpret_cast<const void*>(GspnFwdKernel<T, V, NG, decltype(p)::value>);
  });
}

// The wide instance (kWide) exists only where BwdMaxThreads exceeds kBwdThreads.
template <typename T, int V, int NG, bool kAcc, bool kPrefetch>
const void* BwdKernelP(int P, bool wide) {
  return ForP<V>(P, [&](auto p) {
    constexpr int kP = decltype(p)::value;
    if constexpr (BwdMaxThreads(sizeof(T), V, NG, kP, kAcc) > kBwdThreads)
      if (wide)
        return reinterpret_cast<const void*>(GspnBwdKernel<T, V, NG, kP, kAcc, kPrefetch, true>);
    return reinterpret_cast<const void*>(GspnBwdKernel<T, V, NG, kP, kAcc, kPrefetch, false>);
  });
}

// The backward with or without the L2 prefetch (the launch plan chooses; MakePlan).
template <typename T, int V, int NG, bool kAcc>
const void* BwdKernelPrefetch(int P, bool prefetch, bool wide) {
  return prefetch ? BwdKernelP<T, V, NG, kAcc, true>(P, wide)
                  : BwdKernelP<T, V, NG, kAcc, false>(P, wide);
}

// The 16-bit instances with half vectors (HalfVector): the forward's with P = 1 for G = C and
// for one gate group per vector; the backward's for G = C, wide and staged, P = 1, with and
// without the dx sum, without the L2 prefetch.
template <typename T>
const void* HalfVectorKernel(int kind, int NG, bool acc, bool prefetch) {
  if constexpr (sizeof(T) == 2) {
    if (kind == 0)
      return NG == 1 ? reinterpret_cast<const void*>(GspnFwdKernel<T, 4, 1, 1>)
                     : reinterpret_cast<const void*>(GspnFwdKernel<T, 4, 4, 1>);
    if (NG == 4 && !prefetch)
      return acc ? reinterpret_cast<const void*>(GspnBwdKernel<T, 4, 4, 1, true, false, true>)
                 : reinterpret_cast<const void*>(GspnBwdKernel<T, 4, 4, 1, false, false, true>);
  }
  return nullptr;
}

// kind 0: forward; 1: backward (acc: the running dx sum, when D > 1; prefetch: see
// BwdKernelPrefetch; wide: a block of more than kBwdThreads, BwdMaxThreads).
template <typename T>
const void* KernelFor(int kind, int V, int NG, int P, bool acc, bool prefetch, bool wide) {
  if (V > 1 && V * sizeof(T) == 8)  // half vectors: only these instances exist
    return P == 1 && (kind == 0 || wide) ? HalfVectorKernel<T>(kind, NG, acc, prefetch) : nullptr;
  return DispatchVNG<T>(V, NG, [&](auto v, auto ng) -> const void* {
    constexpr int kV = decltype(v)::value, kNG = decltype(ng)::value;
    if (kind == 0) return FwdKernelP<T, kV, kNG>(P);
    return acc ? BwdKernelPrefetch<T, kV, kNG, true>(P, prefetch, wide)
               : BwdKernelPrefetch<T, kV, kNG, false>(P, prefetch, wide);
  });
}

// The launch bound of a forward instance (kFwdMaxThreads; every P > 1 instance has 512).
template <typename T>
int FwdMaxThreads(int V, int NG, int P) {
  if (V > 1 && V * sizeof(T) == 8) return kFwdMaxThreads<T, 4, 4, 1>;  // half vectors
  return DispatchVNG<T>(V, NG, [&](auto v, auto ng) {
    return P == 1 ? kFwdMaxThreads<T, decltype(v)::value, decltype(ng)::value, 1> : kFwdThreads;
  });
}

// Whether ptxas spilled registers of a kernel instance to local memory (the 16-bit backward with
// several gate groups per vector, two positions per thread and D > 1 does: 300 bytes, and ran
// 17% slower than one position per thread). A few bytes are tolerated: v5's bf16 P = 2
// backward at D = 1 had 8 and was still the fastest plan.
bool Spills(const void* kernel) {
  cudaFuncAttributes attr{};
  return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.localSizeBytes > 64;
}

struct Plan {
  Launch a;
  const void* kernel;
  int V, NG, P, threads;  // (the L2 prefetch: a.prefetch)
  bool staged;            // the backward's inputs staged through shared memory (BwdStaged)
  double waves;           // slabs (before the tail split) over the blocks resident at once
  size_t smem;
  int64_t blocks;
};

// Lets a kernel use the plan's dynamic shared memory past the default 48 KB. The occupancy API
// also counts it only once allowed (else it answers 0 blocks).
cudaError_t AllowSharedMemory(const void* kernel, size_t smem) {
  if (smem <= (48 << 10)) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
}

// A tuning knob for experiments/tune_kernel.py, or `unset` where the variable is not set.
int EnvInt(const char* name, int unset = 0) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : unset;
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// An attribute of the current device, or `fallback` where the query fails.
int DeviceAttr(cudaDeviceAttr attr, int fallback) {
  int device = 0, value = fallback;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess)
    return fallback;
  return value;
}

// The tail split (SlabOfBlock in the kernels): the slabs of the last, partial wave are each
// scanned by k blocks of Vs / k lanes, the largest k (a power of 2) whose blocks still fit one
// wave, with whole gate groups (a multiple of nsub lanes; not with the second launch's partial
// sums) and slabs of at least 32 bytes per pixel, 64 where the kernel prefetches into L2; never
// where it stages, unless forced (BwdStaged; v18: halves of 32 bytes made 32 x 1152 x 64 x 64
// bfloat16 G = C D = 1 5% slower, 1.39 -> 1.46 ms, and 128 x 128 1%).
// Measured (H100, docs/kernel_notes.md, v13): halves of 64 bytes made the 32 x 1152 x 64 x 64
// bfloat16 forwards 1-2% faster; halves of 32 bytes made the 8 x 1152 x 128 x 128 bfloat16 G = C
// forward 4% faster without the L2 prefetch (0.801 -> 0.770 ms), but every prefetching 128 x
// 128 case 1-13% slower (bfloat16 G = 72 forward 0.520 -> 0.589). CGSPN_CUDA_TAIL_SPLIT=k forces k
// where it is valid (1: no split), and CGSPN_CUDA_TAIL_WAVE=n takes n blocks for a wave, so that
// the tests can split part of a small grid.
void SplitTail(Plan* plan, int vector_bytes, int sms) {
  Launch& a = plan->a;
  const int64_t slabs = plan->blocks;
  a.tail_start = slabs;
  a.tail_k = 1;
  int per_sm = 0;
  // Allowed here, not only at the launch, so that the first call plans as the later ones.
  AllowSharedMemory(plan->kernel, plan->smem);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, plan->kernel, plan->threads, plan->smem);
  const int forced_wave = EnvInt("CGSPN_CUDA_TAIL_WAVE");
  const int64_t slots = forced_wave > 0 ? forced_wave : int64_t(std::max(per_sm, 1)) * sms;
  const int64_t tail = slabs % slots;
  plan->waves = double(slabs) / double(slots);
  const int forced = EnvInt("CGSPN_CUDA_TAIL_SPLIT");
  auto valid = [&](int k) {
    return a.Vs % k == 0 && (a.Vs / k) % a.nsub == 0 && (k == 1 || a.npart == 1);
  };
  const int min_bytes = a.prefetch ? 64 : 32;
  int k = 1;
  if (forced > 0) {
    if (valid(forced)) k = forced;
  } else if (!plan->staged) {
    while (valid(2 * k) && tail * 2 * k <= slots && a.Vs / (2 * k) * vector_bytes >= min_bytes)
      k *= 2;
  }
  if (k == 1 || tail == 0) return;
  a.tail_start = slabs - tail;
  a.tail_k = k;
  plan->blocks = a.tail_start + tail * k;
}

// Whether a 16-bit call takes half vectors (4 channels of 8 bytes per thread instead of 8 of 16;
// PlanCall falls back to whole ones where no plan of them fits), given the plan of whole ones:
//  - the backward for G = C (512-thread blocks, staged: BwdStaged) at D = 1, and with the dx sum
//    of D > 1 at lines of up to 64 positions. H100, bfloat16 (docs/kernel_notes.md, v18):
//    32 x 1152 x 64 x 64 1.39-1.40 ms against 1.51-1.55, 8 x 1152 x 128 x 128 1.59-1.60 against
//    1.82, 8 x 192 x 128 x 128 0.285 against 0.337; at D = 4 6.58 against 7.33 at 64 x 64, but
//    9.71 against 8.28 at 8 x 1152 x 128 x 128 (8 x 192 x 128 x 128: 1.27 against 1.46). For one
//    gate group per vector (G = C / 16: 4 lanes a group) it was 1.2-1.4x slower at D = 1.
//  - the forward (blocks of up to 768 threads) where the whole vectors' grid fills few waves
//    (fewer than 5 for G = C, whose threads have 8 groups' arithmetic per line, else 3): more
//    threads per slab then pay, and cost ~2% to 1.3x in full waves. Half against whole: G = C
//    0.677 against 0.691 ms at 4.36 waves (32 x 1152 x 64 x 64, D = 1), 0.708 against 0.773 at
//    2.18, 0.168 against 0.193 at 0.36, 0.48 against 0.52 at 1.45; 2.72 against 2.67 at 17.5
//    and 3.16 against 2.70 at 8.7. G = C / 16: 0.474 against 0.498 at 2.18, 0.325 against 0.337
//    at 1.45; 0.461 against 0.386 at 4.36.
// CGSPN_CUDA_HALF_FWD / _BWD = 1 / 0 force it on / off.
bool HalfVector(int kind, const ScanShape& s, const Plan* whole) {
  const char* knob = std::getenv(kind == 0 ? "CGSPN_CUDA_HALF_FWD" : "CGSPN_CUDA_HALF_BWD");
  if (knob) return std::string(knob) != "0";
  if (kind == 1) return s.G == s.C && (s.D == 1 || std::max(s.H, s.W) <= 64);
  return whole != nullptr && whole->V == 8 && whole->waves < (s.G == s.C ? 5.0 : 3.0);
}

// Chooses the vector width, positions per thread and slab width of one call. kind: 0 forward
// (2 shared tiles), 1 backward (4 or 6 tiles: BwdTiles). try_half: with half vectors where the
// call allows them (HalfVector; an error where it does not, and MakePlan falls back). The rules
// come from the sweeps of experiments/tune_kernel.py on an H100 (docs/kernel_notes.md, v4 and
// v5):
//  - the slab width (bytes of a pixel that one block streams) matters most: at the same
//    occupancy, 32-byte slabs ran at ~75% of the copy bandwidth, 64-byte at ~87%, 128-byte at
//    ~91%. Wider than 128 bytes is not tried.
//  - forward: one position per thread (two spilled registers), then the slab (>= 64 bytes if
//    possible) that keeps the most threads resident per multiprocessor, the wider on ties.
//  - backward: the group reduction in one launch first, then an instance that does not spill,
//    then one with the neighbour synchronisation, then the widest slab; two positions per
//    thread where that widens it (the backward holds ~170-250 registers, so one 256-thread
//    block per multiprocessor: width is what is left to gain), and a block of more than 256
//    threads before a wider slab (one gate group per vector and one position per thread:
//    BwdMaxThreads).
//  - both: slabs of at least one 32-byte sector per pixel where the channels allow (16-byte
//    slabs ran at 13% of the copy bandwidth in the backward at 8x192x128x128 bf16, v5), then at
//    least one block per multiprocessor where the problem allows.
template <typename T>
ffi::Error PlanCall(const ScanShape& s, ffi::Span<const int64_t> dirs, int64_t chunk,
                    bool normalize, bool aligned, int kind, bool try_half, Plan* plan) {
  const int64_t S = s.C / s.G;
  const int vec = 16 / int(sizeof(T));
  // The vector path needs whole 16-byte vectors per pixel and groups that either fill whole
  // vectors or split one evenly.
  const bool vector_ok = aligned && s.C % vec == 0 && (S % vec == 0 || vec % S == 0);
  int64_t Lmax = 0;
  for (int64_t d : dirs) Lmax = std::max(Lmax, LineGeometry::Make(d, s.H, s.W).length);
  const int max_threads = kind == 0 ? kFwdThreads : kBwdThreads;
  if (Lmax > int64_t(max_threads) * kMaxPositions)
    return ffi::Error::InvalidArgument(
        "gspn_scan (CUDA): lines longer than " + std::to_string(max_threads * kMaxPositions) +
        " positions (H or W) are not supported by the " + (kind == 0 ? "forward" : "backward") +
        " kernel; use backend='reference'");
  // Half vectors (4 channels of 8 bytes) for 16-bit types (the backward: G = C only): twice the
  // threads per slab, each with half the arithmetic of a line (HalfVector).
  const bool half = try_half && vec == 8 && vector_ok &&
                    (kind == 0 ? (S == 1 || S % vec == 0) && Lmax <= kFwdThreads
                               : S == 1 && Lmax <= 512);
  if (try_half && !half) return ffi::Error::Internal("gspn_scan (CUDA): no half vectors here");
  // The vector path holds at most 2 positions per thread (registers); longer lines take the
  // scalar path.
  const int V = half ? vec / 2 : vector_ok && Lmax <= 2 * int64_t(max_threads) ? vec : 1;
  const int NG = S < V ? int(V / S) : 1;
  const int64_t lanes = S >= V ? S / V : 1;  // vector lanes of one group
  int full_sub = 1;  // the largest power of 2 (<= 32) dividing the group's lanes
  while (full_sub < 32 && lanes % (2 * full_sub) == 0) full_sub *= 2;
  const bool acc = kind == 1 && s.D > 1;
  // The L2 prefetch (PrefetchL2 in the kernels), by the prefetch sweeps of
  // docs/kernel_notes.md. The forward's (compiled for 16-bit types only: it made float32 up to
  // 2.4x slower, v8) pays only where a thread has few bytes in flight per line, one gate group
  // per vector, with 128-byte slabs: 32 x 1152 x 64 x 64 bfloat16 G = 72 0.439 ms without,
  // 0.386 with. Elsewhere it cost 1-20% (8 x 1152 x 128 x 128 bfloat16 G = C 0.801 -> 0.872
  // ms), and with 32-byte slabs 2.2x (v13).
  // The backward's (v9): it pays for 16-bit types and for float32 with several channels per
  // gate group (2-22% faster), but not with one channel per group in float32 (4% to 2x
  // slower), with 32-byte slabs (9% to 2x slower) or, when D > 1, with 64-byte slabs (two
  // positions per thread: 4-39% slower in v9; one: 64 x 64 bfloat16 G = C D = 4 7.6 ms
  // without, 9.0 with, v11). In blocks of more than 256 threads (v16), whose resident threads
  // keep more loads in flight, it pays only for 16-bit types with 128-byte slabs (32 x 1152 x
  // 64 x 64 bfloat16 G = 72 D = 1 0.826 ms with it, 0.878 without); elsewhere it cost 35-75%
  // (8 x 1152 x 128 x 128 float32 G = 72 D = 1 2.17 ms with it, 1.60 without).
  // CGSPN_CUDA_PREFETCH_FWD / _BWD = 0 / 1 override the rules.
  const char* prefetch_knob =
      std::getenv(kind == 0 ? "CGSPN_CUDA_PREFETCH_FWD" : "CGSPN_CUDA_PREFETCH_BWD");
  auto prefetch_for = [&](int64_t slab_bytes, int block_threads) {
    if (kind == 0) {
      if (prefetch_knob) return kPrefetchL2<T> && std::string(prefetch_knob) != "0";
      return kPrefetchL2<T> && NG == 1 && slab_bytes >= 128;
    }
    if (half && NG > 1) return false;  // G = C: 1.1-2.3x slower with it (v18): not compiled
    if (prefetch_knob) return std::string(prefetch_knob) != "0";
    return (kPrefetchL2<T> || S > 1) && slab_bytes >= 64 && !(s.D > 1 && slab_bytes < 128) &&
           (block_threads <= kBwdThreads || (sizeof(T) == 2 && slab_bytes >= 128));
  };

  const int sms = DeviceAttr(cudaDevAttrMultiProcessorCount, 132);
  const int smem_optin = DeviceAttr(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 << 10);
  const int64_t vtot = s.C / V;  // vectors per pixel
  const int64_t grid_lines = kind == 0 ? s.D * s.B : s.B;
  const int tiles = kind == 0 ? 2 : BwdTiles(int(sizeof(T)), NG);
  const char* sync_knob = std::getenv(kind == 0 ? "CGSPN_CUDA_FWD_SYNC" : "CGSPN_CUDA_BWD_SYNC");
  const bool block_sync_knob = sync_knob && std::string(sync_knob) == "block";
  int forced_p = EnvInt(kind == 0 ? "CGSPN_CUDA_P_FWD" : "CGSPN_CUDA_P_BWD");
  int forced_vs = EnvInt(kind == 0 ? "CGSPN_CUDA_VS_FWD" : "CGSPN_CUDA_VS_BWD");

  // Candidates (P, Vs), each scored by a tuple compared lexicographically (larger is better).
  using Key = std::array<int64_t, 8>;
  bool found = false;
  Key best_key{};
  const int max_p = half ? 1 : V > 1 ? 2 : kMaxPositions;
  // Fewest positions per thread whose line fits one block of kFwdThreads / kBwdThreads; the
  // backward's instances with larger blocks (BwdMaxThreads) may take fewer (below).
  int min_p = 1;
  while ((Lmax + min_p - 1) / min_p > max_threads) min_p *= 2;
  // Two passes: with the tuning knobs, then (if they fit no candidate) without them.
  for (int pass = 0; pass < 2 && !found; ++pass, forced_p = forced_vs = 0)
  for (int P = kind == 0 ? min_p : 1; P <= max_p; P *= 2) {
    // Forward: the fewest positions per thread (more spill registers), unless forced.
    if (forced_p ? P != forced_p : (kind == 0 && P != min_p)) continue;
    const int Pt = int((Lmax + P - 1) / P);
    // Block sizes differ between instances (kFwdMaxThreads, BwdMaxThreads): this one's bound.
    const int p_threads = kind == 0 ? FwdMaxThreads<T>(V, NG, P)
                                    : BwdMaxThreads(int(sizeof(T)), V, NG, P, acc);
    if (Pt > p_threads) continue;  // the line does not fit one block of this instance
    // Lanes of a group reduced by shuffles; the rest (npart) by the second launch. The forward
    // has no reduction.
    int nsub = kind == 1 ? full_sub : 1;
    while (int64_t(nsub) * Pt > p_threads) nsub /= 2;
    const int64_t npart = kind == 1 ? lanes / nsub : 1;
    const int64_t vs_cap = (vtot + nsub - 1) / nsub * nsub;
    for (int Vs = nsub; Vs <= vs_cap && Vs * Pt <= p_threads; Vs += nsub) {
      const int threads = (Vs * Pt + 31) / 32 * 32;  // whole warps: the shuffles use full masks
      // The backward's wide instance only for blocks that need it (BwdMaxThreads).
      const bool wide = kind == 1 && threads > kBwdThreads;
      if (half && kind == 1 && !wide) continue;  // the backward's half vectors: wide instances
      const int bound = kind == 1 && !wide ? kBwdThreads : p_threads;  // the instance's
      // Staged instances (BwdStaged) add their threads' two slots of inputs after the tiles.
      const bool staged = kind == 1 && BwdStaged(V, NG, P, wide);
      const size_t slots =
          staged ? size_t(2) * threads * BwdSlotBytes(int(sizeof(T)), V, NG, acc) : 0;
      const size_t smem =
          size_t(tiles) * Lmax * Vs * V * sizeof(float) + MbarBytes(bound) + slots;
      if (smem > size_t(smem_optin)) break;
      const int64_t bytes = int64_t(Vs) * V * sizeof(T);  // of a pixel, per block
      if (bytes > 128 && Vs > nsub) break;
      // Slabs that start mid-sector share that sector with the neighbouring block: only as
      // the whole pixel, the narrowest slab, or where a knob asks for it (to measure balanced
      // waves: 3-lane slabs at 128 x 128 bf16 give 2.91 equal waves instead of 2.18). The
      // forward's half vectors also take 16-byte multiples: at lines of 128 positions 48-byte
      // slabs in 768 threads ran 0.706 ms, 32-byte ones in 512 0.881 (v18, 8 x 1152 x 128 x 128
      // bfloat16; the whole vectors' plan 0.773).
      const bool half_fwd_ok = half && kind == 0 && bytes % 16 == 0;
      if (bytes % 32 != 0 && !half_fwd_ok && Vs != vs_cap && Vs != nsub && Vs != forced_vs)
        continue;
      if (forced_vs && Vs != forced_vs) continue;
      const bool prefetch = prefetch_for(bytes, threads);
      const void* kernel = KernelFor<T>(kind, V, NG, P, acc, prefetch, wide);
      const bool spills = kind == 1 && Spills(kernel);  // backward key
      const int64_t blocks = grid_lines * ((vtot + Vs - 1) / Vs);
      // Neighbour synchronisation (NeighbourSync in the kernels) where the instance has it;
      // CGSPN_CUDA_FWD_SYNC=block or CGSPN_CUDA_BWD_SYNC=block forces a block barrier per line.
      const bool neighbour_sync =
          !block_sync_knob && NeighbourSyncCompiled(kind == 1, int(sizeof(T)), NG, P);
      Key key;
      if (kind == 0) {
        int per_sm = 0;
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
        key = {bytes >= 32, std::min<int64_t>(blocks, sms), bytes >= 64,
               int64_t(per_sm) * threads, bytes, -P, 0, 0};
      } else if (V > 1) {
        // An instance with the neighbour synchronisation before a wider slab without it (the
        // 16-bit P = 2 instances with NG >= 4 have none: v12, 64 x 64 bfloat16 G = C D = 1
        // 1.60 -> 1.53 ms with P = 1 and 64-byte slabs, 128 x 128 2.00 -> 1.82 with 32-byte).
        // Then, on lines of up to 128 positions, a wide block before a wider slab (v16: 32 x
        // 1152 x 64 x 64 bfloat16 G = 72 D = 4 4.93 ms with 256 threads and 128-byte slabs, 4.57
        // with 384 threads and 96-byte slabs); on longer ones 256 threads of two positions
        // before 512 of one at the same slab (v21, 4 x 1152 x 128 x 256 G = 72: bfloat16 1.44
        // ms against 1.99, float32 2.54 against 3.92).
        key = {npart == 1, !spills, bytes >= 32, std::min<int64_t>(blocks, sms), neighbour_sync,
               wide == (Lmax <= 128), std::min<int64_t>(bytes, 128), -P};
      } else {  // scalar path: registers grow with P fastest
        key = {npart == 1, std::min<int64_t>(blocks, sms), -P, std::min<int64_t>(bytes, 128),
               -Vs, 0, 0, 0};
      }
      if (found && key <= best_key) continue;
      found = true;
      best_key = key;
      Launch& a = plan->a;
      a = {};
      a.B = s.B; a.H = s.H; a.W = s.W; a.C = s.C; a.G = s.G; a.S = S;
      a.D = int(s.D);
      for (int64_t i = 0; i < s.D; ++i) a.dir_bits |= int(dirs[i]) << (2 * i);
      a.chunk = chunk;
      a.normalize = normalize;
      a.Vs = Vs; a.Pt = Pt; a.Lmax = int(Lmax);
      a.nslab = int((vtot + Vs - 1) / Vs);
      a.nsub = nsub; a.npart = int(npart);
      a.neighbour_sync = neighbour_sync;
      a.prefetch = prefetch;
      plan->kernel = kernel;
      plan->V = V; plan->NG = NG; plan->P = P;
      plan->threads = threads;
      plan->staged = staged;
      plan->smem = smem;
      plan->blocks = blocks;
    }
  }
  if (!found)
    return ffi::Error::Internal("gspn_scan (CUDA): no launch configuration fits this call");
  SplitTail(plan, sizeof(T) * V, sms);
  return ffi::Error::Success();
}

// The launch plan of one call (PlanCall): of whole vectors, or of half ones where the rule
// (HalfVector) asks and a plan of them fits the call. The backward's rule needs no plan of whole
// vectors, so it plans those only where the half ones do not fit; the forward's needs their
// waves.
template <typename T>
ffi::Error MakePlan(const ScanShape& s, ffi::Span<const int64_t> dirs, int64_t chunk,
                    bool normalize, bool aligned, int kind, Plan* plan) {
  const bool half_types = sizeof(T) == 2;
  if (half_types && kind == 1 && HalfVector(kind, s, nullptr) &&
      PlanCall<T>(s, dirs, chunk, normalize, aligned, kind, true, plan).success())
    return ffi::Error::Success();
  const ffi::Error whole = PlanCall<T>(s, dirs, chunk, normalize, aligned, kind, false, plan);
  if (!half_types || kind == 1 || !HalfVector(kind, s, whole.success() ? plan : nullptr))
    return whole;
  Plan half{};
  if (!PlanCall<T>(s, dirs, chunk, normalize, aligned, kind, true, &half).success()) return whole;
  // Half vectors only in slabs of at least one 32-byte sector per pixel, as whole ones: on lines
  // of 256 positions a 768-thread block holds at most 3 half lanes, and the plan of 8-byte slabs
  // ran 4 x 1152 x 128 x 256 bfloat16 G = 72 at 2.12 ms against whole vectors' 0.535 (G = C
  // 4.34 against 0.81; docs/kernel_notes.md, v21). Forced half vectors are taken as planned.
  const char* half_knob = std::getenv("CGSPN_CUDA_HALF_FWD");
  if (!half_knob && half.a.Vs * half.V * int64_t(sizeof(T)) < 32) return whole;
  *plan = half;
  return ffi::Error::Success();
}

// Launches a plan's kernel on the stream. With CGSPN_CUDA_VERBOSE=1 it also prints the plan, the
// kernel's registers and how many of its blocks fit one multiprocessor (tuning experiments).
cudaError_t LaunchPlan(cudaStream_t st, const Plan& pl, void** args, const char* what) {
  if (cudaError_t e = AllowSharedMemory(pl.kernel, pl.smem)) return e;
  if (EnvInt("CGSPN_CUDA_VERBOSE")) {
    cudaFuncAttributes attr{};
    int per_sm = 0;
    cudaFuncGetAttributes(&attr, pl.kernel);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, pl.kernel, pl.threads, pl.smem);
    std::fprintf(stderr,
                 "gspn_scan CUDA %s: V=%d NG=%d P=%d Vs=%d Pt=%d threads=%d blocks=%lld smem=%zu "
                 "nsub=%d npart=%d prefetch=%d sync=%s tail=%lldx%d regs=%d local=%zu "
                 "blocks/SM=%d\n",
                 what, pl.V, pl.NG, pl.P, pl.a.Vs, pl.a.Pt, pl.threads,
                 static_cast<long long>(pl.blocks), pl.smem, pl.a.nsub, pl.a.npart,
                 int(pl.a.prefetch), pl.a.neighbour_sync ? "neighbour" : "block",
                 static_cast<long long>(pl.blocks - pl.a.tail_start), pl.a.tail_k, attr.numRegs,
                 attr.localSizeBytes, per_sm);
  }
  if (cudaError_t e = cudaLaunchKernel(pl.kernel, dim3(unsigned(pl.blocks)), dim3(pl.threads),
                                       args, pl.smem, st))
    return e;
  return cudaGetLastError();
}

ffi::Error CudaError(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("gspn_scan (CUDA) ") + what + ": " +
                              cudaGetErrorString(e));
}

// ------------------------------------------------------------------ the TMA forward

// A launch of `blocks` blocks in clusters of `cluster` (the TMA kernels' lockstep groups); the
// configuration points at `attr`, which must outlive it.
cudaLaunchConfig_t ClusterLaunch(int blocks, int cluster, int threads, size_t smem,
                                 cudaStream_t st, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(blocks));
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = unsigned(cluster);
  attr->val.clusterDim.y = attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// One launch of `kernel` in clusters of `cluster` blocks. Experiments (v28):
// CGSPN_CUDA_CLUSTER_POLICY=1|2 asks for the Spread or LoadBalancing cluster scheduling policy
// (where a cluster's blocks go), 0 or unset the default.
template <typename... Params, typename... Args>
cudaError_t LaunchInClusters(cudaStream_t st, void (*kernel)(Params...), int blocks, int cluster,
                             int threads, size_t smem, Args&&... args) {
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t cfg = ClusterLaunch(blocks, cluster, threads, smem, st, attr);
  if (const int policy = EnvInt("CGSPN_CUDA_CLUSTER_POLICY"); policy == 1 || policy == 2) {
    attr[1].id = cudaLaunchAttributeClusterSchedulingPolicyPreference;
    attr[1].val.clusterSchedulingPolicyPreference = cudaClusterSchedulingPolicy(policy);
    cfg.numAttrs = 2;
  }
  if (cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...)) return e;
  return cudaGetLastError();
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda);
// nullptr where the driver has none.
inline PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The L2 promotion of the TMA copies: none by default. A slab's box row is 96 bytes; a 256-byte
// promotion (v20's choice, from the model) also fetches bytes of the neighbouring slabs, which
// pays only where their blocks read them while they are still in L2. Measured against it (v24,
// H100, bfloat16 G = C / 16; docs/kernel_notes.md): 8 x 1152 x 128 x 128 forward D = 4 1.63 ->
// 1.58-1.60 ms, split rows of 256 0.47-0.55 -> 0.45-0.50, backward D = 1 1.00 -> 0.98, forward
// D = 1 within 1%. CGSPN_CUDA_TMA_L2=64, 128 or 256 selects a promotion (experiments).
inline CUtensorMapL2promotion TmaL2Promotion() {
  switch (EnvInt("CGSPN_CUDA_TMA_L2")) {
    case 64: return CU_TENSOR_MAP_L2_PROMOTION_L2_64B;
    case 128: return CU_TENSOR_MAP_L2_PROMOTION_L2_128B;
    case 256: return CU_TENSOR_MAP_L2_PROMOTION_L2_256B;
    default: return CU_TENSOR_MAP_L2_PROMOTION_NONE;
  }
}

// The TMA kernels' cluster size for `blocks` blocks of neighbouring slabs, groups of `run` of
// which scan the same lines: `preferred`, or CGSPN_CUDA_TMA_CLUSTER=2, 4 or 8 (experiments: how
// many neighbouring slabs keep in lockstep), where that divides both; else kTmaCluster.
inline int TmaClusterSize(int64_t blocks, int64_t run, int preferred) {
  const int knob = EnvInt("CGSPN_CUDA_TMA_CLUSTER");
  const int c = knob == 2 || knob == 4 || knob == 8 ? knob : preferred;
  return blocks % c == 0 && run % c == 0 ? c : kTmaCluster;
}

// How many clusters of `cluster` blocks of `kernel` (threads, smem bytes) can be resident at
// once on the idle GPU; 0 where none or the query fails. The plans ask at every call of the
// handler, so the answer is kept per device and query. The kernel is allowed `smem` first: the
// query counts no block that asks for more than the kernel's allowance (48 KB until raised).
int ActiveClusters(const void* kernel, int cluster, int threads, size_t smem) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, int, size_t>, int> known;
  const auto key = std::make_tuple(device, kernel, cluster, threads, smem);
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = known.find(key); it != known.end()) return it->second;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = ClusterLaunch(cluster, cluster, threads, smem, nullptr, &attr);
  int n = 0;
  if (AllowSharedMemory(kernel, smem) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess)
    n = 0;
  return known[key] = std::max(n, 0);
}

// The TMA kernels' line barrier (LineSyncKind) where a block reads nothing of its peers':
// `preferred`, unless CGSPN_CUDA_TMA_LOCKSTEP says 0 (a block barrier alone; also what an empty
// value reads as), 1 (the lockstep with a relaxed arrive; before v25, 1 meant release and
// acquire) or 2 (release and acquire at cluster scope); experiments. Split lines always take
// kLineSyncCluster. Measured (H100, v25, docs/kernel_notes.md; 8 x 1152 x 128 x 128 G = 72,
// three runs): the TMA backward 5% faster relaxed (bfloat16 0.868-0.914 ms against 0.925-0.931,
// float16 0.867-0.872 against 0.912-1.026), but the TMA forward slower (bfloat16 D = 1
// 0.446-0.453 against 0.432-0.449, D = 4 1.708-1.754 against 1.578-1.594; only 16 x 768 x 96 x
// 96 G = 48 gained, 0.303 against 0.309-0.313): each keeps its own.
inline int TmaLineSync(int preferred) {
  const int k = EnvInt("CGSPN_CUDA_TMA_LOCKSTEP", preferred);
  return k == kLineSyncBlock || k == kLineSyncLockstep || k == kLineSyncCluster ? k : preferred;
}
inline const char* LineSyncName(int kind) {
  return kind == kLineSyncBlock ? "block" : kind == kLineSyncCluster ? "cluster" : "lockstep";
}

// A map of [rows][W][inner] 16-bit elements at `base` with boxes [box_rows][box_w][box_inner].
// Out-of-range elements of a box (a partial last slab, the gates past the last group) read as 0.
template <typename T>
bool EncodeTmaMap(CUtensorMap* map, const T* base, int64_t inner, int64_t W, int64_t rows,
                  int box_inner, int box_w, int box_rows) {
  const cuuint64_t dims[3] = {cuuint64_t(inner), cuuint64_t(W), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(inner * sizeof(T)), cuuint64_t(inner * W * sizeof(T))};
  const cuuint32_t box[3] = {cuuint32_t(box_inner), cuuint32_t(box_w), cuuint32_t(box_rows)};
  const cuuint32_t elem[3] = {1, 1, 1};
  const CUtensorMapDataType type = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                             : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return TensorMapEncoder()(map, type, 3, const_cast<T*>(base), dims, strides, box, elem,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                            TmaL2Promotion(),
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The gate box's width: the gate elements of a slab's groups, from the 16-byte boundary at or
// before its first group's, rounded up to 8 elements; the widest over the slabs: those of
// kTmaSlab channels, or `even_slabs` even slabs of the TMA forward (TmaLaunch::units).
int TmaGateBox(const ScanShape& s, int64_t even_slabs = 0) {
  const int64_t Sg = s.C / s.G;
  const int64_t nslab = even_slabs > 0 ? even_slabs : (s.C + kTmaSlab - 1) / kTmaSlab;
  int gbox = 8;
  for (int64_t j = 0; j < nslab; ++j) {
    const int64_t c0 = even_slabs > 0 ? 16 * EvenSlabUnit(j, s.C / 16, nslab) : j * kTmaSlab;
    const int64_t c1 = even_slabs > 0 ? 16 * EvenSlabUnit(j + 1, s.C / 16, nslab)
                                      : std::min(c0 + kTmaSlab, s.C);
    const int64_t first = (3 * (c0 / Sg)) & ~int64_t(7);
    const int64_t end = 3 * ((c1 - 1) / Sg) + 3;
    gbox = std::max(gbox, int((end - first + 7) / 8 * 8));
  }
  return gbox;
}

// The row and column maps of one buffer, those a call's directions use (the others stay as
// they are: zero, never read). Boxes of row_box positions for rows, col_box for columns.
struct LineBoxes {
  bool rows, cols;
  int row_box, col_box;
  template <typename T>
  bool Encode(CUtensorMap* row, CUtensorMap* col, const T* base, int64_t inner, int64_t W,
              int64_t nrows, int box_inner) const {
    return (!rows || EncodeTmaMap(row, base, inner, W, nrows, box_inner, row_box, 1)) &&
           (!cols || EncodeTmaMap(col, base, inner, W, nrows, box_inner, 1, col_box));
  }
};

// The directions of a call as the TMA plans see them: whether any runs along rows or columns,
// and the shortest and longest line.
struct LineSpan {
  bool any_rows = false, any_cols = false;
  int64_t Lmin = kCudaMaxLineLength, Lmax = 0;
  int64_t steps_max = 0, steps_total = 0;  // lines of the longest scan, of all scans together
  LineSpan(const ScanShape& s, const int64_t* dirs) {
    for (int64_t d = 0; d < s.D; ++d) {
      const LineGeometry geo = LineGeometry::Make(dirs[d], s.H, s.W);
      (dirs[d] == kTopBottom || dirs[d] == kBottomTop ? any_rows : any_cols) = true;
      Lmax = std::max(Lmax, geo.length);
      Lmin = std::min(Lmin, geo.length);
      steps_max = std::max(steps_max, geo.steps);
      steps_total += geo.steps;
    }
  }
};

// How many blocks of `kernel` (threads, smem bytes) fit a multiprocessor, after allowing it that
// much shared memory; 0 where they do not or the query fails.
int BlocksPerSm(const void* kernel, int threads, size_t smem) {
  int per_sm = 0;
  if (AllowSharedMemory(kernel, smem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess)
    return 0;
  return per_sm;
}

bool BlocksFit(const void* kernel, int threads, size_t smem, int need) {
  return BlocksPerSm(kernel, threads, smem) >= need;
}

// How many blocks of `kernel`, launched in clusters of `cluster`, are resident at once on the
// idle GPU (a wave): the TMA kernels' loose lockstep (TmaLaunch::lead) waits only for the
// blocks of a block's own wave. At least one cluster.
int WaveBlocks(const void* kernel, int threads, size_t smem, int cluster) {
  const int clusters = ActiveClusters(kernel, cluster, threads, smem);
  const int64_t blocks = clusters > 0 ? int64_t(clusters) * cluster
                                      : int64_t(BlocksPerSm(kernel, threads, smem)) *
                                            DeviceAttr(cudaDevAttrMultiProcessorCount, 132) /
                                            cluster * cluster;
  return int(std::clamp<int64_t>(blocks, cluster, INT32_MAX));
}

// The loose lockstep's most sleeps per line (CGSPN_CUDA_TMA_LEAD_WAIT ns in all, 4096 by default).
int LeadPolls() {
  return std::max(0, EnvInt("CGSPN_CUDA_TMA_LEAD_WAIT", 4096)) / int(kTmaLeadPollNs);
}

// The blocks of a wave of the loose lockstep (TmaLaunch::lead_wave): `wave`, what fits the GPU
// at once, or CGSPN_CUDA_TMA_LEAD_WAVE=n (tests); at most the call's `blocks`, at least 1.
int LeadWave(int wave, int64_t blocks) {
  return int(std::clamp<int64_t>(EnvInt("CGSPN_CUDA_TMA_LEAD_WAVE", wave), 1,
                                 std::max<int64_t>(blocks, 1)));
}

// The waves of the loose lockstep's arrival words.
int64_t LeadWaves(int blocks, int wave) { return (int64_t(blocks) + wave - 1) / wave; }

// `words` zeroed words of scratch, on the stream; *out stays null where scratch cannot be had
// (the counts it holds steer only the speed: the callers then do without them).
cudaError_t ZeroedScratch(ffi::ScratchAllocator& scratch, size_t words, cudaStream_t st,
                          unsigned** out) {
  *out = nullptr;
  auto mem = scratch.Allocate(words * sizeof(unsigned), 16);
  if (!mem) return cudaSuccess;
  *out = static_cast<unsigned*>(*mem);
  return cudaMemsetAsync(*out, 0, words * sizeof(unsigned), st);
}

struct TmaPlan {
  TmaMaps maps;
  TmaLaunch a;
  int blocks, cluster;
  // Consumer warps: kTmaWarps, or kTmaWideWarps where the last wave is <= 7/8 full; lone wide
  // blocks (slabs wider than kTmaSlab, GspnFwdTmaLoneKernel) kTmaLoneWarps or kTmaLoneFewWarps.
  int warps;
  size_t smem;
  bool lone() const { return a.swide > kTmaSlab; }  // (swide is 0 but for even slabs)
};

template <typename T>
auto TmaFwdKernelFor(int warps, bool even, bool lone = false) {
  if (lone)
    return warps == kTmaLoneFewWarps ? GspnFwdTmaLoneKernel<T, kTmaLoneFewWarps>
                                     : GspnFwdTmaLoneKernel<T, kTmaLoneWarps>;
  const bool wide = warps == kTmaWideWarps;
  if (even)
    return wide ? GspnFwdTmaKernel<T, kTmaWideWarps, true> : GspnFwdTmaKernel<T, kTmaWarps, true>;
  return wide ? GspnFwdTmaKernel<T, kTmaWideWarps, false> : GspnFwdTmaKernel<T, kTmaWarps, false>;
}

// When the TMA forward's line barrier turns from release and acquire to the relaxed lockstep
// (TmaLaunch::relax_at): once fewer than R of the call's `blocks` blocks remain, R = 4/3 of the
// multiprocessors (176 on an H100; CGSPN_CUDA_TMA_RELAX_BELOW=R for experiments), and from the
// start on lines of at most 96 positions. Measured (H100, docs/kernel_notes.md, v27; 1152
// channels, bfloat16 G = 72, each form forced): at 128 x 128 the relaxed lockstep 19-23% faster
// at 2-6 images (48-144 blocks) and 9% at 7 (168), release and acquire 2-7% faster at 8-10
// (192-240) and 3.5% at D = 4 (768); at 96 x 96 the relaxed 9-22% faster at every batch (6-24
// images of 768 channels: 96-384 blocks).
int TmaRelaxAt(int64_t blocks, int64_t Lmax) {
  if (Lmax <= 96) return 0;
  const int sms = DeviceAttr(cudaDevAttrMultiProcessorCount, 132);
  const int64_t below = EnvInt("CGSPN_CUDA_TMA_RELAX_BELOW", sms * 4 / 3);
  return int(std::clamp<int64_t>(blocks - below, 0, INT32_MAX));
}

// Whether the TMA forward takes a call, and its launch. It needs: a 16-bit type; 16-byte aligned
// buffers, C and 3 G multiples of 8 (the maps' row strides and the gate boxes' 16-byte starts);
// whole gate groups per 8-channel vector; lines of at most 2 kTmaMaxLine positions; an even
// number of blocks whose pairs (the clusters) scan equally many lines. Where it can, the plan
// takes it for lines of more than 64 positions: measured there (8 x 1152 x 128 x 128 bfloat16
// G = 72), not at 64, where the register forward is as fast (docs/kernel_notes.md, v20).
// Lines longer than kTmaMaxLine are split between a cluster's two blocks (TmaLaunch::split;
// v21: 4 x 1152 x 128 x 256 bfloat16 G = 72 0.536 ms with the register forward, 0.476 split;
// 16 x 768 x 96 x 192 G = 48 D = 4 3.89 -> 2.86).
// CGSPN_CUDA_TMA_FWD=0 never takes it, =1 wherever it can; CGSPN_CUDA_TMA_SPLIT=1 splits
// shorter lines too (tests, A/B).
// CGSPN_CUDA_TMA_FWD_SLABS unset: the plan's rule of slabs (PlanTmaForward).
constexpr int kSlabsRule = INT32_MIN;

template <typename T>
bool PlanTmaForward(const ScanShape& s, const int64_t* dirs, bool aligned, int64_t chunk,
                    bool normalize, const T* x, const T* lam, const T* w, const T* h,
                    TmaPlan* tp) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  const int knob = EnvInt("CGSPN_CUDA_TMA_FWD", -1);
  if (knob == 0 || !aligned || s.C % 8 || (3 * s.G) % 8 || (s.C / s.G) % 8) return false;
  const LineSpan span(s, dirs);
  const bool any_rows = span.any_rows, any_cols = span.any_cols;
  const int64_t Lmax = span.Lmax, Lmin = span.Lmin;
  if (Lmax > 2 * kTmaMaxLine || (knob != 1 && Lmin <= 64)) return false;
  // Calls of several directions with column lines whose positions lie more than 512 KB apart
  // (W C 16-bit elements) keep the register forward (the whole call, rows too). Measured (v21,
  // v22) with 590 KB (1152 channels, W = 256): at D = 4 the TMA forward ran 1.07-1.64x slower
  // at every batch (2 x 1152 x 256 x 256 bfloat16 G = 72 2.81 ms against 1.92), lr + rl alone
  // 1.18x, tb + bt alone 1.06x; but one direction alone 13-21% faster (lr 0.587 against 0.728,
  // tb 0.578 against 0.666), so neither the stride nor lines of 256 steps alone is the cause.
  // With 295 KB (W = 128, 192) it was 7-26% faster at D = 4.
  if (knob != 1 && s.D > 1 && any_cols && s.W * s.C * int64_t(sizeof(T)) > (512 << 10))
    return false;
  const bool split = Lmax > kTmaMaxLine || EnvInt("CGSPN_CUDA_TMA_SPLIT") == 1;
  const int64_t Lb = split ? (Lmax + 1) / 2 : Lmax;  // positions of a block's box, at most
  // Even slabs (TmaLaunch::units): a line's C / 16 units of 16 channels in n slabs of 2 or 3
  // units, 32 or 48 channels (a 32-byte sector's multiple: slabs of 40 channels ran 3-12% slower
  // at 8 images, v45; narrower ones move too few bytes a box row: v21, v27).
  // The plan's rule (v46): slabs of 32 channels where the default's 48 would put more blocks
  // than multiprocessors (some SMs running a pair, the rest one block, all held to the pairs'
  // pace by the lockstep) and those of 32 fill at most a wave of two blocks a multiprocessor, so
  // that every SM runs a pair of narrower blocks (and 6 consumer warps, below). Measured (H200,
  // v46, tune family slabrule, medians of three against the 48-channel slabs; bfloat16 G = C /
  // 16 at 128 x 128 unless said; docs/kernel_notes.md): 1152 channels, 6 images 0.307 -> 0.254
  // ms, 7 images 0.312 -> 0.269; 768 x 10 0.314 -> 0.265, x 11 0.316 -> 0.272; 1536 x 5 0.311
  // -> 0.264; 3 x 1152 rows and columns 0.310 -> 0.265; 7 x 1152 at 112 x 112 0.250 -> 0.222;
  // 10 x 768 at 96 x 96 0.197 -> 0.157 (11-20% faster). Calls this rule leaves alone (2, 4, 5,
  // 8 and 9 images of 1152, 6 x 768, 4 x 1536, D = 4) within 1%. (Tune family evenrule, v46 on
  // v45's plan: where the default's blocks fit one a multiprocessor the narrow ones, paired, ran
  // 18-28% slower; at 8 x 1152, 288 narrow blocks, more than a wave, slabs of both widths
  // filling the wave gained nothing.)
  // Before those pairs (v47): lone wide blocks, slabs of 64 or 80 channels, one block a
  // multiprocessor (GspnFwdTmaLoneKernel), wherever as many as the multiprocessors hold all the
  // units of a line (at most 5 units a block) and are resident at once, on lines of more than
  // 96 positions: no SM then carries more than 5 units (the 48-channel slabs put 6 on the SMs
  // running a pair, 3 on the rest), and a lone block's line costs little more for each unit it
  // adds (v46b: 2 -> 3 units 5%). Measured (H200, v47, medians of three; bfloat16 at 128 x 128
  // unless said): where v46b's plan took 48-channel slabs, 14-16% faster (tune families lonewide
  // and lonerule): 8 x 1152 G = 72 0.351 -> 0.297 ms (128 blocks), float16 0.352 -> 0.302, at
  // 112 x 112 0.283 -> 0.242, 12 x 768 G = 48 0.357 -> 0.306 (132), 6 x 1536 G = 96 0.352 ->
  // 0.299 (132), 2 x 1152 D = 4 0.355 -> 0.301; where it took the pairs of 32, 2-5% faster
  // (lonerule): 6 x 1152 0.256 -> 0.251, 7 x 1152 0.265 -> 0.257, 10 x 768 0.265 -> 0.255,
  // 11 x 768 0.277 -> 0.264, 5 x 1536 0.269 -> 0.260, 7 x 1152 float16 0.265 -> 0.260, 7 x 1152
  // at 112 x 112 0.221 -> 0.211, 3 x 1152 rows and columns 0.264 -> 0.253. But 12% slower at
  // 10 x 768 x 96 x 96 (0.173 against the pairs' 0.154): on lines that short a line's fixed
  // costs (the barrier, the copies' latency) weigh more, and two blocks a multiprocessor overlap
  // them; so not on lines of 96 or fewer. Not past a wave: 9 x 1152 in 144 of them ran 0.554
  // against 0.357. CGSPN_CUDA_TMA_FWD_LONE=0 leaves them out of the rule (the pairs of 32 where
  // they fit).
  // Where the default's blocks leave multiprocessors idle, as many slabs as fill them with one
  // block each (of both widths where they do not divide): 2-6% faster at all 13 calls of tune
  // family lonefill, C = 128-1536, 1-32 images, D = 1 and 4 (H200, v46b, medians of three against
  // the 48-channel slabs, two calls: 32 x 128 x 128 x 128 G = 8 0.212 -> 0.200 ms, 3 x 1152 G =
  // 72 0.210 -> 0.199, 1 x 1152 D = 4 0.220 -> 0.212, 8 x 128 0.194 -> 0.189); unchanged where
  // it adds a slab or two (5 x 1152: 26 slabs, 4 x 1536: 33; slabrule's -2).
  // Both rules give some calls whose 48-channel blocks were an odd count (D B and ceil(C / 48)
  // odd, e.g. C = 128), which took the register forward, an even count, and so the TMA forward,
  // as every other call of lines over 64 positions, where it measured faster (v20, below).
  // CGSPN_CUDA_TMA_FWD_SLABS=0 (or any negative but -1, -2, -3) keeps the 48-channel slabs (a
  // partial last one); =n asks n, clamped to the widths' bounds; -1 as many as fill a wave of two
  // blocks a multiprocessor, -2 as many as fill the multiprocessors with one block each (without
  // the rules' conditions), -3 as many slabs of 64 or 80 channels as fill the multiprocessors with
  // one block each (GspnFwdTmaLoneKernel, without the rule's conditions; 20 consumer warps,
  // CGSPN_CUDA_TMA_FWD_WARPS=10: 10). A count that would leave a cluster straddling two directions
  // of different line counts moves by one (below); where neither neighbour does either, the
  // 48-channel slabs. Not on split lines, nor where C is not a multiple of 16 or below 32. (The TMA
  // forward's C is a multiple of 64: G and C / G multiples of 8.)
  const int64_t units = s.C / 16, lo = (units + 2) / 3, hi = units / 2;
  const int64_t lines = std::max<int64_t>(1, s.D * s.B);
  const int sms = DeviceAttr(cudaDevAttrMultiProcessorCount, 132);
  const int slabs_knob = EnvInt("CGSPN_CUDA_TMA_FWD_SLABS", kSlabsRule);
  const int64_t default_slabs = (s.C + kTmaSlab - 1) / kTmaSlab;
  const bool rule = slabs_knob == kSlabsRule;
  const bool pair_rule = rule && lines * default_slabs > sms;
  const int64_t lone_fill = std::max<int64_t>(1, sms / lines);
  const int64_t want = pair_rule ? (lines * hi <= 2 * sms && units % 2 == 0 ? hi : 0)
                       : rule || slabs_knob == -2 ? lone_fill
                       : slabs_knob == -1         ? 2 * sms / lines
                                                  : slabs_knob;
  auto pairs_whole = [&](int64_t n) {  // the clusters' rule, below
    return (s.D * s.B * n) % kTmaCluster == 0 && ((s.B * n) % kTmaCluster == 0 || s.H == s.W);
  };
  auto round128 = [](int64_t n) { return int((n + 127) / 128 * 128); };
  // A block's shared memory: kTmaStages stages of {x, lam, gates} boxes, the h tiles by line
  // parity (float), the mbarriers, the line barrier's kinds.
  auto smem_of = [&](int64_t width, int gbox) {
    return size_t(kTmaStages) * (2 * round128(Lb * width * sizeof(T)) +
                                 round128(Lb * gbox * sizeof(T))) +
           2 * Lb * width * 4 + 2 * kTmaStages * 8 + 2 * sizeof(int);
  };
  int64_t nslab = default_slabs;
  bool even = false, wide_lone = false;
  const bool lone_rule = pair_rule && Lmin > 96 && EnvInt("CGSPN_CUDA_TMA_FWD_LONE", 1) != 0;
  if ((slabs_knob == -3 || lone_rule) && !split && s.C % 16 == 0) {
    // Lone wide blocks (GspnFwdTmaLoneKernel): as many slabs of 4 or 5 units as fill the
    // multiprocessors with one block each. The rule's first choice (v47): where they fit one
    // wave, before the pairs of 32 (the rule only for as many blocks as multiprocessors, and
    // those resident at once in clusters).
    const int64_t wlo = (units + 4) / 5, whi = units / 4;
    const int64_t n = lone_rule ? std::min<int64_t>(sms / lines, whi)
                                : std::clamp<int64_t>(sms / lines, wlo, std::max(wlo, whi));
    for (const int64_t m : {n, n - 1, n + 1}) {
      if (m < wlo || m > whi || !pairs_whole(m)) continue;
      if (lone_rule &&
          (m > n || WaveBlocks(reinterpret_cast<const void*>(
                                   TmaFwdKernelFor<T>(kTmaLoneWarps, true, true)),
                               TmaThreadsOf(kTmaLoneWarps),
                               smem_of(16 * ((units + m - 1) / m), TmaGateBox(s, m)),
                               kTmaCluster) < lines * m))
        continue;
      nslab = m, even = wide_lone = true;
      break;
    }
  }
  if (!wide_lone && want > 0 && !split && s.C % 16 == 0 && units >= 2) {
    const int64_t n = std::clamp<int64_t>(want, lo, hi);
    for (const int64_t m : {n, n - 1, n + 1})
      // The rule only for more slabs than the 48-channel ones (C = 64: 48 + 16 stays), and
      // never for more blocks than it asked.
      if (m >= lo && m <= hi && pairs_whole(m) && (!rule || (m > default_slabs && m <= n))) {
        nslab = m, even = true;
        break;
      }
  }
  const bool rule_slabs = even && pair_rule && !wide_lone;
  const int swide = even ? int(16 * ((units + nslab - 1) / nslab)) : kTmaSlab;
  const int snarrow = even ? int(16 * (units / nslab)) : kTmaSlab;
  const int64_t blocks = s.D * s.B * nslab * (split ? 2 : 1);
  // A cluster's two blocks must scan the same number of lines: never straddle two directions
  // of different line counts (the halves of one line always do).
  if (!split && (blocks % kTmaCluster || ((s.B * nslab) % kTmaCluster && s.H != s.W)))
    return false;
  tp->cluster = split ? kTmaCluster
                      : TmaClusterSize(blocks, s.H == s.W ? blocks : s.B * nslab, kTmaCluster);
  if (blocks > INT32_MAX || s.D * s.B * s.H > INT32_MAX || !TensorMapEncoder()) return false;
  const int gbox = TmaGateBox(s, even ? nslab : 0);
  TmaLaunch& a = tp->a;
  a = {};
  if (even) a.units = int(units), a.swide = swide;
  a.B = int(s.B), a.H = int(s.H), a.W = int(s.W), a.C = int(s.C), a.G = int(s.G);
  a.D = int(s.D);
  for (int64_t d = 0; d < s.D; ++d) a.dir_bits |= int(dirs[d]) << (2 * d);
  a.nslab = int(nslab), a.gbox = gbox, a.restarts = LineRestarts::Make(chunk),
      a.normalize = normalize;
  a.split = split;
  a.lockstep = split ? kLineSyncCluster : TmaLineSync(kLineSyncCluster);
  a.relax_at = split || EnvInt("CGSPN_CUDA_TMA_LOCKSTEP", -1) >= 0
                   ? INT32_MAX
                   : TmaRelaxAt(blocks, Lmax);
  if (a.relax_at == 0) a.lockstep = kLineSyncLockstep;  // relaxed from the first line
  a.pace = std::max(0, EnvInt("CGSPN_CUDA_TMA_PACE"));
  if (const char* ids = std::getenv("CGSPN_CUDA_TMA_PACE_SMS"); ids && *ids) {
    a.pace_masked = 1;  // an experiment: comma-separated %smid values (0-255)
    for (const char* c = ids; *c;) {
      char* end = nullptr;
      const long id = std::strtol(c, &end, 10);
      if (end == c) break;
      if (id >= 0 && id < 256) a.pace_sms[id / 32] |= 1u << (id % 32);
      c = *end == ',' ? end + 1 : end;
    }
  }
  // h as bulk tensor stores from the stage unless CGSPN_CUDA_TMA_FWD_BULK=0 (v26: 1.5-3% faster).
  // Not in calls of split lines whose column lines are odd (the whole call): the second half's
  // box would run past the image into the next image's (or direction's) first row, which is
  // inside the map. (A row line's runs past W, and the store drops what lies outside the
  // tensor.)
  a.bulk_h = (!split || !any_cols || s.H % 2 == 0) && EnvInt("CGSPN_CUDA_TMA_FWD_BULK", 1) == 1;
  // lam and the gates copied before the wait for the bulk store's read unless
  // CGSPN_CUDA_TMA_FWD_EARLY=0 (v34: 1-3% faster).
  a.early = a.bulk_h && EnvInt("CGSPN_CUDA_TMA_FWD_EARLY", 1) == 1;
  const int lead_knob = EnvInt("CGSPN_CUDA_TMA_LEAD", -1);
  a.lead = split ? 0 : std::max(0, lead_knob);
  a.lead_polls = LeadPolls();
  a.lead_blocks = int(blocks);
  a.steps_max = int(span.steps_max);
  a.xbytes = round128(Lb * swide * sizeof(T));
  a.gbytes = round128(Lb * gbox * sizeof(T));
  tp->blocks = int(blocks);
  tp->smem = smem_of(swide, gbox);
  const int warps_knob = EnvInt("CGSPN_CUDA_TMA_FWD_WARPS", -1);
  tp->warps = !wide_lone                       ? kTmaWarps
              : warps_knob == kTmaLoneFewWarps ? kTmaLoneFewWarps
                                               : kTmaLoneWarps;
  if (!BlocksFit(reinterpret_cast<const void*>(TmaFwdKernelFor<T>(tp->warps, even, wide_lone)),
                 TmaThreadsOf(tp->warps), tp->smem, knob == 1 || wide_lone ? 1 : 2))
    return false;
  const int narrow_wave =
      WaveBlocks(reinterpret_cast<const void*>(TmaFwdKernelFor<T>(tp->warps, even, wide_lone)),
                 TmaThreadsOf(tp->warps), tp->smem, tp->cluster);
  // 12 consumer warps of 2 items where the call's last wave fills at most 7/8 of a wave (so
  // that a quarter or more of the multiprocessors run a lone block), else 6 of 4;
  // CGSPN_CUDA_TMA_FWD_WARPS=6 or 12 forces a count. A lone block's line is mostly its consumer
  // warps' instruction latency (v35: ~700 instructions a warp and line at ~5 cycles each); twice
  // the warps of half the items hide more of it. Measured (H200, v36, tune family fwdwarps;
  // bfloat16 1152 x 128 x 128 G = 72 but the last; 6 / 12 warps, ms, means of two runs): 2
  // images (48 blocks) 0.236 / 0.202, 4 (96) 0.242 / 0.225, 8 (192) 0.352 / 0.349, 12 (288: a
  // last wave of 24) 0.621 / 0.608, 2 x 128 x 256 (96 split blocks) 0.267 / 0.256; 11 images
  // (264: two blocks on every multiprocessor) and D = 4 (a last wave of 240) alike; 16 x 768 x
  // 96 x 96 G = 48 (256 blocks) 0.217 / 0.220. (Same shared memory; 72 registers a thread, 24
  // bytes spilled.)
  const int last_wave = int((blocks - 1) % narrow_wave) + 1;
  // The rule's slabs of 32 (every multiprocessor a pair, above) take 6: measured (H200, v46,
  // tune family slabrule, one run in each of two calls) 6.5-12.5% faster than 12 at 216-264
  // blocks (6 images of 1152 x 128 x 128 bfloat16 G = 72, 216 blocks: 0.255-0.262 ms against
  // 0.286-0.293; 10 x 768 at 240: 0.264-0.265 against 0.291-0.292).
  const int warps = warps_knob == kTmaWarps || warps_knob == kTmaWideWarps ? warps_knob
                    : rule_slabs                                          ? kTmaWarps
                    : 8 * last_wave <= 7 * narrow_wave                    ? kTmaWideWarps
                                                                          : kTmaWarps;
  if (!wide_lone && warps != kTmaWarps &&
      BlocksFit(reinterpret_cast<const void*>(TmaFwdKernelFor<T>(warps, even)),
                TmaThreadsOf(warps), tp->smem, knob == 1 ? 1 : 2))
    tp->warps = warps;
  // The grid's loose lockstep holds the blocks of each wave together (TmaLaunch::lead_wave).
  // The plan takes it, with the relaxed line barrier throughout, where the barrier would
  // otherwise start with release and acquire (more than 4/3 SMs' worth of blocks: TmaRelaxAt);
  // a wave of at most 4/3 SMs' worth does not wait. Measured (H100, docs/kernel_notes.md, v29):
  // the relaxed lockstep leaves the blocks of the cluster scheduler's 8-SM units (filled with
  // two blocks per SM) 20% behind, which the release's fence hides at the price of every line;
  // held within kTmaLeadLines lines of the slowest block, 8 and 10 images of 1152 x 128 x 128
  // bfloat16 G = 72 ran 8% and 7% faster than v27's adaptive barrier (with fewer blocks, 6
  // images, the lead cost 11%); wave by wave (v30), 12 and 16 images 5% and 2% faster, D = 4 at
  // 4 and 8 images 2% and 3%. CGSPN_CUDA_TMA_LEAD_WAVES=0 keeps it to calls of one wave (v29);
  // CGSPN_CUDA_TMA_LEAD_WAVE=n: waves of n blocks (tests).
  const int wave =
      WaveBlocks(reinterpret_cast<const void*>(TmaFwdKernelFor<T>(tp->warps, even, wide_lone)),
                 TmaThreadsOf(tp->warps), tp->smem, tp->cluster);
  a.lead_wave = LeadWave(wave, blocks);
  // (Not where no wave would wait: a wave of at most lead_min blocks, on a GPU that holds few.)
  if (lead_knob < 0 && EnvInt("CGSPN_CUDA_TMA_RELAX_BELOW", -1) < 0 && a.relax_at > 0 &&
      a.relax_at < INT32_MAX && std::min<int64_t>(blocks, a.lead_wave) > sms * 4 / 3 &&
      (blocks <= wave || EnvInt("CGSPN_CUDA_TMA_LEAD_WAVES", 1) != 0)) {
    a.lead = kTmaLeadLines;
    a.lead_min = sms * 4 / 3;
    a.relax_at = 0;
    a.lockstep = kLineSyncLockstep;
  }
  // The maps (only those a direction of the call uses; the others stay zero, never read).
  tp->maps = {};
  const int64_t xrows = s.B * s.H, drows = s.D * s.B * s.H;
  TmaMaps& m = tp->maps;
  // Boxes of a block's positions: the whole line, or half of it (rounded up) where split.
  const LineBoxes boxes{any_rows, any_cols, int(split ? (s.W + 1) / 2 : s.W),
                        int(split ? (s.H + 1) / 2 : s.H)};
  const bool two_widths = snarrow != swide;
  return boxes.Encode(&m.x_row, &m.x_col, x, s.C, s.W, xrows, swide) &&
         boxes.Encode(&m.lam_row, &m.lam_col, lam, s.C, s.W, drows, swide) &&
         boxes.Encode(&m.w_row, &m.w_col, w, 3 * s.G, s.W, drows, gbox) &&
         (!a.bulk_h || boxes.Encode(&m.h_row, &m.h_col, h, s.C, s.W, drows, swide)) &&
         (!two_widths ||
          (boxes.Encode(&m.x_row_n, &m.x_col_n, x, s.C, s.W, xrows, snarrow) &&
           boxes.Encode(&m.lam_row_n, &m.lam_col_n, lam, s.C, s.W, drows, snarrow) &&
           (!a.bulk_h || boxes.Encode(&m.h_row_n, &m.h_col_n, h, s.C, s.W, drows, snarrow))));
}

template <typename T>
cudaError_t LaunchTmaForward(cudaStream_t st, TmaPlan& tp, T* h, unsigned* done) {
  const bool even = tp.a.units > 0;  // TmaLaunch::units
  const auto kernel = TmaFwdKernelFor<T>(tp.warps, even, tp.lone());
  const int threads = TmaThreadsOf(tp.warps);
  if (EnvInt("CGSPN_CUDA_VERBOSE"))
    std::fprintf(stderr, "gspn_scan CUDA forward: TMA S=%d threads=%d blocks=%d smem=%zu "
                 "cluster=%d linesync=%s relax_at=%d gbox=%d split=%d bulk_h=%d early=%d pace=%d "
                 "lead=%d wave=%d blocks/SM=%d slabs=%d widths=%d-%d lone=%d\n",
                 even ? tp.a.swide : kTmaSlab, threads, tp.blocks, tp.smem, tp.cluster,
                 LineSyncName(tp.a.lockstep),
                 tp.a.relax_at == INT32_MAX ? -1 : tp.a.relax_at, tp.a.gbox, tp.a.split,
                 tp.a.bulk_h, tp.a.early, tp.a.pace, tp.a.lead, tp.a.lead > 0 ? tp.a.lead_wave : 0,
                 BlocksPerSm(reinterpret_cast<const void*>(kernel), threads, tp.smem),
                 tp.a.nslab, even ? 16 * (tp.a.units / tp.a.nslab) : kTmaSlab,
                 even ? tp.a.swide : kTmaSlab, int(tp.lone()));
  return LaunchInClusters(st, kernel, tp.blocks, tp.cluster, threads, tp.smem, tp.maps, h, done,
                          tp.a);
}

// An experiment (CGSPN_CUDA_TMA_TRACE=file): the launch with each block's line times recorded
// (GspnFwdTmaKernel), waited for and written to `path` as int64 words: the block count, the
// words per block, then the blocks' traces. It synchronises the stream: never in real use.
template <typename T>
cudaError_t TracedTmaForward(cudaStream_t st, TmaPlan& tp, T* h, unsigned* done,
                             const char* path) {
  const int T_max = tp.a.steps_max;
  const int64_t words = int64_t(tp.blocks) * TmaTraceWords(T_max);
  // Every block writes T_max words' room; a block of shorter lines leaves its tail zero.
  unsigned long long* trace = nullptr;
  cudaError_t e = cudaMallocAsync(&trace, words * 8, st);
  if (e == cudaSuccess) e = cudaMemsetAsync(trace, 0, words * 8, st);
  if (e != cudaSuccess) return e;
  TmaPlan traced = tp;
  traced.a.trace = trace;
  traced.a.trace_words = TmaTraceWords(T_max);
  e = LaunchTmaForward<T>(st, traced, h, done);
  std::vector<unsigned long long> host(words);
  if (e == cudaSuccess)
    e = cudaMemcpyAsync(host.data(), trace, words * 8, cudaMemcpyDeviceToHost, st);
  if (e == cudaSuccess) e = cudaStreamSynchronize(st);
  cudaFreeAsync(trace, st);
  if (e != cudaSuccess) return e;
  // The results are computed either way: a trace that cannot be written is reported, not fatal.
  FILE* f = std::fopen(path, "wb");
  const int64_t head[2] = {tp.blocks, TmaTraceWords(T_max)};
  const bool written = f && std::fwrite(head, sizeof(head), 1, f) == 1 &&
                       std::fwrite(host.data(), 8, host.size(), f) == host.size();
  if (f) std::fclose(f);
  if (!written)
    std::fprintf(stderr, "gspn_scan CUDA forward: CGSPN_CUDA_TMA_TRACE=%s could not be written\n",
                 path);
  return cudaSuccess;
}

// ------------------------------------------------------------------ the TMA backward

struct TmaBwdPlan {
  TmaBwdMaps maps;
  TmaBwdLaunch a;
  int blocks, cluster;
  int lines;  // that each block scans, all directions: the loose lockstep's arrival words
  size_t smem;
  // How the running dx sum is loaded, GspnBwdTmaKernel's kAcc: 0 none (D = 1), 1 by line, 2
  // item by item, 3 item by item with the last item's carry in shared memory. A choice of
  // instance, so the plan's and not the kernel's launch struct.
  int acc_form = 0;
};

// The TMA backward's instance for a plan: D = 1 (no running dx sum), or the sum's form; the
// one that reads the experiments' modes only where one is set.
template <typename T, bool kModes>
auto TmaBwdKernelOf(int acc_form) {
  return acc_form == 3   ? GspnBwdTmaKernel<T, 3, kModes>
         : acc_form == 2 ? GspnBwdTmaKernel<T, 2, kModes>
         : acc_form == 1 ? GspnBwdTmaKernel<T, 1, kModes>
                         : GspnBwdTmaKernel<T, 0, kModes>;
}
template <typename T>
auto TmaBwdKernelFor(const TmaBwdPlan& tp) {
  return tp.a.mode != 0 ? TmaBwdKernelOf<T, true>(tp.acc_form)
                        : TmaBwdKernelOf<T, false>(tp.acc_form);
}

// Whether the TMA backward takes a call, and its launch. It needs what the TMA forward needs
// (16-bit, aligned, C and 3 G multiples of 8) and: gate groups of 8 or 16 channels (the gate
// gradient's reduction is one shuffle between a thread and its neighbour); lines of at most
// kTmaMaxLine positions; an even number of (image, slab) blocks, for the clusters (of eight
// where they divide the blocks, below; else of two).
// The plan takes it only where it measured faster than the register backward (H100, v22,
// docs/kernel_notes.md): one direction, gate groups of 16 channels, lines of 97-128 positions
// (8 x 1152 x 128 x 128 bfloat16 G = 72 1.03-1.06 ms against 1.07-1.09; float16 1.00-1.03
// against 1.02-1.03). It was slower on 64-position lines (1.01 against 0.84 ms, with half its
// warps idle) and 1.4-1.6x slower at D = 4 (the running dx sum through registers). At D > 1 its
// item-by-item form (v31-v32) ties the register backward at 8 x 1152 x 128 x 128 and wins at
// 4-5 images, but loses 4-17% where a wave holds 144 or more blocks: not taken there either.
// CGSPN_CUDA_TMA_BWD=0 never takes it, =1 wherever it can (tests, A/B);
// CGSPN_CUDA_TMA_BWD_MODE times parts of it (see TmaBwdLaunch::mode; results are then wrong).
template <typename T>
bool PlanTmaBackward(const ScanShape& s, const int64_t* dirs, bool aligned, int64_t chunk,
                     bool normalize, const T* x, const T* lam, const T* w, const T* h,
                     const T* dh, const T* dx, const T* dlam, TmaBwdPlan* tp) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  const int knob = EnvInt("CGSPN_CUDA_TMA_BWD", -1);
  if (knob == 0 || !aligned || s.C % 8 || (3 * s.G) % 8) return false;
  const int64_t Sg = s.C / s.G;
  if (Sg != 8 && Sg != 16) return false;
  const LineSpan span(s, dirs);
  const bool any_rows = span.any_rows, any_cols = span.any_cols;
  const int64_t Lmax = span.Lmax, Lmin = span.Lmin;
  if (Lmax > kTmaMaxLine || (knob != 1 && (Lmin <= 96 || s.D > 1 || Sg != 16))) return false;
  const int64_t nslab = (s.C + kTmaSlab - 1) / kTmaSlab;
  const int64_t blocks = s.B * nslab;
  if (blocks % kTmaCluster || blocks > INT32_MAX || s.D * s.B * s.H > INT32_MAX ||
      !TensorMapEncoder())
    return false;
  const int gbox = TmaGateBox(s);
  TmaBwdLaunch& a = tp->a;
  a = {};
  a.B = int(s.B), a.H = int(s.H), a.W = int(s.W), a.C = int(s.C), a.G = int(s.G);
  a.D = int(s.D);
  for (int64_t d = 0; d < s.D; ++d) a.dir_bits |= int(dirs[d]) << (2 * d);
  a.nslab = int(nslab), a.gbox = gbox, a.nsub = int(Sg / 8);
  a.restarts = LineRestarts::Make(chunk), a.normalize = normalize;
  a.mode = EnvInt("CGSPN_CUDA_TMA_BWD_MODE");
  // D > 1: the running dx sum prefetched into L2 kTmaStages lines ahead, as far as the stage
  // copies (TmaBwdLaunch::acc_l2; v31, H100: 1% faster at 8 x 1152 x 128 x 128, 15% at 4
  // images). CGSPN_CUDA_TMA_BWD_ACC_L2=n: n lines ahead (at most 64), 0 none (A/B).
  a.acc_l2 = s.D > 1 ? std::clamp(EnvInt("CGSPN_CUDA_TMA_BWD_ACC_L2", kTmaStages), 0, 64) : 0;
  // D > 1: the sum loaded item by item, one item ahead, where CGSPN_CUDA_TMA_BWD_ACC_ITEM=1
  // (fewer registers; v31: 20% faster than by line), and with the last item's carry in shared
  // memory where CGSPN_CUDA_TMA_BWD_CARRY_SMEM=1 too (v32).
  // Form 3 only where its carries leave two blocks a multiprocessor (gate groups of 8 channels
  // have wider gate boxes: 118 KB a block at lines of 128).
  // dh and h_{t-1} copied once the line barrier has passed (v34's experiment; off: no change).
  a.early = EnvInt("CGSPN_CUDA_TMA_BWD_EARLY", 0) == 1;
  tp->acc_form = s.D == 1                                             ? 0
                 : EnvInt("CGSPN_CUDA_TMA_BWD_ACC_ITEM") != 1    ? 1
                 : EnvInt("CGSPN_CUDA_TMA_BWD_CARRY_SMEM") == 1 ? 3
                                                                : 2;
  a.lockstep = TmaLineSync(kLineSyncLockstep);
  auto round128 = [](int64_t n) { return int((n + 127) / 128 * 128); };
  a.xbytes = round128(Lmax * kTmaSlab * sizeof(T));
  a.gbytes = round128(Lmax * gbox * sizeof(T));
  tp->blocks = int(blocks);
  tp->smem = size_t(kTmaStages) * (4 * a.xbytes + a.gbytes) + kTmaBwdEdgeFloats * 4 +
             2 * kTmaStages * 8;
  if (tp->acc_form == 3) {
    if (BlocksFit(reinterpret_cast<const void*>(TmaBwdKernelFor<T>(*tp)), kTmaBwdThreads,
                  tp->smem + kTmaBwdCarryBytes, 2))
      tp->smem += kTmaBwdCarryBytes;
    else
      tp->acc_form = 2;
  }
  if (!BlocksFit(reinterpret_cast<const void*>(TmaBwdKernelFor<T>(*tp)), kTmaBwdThreads,
                 tp->smem, knob == 1 ? 1 : 2))
    return false;
  // Lockstep groups of kTmaBwdCluster neighbouring slabs where they divide the blocks and fit
  // the GPU; else pairs. Measured (v24, H100, 8 x 1152 x 128 x 128 G = 72 D = 1, three runs
  // each, interleaved): bfloat16 0.980-0.986 ms in pairs, 0.926-0.930 in groups of 8; float16
  // 0.981-1.040 against 0.921-0.940 (groups of 4 between). The forward measured no better in
  // groups of 4 or 8, and 10% slower at D = 4.
  // Groups of 8 also only where the call takes no more waves in them than in pairs: a GPC
  // holds whole clusters, so fewer blocks fit at once in groups of 8 (240 on an H100, against
  // 264 in pairs). Measured (v30): 11 images of 1152 x 128 x 128 (264 blocks) ran 1.54 ms in
  // groups of 8, two waves, against 0.97 for 10 images in one. CGSPN_CUDA_TMA_CLUSTER=8
  // keeps groups of 8 wherever they fit.
  const void* kernel = reinterpret_cast<const void*>(TmaBwdKernelFor<T>(*tp));
  tp->cluster = TmaClusterSize(blocks, blocks, kTmaBwdCluster);
  if (tp->cluster != kTmaCluster) {
    const int64_t wide = int64_t(ActiveClusters(kernel, tp->cluster, kTmaBwdThreads, tp->smem)) *
                         tp->cluster;
    const int64_t pairs = WaveBlocks(kernel, kTmaBwdThreads, tp->smem, kTmaCluster);
    if (wide == 0 || (EnvInt("CGSPN_CUDA_TMA_CLUSTER") == 0 &&
                      (blocks + wide - 1) / wide > (blocks + pairs - 1) / pairs))
      tp->cluster = kTmaCluster;
  }
  // The grid's loose lockstep (v29), as the forward's: by the plan where the call is one wave
  // (or CGSPN_CUDA_TMA_BWD_LEAD_WAVES=1: any call) and the wave holds more than 4/3 SMs' worth
  // of blocks; CGSPN_CUDA_TMA_BWD_LEAD=n sets it (0: none) in every wave. Wave by wave it
  // measured mixed (v30: 16 images of 1152 x 128 x 128 2% faster, 12 images alike).
  const int sms = DeviceAttr(cudaDevAttrMultiProcessorCount, 132);
  const int lead_knob = EnvInt("CGSPN_CUDA_TMA_BWD_LEAD", -1);
  const int wave = WaveBlocks(kernel, kTmaBwdThreads, tp->smem, tp->cluster);
  a.lead_wave = LeadWave(wave, blocks);
  if (lead_knob >= 0) {
    a.lead = lead_knob;
  } else if (blocks <= wave || EnvInt("CGSPN_CUDA_TMA_BWD_LEAD_WAVES") == 1) {
    a.lead = kTmaLeadLines;
    a.lead_min = sms * 4 / 3;
    if (std::min<int64_t>(blocks, a.lead_wave) <= a.lead_min) a.lead = 0;  // no wave waits
  }
  a.lead_polls = LeadPolls();
  a.lead_blocks = int(blocks);
  tp->lines = int(span.steps_total);
  tp->maps = {};
  const int64_t xrows = s.B * s.H, drows = s.D * s.B * s.H;
  TmaBwdMaps& m = tp->maps;
  const LineBoxes boxes{any_rows, any_cols, int(s.W), int(s.H)};
  return boxes.Encode(&m.x_row, &m.x_col, x, s.C, s.W, xrows, kTmaSlab) &&
         boxes.Encode(&m.lam_row, &m.lam_col, lam, s.C, s.W, drows, kTmaSlab) &&
         boxes.Encode(&m.dh_row, &m.dh_col, dh, s.C, s.W, drows, kTmaSlab) &&
         boxes.Encode(&m.h_row, &m.h_col, h, s.C, s.W, drows, kTmaSlab) &&
         boxes.Encode(&m.w_row, &m.w_col, w, 3 * s.G, s.W, drows, gbox) &&
         boxes.Encode(&m.dx_row, &m.dx_col, dx, s.C, s.W, xrows, kTmaSlab) &&
         boxes.Encode(&m.dlam_row, &m.dlam_col, dlam, s.C, s.W, drows, kTmaSlab);
}

template <typename T>
cudaError_t LaunchTmaBackward(cudaStream_t st, TmaBwdPlan& tp, T* dx, T* dlam, T* dw,
                              float* acc, unsigned* arrived) {
  const auto kernel = TmaBwdKernelFor<T>(tp);
  if (EnvInt("CGSPN_CUDA_VERBOSE"))
    std::fprintf(stderr, "gspn_scan CUDA backward: TMA S=%d threads=%d blocks=%d smem=%zu "
                 "cluster=%d linesync=%s gbox=%d nsub=%d lead=%d wave=%d acc_l2=%d "
                 "acc_item=%d carry_smem=%d early=%d modes=%d blocks/SM=%d\n",
                 kTmaSlab, kTmaBwdThreads, tp.blocks, tp.smem, tp.cluster,
                 LineSyncName(tp.a.lockstep), tp.a.gbox, tp.a.nsub, tp.a.lead,
                 tp.a.lead > 0 ? tp.a.lead_wave : 0, tp.a.acc_l2,
                 int(tp.acc_form >= 2), int(tp.acc_form == 3), tp.a.early,
                 int(kernel == TmaBwdKernelOf<T, true>(tp.acc_form)),  // the instance launched
                 BlocksPerSm(reinterpret_cast<const void*>(kernel), kTmaBwdThreads, tp.smem));
  return LaunchInClusters(st, kernel, tp.blocks, tp.cluster, kTmaBwdThreads, tp.smem, tp.maps, dx,
                          dlam, dw, acc, arrived, tp.a);
}

template <typename T>
ffi::Error Forward(cudaStream_t st, ffi::ScratchAllocator& scratch, const ScanShape& s,
                   ffi::AnyBuffer x, ffi::AnyBuffer lam, ffi::AnyBuffer w,
                   ffi::Result<ffi::AnyBuffer> h, ffi::Span<const int64_t> dirs, int64_t chunk,
                   bool normalize) {
  const T* xp = static_cast<const T*>(x.untyped_data());
  const T* lp = static_cast<const T*>(lam.untyped_data());
  const T* wp = static_cast<const T*>(w.untyped_data());
  T* hp = static_cast<T*>(h->untyped_data());
  const bool aligned = Aligned16(xp) && Aligned16(lp) && Aligned16(wp) && Aligned16(hp);
  if constexpr (sizeof(T) == 2) {
    TmaPlan tp;
    if (PlanTmaForward<T>(s, dirs.begin(), aligned, chunk, normalize, xp, lp, wp, hp, &tp)) {
      // The count of finished blocks where the line barrier turns relaxed partway. It steers
      // only the speed: without scratch for it, the barrier keeps its first kind throughout.
      unsigned* done = nullptr;
      if ((tp.a.relax_at > 0 && tp.a.relax_at < INT32_MAX) || tp.a.lead > 0) {
        const size_t words = 1 + (tp.a.lead > 0 ? size_t(LeadWaves(tp.a.lead_blocks,
                                                                     tp.a.lead_wave)) *
                                                         tp.a.steps_max
                                                   : 0);
        if (cudaError_t e = ZeroedScratch(scratch, words, st, &done); e != cudaSuccess)
          return CudaError(e, "forward (TMA): zeroing the block count");
        if (!done) {
          tp.a.relax_at = INT32_MAX;
          tp.a.lead = 0;
        }
      }
      if (const char* path = std::getenv("CGSPN_CUDA_TMA_TRACE"); path && *path)
        return CudaError(TracedTmaForward<T>(st, tp, hp, done, path),
                         "forward launch (TMA, traced)");
      return CudaError(LaunchTmaForward<T>(st, tp, hp, done), "forward launch (TMA)");
    }
  }
  Plan pl;
  if (ffi::Error e = MakePlan<T>(s, dirs, chunk, normalize, aligned, 0, &pl); e.failure()) return e;
  void* args[] = {&xp, &lp, &wp, &hp, &pl.a};
  return CudaError(LaunchPlan(st, pl, args, "forward"), "forward launch");
}

template <typename T>
ffi::Error Backward(cudaStream_t st, ffi::ScratchAllocator& scratch, const ScanShape& s,
                    ffi::AnyBuffer x, ffi::AnyBuffer lam, ffi::AnyBuffer w, ffi::AnyBuffer h,
                    ffi::AnyBuffer dh, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dlam, ffi::Result<ffi::AnyBuffer> dw,
                    ffi::Span<const int64_t> dirs, int64_t chunk, bool normalize) {
  const T* xp = static_cast<const T*>(x.untyped_data());
  const T* lp = static_cast<const T*>(lam.untyped_data());
  const T* wp = static_cast<const T*>(w.untyped_data());
  const T* hp = static_cast<const T*>(h.untyped_data());
  const T* dhp = static_cast<const T*>(dh.untyped_data());
  T* dxp = static_cast<T*>(dx->untyped_data());
  T* dlp = static_cast<T*>(dlam->untyped_data());
  T* dwp = static_cast<T*>(dw->untyped_data());
  const bool aligned = Aligned16(xp) && Aligned16(lp) && Aligned16(wp) && Aligned16(hp) &&
                       Aligned16(dhp) && Aligned16(dxp) && Aligned16(dlp) && Aligned16(dwp);
  // The running dx sum over directions: dx itself when it is float32, else a float32 scratch.
  float* acc = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    acc = dxp;
  } else if (s.D > 1) {
    auto mem = scratch.Allocate(size_t(s.pixels()) * s.C * sizeof(float), 16);
    if (!mem) return ffi::Error::Internal("gspn_scan (CUDA): no scratch for dx");
    acc = static_cast<float*>(*mem);
  }
  if constexpr (sizeof(T) == 2) {
    TmaBwdPlan tp;
    if (PlanTmaBackward<T>(s, dirs.begin(), aligned, chunk, normalize, xp, lp, wp, hp, dhp, dxp,
                           dlp, &tp)) {
      // The loose lockstep's arrivals, one word per line; without scratch, no lead (it steers
      // only the speed).
      unsigned* arrived = nullptr;
      if (tp.a.lead > 0) {
        const size_t words = size_t(LeadWaves(tp.a.lead_blocks, tp.a.lead_wave)) * tp.lines;
        if (cudaError_t e = ZeroedScratch(scratch, words, st, &arrived);
            e != cudaSuccess)
          return CudaError(e, "backward (TMA): zeroing the line arrivals");
        if (!arrived) tp.a.lead = 0;
      }
      return CudaError(LaunchTmaBackward<T>(st, tp, dxp, dlp, dwp, acc, arrived),
                       "backward launch (TMA)");
    }
  }
  Plan pl;
  if (ffi::Error e = MakePlan<T>(s, dirs, chunk, normalize, aligned, 1, &pl); e.failure()) return e;
  float* part = nullptr;
  if (pl.a.npart > 1) {
    auto mem = scratch.Allocate(size_t(pl.a.npart) * s.D * s.pixels() * s.G * 3 * sizeof(float), 16);
    if (!mem) return ffi::Error::Internal("gspn_scan (CUDA): no scratch for dw");
    part = static_cast<float*>(*mem);
  }
  void* args[] = {&xp, &lp, &wp, &hp, &dhp, &dxp, &dlp, &dwp, &acc, &part, &pl.a};
  if (cudaError_t e = LaunchPlan(st, pl, args, "backward")) return CudaError(e, "backward launch");
  if (part != nullptr) {
    const int64_t n = s.D * s.pixels() * s.G;
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 1 << 20);
    GspnDwReduceKernel<T><<<unsigned(blocks), threads, 0, st>>>(part, wp, dwp, pl.a);
    return CudaError(cudaGetLastError(), "backward gate-gradient launch");
  }
  return ffi::Error::Success();
}

// Runs f(T()) with T the CUDA storage type of the call's dtype.
template <typename F>
ffi::Error DispatchDtype(ffi::DataType dt, F&& f) {
  switch (dt) {
    case ffi::DataType::F32: return f(float());
    case ffi::DataType::BF16: return f(__nv_bfloat16());
    case ffi::DataType::F16: return f(__half());
    default: return ffi::Error::InvalidArgument("gspn_scan: dtype must be float32, bfloat16 or float16");
  }
}

ffi::Error FwdImpl(cudaStream_t st, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                   ffi::AnyBuffer lam, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> h,
                   ffi::Span<const int64_t> directions, int64_t chunk, bool normalize) {
  ScanShape s;
  if (ffi::Error e = CheckCall(x, lam, w, directions, chunk, &s); e.failure()) return e;
  if (h->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("gspn_scan: h must have the dtype of x");
  return DispatchDtype(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    return Forward<T>(st, scratch, s, x, lam, w, h, directions, chunk, normalize);
  });
}

ffi::Error BwdImpl(cudaStream_t st, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                   ffi::AnyBuffer lam, ffi::AnyBuffer w, ffi::AnyBuffer h, ffi::AnyBuffer dh,
                   ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dlam,
                   ffi::Result<ffi::AnyBuffer> dw, ffi::Span<const int64_t> directions,
                   int64_t chunk, bool normalize) {
  ScanShape s;
  if (ffi::Error e = CheckCall(x, lam, w, directions, chunk, &s); e.failure()) return e;
  if (ffi::Error e = CheckBackwardCall(x, lam, w, h, dh, *dx, *dlam, *dw); e.failure()) return e;
  return DispatchDtype(x.element_type(), [&](auto tag) {
    using T = decltype(tag);
    return Backward<T>(st, scratch, s, x, lam, w, h, dh, dx, dlam, dw, directions, chunk,
                       normalize);
  });
}

}  // namespace
}  // namespace cgspn

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GspnFwdCuda, cgspn::FwdImpl,
    cgspn::BindForward(xla::ffi::Ffi::Bind()
                           .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<xla::ffi::ScratchAllocator>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GspnBwdCuda, cgspn::BwdImpl,
    cgspn::BindBackward(xla::ffi::Ffi::Bind()
                            .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                            .Ctx<xla::ffi::ScratchAllocator>()));
