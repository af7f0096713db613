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
// consumer warps scan from there, clusters of two neighbouring slabs keep in lockstep.
//
// What the staged h_{t-1} box gives for free: the gate gradient of line t needs h_{t-1} at
// p - 1, p, p + 1, which the register backward either saved in a shared tile one line late or
// re-read from L1; here all three positions sit in the stage. So every line forms its own gate
// gradient (reduced over the group's two 8-channel vectors by one shuffle) and stores it.
//
// Blocks: one per (image, slab of kTmaSlab channels), scanning the D directions one after the
// other (the running float32 dx sum of the earlier directions, as in the register backward, is
// read and written by ordinary loads and stores: only this block touches its slab of it).
#pragma once

#include "gspn_cuda_forward_tma.cuh"

namespace cgspn {
namespace {

constexpr int kTmaBwdWarps = 12;  // consumer warps; one more produces
constexpr int kTmaBwdThreads = (kTmaBwdWarps + 1) * 32;
constexpr int kTmaBwdItems = kTmaMaxLine * (kTmaSlab / 8) / (kTmaBwdWarps * 32);

// The maps of one backward call: x, lam, dh, h (saved forward output) and the gates, as in the
// forward ([rows][W][inner], row and column boxes).
struct TmaBwdMaps {
  CUtensorMap x_row, x_col, lam_row, lam_col, dh_row, dh_col, h_row, h_col, w_row, w_col;
};

struct TmaBwdLaunch {
  int B, H, W, C, G, D;
  int dir_bits;  // 2 bits per direction, as Launch
  int nslab;     // ceil(C / kTmaSlab)
  int gbox;      // gate elements per pixel in a box (a multiple of 8)
  int nsub;      // 8-channel vectors per gate group: 1 or 2
  int lmax;      // positions of a box slot and a tile: the longest line of the call
  int64_t chunk;
  bool normalize;
  int xbytes, gbytes;  // stage pieces: one [Lmax][kTmaSlab] box, the gate box (128-byte multiples)
};

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

// Shared memory: kTmaStages stages of {x, lam, dh, h_{t-1} [Lmax][kTmaSlab], gates [Lmax][gbox]},
// then the tiles [2 kinds (u0 = a_0 z, u2 = a_2 z)][2 line parities][Lmax][kTmaSlab] float, then
// the "full" and "empty" mbarriers.
template <typename T>
__global__ void __launch_bounds__(kTmaBwdThreads, 1)
    GspnBwdTmaKernel(const __grid_constant__ TmaBwdMaps maps, T* __restrict__ dx,
                     T* __restrict__ dlam, T* __restrict__ dw, float* acc,
                     const TmaBwdLaunch a) {
  static_assert(sizeof(T) == 2, "16-bit types only");
  constexpr int S = kTmaSlab, NV = S / 8, K = kTmaStages, NCT = kTmaBwdWarps * 32;
  extern __shared__ __align__(128) unsigned char smem[];
  const int stage_bytes = 4 * a.xbytes + a.gbytes;
  const int Lmax = a.lmax;
  float* tiles = reinterpret_cast<float*>(smem + K * stage_bytes);
  auto tile = [&](int kind, int parity) { return tiles + (2 * kind + parity) * Lmax * S; };
  uint64_t* full = reinterpret_cast<uint64_t*>(tiles + 4 * Lmax * S);
  uint64_t* empty = full + K;

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
  // h of line t - 1 unless line t restarts (it is not read then).
  auto issue = [&](int q) {
    const BwdLineOf ln(a, q);
    const int dir = (a.dir_bits >> (2 * ln.d)) & 3;
    const bool rows = dir == kTopBottom || dir == kBottomTop;
    const int L = rows ? a.W : a.H;
    const bool need_h = !LineGeometry::Restarts(ln.t, a.chunk);
    const int s = q % K;
    unsigned char* st = smem + s * stage_bytes;
    const unsigned box = unsigned(L * S * sizeof(T));
    MbarExpectTx(&full[s], (need_h ? 4 : 3) * box + unsigned(L * a.gbox * sizeof(T)));
    // The image row (rows) or column (columns) of line t, and of line t - 1.
    const bool forward = dir == kTopBottom || dir == kLeftRight;
    const int n = rows ? a.H : a.W;
    const int at = forward ? ln.t : n - 1 - ln.t, before = forward ? at - 1 : at + 1;
    const int xrow = b * a.H, drow = (ln.d * a.B + b) * a.H;
    const TmaBwdMaps& m = maps;
    if (rows) {
      TmaLoad(st, &m.x_row, c0, 0, xrow + at, &full[s]);
      TmaLoad(st + a.xbytes, &m.lam_row, c0, 0, drow + at, &full[s]);
      TmaLoad(st + 2 * a.xbytes, &m.dh_row, c0, 0, drow + at, &full[s]);
      if (need_h) TmaLoad(st + 3 * a.xbytes, &m.h_row, c0, 0, drow + before, &full[s]);
      TmaLoad(st + 4 * a.xbytes, &m.w_row, gfirst, 0, drow + at, &full[s]);
    } else {
      TmaLoad(st, &m.x_col, c0, at, xrow, &full[s]);
      TmaLoad(st + a.xbytes, &m.lam_col, c0, at, drow, &full[s]);
      TmaLoad(st + 2 * a.xbytes, &m.dh_col, c0, at, drow, &full[s]);
      if (need_h) TmaLoad(st + 3 * a.xbytes, &m.h_col, c0, before, drow, &full[s]);
      TmaLoad(st + 4 * a.xbytes, &m.w_col, gfirst, at, drow, &full[s]);
    }
  };

  if (warp == kTmaBwdWarps) {  // the producer: lines 0 .. K-1, then q + K once the cluster is past q
    if (lane == 0)
      for (int q = 0; q < K && q < lines; ++q) issue(q);
    for (int q = 0; q < lines; ++q) {
      ClusterSync();
      if (lane == 0 && q + K < lines) {
        MbarWait(&empty[q % K], (q / K) & 1);
        issue(q + K);
      }
      __syncwarp();
    }
    return;
  }

  // Consumers: item k of a thread is (position p0 + k * kStride, vector v), as in the forward.
  // The two vectors of a 16-channel group are threads 2i and 2i + 1 of one warp (NV is even).
  static_assert(NCT % NV == 0 && NV % 2 == 0, "a thread's items share one vector");
  constexpr int kStride = NCT / NV;
  const int v = threadIdx.x % NV, p0 = threadIdx.x / NV;
  const int c = c0 + v * 8;  // this thread's first channel
  const bool lane_ok = c < a.C;
  const bool leader = a.nsub == 1 || v % 2 == 0;  // stores its group's gate gradient
  const int gel = 3 * (c / Sg) - gfirst;          // this thread's gates in a box row
  const int64_t bhw = int64_t(a.B) * a.H * a.W;
  // a_1 z of the line scanned before (line t + 1) at this thread's positions.
  float u1[kTmaBwdItems][8];
#pragma unroll
  for (int k = 0; k < kTmaBwdItems; ++k)
#pragma unroll
    for (int i = 0; i < 8; ++i) u1[k][i] = 0.f;

  for (int q = 0; q < lines; ++q) {
    const BwdLineOf ln(a, q);
    const int dir = (a.dir_bits >> (2 * ln.d)) & 3;
    const LineGeometry geo = LineGeometry::Make(dir, a.H, a.W);
    const int L = int(geo.length), t = ln.t;
    const bool first_dir = ln.d == 0, last_dir = ln.d == a.D - 1;
    // Line t + 1 fed line t unless it restarted (or this is the direction's first line).
    const bool coupled = ln.n > 0 && !LineGeometry::Restarts(t + 1, a.chunk);
    const bool restart = LineGeometry::Restarts(t, a.chunk);
    const int64_t line = int64_t(b) * geo.image + geo.base + int64_t(t) * geo.step_stride;

    // The running dx sum of the earlier directions at this line: its loads go out before the
    // wait for the stage.
    float accv[kTmaBwdItems][8];
    if (!first_dir) {
#pragma unroll
      for (int k = 0; k < kTmaBwdItems; ++k) {
        const int p = p0 + k * kStride;
        if (lane_ok && p < L) LoadF<8>(acc + (line + p * geo.pos_stride) * a.C + c, accv[k]);
      }
    }
    const int s = q % K;
    MbarWait(&full[s], (q / K) & 1);
    const unsigned char* st = smem + s * stage_bytes;
    const T* xs = reinterpret_cast<const T*>(st);
    const T* ls = reinterpret_cast<const T*>(st + a.xbytes);
    const T* dhs = reinterpret_cast<const T*>(st + 2 * a.xbytes);
    const T* hs = reinterpret_cast<const T*>(st + 3 * a.xbytes);
    const T* gs = reinterpret_cast<const T*>(st + 4 * a.xbytes);
    const float* u0_in = tile(0, (q + 1) & 1);  // written by the line before in scan order
    const float* u2_in = tile(1, (q + 1) & 1);
    float* u0_out = tile(0, q & 1);
    float* u2_out = tile(1, q & 1);

#pragma unroll
    for (int k = 0; k < kTmaBwdItems; ++k) {
      const int p = p0 + k * kStride;
      const bool active = lane_ok && p < L;
      float da[3] = {0.f, 0.f, 0.f}, wa[3] = {0.f, 0.f, 0.f}, wc[3] = {0.f, 0.f, 0.f};
      const int64_t pix = line + p * geo.pos_stride;
      if (active) {
        float z[8], xv[8], lv[8], out[8];
        Pack<T, 8> pk;
        pk.r = *reinterpret_cast<const uint4*>(dhs + p * S + v * 8);
        pk.Unpack(z);
        if (coupled) {
          float r[8], l[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) r[i] = l[i] = 0.f;
          if (p + 1 < L) LoadF<8>(u0_in + (p + 1) * S + v * 8, r);
          if (p > 0) LoadF<8>(u2_in + (p - 1) * S + v * 8, l);
#pragma unroll
          for (int i = 0; i < 8; ++i) z[i] += u1[k][i] + r[i] + l[i];
        }
        pk.r = *reinterpret_cast<const uint4*>(xs + p * S + v * 8);
        pk.Unpack(xv);
        pk.r = *reinterpret_cast<const uint4*>(ls + p * S + v * 8);
        pk.Unpack(lv);
        if (!restart) {
          const T* gp = gs + p * a.gbox + gel;
          const float g[3] = {ToF<T>(gp[0]), ToF<T>(gp[1]), ToF<T>(gp[2])};
          Weights(g, p > 0, p + 1 < L, a.normalize, wa, wc);
          float hl[8], hm[8], hr[8], u0[8], u2[8];
          pk.r = *reinterpret_cast<const uint4*>(hs + p * S + v * 8);
          pk.Unpack(hm);
#pragma unroll
          for (int i = 0; i < 8; ++i) hl[i] = hr[i] = 0.f;
          if (p > 0) {
            pk.r = *reinterpret_cast<const uint4*>(hs + (p - 1) * S + v * 8);
            pk.Unpack(hl);
          }
          if (p + 1 < L) {
            pk.r = *reinterpret_cast<const uint4*>(hs + (p + 1) * S + v * 8);
            pk.Unpack(hr);
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            u0[i] = wa[0] * z[i];
            u1[k][i] = wa[1] * z[i];
            u2[i] = wa[2] * z[i];
            da[0] += z[i] * hl[i];
            da[1] += z[i] * hm[i];
            da[2] += z[i] * hr[i];
          }
          StoreF<8>(u0_out + p * S + v * 8, u0);
          StoreF<8>(u2_out + p * S + v * 8, u2);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = z[i] * xv[i];
        Pack<T, 8>::Store(dlam + (int64_t(ln.d) * bhw + pix) * a.C + c, out);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = z[i] * lv[i] + (first_dir ? 0.f : accv[k][i]);
        if (last_dir)
          Pack<T, 8>::Store(dx + pix * a.C + c, out);
        else
          StoreF<8>(acc + pix * a.C + c, out);
      }
      // The group's weight gradient over its two vectors (uniform: every lane takes part).
      if (a.nsub == 2) {
#pragma unroll
        for (int j = 0; j < 3; ++j) da[j] += __shfl_xor_sync(0xffffffffu, da[j], 1);
      }
      if (active && leader) {
        float out[3] = {0.f, 0.f, 0.f};  // zero where line t restarts
        if (!restart) GateGrad(da, wa, wc, a.normalize, out);
        T* dwp = dw + ((int64_t(ln.d) * bhw + pix) * a.G + c / Sg) * 3;
#pragma unroll
        for (int j = 0; j < 3; ++j) dwp[j] = FromF<T>(out[j]);
      }
    }
    // The stage is read: hand it back to the producer. The cluster barrier then orders this
    // line's tiles (and running dx sum) before the next line's reads.
    __syncwarp();
    if (lane == 0) MbarArrive(&empty[s]);
    ClusterSync();
  }
}

}  // namespace
}  // namespace cgspn
