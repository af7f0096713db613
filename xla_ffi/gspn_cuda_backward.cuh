// The backward (and its small second launch) kernel of gspn_scan (device code). The layout of
// the work, the neighbour exchange, the latency hiding and the gate normalisation it shares with
// the other kernels are described in gspn_cuda_kernels.cuh, with the building blocks (packs,
// gates, launch parameters, mbarriers). Part of gspn_cuda.cu's translation unit.
#pragma once

#include "gspn_cuda_kernels.cuh"

namespace cgspn {
namespace {

// ------------------------------------------------------------------ backward

// kAcc: D > 1, the directions' dx contributions are summed through the running float32 sum
// (without it, those registers would be held for nothing).
template <typename T, int V, int NG, bool kAcc>
struct BwdIn {
  Pack<T, V> x, lam, dh, hm;  // hm: the saved h of line t - 1 at this position
  GatePack<T, NG, false> g;   // the 3 * NG gates, three loads (pairs did not pay here: v19)
  float acc[kAcc ? V : 1];    // running float32 dx sum of the earlier directions
};

// kPrefetch: the L2 prefetch of line t - 2 (chosen by the launch plan; see PrefetchL2). kWide:
// blocks of up to BwdMaxThreads threads instead of kBwdThreads (fewer registers per thread).
template <typename T, int V, int NG, int P, bool kAcc, bool kWide>
constexpr int kBwdBound = kWide ? BwdMaxThreads(sizeof(T), V, NG, P, kAcc) : kBwdThreads;

// Blocks per SM that ptxas is told to fit (0: none asked, as if the argument were left out; nvcc
// 13 then emits no .minnctapersm). The bfloat16 16-byte instance with
// one gate group per pack (G = C/16 and fewer groups): since v39 ptxas compiles it at 128
// registers with a 12-byte spill, aiming at two blocks per SM; asked for one it takes 159 and
// no spill, and 8x192x128^2 G = 12 runs 0.248 -> 0.236 ms on the H200 (v41). Asking every
// instance for one block raised the registers of ~60 and took some over 128 (one block where
// there were two) for no measured gain anywhere else, so only this instance (both its prefetch
// forms) is asked.
template <typename T, int V, int NG, int P, bool kAcc, bool kWide>
constexpr int kBwdMinBlocks =
    (std::is_same_v<T, __nv_bfloat16> && V == 8 && NG == 1 && P == 1 && !kAcc && !kWide) ? 1 : 0;

// dx is not __restrict__: for float32 the running dx sum `acc` is the dx buffer itself.
template <typename T, int V, int NG, int P, bool kAcc, bool kPrefetch, bool kWide>
__global__ void __launch_bounds__(kBwdBound<T, V, NG, P, kAcc, kWide>,
                                  kBwdMinBlocks<T, V, NG, P, kAcc, kWide>)
    GspnBwdKernel(const T* __restrict__ x, const T* __restrict__ lam, const T* __restrict__ w,
                  const T* __restrict__ h, const T* __restrict__ dh, T* dx,
                  T* __restrict__ dlam, T* __restrict__ dw, float* acc, float* __restrict__ part,
                  const Launch a) {
  extern __shared__ float4 smem_raw[];
  // [warps][2 line parities] mbarriers, then the tiles [2 or 3 kinds][2 parities][Lmax][Cs]
  // (BwdTiles: the saved-h tile only where the gate gradient is formed one line late).
  uint64_t* mbar = reinterpret_cast<uint64_t*>(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw) +
               MbarBytes(kBwdBound<T, V, NG, P, kAcc, kWide>) / sizeof(float);
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
  // Inputs staged through shared memory (BwdStaged): two slots per thread after the tiles,
  // [2 sets][threads] at BwdSlotBytes apart, filled by cp.async.
  constexpr bool kStaged = BwdStaged(V, NG, P, kWide);
  constexpr int kSlot = BwdSlotBytes(sizeof(T), V, NG, kAcc);
  static_assert(!kStaged || (sizeof(T) == 2 && sizeof(BwdIn<T, V, NG, kAcc>) <= kSlot &&
                             sizeof(Pack<T, NG>) == sizeof(Pack<T, V>)),
                "a staged slot holds one position's inputs, in pieces of one vector");
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
        in[j].g.ForLoads(wd + pix * G3, op);
        after(j, pix);
      }
    };
    auto load = [&](BwdIn<T, V, NG, kAcc>(&in)[P], int t) {
      if constexpr (kStaged) {  // copies into the slot `in`, one commit group per line
        for_inputs(in, t, [](auto& pack, const T* p) { CopyAsync<sizeof(pack.r)>(&pack.r, p); },
                   [&](int j, int64_t pix) {
                     // The running dx sum (see below), through L1 like that load: 8-byte pieces,
                     // since a slot's sum need not be 16-byte aligned.
                     // (Braces: in the instances without the sum the discarded branch left the
                     // pragma before no statement, and nvcc warned.)
                     if constexpr (kAcc) {
                       if (!first_dir) {
#pragma unroll
                         for (int i = 0; i < V; i += 2)
                           CopyAsync<8>(&in[j].acc[i], accd + pix * C + i);
                       }
                     }
                   });
        CopyCommit();
        return;
      }
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
    auto finish_dw = [&](int p, const GatePack<T, NG, false>& graw, int g,
                         const float (&da)[3], float* out) {
      float gv[3 * NG], wa[3], wc[3];
      graw.Unpack(gv);
      Weights(gv + 3 * g, p > 0, p + 1 < L, a.normalize, wa, wc);
      GateGrad(da, wa, wc, a.normalize, out + 3 * g);
    };

    // State of line t + 1 at this thread's positions: a_1 z and, for the one-line-late gate
    // gradient, its adjoint z and its gates. (That form reads the saved h of line t at p, loaded
    // with line t + 1, back from the shared tile: fewer registers.)
    float zold[P][V], u1[P][V];
    GatePack<T, NG, false> gold[P];
#pragma unroll
    for (int j = 0; j < P; ++j)
#pragma unroll
      for (int i = 0; i < V; ++i) zold[j][i] = u1[j][i] = 0.f;

    // One line of the reverse scan: issue the loads of line t - 1 into `ahead` (the set line
    // t + 1 used), then process line t from `cur`.
    auto step = [&](int t, const BwdIn<T, V, NG, kAcc>(&cur)[P], BwdIn<T, V, NG, kAcc>(&ahead)[P]) {
      if (t > 0) load(ahead, t - 1);
      if constexpr (kStaged) {
        if (t == 0) CopyCommit();  // every line one group, so that the wait below counts right
        CopyWait<1>();             // line t's copies (the group before line t - 1's) have landed
      }
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
        if constexpr (kAcc) {
          if (!first_dir) {
#pragma unroll
            for (int i = 0; i < V; ++i) out[i] += cur[j].acc[i];
          }
        }
        if (last_dir)
          Pack<T, V>::Store(dxd + pix * C, out);
        else
          StoreF<V>(accd + pix * C, out);

        // Same-line form: line t's gate gradient (zero where line t restarts: h_t did not
        // depend on h_{t-1}).
        float dwv[kSame ? 3 * NG : 1] = {};
        if (!restart) {  // publish a_0 z, a_2 z (and h_{t-1}) for line t - 1
          float gv[3 * NG], hm[V], u0[V], u2[V];
          cur[j].g.Unpack(gv);
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
            gold[j] = cur[j].g;
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

    // The two register sets swap roles by unrolling, never by copying (see the forward). Staged:
    // the two sets are this thread's slots in shared memory.
    using Set = BwdIn<T, V, NG, kAcc>[P];
    Set regs0, regs1;
    char* slots = reinterpret_cast<char*>(smem + BwdTiles(sizeof(T), NG) * tile_size);
    Set& r0 = kStaged ? *reinterpret_cast<Set*>(slots + threadIdx.x * kSlot) : regs0;
    Set& r1 = kStaged ? *reinterpret_cast<Set*>(slots + (blockDim.x + threadIdx.x) * kSlot)
                      : regs1;
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
