// The forward kernel of gspn_scan (device code). The layout of the work, the neighbour exchange,
// the latency hiding and the gate normalisation it shares with the other kernels are described
// in gspn_cuda_kernels.cuh, with the building blocks (packs, gates, launch parameters,
// mbarriers). Part of gspn_cuda.cu's translation unit.
#pragma once

#include "gspn_cuda_kernels.cuh"

namespace cgspn {
namespace {

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
  // the 3 * NG gates: in two loads for 16-bit whole vectors with one group each (GatePack)
  GatePack<T, NG, (NG == 1 && sizeof(T) == 2 && V == 8)> g;
};

// Threads per block of a forward instance: 768 (at most 85 registers each) where a thread
// holds few: float32 with one gate group per vector, 80 registers. Lines of 128 positions then
// get 96-byte slabs and 768 resident threads per multiprocessor instead of 64-byte slabs and 512
// (8 x 1152 x 128 x 128 G = 72: 22 KB of loads in flight per multiprocessor, against 34 KB at
// 64 x 64, where 384-thread blocks fit twice). Also the 16-bit half vectors (4 channels of 8
// bytes: HalfVector in gspn_cuda.cu), 80 registers.
template <typename T, int V, int NG, int P>
constexpr int kFwdMaxThreads =
    (sizeof(T) == 4 && V > 1 && NG == 1 && P == 1) || (sizeof(T) == 2 && V == 4 && P == 1)
        ? 768
        : kFwdThreads;

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
      in[j].g.ForLoads(wd + pix * G3, op);
    }
  };
  auto load = [&](FwdIn<T, V, NG>(&in)[P], int t) {
    for_inputs(in, t, [](auto& pack, const T* p) { pack.Load(p); });
  };
  auto prefetch = [&](int t) {  // (into packs of its own: GatePack::ForLoads writes to its pack)
    FwdIn<T, V, NG> unused[P];
    for_inputs(unused, t, [](auto&, const T* p) { PrefetchL2(p); });
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
      if (a.prefetch && t + 2 < T_steps) prefetch(t + 2);
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
      cur[j].g.Unpack(gv);
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

}  // namespace
}  // namespace cgspn
