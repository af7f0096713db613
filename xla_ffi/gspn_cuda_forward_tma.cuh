// The forward of gspn_scan through tensor-memory-accelerator copies (device code), for 16-bit
// types with one gate group per 8-channel vector on lines of at most 256 positions. Part of
// gspn_cuda.cu's translation unit; the host side (the tensor maps, the plan rule) is there.
//
// Why a second forward: the register-load forward (gspn_cuda_forward.cuh) issues each thread's
// loads one line ahead. On 16-bit G = C / 16 lines of 128 positions it reaches 68% of the copy
// bandwidth. Here one producer thread per block copies each line's whole [positions x 48
// channels] box of x and lam, and the box of the gates those channels use, K = 2 lines ahead
// into shared memory. Six consumer warps scan from there. Blocks run in clusters of 2
// neighbouring slabs that keep in lockstep: a cluster barrier per line, and line t + K is copied
// only once both blocks finished line t, so that they read each pixel's neighbouring 96-byte
// pieces together. Measured (H100, docs/kernel_notes.md, v20): 8 x 1152 x 128 x 128 bfloat16
// G = 72 0.474 -> 0.422 ms against the register forward in one run (D = 4 1.697 -> 1.582, float16
// 0.479 -> 0.430, 16 x 768 x 96 x 96 G = 48 0.361 -> 0.320). The standalone model it follows
// (experiments/tma_forward.cu) ran the same blocks without the lockstep at 0.68-0.73 ms, and
// gained nothing at 64 positions, where the plan keeps the register forward.
//
// Lines of 129-256 positions are split: a cluster's two blocks scan the two halves of one line
// of one slab (TmaLaunch::split). Each reads the h of the line before at the position next to
// its half's edge from the other block's shared memory (distributed shared memory); the cluster
// barrier that keeps them in lockstep already orders those reads.
#pragma once

#include <cuda.h>

#include "gspn_cuda_kernels.cuh"

namespace cgspn {
namespace {

constexpr int kTmaSlab = 48;      // channels per block (96 bytes of 16-bit types)
constexpr int kTmaWarps = 6;      // consumer warps; one more warp produces (see kTmaWideWarps)
// Twice the consumer warps, half the items each: the plan's choice where the last wave fills at
// most 7/8 of a wave (PlanTmaForward). Nsight Compute on v34 (H200, docs/kernel_notes.md) found
// each consumer warp issuing ~700 instructions a line at ~5 cycles each, with ~2.2 warps a
// scheduler to hide that.
constexpr int kTmaWideWarps = 12;
// Lone wide blocks (TmaLaunch::units with slabs of 4 or 5 units, 64 or 80 channels; one block a
// multiprocessor: GspnFwdTmaLoneKernel): 20 consumer warps, 2 items a thread, or 10 of 4
// (CGSPN_CUDA_TMA_FWD_WARPS=10). Both counts divide among the 8 and 10 vectors of a row.
constexpr int kTmaLoneWarps = 20, kTmaLoneFewWarps = 10;
__host__ __device__ constexpr int TmaThreadsOf(int warps) { return (warps + 1) * 32; }
constexpr int kTmaStages = 2;     // lines of copies in flight (3 was slower in the model)
constexpr int kTmaMaxLine = 128;  // positions of a block: items (kTmaSlab / 8 each) per thread <= 4
constexpr int kTmaCluster = 2;

// The tensor maps of one call: x, lam, the gates and h, each as [rows][W][inner] with boxes for
// lines along rows (directions tb, bt: box [1][W][inner box]) and along columns (lr, rl:
// [H][1][inner box]). In shared memory both boxes are [positions][inner box]: every
// direction's positions increase with the image coordinate (LineGeometry).
struct TmaMaps {
  CUtensorMap x_row, x_col, lam_row, lam_col, w_row, w_col;
  CUtensorMap h_row, h_col;  // the output, where TmaLaunch::bulk_h (stored from the x box)
  // Even slabs (TmaLaunch::units): the maps above have boxes of the wider slabs' channels, these
  // of the narrower ones' (where the widths differ).
  CUtensorMap x_row_n, x_col_n, lam_row_n, lam_col_n, h_row_n, h_col_n;
};

struct TmaLaunch {
  int B, H, W, C, G, D;
  int dir_bits;  // 2 bits per direction, as Launch
  int nslab;     // ceil(C / kTmaSlab), or the even slabs' count (below)
  // Even slabs (an experiment, CGSPN_CUDA_TMA_FWD_SLABS; GspnFwdTmaKernel's kEven): the
  // units = C / 16 pieces of 32 bytes of a line split into nslab slabs of 2 or 3 units (32 or 48
  // channels), slab j holding units [j units / nslab, (j + 1) units / nslab), so that a call
  // can have as many blocks as fill the GPU's wave (v45). `swide` is the wider slabs' channels
  // (the shared memory is sized for it). 0 where slabs are kTmaSlab wide.
  int units, swide;
  int gbox;      // gate elements per pixel in a box (a multiple of 8)
  int split;     // 1: a cluster's blocks scan the halves of one line; 0: neighbouring slabs
  int lockstep;  // the first line's barrier: a LineSyncKind (kLineSyncCluster by default and
                 // always where split; kLineSyncLockstep where relax_at is 0)
  // The line barrier turns to kLineSyncLockstep once `relax_at` blocks of the call have
  // finished (counted in GspnFwdTmaKernel's `done`); 0: from the first line; INT32_MAX: never.
  // Measured (H100, docs/kernel_notes.md, v27): the relaxed lockstep is 19-23% faster while few
  // blocks run (2-7 images of 1152 x 128 x 128 G = 72 bfloat16), but release and acquire 2-7%
  // faster while the GPU is full (8-10 images).
  int relax_at;
  // 1 (the default): h goes out as one bulk tensor store of the block's box per line, written
  // over the x box in the stage (as the TMA backward's dx and dlam are) and issued by the
  // producer after the line barrier. 0 (CGSPN_CUDA_TMA_FWD_BULK other than 1, and calls of
  // split lines with odd column lines, whose second half's box would store into the next
  // image: the whole call, its row lines too): 16-byte stores from every thread. Measured
  // 1.5-3% faster in bulk at 128 x 128 (H100, docs/kernel_notes.md, v26): the consumers issue
  // about 5% fewer instructions.
  int bulk_h;
  // 1 (the default where h goes out in bulk; CGSPN_CUDA_TMA_FWD_EARLY=0 turns it off): the
  // producer copies line t + K's lam and gates once the line barrier has passed (and the lead's
  // wait, where there is one), and only x, whose box line t's h is going out from, once that
  // store has read it. Measured 1-3.3% faster at 128 x 128 and 96 x 96 (H200,
  // docs/kernel_notes.md, v34). Copying lam and the gates before the line barrier, once this
  // block's consumers have handed the stage back, was up to 8% slower than that (3-8% at
  // 128 x 128, as fast at 96 x 96): the cluster's blocks no longer read their neighbouring
  // pieces together.
  int early;
  // Experiments (CGSPN_CUDA_TMA_PACE; 0 by default): what the relaxed lockstep's lines add to
  // find out which part of the release's GPU-wide memory barrier helps a full GPU (v25-v27).
  // kPaceProducerFence: a GPU-scope fence in the producer before it issues the next copies;
  // kPaceConsumerFence: one in every consumer before the line barrier; >= kPaceSleepMin: the
  // producer sleeps that many nanoseconds before it issues the next copies.
  int pace;
  // With pace_masked (CGSPN_CUDA_TMA_PACE_SMS=id,id,...), the sleep only in blocks on the SMs
  // whose bits (%smid) are set in `pace_sms`: which blocks' own sleep helps (v29).
  int pace_masked;
  unsigned pace_sms[8];
  // A loose lockstep of the grid (v29; the plan's rule in PlanTmaForward, or
  // CGSPN_CUDA_TMA_LEAD=n, where 0 turns it off): a block issues line u's copies only once all
  // blocks of its wave have finished line u - n. Waves are runs of `lead_wave` blocks in
  // blockIdx order (the order the GPU starts them in; lead_wave is what fits the GPU at once),
  // `lead_blocks` blocks in all; a wave of at most `lead_min` blocks does not wait. A wait lasts
  // at most `lead_polls` sleeps of kTmaLeadPollNs (CGSPN_CUDA_TMA_LEAD_WAIT ns in all, 4096 by
  // default), and a block that timed out kTmaLeadMisses times stops waiting: a block never
  // waits for ever on one that is not resident (other work may share the GPU). Arrivals are
  // counted per wave and line in the scratch words after `done` (steps_max per wave); a block
  // of shorter scans arrives at the rest when it ends.
  int lead, lead_polls, lead_blocks, lead_wave, lead_min;
  int steps_max;  // lines of the call's longest scan (the lead's arrival words, the trace's)
  // Experiments (CGSPN_CUDA_TMA_TRACE=file): where not null, each block's producer records
  // its line times in `trace`, `trace_words` words per block (TmaTraceWords of the call's
  // longest scan: see GspnFwdTmaKernel).
  unsigned long long* trace;
  int trace_words;
  LineRestarts restarts;  // the call's chunk
  bool normalize;
  // Shared memory: stage bytes (x box, lam box, gate box; each rounded to 128 bytes).
  int xbytes, gbytes;
};

// The first unit (16 channels) of even slab j of `nslab` over `units` (TmaLaunch::units): for
// the kernel and the host's plan alike.
__host__ __device__ inline int64_t EvenSlabUnit(int64_t j, int64_t units, int64_t nslab) {
  return j * units / nslab;
}
// The units of even slab j (the kernels choose a block's body by its slab's width).
__device__ inline int64_t EvenSlabUnits(const TmaLaunch& a, int64_t j) {
  return EvenSlabUnit(j + 1, a.units, a.nslab) - EvenSlabUnit(j, a.units, a.nslab);
}

// The barrier at the end of each line of the TMA kernels (TmaLaunch::lockstep). Each kind orders
// the block's own accesses across its threads, as __syncthreads does: the h tiles, the span
// edges, the gate gradients and outputs written into the stage (before the dw stores and the
// bulk tensor stores), the backward's running dx sum in global memory (only its block touches
// its slab). `kind` is the same in every thread of a block (a launch argument, or the forward's
// switch from shared memory: TmaLaunch::relax_at; the blocks of a cluster may differ for a
// line), and every call is made by whole, converged warps (.aligned).
//  - kLineSyncCluster: release and acquire at cluster scope (the forward's, until relax_at; always
//    where a block reads its peer's shared memory: lines split between a cluster's two blocks).
//    The release compiles to MEMBAR.ALL.GPU: Nsight Compute put 35-42% of the TMA forward's
//    warp stall samples there (v24 code, 8 x 1152 x 128 x 128 bfloat16 G = 72), as many with h
//    in bulk stores, which leave the consumers no global stores to wait for (v26): most likely
//    the barrier's own latency. Yet the forward measured 2-8% slower without it while the GPU
//    is full of its blocks (8-10 images of 1152 x 128 x 128), and 19-23% faster while few run
//    (docs/kernel_notes.md, v25-v27).
//  - kLineSyncLockstep (the backward's default, 5% faster there; the forward's from relax_at
//    on): a block barrier for the ordering, inside a cluster barrier whose arrive is relaxed,
//    which only keeps the cluster's blocks in lockstep (its wait keeps the default acquire:
//    CCTL.IVALL, no memory barrier).
//  - kLineSyncBlock (experiments, CGSPN_CUDA_TMA_LOCKSTEP=0): the block barrier alone.
enum LineSyncKind { kLineSyncBlock = 0, kLineSyncLockstep = 1, kLineSyncCluster = 2 };
enum TmaPace { kPaceNone, kPaceProducerFence, kPaceConsumerFence, kPaceSleepMin = 16 };
constexpr unsigned kTmaLeadPollNs = 256;
constexpr int kTmaLeadLines = 5;  // the plan's TmaLaunch::lead (v29: 4 and 6 measured alike)
constexpr int kTmaLeadMisses = 16;  // timed-out waits after which a block stops waiting

// The grid's loose lockstep (TmaLaunch::lead, TmaBwdLaunch::lead): a block's arrival at the end
// of a line, counted in `*arrived`, and the wait before a line's copies until `blocks` blocks
// have arrived at an earlier one, at most `polls` sleeps (one thread each; polls >= 0, as
// LeadPolls gives it); false if it timed out.
__device__ __forceinline__ void LeadArrive(unsigned* arrived) {
  asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(arrived) : "memory");
}
__device__ __forceinline__ bool LeadWait(const unsigned* arrived, int blocks, int polls) {
  for (int i = 0;; ++i) {
    unsigned n;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(n) : "l"(arrived));
    if (n >= unsigned(blocks)) return true;
    if (i == polls) return false;
    __nanosleep(kTmaLeadPollNs);
  }
}
// A block's part in the loose lockstep: the arrival words of its wave (`lines` per wave after
// `words`), the blocks of that wave, and how many of its waits may still time out (0: it does
// not wait). `wave`, `total` and `min_blocks` are the launch's lead_wave, lead_blocks, lead_min.
struct LeadState {
  unsigned* arrived;
  int blocks, misses;
  __device__ LeadState(unsigned* words, int lines, int lead, int wave, int total,
                       int min_blocks) {
    const int w = lead > 0 ? int(blockIdx.x) / wave : 0;
    arrived = words + int64_t(w) * lines;
    blocks = lead > 0 ? min(wave, total - w * wave) : 0;
    misses = lead > 0 && blocks > min_blocks ? kTmaLeadMisses : 0;
  }
  __device__ void Arrive(int line) { LeadArrive(arrived + line); }
  __device__ void Wait(int line, int polls) {
    if (misses > 0 && !LeadWait(arrived + line, blocks, polls)) --misses;
  }
};
// A block's trace: %smid, %globaltimer at its start and at its end (ns), clock64 at its start
// and at the end of each of its T lines' barriers.
__host__ __device__ constexpr int TmaTraceWords(int T) { return 4 + T; }
__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void LineSync(int kind) {
  if (kind == kLineSyncLockstep) {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    __syncthreads();
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  } else if (kind == kLineSyncCluster) {  // every thread of the cluster arrives, then waits
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
  } else {
    __syncthreads();
  }
}
// The address of `p` (this block's shared memory) in block `rank` of the cluster.
__device__ __forceinline__ unsigned PeerAddr(const void* p, unsigned rank) {
  unsigned out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(SharedAddr(p)), "r"(rank));
  return out;
}
// 8 floats (32 bytes, 16-byte aligned) from another block's shared memory.
__device__ __forceinline__ void LoadPeerF8(unsigned addr, float* out) {
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(out[0]), "=f"(out[1]), "=f"(out[2]), "=f"(out[3]) : "r"(addr) : "memory");
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(out[4]), "=f"(out[5]), "=f"(out[6]), "=f"(out[7]) : "r"(addr + 16)
               : "memory");
}
__device__ __forceinline__ void MbarExpectTx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SharedAddr(bar)),
               "r"(bytes)
               : "memory");
}
// Adds `bytes` to the transactions the current phase waits for, without an arrival.
__device__ __forceinline__ void MbarExpectTxOnly(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(SharedAddr(bar)),
               "r"(bytes)
               : "memory");
}
// The box of a 3-D tensor map at (c0, c1, c2) into shared memory, completing on `bar`.
__device__ __forceinline__ void TmaLoad(void* dst, const CUtensorMap* map, int c0, int c1, int c2,
                                        uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(SharedAddr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(SharedAddr(bar))
      : "memory");
}

// 8 floats as T at `p` in shared memory (16 bytes, aligned): an output written into a stage box
// for a bulk tensor store.
template <typename T>
__device__ __forceinline__ void StoreBox8(T* p, const float* in) {
  T e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = FromF<T>(in[i]);
  uint4 r;
  memcpy(&r, e, sizeof(r));
  *reinterpret_cast<uint4*>(p) = r;
}

// The box at (c0, c1, c2) of a 3-D tensor map from shared memory (a bulk async-group).
__device__ __forceinline__ void TmaStore(const CUtensorMap* map, int c0, int c1, int c2,
                                         const void* src) {
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];"
      ::"l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(SharedAddr(src))
      : "memory");
}

// Blocks: one per (direction, image, slab of kTmaSlab channels (kEven: of the even slabs,
// TmaLaunch::units)[, half line]), half fastest,
// then slab, launched in clusters of kTmaCluster whose blocks scan the same number of lines (the
// host sees to it). A block's Lb positions: the line's L, or the half of ceil(L / 2) (the
// second half's box runs past the line where L is odd: read and never used; stored back only on
// row lines, where it lies past W and the store drops it).
// Shared memory: kTmaStages stages of {x [Lb][S], lam [Lb][S], gates [Lb][gbox]}, the h tiles
// [2][Lb][S] (float, by line parity; S the block's slab width, with room for the widest: even
// slabs), the "full" and "empty" mbarriers, then the line barrier's kind by line parity
// (TmaLaunch::relax_at). `done` counts the finished blocks (zero at launch; unused where
// relax_at is 0 or INT32_MAX).
//
// The block's slab is kTmaSlab channels, or (kEven) one of the even slabs of TmaLaunch::units,
// whose width GspnFwdTmaKernel has found to be NV vectors: NV is a template argument so that
// every offset of an item stays a constant (a runtime width spilled registers and ran the
// forward 38% slower at the same blocks; docs/kernel_notes.md, v45).
template <typename T, int kWarps, bool kEven, int NV>
__device__ __forceinline__ void FwdTmaBlock(const TmaMaps& maps, T* __restrict__ h,
                                            unsigned* done, const TmaLaunch& a) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  constexpr int S = 8 * NV, K = kTmaStages, NCT = kWarps * 32;
  // Items per thread (item k at position p0 + k kStride): 4 at 6 warps, 2 at 12, for slabs of
  // kTmaSlab channels; 3 and 2 for the even slabs of 32; 2 at 20 warps (4 at 10) for the lone
  // wide slabs of 64 and 80.
  constexpr int kStride = NCT / NV, KI = (kTmaMaxLine + kStride - 1) / kStride;
  static_assert(kEven || KI * NCT == kTmaMaxLine * NV, "whole items per thread");
  extern __shared__ __align__(128) unsigned char smem[];
  const int stage_bytes = 2 * a.xbytes + a.gbytes;

  const int part = a.split ? blockIdx.x % 2 : 0;  // the cluster rank where split
  const int idx = a.split ? blockIdx.x / 2 : blockIdx.x;
  const int slab = idx % a.nslab;
  const int rest = idx / a.nslab;
  // The block's first channel; Sbox: the slab width the shared memory is laid out for.
  const int c0 = kEven ? 16 * int(EvenSlabUnit(slab, a.units, a.nslab)) : slab * S;
  const int Sbox = kEven ? a.swide : kTmaSlab;
  const bool narrow = kEven && S != a.swide;  // its boxes: the *_n maps
  const int b = rest % a.B, d = rest / a.B;
  const int dir = (a.dir_bits >> (2 * d)) & 3;
  const bool rows = dir == kTopBottom || dir == kBottomTop;
  const LineGeometry geo = LineGeometry::Make(dir, a.H, a.W);
  const int L = int(geo.length), T_steps = int(geo.steps);
  const int Lb = a.split ? (L + 1) / 2 : L;      // positions of a block's box
  const int off = part * Lb;                     // its first position in the line
  const int Lown = min(Lb, L - off);             // of them, in the line
  float* tile = reinterpret_cast<float*>(smem + K * stage_bytes);
  uint64_t* full = reinterpret_cast<uint64_t*>(tile + 2 * Lb * Sbox);
  uint64_t* empty = full + K;
  int* sync_kind = reinterpret_cast<int*>(empty + K);  // [line parity]
  const bool adaptive = a.relax_at > 0 && a.relax_at < INT32_MAX;

  const int Sg = a.C / a.G;
  const int gfirst = (3 * (c0 / Sg)) & ~7;  // the gate box's first element, 16-byte aligned
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < K; ++s) {
      MbarInit(&full[s], 1);
      MbarInit(&empty[s], kWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    sync_kind[0] = sync_kind[1] = a.lockstep;
  }
  __syncthreads();
  int kind = sync_kind[0];  // the line barrier of the line at hand

  // Line t's box: its first pixel as (position, row) in the maps of [D * B * H] rows (lam, the
  // gates, h); x's map has [B * H] rows, d B H fewer. A row line is (row i, all W), a column line
  // (column j, the rows of image b).
  const int drow = (d * a.B + b) * a.H, xshift = d * a.B * a.H;
  auto box_at = [&](int t, int* c1, int* c2) {
    if (rows) {
      *c1 = off;
      *c2 = drow + (dir == kTopBottom ? t : a.H - 1 - t);
    } else {
      *c1 = dir == kLeftRight ? t : a.W - 1 - t;
      *c2 = drow + off;
    }
  };
  // Line t's copies into stage t % K (one thread): all three boxes, or (TmaLaunch::early) lam and
  // the gates first, with the one arrival that expects all the line's bytes, and x (where line
  // t - K's h is going out in bulk) only once that store has read it.
  enum { kAll, kFront, kX };
  auto issue = [&](int t, int which) {
    const int s = t % K;
    unsigned char* st = smem + s * stage_bytes;
    int c1, c2;
    box_at(t, &c1, &c2);
    if (which != kX) {
      MbarExpectTx(&full[s], unsigned(2 * Lb * S * sizeof(T) + Lb * a.gbox * sizeof(T)));
      TmaLoad(st + a.xbytes,
              narrow ? (rows ? &maps.lam_row_n : &maps.lam_col_n)
                     : (rows ? &maps.lam_row : &maps.lam_col),
              c0, c1, c2, &full[s]);
      TmaLoad(st + 2 * a.xbytes, rows ? &maps.w_row : &maps.w_col, gfirst, c1, c2, &full[s]);
    }
    if (which != kFront)
      TmaLoad(st,
              narrow ? (rows ? &maps.x_row_n : &maps.x_col_n) : (rows ? &maps.x_row : &maps.x_col),
              c0, c1, c2 - xshift, &full[s]);
  };

  if (warp == kWarps) {  // the producer: lines 0 .. K-1, then t + K once the cluster is past t
    if (lane == 0)
      for (int t = 0; t < K && t < T_steps; ++t) issue(t, kAll);
    const bool early = a.bulk_h && a.early;
    unsigned long long* trace =
        a.trace ? a.trace + int64_t(blockIdx.x) * a.trace_words : nullptr;
    if (trace && lane == 0) {
      unsigned id;
      asm("mov.u32 %0, %%smid;" : "=r"(id));
      trace[0] = id;
      trace[1] = GlobalTimer();
      trace[3] = clock64();
    }
    // Where adaptive: the count of finished blocks, loaded a line before it is used (its
    // latency hidden) and after the line barrier (whose release would wait for it), gives the
    // kind of line t + 1's barrier, written for the consumers before line t's barrier, after
    // which they read it; once relaxed, it stays so (the count only grows).
    unsigned finished = 0;
    bool sleeper = true;  // TmaLaunch::pace_masked: this block's SM is in the mask
    if (a.pace_masked) {
      unsigned id;
      asm("mov.u32 %0, %%smid;" : "=r"(id));
      sleeper = id < 256 && ((a.pace_sms[id / 32] >> (id % 32)) & 1u);
    }
    LeadState lead(done + 1, a.steps_max, a.lead, a.lead_wave, a.lead_blocks, a.lead_min);
    for (int t = 0; t < T_steps; ++t) {
      int next = kind;
      if (adaptive) {
        if (__shfl_sync(~0u, finished, 0) >= unsigned(a.relax_at)) next = kLineSyncLockstep;
        if (lane == 0) sync_kind[(t + 1) & 1] = next;
      }
      LineSync(kind);
      if (trace && lane == 0) trace[4 + t] = clock64();
      if (adaptive && lane == 0)
        asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(finished) : "l"(done));
      if (a.lead > 0 && lane == 0) lead.Arrive(t);
      const bool paced = kind == kLineSyncLockstep;  // TmaLaunch::pace applies to the line
      kind = next;
      if (lane == 0 && a.bulk_h) {
        // Line t's h, written by the consumers over its x box and fenced before the barrier, as
        // one bulk store; read out of the stage before line t + K's x is copied over it. Here,
        // not in a consumer warp, so that no consumer waits for it.
        int c1, c2;
        box_at(t, &c1, &c2);
        TmaStore(narrow ? (rows ? &maps.h_row_n : &maps.h_col_n)
                        : (rows ? &maps.h_row : &maps.h_col),
                 c0, c1, c2, smem + (t % K) * stage_bytes);
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        if (!early || t + K >= T_steps)  // (else before line t + K's x copy, below)
          asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
      }
      if (lane == 0 && t + K < T_steps) {
        MbarWait(&empty[t % K], (t / K) & 1);
        if (a.lead > 0 && t + K - a.lead >= 0) lead.Wait(t + K - a.lead, a.lead_polls);
        if (paced && a.pace == kPaceProducerFence) {
          asm volatile("fence.acq_rel.gpu;" ::: "memory");
        } else if (paced && a.pace >= kPaceSleepMin && sleeper) {
          __nanosleep(unsigned(a.pace));
        }
        if (early) {
          issue(t + K, kFront);
          asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
        }
        issue(t + K, early ? kX : kAll);
      }
      __syncwarp();
    }
    // Every store has read its stage (the wait per line); this waits for their writes too.
    if (lane == 0 && a.bulk_h) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    if (trace && lane == 0) trace[2] = GlobalTimer();
    if (a.lead > 0 && lane == 0)  // arrived at the lines of longer scans, for their waits
      for (int t = T_steps; t < a.steps_max; ++t) lead.Arrive(t);
    return;
  }

  // Consumers: item k of a thread is (position p0 + k * kStride, vector v): since NCT is a
  // multiple of NV, every item of a thread has the same vector, hence the same gates in a box
  // row and the same channels; positions step by kStride. The same items every line, so each
  // thread keeps its own h of the previous line. (Offsets are formed once: the first form, with
  // the position and vector divided out per item and line, ran the 8 x 1152 x 128 x 128
  // bfloat16 G = 72 forward at 0.569 ms against the model's 0.411.)
  static_assert(NCT % NV == 0, "a thread's items share one vector");
  const int v = threadIdx.x % NV, p0 = threadIdx.x / NV;
  const bool lane_ok = c0 + v * 8 < a.C;
  const int gel = 3 * ((c0 + v * 8) / Sg) - gfirst;  // this thread's gates in a box row
  const int64_t bhw = int64_t(a.B) * a.H * a.W;
  const int64_t pstep = geo.pos_stride * a.C;  // elements from position p to p + 1
  T* hthread = h + int64_t(d) * bhw * a.C + c0 + v * 8 + (off + p0) * pstep;
  // The other half's h tiles (split lines): the position next to this half's edge.
  const unsigned peer_tiles = a.split ? PeerAddr(tile, part ^ 1) : 0u;
  const int peer_pos = part == 0 ? 0 : Lb - 1;
  float hown[KI][8];
#pragma unroll
  for (int k = 0; k < KI; ++k)
#pragma unroll
    for (int i = 0; i < 8; ++i) hown[k][i] = 0.f;

  for (int t = 0; t < T_steps; ++t) {
    const int s = t % K;
    MbarWait(&full[s], (t / K) & 1);
    if (adaptive) kind = sync_kind[t & 1];  // written before line t - 1's barrier
    const unsigned char* st = smem + s * stage_bytes;
    const T* xs = reinterpret_cast<const T*>(st);
    const T* ls = reinterpret_cast<const T*>(st + a.xbytes);
    const T* gs = reinterpret_cast<const T*>(st + 2 * a.xbytes);
    const float* prev = tile + ((t + 1) & 1) * Lb * S;  // written by line t - 1
    float* now = tile + (t & 1) * Lb * S;
    const unsigned peer_prev =
        peer_tiles + unsigned((((t + 1) & 1) * Lb * S + peer_pos * S + v * 8) * sizeof(float));
    const bool restart = a.restarts.At(t);
    float hv[KI][8];
#pragma unroll
    for (int k = 0; k < KI; ++k) {
      const int p = p0 + k * kStride;  // in the block's box; off + p in the line
      if (!lane_ok || p >= Lown) continue;
      Pack<T, 8> xp, lp;
      xp.r = *reinterpret_cast<const uint4*>(xs + p * S + v * 8);
      lp.r = *reinterpret_cast<const uint4*>(ls + p * S + v * 8);
      float xv[8], lv[8];
      xp.Unpack(xv);
      lp.Unpack(lv);
#pragma unroll
      for (int i = 0; i < 8; ++i) hv[k][i] = lv[i] * xv[i];
      if (!restart) {
        const T* gp = gs + p * a.gbox + gel;
        const float g[3] = {ToF<T>(gp[0]), ToF<T>(gp[1]), ToF<T>(gp[2])};
        const bool has_left = off + p > 0, has_right = off + p + 1 < L;
        float wa[3], wc[3];
        Weights(g, has_left, has_right, a.normalize, wa, wc);
        float left[8], right[8];
        if (p > 0) LoadF<8>(prev + (p - 1) * S + v * 8, left);
        else if (has_left) LoadPeerF8(peer_prev, left);  // the first half's last position
        if (p + 1 < Lown) LoadF<8>(prev + (p + 1) * S + v * 8, right);
        else if (has_right) LoadPeerF8(peer_prev, right);  // the second half's first position
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float acc = hv[k][i] + wa[1] * hown[k][i];
          if (has_left) acc += wa[0] * left[i];
          if (has_right) acc += wa[2] * right[i];
          hv[k][i] = acc;
        }
      }
    }
    // The stage is read: hand it back to the producer. (Where h goes out through it, this
    // warp still writes h over its x box below: the producer copies into the stage only after
    // the line barrier, and into the x box only after its bulk store of that h has read it.)
    __syncwarp();
    if (lane == 0) MbarArrive(&empty[s]);
    T* hline = hthread + (b * geo.image + geo.base + int64_t(t) * geo.step_stride) * a.C;
#pragma unroll
    for (int k = 0; k < KI; ++k) {
      const int p = p0 + k * kStride;
      if (!lane_ok || p >= Lown) continue;
      if (a.bulk_h) {  // over x at (p, v), which only this thread read
        StoreBox8(const_cast<T*>(xs) + p * S + v * 8, hv[k]);
      } else {
        Pack<T, 8>::Store(hline + k * kStride * pstep, hv[k]);
      }
      StoreF<8>(now + p * S + v * 8, hv[k]);
#pragma unroll
      for (int i = 0; i < 8; ++i) hown[k][i] = hv[k][i];
    }
    // The h written into the stage must be visible to the bulk store (the async proxy), which
    // the producer issues after the line barrier.
    if (a.bulk_h) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    if (a.pace == kPaceConsumerFence && kind == kLineSyncLockstep)
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
    LineSync(kind);
  }
  if (adaptive && threadIdx.x == 0) atomicAdd(done, 1u);
}

// Slabs of kTmaSlab channels, or (kEven) the even slabs of TmaLaunch::units: 48 or 32
// channels, each block's body compiled for its width.
template <typename T, int kWarps, bool kEven>
__global__ void __launch_bounds__(TmaThreadsOf(kWarps), 2)  // two blocks per SM, as measured
    GspnFwdTmaKernel(const __grid_constant__ TmaMaps maps, T* __restrict__ h, unsigned* done,
                     const TmaLaunch a) {
  static_assert(kTmaSlab == 48, "even slabs of 2 or 3 units of 16 channels");
  if constexpr (!kEven) {
    FwdTmaBlock<T, kWarps, false, kTmaSlab / 8>(maps, h, done, a);
  } else {
    if (EvenSlabUnits(a, (a.split ? blockIdx.x / 2 : blockIdx.x) % a.nslab) == 3)
      FwdTmaBlock<T, kWarps, true, 6>(maps, h, done, a);
    else
      FwdTmaBlock<T, kWarps, true, 4>(maps, h, done, a);
  }
}


// Lone wide blocks: even slabs of 4 or 5 units (64 or 80 channels), one block a multiprocessor
// (the plan's CGSPN_CUDA_TMA_FWD_SLABS=-3, v47). Where the 48-channel blocks are more than the
// multiprocessors, some SMs run two of them (6 units) and the rest one, all held to the pairs'
// pace; fewer, wider blocks put at most 5 units on any SM, and a lone block's line costs little
// more per unit it adds (v46b: 2 -> 3 units 5%). Never on split lines.
template <typename T, int kWarps>
__global__ void __launch_bounds__(TmaThreadsOf(kWarps), 1)
    GspnFwdTmaLoneKernel(const __grid_constant__ TmaMaps maps, T* __restrict__ h, unsigned* done,
                         const TmaLaunch a) {
  if (EvenSlabUnits(a, blockIdx.x % a.nslab) == 5)  // (never split)
    FwdTmaBlock<T, kWarps, true, 10>(maps, h, done, a);
  else
    FwdTmaBlock<T, kWarps, true, 8>(maps, h, done, a);
}

}  // namespace
}  // namespace cgspn
