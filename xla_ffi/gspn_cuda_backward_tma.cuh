// The backward of gspn_scan through tensor-memory-accelerator copies (device code), for 16-bit
// types with gate groups of 8 or 16 channels on lines of at most 128 positions. Part of
// gspn_cuda.cu's translation unit; the host side (the tensor maps, the plan rule) is there.
//
// Why a second backward: the register-load backward reads five streams per line (x, lam, dh, the
// saved h of the line before, the gates) one line ahead into registers; on 16-bit G = C / 16
// lines of 128 positions it runs at 61% of the copy bandwidth (v21), the forward there at 68%
// before its TMA form (gspn_cuda_forward_tma.cuh) took it to 77%. This is the same design for the
// reverse scan: per line one producer thread copies the block's [positions x 48 channels] boxes
// of x, lam, dh and h_{t-1}, and the box of the gates, K = 2 lines ahead into shared memory;
// consumer warps scan from there, clusters of eight (or two) neighbouring slabs keep in
// lockstep.
//
// What the staged h_{t-1} box gives for free: the gate gradient of line t needs h_{t-1} at
// p - 1, p, p + 1, which the register backward either saved in a shared tile one line late or
// re-read from L1; here all three positions sit in the stage. So every line forms its own gate
// gradient (reduced over the group's two 8-channel vectors by one shuffle) and stores it.
//
// Blocks: one per (image, slab of kTmaSlab channels), scanning the D directions one after the
// other (the running float32 dx sum of the earlier directions, as in the register backward, is
// read and written by ordinary loads and stores: only this block touches its slab of it).
//
// Measured (v22, H100; docs/kernel_notes.md, section "v22"), against the register backward in
// the same runs: 8 x 1152 x 128 x 128 bfloat16 G = 72 D = 1 1.027-1.056 ms against 1.086-1.088
// (3-6% faster); 64-position lines 1.01 against 0.84 (half the warps idle); D = 4 1.4-1.6x
// slower (the running dx sum through registers, in 32-byte pieces at 16 positions per warp
// store; that instance spills 0.4 KB). So the plan takes it only for one direction, groups of
// 16 channels and lines of 97-128 positions. Where the time goes at 128 x 128 D = 1
// (TmaBwdLaunch::mode): copies alone 0.53 ms, copies and arithmetic 0.60-0.66, the rest stores.
// Next: the dx sum through the stage, the gate gradients as whole stores, full warps at 64
// positions. v31's prefetch of the dx sum into L2 ahead of the consumers' loads measured 1% at
// 8 images and 15% at 4 (H100, `TUNE_FAMILY=accl2`; notes, section "v31").
#pragma once

#include "gspn_cuda_forward_tma.cuh"

namespace cgspn {
namespace {

// Consumer warps: warp w scans the vector pair w % kTmaBwdPairs (16 channels: one gate group of
// 16, or two of 8) at the kTmaBwdSpan positions from (w / kTmaBwdPairs) kTmaBwdSpan. Lane l holds
// vector 2 (w % kTmaBwdPairs) + (l & 1) at positions (l >> 1) + 16 k, k < kTmaBwdItems, of that
// span. So a position's two vectors are neighbouring lanes (the gate gradient's reduction is one
// shuffle), and positions p +- 1 are lanes l +- 2 (or the same lane's next or previous item), so
// that the neighbour exchange of the reverse scan goes through shuffles, not shared tiles; only
// the first and last position of a span are exchanged with the warp of the next span through
// shared memory. Without tiles two blocks fit a multiprocessor at 128 positions (108 KB each).
constexpr int kTmaBwdPairs = kTmaSlab / 16;
// Consumer warps; one more produces. (v36 measured 12 warps in 4 spans of 32 positions, 2 items
// a lane, 47-76% slower on an H200: 72 registers a thread and 250 bytes of spills at D = 1;
// docs/kernel_notes.md.)
constexpr int kTmaBwdWarps = 6;
constexpr int kTmaBwdThreads = TmaThreadsOf(kTmaBwdWarps);
// Blocks of neighbouring slabs that keep in lockstep, where the block count allows (else
// kTmaCluster): 8 measured 6% faster than pairs (v24).
constexpr int kTmaBwdCluster = 8;
constexpr int kTmaBwdSpans = kTmaBwdWarps / kTmaBwdPairs;
constexpr int kTmaBwdSpan = kTmaMaxLine / kTmaBwdSpans;
constexpr int kTmaBwdItems = kTmaBwdSpan / 16;
static_assert(kTmaSlab % 16 == 0 && kTmaBwdWarps % kTmaBwdPairs == 0 && kTmaBwdSpan % 16 == 0,
              "whole vector pairs and spans of 16-position items");
// Shared floats of the span-edge exchange: [2 line parities][2 kinds][spans][kTmaSlab].
constexpr int kTmaBwdEdgeFloats = 2 * 2 * kTmaBwdSpans * kTmaSlab;
// Shared bytes of the consumers' last-item carries (GspnBwdTmaKernel's kAcc 3): 8 floats each.
constexpr int kTmaBwdCarryBytes = kTmaBwdWarps * 32 * 8 * 4;
// They follow the stages (128-byte multiples), the edges and the 2 kTmaStages mbarriers: their
// float4 accesses need that to be a 16-byte multiple.
static_assert((kTmaBwdEdgeFloats * 4 + 2 * kTmaStages * 8) % 16 == 0,
              "16-byte aligned last-item carries");

// The maps of one backward call: x, lam, dh, h (saved forward output) and the gates, as in the
// forward ([rows][W][inner], row and column boxes).
struct TmaBwdMaps {
  CUtensorMap x_row, x_col, lam_row, lam_col, dh_row, dh_col, h_row, h_col, w_row, w_col;
  CUtensorMap dx_row, dx_col, dlam_row, dlam_col;  // the outputs, stored from the stage
};

struct TmaBwdLaunch {
  int B, H, W, C, G, D;
  int dir_bits;  // 2 bits per direction, as Launch
  int nslab;     // ceil(C / kTmaSlab)
  int gbox;      // gate elements per pixel in a box (a multiple of 8)
  int nsub;      // 8-channel vectors per gate group: 1 or 2
  int mode;      // experiments (CGSPN_CUDA_TMA_BWD_MODE): 1 copies only, 2 copies and stores,
                 // 3 no stores, 4 no dw stores, 5 dx and dlam from the registers, 6 the dx sum's
                 // L2 prefetch as loads of its ranges' ends (sanitizer; results unchanged)
  int lockstep;  // the line barrier: a LineSyncKind (kLineSyncLockstep by default)
  // The grid's loose lockstep, as the forward's (TmaLaunch::lead; v29): line q's copies wait
  // until all blocks of the block's wave have finished line q - lead (arrivals counted per wave
  // and line in GspnBwdTmaKernel's `arrived`: as many words per wave as a block scans lines),
  // waves and waits as there. 0: none.
  int lead, lead_polls, lead_blocks, lead_wave, lead_min;
  LineRestarts restarts;  // the call's chunk
  bool normalize;
  int xbytes, gbytes;  // stage pieces: one [Lmax][kTmaSlab] box, the gate box (128-byte multiples)
  // D > 1: as the consumers finish a line, the producer warp prefetches into L2 the running dx
  // sum of the line acc_l2 lines after it, acc_l2 - 1 lines before they start that line (the
  // stage copies run K lines after it); 0: none (CGSPN_CUDA_TMA_BWD_ACC_L2).
  int acc_l2;
  // 1 (CGSPN_CUDA_TMA_BWD_EARLY=1; v34's experiment): the producer copies line q + K's dh and
  // h_{t-1} into their boxes once the line barrier of line q (and the lead's wait, where there
  // is one) has passed: the consumers read those boxes only before it. x, lam and the gates,
  // whose boxes carry line q's outputs until the bulk and dw stores have read them, follow once
  // the stage is handed back. Measured no change on the H200 (v34), so off.
  int early;
};

// The parts of a line's stage copies (TmaBwdLaunch::early).
enum TmaBwdCopy { kCopyAll, kCopyEarly, kCopyLate };

// Which direction and line the q-th line a block scans is: directions in order, each from its
// last line to its first.
struct BwdLineOf {
  int d, t, n;  // direction index, line, lines of this direction already scanned
  __device__ BwdLineOf(const TmaBwdLaunch& a, int q) {
    d = 0;
    for (;;) {
      const int dir = (a.dir_bits >> (2 * d)) & 3;
      const int T = (dir == kTopBottom || dir == kBottomTop) ? a.H : a.W;
      if (q < T || d == a.D - 1) {
        n = q;
        t = T - 1 - q;
        return;
      }
      q -= T;
      ++d;
    }
  }
};

// The running dx sum of block (image b, channels from c0)'s q-th line into L2, by the 32 lanes
// of a warp (a direction after the first only). The consumers load it with ordinary loads as
// they start the line, so its latency is exposed on every line, and most of it comes from DRAM:
// a line's sum was written during the direction before, mostly long before (the whole grid's
// sums are far larger than L2). A prefetch is only a hint to L2, the point of coherence, so it
// cannot return stale data, however early it runs. (A function, not a lambda of the kernel:
// the lambda, though never called there, changed the code of the D = 1 instance.)
__device__ __forceinline__ void PrefetchAccLine(const TmaBwdLaunch& a, const float* acc, int b,
                                                int c0, int q, int lane) {
  const BwdLineOf ln(a, q);
  if (ln.d == 0) return;
  const int dir = (a.dir_bits >> (2 * ln.d)) & 3;
  const LineGeometry geo = LineGeometry::Make(dir, a.H, a.W);
  const int64_t line = int64_t(b) * geo.image + geo.base + int64_t(ln.t) * geo.step_stride;
  const int n = min(kTmaSlab, a.C - c0);  // floats: a multiple of 8, so 32-byte runs
  for (int p = lane; p < int(geo.length); p += 32) {
    const float* at = acc + (line + p * geo.pos_stride) * a.C + c0;
    if (a.mode == 6) {
      // A sanitizer's view of the range (results unchanged): its first and last float read,
      // since memcheck need not check a prefetch's addresses.
      const volatile float* v = at;
      (void)(v[0] + v[n - 1]);
    } else {
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(at),
                   "r"(unsigned(n * sizeof(float)))
                   : "memory");
    }
  }
}

// Shared memory: kTmaStages stages of {x, lam, dh, h_{t-1} [Lmax][kTmaSlab], gates [Lmax][gbox]},
// then the span edges (kTmaBwdEdgeFloats), then the "full" and "empty" mbarriers, then (kAcc 3)
// the consumers' carries of their last item (kTmaBwdCarryBytes).
// kAcc: the running dx sum of D > 1, 0 where D = 1; 1: each thread loads its sums of the whole
// line as the line starts; 2: item by item, one item ahead (16 registers where 1 takes 32; 1's
// instance spills a 176-byte stack, 2's 80; v31: 2 is 20% faster); 3: as 2, and each thread's
// carry of its last item kept in shared memory between lines rather than in registers (v32:
// the registers 2 spills are mostly carries, reloaded from L2 with their latency exposed;
// with gate groups of 16 channels its 6 KB fit beside the stages at two blocks a
// multiprocessor; where they do not, the plan takes 2). Two blocks per
// multiprocessor: registers are allocated for 8 warps per block (warps in fours), so at most 128
// per thread (with 144, measured on the H100, one block fitted: the plan then declines it).
// kModes: whether the experiments' modes (TmaBwdLaunch::mode) are read by the consumers; without,
// their mode is 0 at compile time, and the items' output and store choices fold away (v40: ~10
// instructions an item in the consumers' loop, each of whose instructions is the line's time,
// v37). The producer's PrefetchAccLine still tests a.mode, once a prefetch, off that path.
template <typename T, int kAcc, bool kModes>
__global__ void __launch_bounds__(kTmaBwdThreads, 2)
    GspnBwdTmaKernel(const __grid_constant__ TmaBwdMaps maps, T* __restrict__ dx,
                     T* __restrict__ dlam, T* __restrict__ dw, float* acc,
                     unsigned* arrived, const TmaBwdLaunch a) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  constexpr int S = kTmaSlab, K = kTmaStages, KI = kTmaBwdItems;
  const int mode = kModes ? a.mode : 0;
  extern __shared__ __align__(128) unsigned char smem[];
  const int stage_bytes = 4 * a.xbytes + a.gbytes;
  float* edges = reinterpret_cast<float*>(smem + K * stage_bytes);
  // u0 = a_0 z at a span's first position, u2 = a_2 z at its last, of the line of parity `par`.
  auto edge = [&](int par, int kind, int span) {
    return edges + ((2 * par + kind) * kTmaBwdSpans + span) * S;
  };
  uint64_t* full = reinterpret_cast<uint64_t*>(edges + kTmaBwdEdgeFloats);
  uint64_t* empty = full + K;
  // kAcc 3: thread i's carry of its last item, floats 0-3 at [i], 4-7 at [kTmaBwdWarps * 32 + i]
  // (16-byte accesses without bank conflicts). Read only where written the line before.
  constexpr bool kCarrySmem = kAcc == 3, kByItem = kAcc >= 2;
  float4* carry_last = reinterpret_cast<float4*>(empty + K);

  const int slab = blockIdx.x % a.nslab, b = blockIdx.x / a.nslab;
  const int c0 = slab * S;
  const int Sg = a.C / a.G;
  const int gfirst = (3 * (c0 / Sg)) & ~7;  // the gate box's first element, 16-byte aligned
  int lines = 0;                            // lines of all directions
  for (int d = 0; d < a.D; ++d) {
    const int dir = (a.dir_bits >> (2 * d)) & 3;
    lines += (dir == kTopBottom || dir == kBottomTop) ? a.H : a.W;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < K; ++s) {
      MbarInit(&full[s], 1);
      MbarInit(&empty[s], kTmaBwdWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  // The q-th line's copies into stage q % K (one thread): x, lam, dh and the gates of line t,
  // h of line t - 1 unless line t restarts (it is not read then). `part`: kCopyAll, or dh and h
  // (kCopyEarly: their bytes expected without an arrival) and then the rest (kCopyLate: the
  // one arrival, with the rest's bytes), as TmaBwdLaunch::early splits them.
  auto issue = [&](int q, int part) {
    const BwdLineOf ln(a, q);
    const int dir = (a.dir_bits >> (2 * ln.d)) & 3;
    const bool rows = dir == kTopBottom || dir == kBottomTop;
    const int L = rows ? a.W : a.H;
    const bool need_h = !a.restarts.At(ln.t);
    const int s = q % K;
    unsigned char* st = smem + s * stage_bytes;
    const unsigned box = unsigned(L * S * sizeof(T));
    const unsigned early_bytes = (need_h ? 2 : 1) * box;
    const unsigned late_bytes = 2 * box + unsigned(L * a.gbox * sizeof(T));
    if (part == kCopyEarly)
      MbarExpectTxOnly(&full[s], early_bytes);
    else
      MbarExpectTx(&full[s], part == kCopyLate ? late_bytes : early_bytes + late_bytes);
    const bool ex = part != kCopyLate, lt = part != kCopyEarly;  // which boxes now
    // The image row (rows) or column (columns) of line t, and of line t - 1.
    const bool forward = dir == kTopBottom || dir == kLeftRight;
    const int n = rows ? a.H : a.W;
    const int at = forward ? ln.t : n - 1 - ln.t, before = forward ? at - 1 : at + 1;
    const int xrow = b * a.H, drow = (ln.d * a.B + b) * a.H;
    const TmaBwdMaps& m = maps;
    if (rows) {
      if (ex) TmaLoad(st + 2 * a.xbytes, &m.dh_row, c0, 0, drow + at, &full[s]);
      if (ex && need_h) TmaLoad(st + 3 * a.xbytes, &m.h_row, c0, 0, drow + before, &full[s]);
      if (lt) TmaLoad(st, &m.x_row, c0, 0, xrow + at, &full[s]);
      if (lt) TmaLoad(st + a.xbytes, &m.lam_row, c0, 0, drow + at, &full[s]);
      if (lt) TmaLoad(st + 4 * a.xbytes, &m.w_row, gfirst, 0, drow + at, &full[s]);
    } else {
      if (ex) TmaLoad(st + 2 * a.xbytes, &m.dh_col, c0, at, drow, &full[s]);
      if (ex && need_h) TmaLoad(st + 3 * a.xbytes, &m.h_col, c0, before, drow, &full[s]);
      if (lt) TmaLoad(st, &m.x_col, c0, at, xrow, &full[s]);
      if (lt) TmaLoad(st + a.xbytes, &m.lam_col, c0, at, drow, &full[s]);
      if (lt) TmaLoad(st + 4 * a.xbytes, &m.w_col, gfirst, at, drow, &full[s]);
    }
  };

  // The producer: lines 0 .. K-1, then q + K once the cluster is past q.
  if (warp == kTmaBwdWarps) {
    if (lane == 0)
      for (int q = 0; q < K && q < lines; ++q) issue(q, kCopyAll);
    if constexpr (kAcc) {
      for (int q = 0; q < a.acc_l2 && q < lines; ++q) PrefetchAccLine(a, acc, b, c0, q, lane);
      __syncwarp();  // the line barrier's cluster arrive is .aligned: the whole warp at once
    }
    LeadState lead(arrived, lines, a.lead, a.lead_wave, a.lead_blocks, a.lead_min);
    for (int q = 0; q < lines; ++q) {
      LineSync(a.lockstep);
      if (a.lead > 0 && lane == 0) lead.Arrive(q);
      // (Before lane 0's waits, which it does not depend on; the warp barrier below reconverges
      // the lanes before the next line barrier.)
      if constexpr (kAcc)
        if (a.acc_l2 > 0 && q + a.acc_l2 < lines)
          PrefetchAccLine(a, acc, b, c0, q + a.acc_l2, lane);
      if (lane == 0 && q + K < lines) {
        if (a.early) {
          if (a.lead > 0 && q + K - a.lead >= 0) lead.Wait(q + K - a.lead, a.lead_polls);
          issue(q + K, kCopyEarly);
          MbarWait(&empty[q % K], (q / K) & 1);
          issue(q + K, kCopyLate);
        } else {
          MbarWait(&empty[q % K], (q / K) & 1);
          if (a.lead > 0 && q + K - a.lead >= 0) lead.Wait(q + K - a.lead, a.lead_polls);
          issue(q + K, kCopyAll);
        }
      }
      __syncwarp();
    }
    return;
  }

  // Consumers (see kTmaBwdPairs).
  const int span = warp / kTmaBwdPairs, half = lane & 1, q16 = lane >> 1;
  const int v = 2 * (warp % kTmaBwdPairs) + half;
  const int c = c0 + v * 8;  // this thread's first channel
  const bool lane_ok = c < a.C;
  const bool leader = a.nsub == 1 || half == 0;  // stores its group's gate gradient
  const int gel = 3 * (c / Sg) - gfirst;         // this thread's gates in a box row
  const int pfirst = span * kTmaBwdSpan + q16;   // item k's position: pfirst + 16 k
  const int64_t bhw = int64_t(a.B) * a.H * a.W;
  // What line t + 1 (scanned just before) adds to z_t at this thread's positions, but for the
  // span edges: a_1 z at p, a_0 z at p + 1, a_2 z at p - 1 of line t + 1. kAcc 3 keeps item
  // KI - 1's in carry_last (shared memory) instead, so carry[KI - 1] is unused there.
  float carry[KI][8];
#pragma unroll
  for (int k = 0; k < KI; ++k)
#pragma unroll
    for (int i = 0; i < 8; ++i) carry[k][i] = 0.f;

  for (int q = 0; q < lines; ++q) {
    const BwdLineOf ln(a, q);
    const int dir = (a.dir_bits >> (2 * ln.d)) & 3;
    const LineGeometry geo = LineGeometry::Make(dir, a.H, a.W);
    const int L = int(geo.length), t = ln.t;
    const bool first_dir = ln.d == 0, last_dir = ln.d == a.D - 1;
    // Line t + 1 fed line t unless it restarted (or this is the direction's first line).
    const bool coupled = ln.n > 0 && !a.restarts.At(t + 1);
    const bool restart = a.restarts.At(t);
    const int64_t line = int64_t(b) * geo.image + geo.base + int64_t(t) * geo.step_stride;

    // The running dx sum of the earlier directions at this line: the loads of the whole line's
    // (kAcc 1), or of its first item's (2 and 3; item k + 1's go out as item k starts), go out before
    // the wait for the stage.
    float accv[kAcc == 1 ? KI : 2][8];
    if (kAcc && !first_dir) {
#pragma unroll
      for (int k = 0; k < (kAcc == 1 ? KI : 1); ++k) {
        const int p = pfirst + 16 * k;
        if (lane_ok && p < L) LoadF<8>(acc + (line + p * geo.pos_stride) * a.C + c, accv[k]);
      }
    }
    const int s = q % K;
    MbarWait(&full[s], (q / K) & 1);
    if (mode == 1 || mode == 2) {  // the copies alone, or with the dx and dlam stores (zeros)
      if (mode == 2) {
        const float zero[8] = {};
#pragma unroll
        for (int k = 0; k < KI; ++k) {
          const int p = pfirst + 16 * k;
          if (!lane_ok || p >= L) continue;
          Pack<T, 8>::Store(dlam + (int64_t(ln.d) * bhw + line + p * geo.pos_stride) * a.C + c,
                            zero);
          Pack<T, 8>::Store(dx + (line + p * geo.pos_stride) * a.C + c, zero);
        }
      }
      __syncwarp();
      if (lane == 0) MbarArrive(&empty[s]);
      LineSync(a.lockstep);
      continue;
    }
    // Modes 3 and 4 (experiments): the arithmetic without any store, or without the dw stores.
    const bool store_out = mode != 3, store_dw = mode != 3 && mode != 4;
    // dx and dlam go out as bulk tensor stores of the line's boxes, written over x and lam in
    // the stage (each read only by the item that writes it); mode 5: 16-byte stores from the
    // registers instead.
    const bool bulk = store_out && mode != 5;
    const bool dx_out = !kAcc || last_dir;  // else the running sum, from the registers
    const unsigned char* st = smem + s * stage_bytes;
    const T* xs = reinterpret_cast<const T*>(st);
    const T* ls = reinterpret_cast<const T*>(st + a.xbytes);
    const T* dhs = reinterpret_cast<const T*>(st + 2 * a.xbytes);
    const T* hs = reinterpret_cast<const T*>(st + 3 * a.xbytes);
    const T* gs = reinterpret_cast<const T*>(st + 4 * a.xbytes);
    auto load = [&](const T* box, int p, float* out) {
      Pack<T, 8> pk;
      pk.r = *reinterpret_cast<const uint4*>(box + p * S + v * 8);
      pk.Unpack(out);
    };
    auto put = [&](const T* box, int p, const float* in) {
      StoreBox8(const_cast<T*>(box) + p * S + v * 8, in);
    };

    // a_2 z of the previous item's last position, for this item's first (lanes 0 and 1).
    float pend[8] = {};
#pragma unroll
    for (int k = 0; k < KI; ++k) {
      const int p = pfirst + 16 * k;
      const bool active = lane_ok && p < L;
      if constexpr (kByItem)
        if (!first_dir && k + 1 < KI && lane_ok && p + 16 < L)
          LoadF<8>(acc + (line + (p + 16) * geo.pos_stride) * a.C + c, accv[(k + 1) & 1]);
      // This item's carry lives in shared memory between lines (kAcc 3, the last item).
      const bool carry_in_smem = kCarrySmem && k == KI - 1;
      float da[3] = {0.f, 0.f, 0.f}, wa[3] = {0.f, 0.f, 0.f}, wc[3] = {0.f, 0.f, 0.f};
      float z[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) z[i] = 0.f;
      if (active) {
        load(dhs, p, z);
        if (coupled) {
          // The span edges come from the neighbouring spans' warps (written before the line
          // barrier that ended line t + 1).
          float e[8];
          if (k == 0 && q16 == 0 && p > 0) {
            LoadF<8>(edge((q + 1) & 1, 1, span - 1) + v * 8, e);
#pragma unroll
            for (int i = 0; i < 8; ++i) z[i] += e[i];
          }
          if (k == KI - 1 && q16 == 15 && p + 1 < L) {
            LoadF<8>(edge((q + 1) & 1, 0, span + 1) + v * 8, e);
#pragma unroll
            for (int i = 0; i < 8; ++i) z[i] += e[i];
          }
          if (carry_in_smem) {
            const float4 lo = carry_last[threadIdx.x];
            const float4 hi = carry_last[kTmaBwdWarps * 32 + threadIdx.x];
            z[0] += lo.x, z[1] += lo.y, z[2] += lo.z, z[3] += lo.w;
            z[4] += hi.x, z[5] += hi.y, z[6] += hi.z, z[7] += hi.w;
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) z[i] += carry[k][i];
          }
        }
        float xv[8], lv[8], out[8];
        load(xs, p, xv);
        load(ls, p, lv);
        if (!restart) {
          const T* gp = gs + p * a.gbox + gel;
          const float g[3] = {ToF<T>(gp[0]), ToF<T>(gp[1]), ToF<T>(gp[2])};
          Weights(g, p > 0, p + 1 < L, a.normalize, wa, wc);
          // The neighbours' rows clamped into the line and their sums dropped at its ends: no
          // branch and no zeroed registers an item (v39; the stage's rows past L may be another
          // line's or unwritten).
          float hl[8], hm[8], hr[8];
          load(hs, p, hm);
          load(hs, max(p - 1, 0), hl);
          load(hs, min(p + 1, L - 1), hr);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            da[0] += z[i] * hl[i];
            da[1] += z[i] * hm[i];
            da[2] += z[i] * hr[i];
          }
          if (p == 0) da[0] = 0.f;
          if (p + 1 == L) da[2] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = z[i] * xv[i];
        if (bulk)
          put(xs, p, out);
        else if (store_out)
          Pack<T, 8>::Store(dlam + (int64_t(ln.d) * bhw + line + p * geo.pos_stride) * a.C + c,
                            out);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = z[i] * lv[i];
        if constexpr (kAcc)
          if (!first_dir)
#pragma unroll
            for (int i = 0; i < 8; ++i) out[i] += accv[kByItem ? k & 1 : k][i];
        if (!store_out)
          ;
        else if (dx_out && bulk)
          put(ls, p, out);
        else if (dx_out)
          Pack<T, 8>::Store(dx + (line + p * geo.pos_stride) * a.C + c, out);
        else
          StoreF<8>(acc + (line + p * geo.pos_stride) * a.C + c, out);
      }
      // carry for line t - 1 (wa = 0 where inactive or restarting: nothing flows from there):
      // a_1 z here, a_0 z from p + 1 (lane + 2; at the item's last lanes, the next item's first:
      // added to this carry when that item is formed) and a_2 z from p - 1 (lane - 2; at the
      // first lanes, the previous item's last: pend). Each span's first a_0 z and last a_2 z go
      // to shared memory for the neighbouring spans' warps.
      // The neighbours' parts are selected and join a_1 z in one fma (v39). The compiler
      // if-converted the earlier branches too: the kernels' sizes differ by 8 instructions,
      // so this form is kept for its one rounding, not for speed.
      float u0[8], u2[8], own_last[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        u0[i] = wa[0] * z[i];
        u2[i] = wa[2] * z[i];
        const float from_right = __shfl_sync(0xffffffffu, u0[i], (lane + 2) & 31);
        const float from_left = __shfl_sync(0xffffffffu, u2[i], (lane + 30) & 31);
        if (k > 0 && q16 == 15) carry[k - 1][i] += from_right;
        const float left = q16 > 0 ? from_left : (k > 0 ? pend[i] : 0.f);
        const float own = fmaf(wa[1], z[i], (q16 < 15 ? from_right : 0.f) + left);
        pend[i] = from_left;
        if (carry_in_smem)
          own_last[i] = own;
        else
          carry[k][i] = own;
      }
      if (carry_in_smem) {
        carry_last[threadIdx.x] = make_float4(own_last[0], own_last[1], own_last[2], own_last[3]);
        carry_last[kTmaBwdWarps * 32 + threadIdx.x] =
            make_float4(own_last[4], own_last[5], own_last[6], own_last[7]);
      }
      if (k == 0 && q16 == 0) StoreF<8>(edge(q & 1, 0, span) + v * 8, u0);
      if (k == KI - 1 && q16 == 15) StoreF<8>(edge(q & 1, 1, span) + v * 8, u2);
      // The group's weight gradient over its two vectors (uniform: every lane takes part).
      if (a.nsub == 2) {
#pragma unroll
        for (int j = 0; j < 3; ++j) da[j] += __shfl_xor_sync(0xffffffffu, da[j], 1);
        // The leader writes over gates its partner lane read: a shuffle does not order memory,
        // a warp barrier does (racecheck reported the read and the write as a hazard).
        __syncwarp();
      }
      // The group's gate gradient replaces its gates in the stage (only this lane pair read
      // them, both before the warp barrier above); the line's gradients go out together below.
      if (active && leader && store_dw) {
        float out[3] = {0.f, 0.f, 0.f};  // zero where line t restarts
        if (!restart) GateGrad(da, wa, wc, a.normalize, out);
        T* gp = const_cast<T*>(gs) + p * a.gbox + gel;
#pragma unroll
        for (int j = 0; j < 3; ++j) gp[j] = FromF<T>(out[j]);
      }
    }
    // The line barrier orders this line's edges, running dx sum and gate gradients before their
    // reads (its block barrier), and keeps the cluster's blocks in lockstep. The fence first
    // makes the outputs written into the stage visible to the bulk stores (the async proxy).
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    LineSync(a.lockstep);
    if (bulk && threadIdx.x == 0) {
      const bool rows = dir == kTopBottom || dir == kBottomTop;
      const bool forward = dir == kTopBottom || dir == kLeftRight;
      const int at = forward ? t : (rows ? a.H : a.W) - 1 - t;
      const int xrow = b * a.H, drow = (ln.d * a.B + b) * a.H;
      if (rows) {
        TmaStore(&maps.dlam_row, c0, 0, drow + at, xs);
        if (dx_out) TmaStore(&maps.dx_row, c0, 0, xrow + at, ls);
      } else {
        TmaStore(&maps.dlam_col, c0, at, drow, xs);
        if (dx_out) TmaStore(&maps.dx_col, c0, at, xrow, ls);
      }
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
    // The slab's gate gradients of each position, 3 per group, are contiguous in dw: stored
    // element by element from the stage, consecutive threads on consecutive elements, so that
    // a warp's store covers a few whole positions (the first form stored each group's three
    // from its lane: a warp's store then touched 16 positions, and the backward took 1.38 ms
    // at 8 x 1152 x 128 x 128 bfloat16 G = 72, 0.88 without the gate gradient's stores).
    // A thread keeps one element j of a position's n3 and steps by the positions that all the
    // threads cover at once (pq; the last few threads idle): two divisions a line where the
    // first form divided each element's index by n3 and formed its 64-bit address anew (v37;
    // ~45 instructions an element, 6 elements a thread and line at 128 positions, G = C / 16).
    if (store_dw) {  // (reads the stage only: see the release below)
      const int n3 = 3 * (min(S, a.C - c0) / Sg);
      const int pq = kTmaBwdWarps * 32 / n3;  // 3 <= n3 <= 18 (PlanTmaBackward: groups of 8, 16)
      const int p0 = threadIdx.x / n3, j = threadIdx.x - p0 * n3;
      if (p0 < pq) {
        const int64_t pstep = int64_t(pq) * geo.pos_stride * a.G * 3;
        T* out = dw + ((int64_t(ln.d) * bhw + line + int64_t(p0) * geo.pos_stride) * a.G +
                       c0 / Sg) * 3 + j;
        const T* in = gs + (p0 * a.gbox + 3 * (c0 / Sg) - gfirst + j);
        for (int p = p0; p < L; p += pq, out += pstep, in += pq * a.gbox) *out = *in;
      }
    }
    // The stage is read (every value loaded from it has been used): hand it back to the
    // producer. No proxy fence here (v42: 2% faster): the copies into the stage are async-proxy
    // writes after these generic *reads*, ordered by the mbarrier's arrive and the producer's
    // wait, as the TMA forward's consumers and CUTLASS's TMA pipelines release their stages.
    // (The PTX ISA asks for a cross-proxy fence between accesses of one location through two
    // proxies and does not set reads apart: this rests on that practice. Racecheck does not see
    // proxies.) The fence before the line barrier stays: the generic *writes* into the stage
    // (outputs, gate gradients) are read by the bulk stores. Nothing after it may write the
    // stage.
    // The bulk stores must have read the stage before the producer copies into it.
    if (bulk && threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    __syncwarp();
    if (lane == 0) MbarArrive(&empty[s]);
  }
  // The last bulk stores must be complete before the kernel ends (their smem must stay valid).
  if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

}  // namespace
}  // namespace cgspn
