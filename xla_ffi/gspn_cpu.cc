// The C++ CPU kernel of gspn_scan: forward and backward FFI handlers.
//
// Work is split over (direction, image) pairs in the forward and over images in the backward
// (whose dx sums over directions), one thread each. Inside, every line is staged in float32
// buffers and the innermost loops run over contiguous channels, so the compiler vectorises them.
// Each line's gates are turned into weights once, per pixel and group, before the channel loops.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "gspn.h"

namespace cgspn {
namespace {

// ------------------------------------------------------------------ storage types <-> float32

inline float Bits2Float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t Float2Bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

struct F32 {
  using Storage = float;
  static float Load(float v) { return v; }
  static float Store(float v) { return v; }
};

struct BF16 {
  using Storage = uint16_t;
  static float Load(uint16_t v) { return Bits2Float(uint32_t(v) << 16); }
  static uint16_t Store(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u = Float2Bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
};

struct F16 {
  using Storage = uint16_t;
  static float Load(uint16_t v) {
    uint32_t sign = uint32_t(v & 0x8000u) << 16, exp = (v >> 10) & 0x1fu, mant = v & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24
      float f = std::ldexp(float(mant), -24);
      return sign ? -f : f;
    }
    if (exp == 31) return Bits2Float(sign | 0x7f800000u | (mant << 13));
    return Bits2Float(sign | ((exp + 112) << 23) | (mant << 13));
  }
  static uint16_t Store(float f) {  // round to nearest even
    uint32_t u = Float2Bits(f);
    uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u >= 0x7f800000u) return sign | 0x7c00u | (u > 0x7f800000u ? 0x200u : 0u);
    if (u >= 0x477ff000u) return sign | 0x7c00u;  // rounds to infinity
    if (u < 0x38800000u)  // below the smallest normal: subnormal steps of 2^-24
      return sign | uint16_t(std::nearbyint(Bits2Float(u) * 16777216.0f));
    u += 0xc8000fffu + ((u >> 13) & 1u);  // rebias the exponent and round
    return sign | uint16_t(u >> 13);
  }
};

template <typename IO>
void LoadRow(const typename IO::Storage* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = IO::Load(src[i]);
}
template <typename IO>
void StoreRow(const float* src, int64_t n, typename IO::Storage* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = IO::Store(src[i]);
}

// ------------------------------------------------------------------ the gate normalisation

// exp(x) for x <= 0 in plain arithmetic (no libm call), so loops over it vectorise: 2^n * p(r)
// with n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), p a degree-6 Taylor polynomial.
// Relative error below 2e-7 over the range used here; arguments below -87 flush to 0.
inline float ExpNonPositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest integer
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// sigmoid(x) = 1 / (1 + exp(-x)) for x >= 0, exp(x) / (1 + exp(x)) below: exp of a
// non-positive argument either way, so nothing overflows. Logits are clamped at -80 (sigmoid
// < 2e-35), as in the reference and the CUDA kernel, so a normalising sum never underflows to 0.
inline float Sigmoid(float x) {
  x = x < -80.f ? -80.f : x;
  const float e = ExpNonPositive(x >= 0.f ? -x : x);
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// The weights of one pixel's gates, a[k][g], and the valid sigmoids s[k][g] (the backward needs
// them), for all G groups at once; then a[k] expanded to one weight per channel, A[k][c]. Every
// loop is over a contiguous array, so they vectorise. Neighbour 0 is missing at the first
// position of a line, neighbour 2 at the last.
class RowWeights {
 public:
  RowWeights(int64_t G, int64_t C) : G_(G), per_(C / G) {
    for (int k = 0; k < 3; ++k) {
      a[k].resize(G), s[k].resize(G), ds[k].resize(G), A[k].resize(C);
    }
    sum_.resize(G);
  }

  // kGrad: also ds[k][g], the derivative of the sigmoid for Gradient (backward only).
  template <typename IO, bool kGrad>
  void Compute(const typename IO::Storage* gates, bool has_left, bool has_right, bool normalize) {
    const bool valid[3] = {has_left, true, has_right};
    for (int k = 0; k < 3; ++k) {
      float* sk = s[k].data();
      if (!valid[k]) {
        std::fill(sk, sk + G_, 0.f);
        continue;
      }
      for (int64_t g = 0; g < G_; ++g) sk[g] = IO::Load(gates[g * 3 + k]);
      if (normalize && kGrad) {
        // ds/dw = s (1 - s), and 0 below the clamp, where s does not depend on the logit.
        float* dk = ds[k].data();
        for (int64_t g = 0; g < G_; ++g) {
          const float v = Sigmoid(sk[g]);
          dk[g] = sk[g] >= -80.f ? v * (1.f - v) : 0.f;
          sk[g] = v;
        }
      } else if (normalize) {
        for (int64_t g = 0; g < G_; ++g) sk[g] = Sigmoid(sk[g]);
      }
    }
    if (normalize) {
      for (int64_t g = 0; g < G_; ++g) sum_[g] = s[0][g] + s[1][g] + s[2][g];
      for (int k = 0; k < 3; ++k)
        for (int64_t g = 0; g < G_; ++g) a[k][g] = s[k][g] / sum_[g];
    } else {
      for (int k = 0; k < 3; ++k) std::copy(s[k].begin(), s[k].end(), a[k].begin());
    }
    for (int k = 0; k < 3; ++k) {
      if (per_ == 1) {
        std::copy(a[k].begin(), a[k].end(), A[k].begin());
      } else {
        for (int64_t g = 0; g < G_; ++g) std::fill_n(A[k].data() + g * per_, per_, a[k][g]);
      }
    }
  }

  // dw[g * 3 + k] from the weight gradients da[k][g] (for the pixel last computed).
  void Gradient(const std::vector<float> (&da)[3], bool has_left, bool has_right, bool normalize,
                float* dw) const {
    const bool valid[3] = {has_left, true, has_right};
    for (int64_t g = 0; g < G_; ++g) {
      const float mean = a[0][g] * da[0][g] + a[1][g] * da[1][g] + a[2][g] * da[2][g];
      for (int k = 0; k < 3; ++k) {
        float v = 0.f;
        if (valid[k])
          v = normalize ? (da[k][g] - mean) / sum_[g] * ds[k][g] : da[k][g];
        dw[g * 3 + k] = v;
      }
    }
  }

  std::vector<float> a[3], s[3], ds[3], A[3];

 private:
  int64_t G_, per_;
  std::vector<float> sum_;
};

// ------------------------------------------------------------------ scheduling

template <typename Fn>
void ParallelFor(int64_t n, int64_t work_per_item, Fn fn) {
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  // Threads only pay off beyond a few hundred thousand element updates each.
  const int64_t threads = std::min<int64_t>({n, hw, std::max<int64_t>(1, n * work_per_item / (1 << 18))});
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t r = 0; r < threads; ++r)
    pool.emplace_back([&, r] {
      for (int64_t i = r; i < n; i += threads) fn(i);
    });
  for (auto& th : pool) th.join();
}

// ------------------------------------------------------------------ forward

template <typename IO>
void ForwardOne(const ScanShape& s, int64_t d, int64_t b, int64_t dir, int64_t chunk,
                bool normalize, const typename IO::Storage* x, const typename IO::Storage* lam,
                const typename IO::Storage* w, typename IO::Storage* h) {
  const auto geo = LineGeometry::Make(dir, s.H, s.W);
  const int64_t C = s.C, G = s.G, L = geo.length;
  const int64_t dir_off = d * s.pixels();
  std::vector<float> prev(L * C), cur(L * C), xs(C), ls(C);
  RowWeights weights(G, C);
  const LineRestarts restarts = LineRestarts::Make(chunk);
  for (int64_t t = 0; t < geo.steps; ++t) {
    const bool restart = restarts.At(t);
    for (int64_t p = 0; p < L; ++p) {
      const int64_t pix = geo.Pixel(b, t, p);
      float* out = cur.data() + p * C;
      LoadRow<IO>(x + pix * C, C, xs.data());
      LoadRow<IO>(lam + (dir_off + pix) * C, C, ls.data());
      for (int64_t c = 0; c < C; ++c) out[c] = ls[c] * xs[c];
      if (!restart) {
        weights.Compute<IO, false>(w + (dir_off + pix) * G * 3, p > 0, p < L - 1, normalize);
        const float* mid = prev.data() + p * C;
        const float* a1 = weights.A[1].data();
        for (int64_t c = 0; c < C; ++c) out[c] += a1[c] * mid[c];
        if (p > 0) {
          const float* a0 = weights.A[0].data();
          for (int64_t c = 0; c < C; ++c) out[c] += a0[c] * mid[c - C];
        }
        if (p < L - 1) {
          const float* a2 = weights.A[2].data();
          for (int64_t c = 0; c < C; ++c) out[c] += a2[c] * mid[c + C];
        }
      }
      StoreRow<IO>(out, C, h + (dir_off + pix) * C);
    }
    std::swap(prev, cur);
  }
}

// ------------------------------------------------------------------ backward

// One image, all directions: dx accumulates over directions in float32 before its single store.
template <typename IO>
void BackwardImage(const ScanShape& s, int64_t b, ffi::Span<const int64_t> dirs, int64_t chunk,
                   bool normalize, const typename IO::Storage* x, const typename IO::Storage* lam,
                   const typename IO::Storage* w, const typename IO::Storage* h,
                   const typename IO::Storage* dh, typename IO::Storage* dx,
                   typename IO::Storage* dlam, typename IO::Storage* dw) {
  const int64_t C = s.C, G = s.G, per = s.group_size(), image = s.H * s.W;
  std::vector<float> dx_acc(image * C, 0.f);
  std::vector<float> xs(C), ls(C), row(C), prod(C), dw_row(G * 3);
  std::vector<float> da[3] = {std::vector<float>(G), std::vector<float>(G), std::vector<float>(G)};
  RowWeights weights(G, C);
  const LineRestarts restarts = LineRestarts::Make(chunk);
  for (int64_t d = 0; d < s.D; ++d) {
    const auto geo = LineGeometry::Make(dirs[d], s.H, s.W);
    const int64_t L = geo.length, dir_off = d * s.pixels();
    // carry[p] = sum_k a_{t+1}[p - k + 1, k] z_{t+1}[p - k + 1]: what line t+1 sends back to t.
    std::vector<float> z(L * C), carry(L * C, 0.f), hprev(L * C);
    for (int64_t t = geo.steps - 1; t >= 0; --t) {
      const bool restart = restarts.At(t);
      for (int64_t p = 0; p < L; ++p) {
        const int64_t pix = geo.Pixel(b, t, p);
        float* zp = z.data() + p * C;
        LoadRow<IO>(dh + (dir_off + pix) * C, C, zp);
        const float* cp = carry.data() + p * C;
        for (int64_t c = 0; c < C; ++c) zp[c] += cp[c];
        LoadRow<IO>(x + pix * C, C, xs.data());
        LoadRow<IO>(lam + (dir_off + pix) * C, C, ls.data());
        for (int64_t c = 0; c < C; ++c) row[c] = zp[c] * xs[c];
        StoreRow<IO>(row.data(), C, dlam + (dir_off + pix) * C);
        float* dxp = dx_acc.data() + (geo.Pixel(0, t, p)) * C;
        for (int64_t c = 0; c < C; ++c) dxp[c] += zp[c] * ls[c];
      }
      std::fill(carry.begin(), carry.end(), 0.f);
      if (restart) {
        for (int64_t p = 0; p < L; ++p) {
          auto* dwp = dw + (dir_off + geo.Pixel(b, t, p)) * G * 3;
          std::fill(dwp, dwp + G * 3, IO::Store(0.f));
        }
        continue;
      }
      for (int64_t p = 0; p < L; ++p)
        LoadRow<IO>(h + (dir_off + geo.Pixel(b, t - 1, p)) * C, C, hprev.data() + p * C);
      for (int64_t p = 0; p < L; ++p) {
        const int64_t pix = geo.Pixel(b, t, p);
        weights.Compute<IO, true>(w + (dir_off + pix) * G * 3, p > 0, p < L - 1, normalize);
        const float* zp = z.data() + p * C;
        for (int k = 0; k < 3; ++k) {
          const int64_t q = p + k - 1;  // the neighbour's position on line t - 1
          float* dak = da[k].data();
          if (q < 0 || q >= L) {
            std::fill(dak, dak + G, 0.f);
            continue;
          }
          const float* hq = hprev.data() + q * C;
          float* cq = carry.data() + q * C;
          const float* ak = weights.A[k].data();
          for (int64_t c = 0; c < C; ++c) {
            prod[c] = zp[c] * hq[c];
            cq[c] += ak[c] * zp[c];
          }
          if (per == 1) {
            std::copy(prod.begin(), prod.end(), dak);
          } else {  // reduce over the channels of each group, in channel order
            for (int64_t g = 0; g < G; ++g) {
              float acc = 0.f;
              for (int64_t c = 0; c < per; ++c) acc += prod[g * per + c];
              dak[g] = acc;
            }
          }
        }
        weights.Gradient(da, p > 0, p < L - 1, normalize, dw_row.data());
        StoreRow<IO>(dw_row.data(), G * 3, dw + (dir_off + pix) * G * 3);
      }
    }
  }
  StoreRow<IO>(dx_acc.data(), image * C, dx + b * image * C);
}

// ------------------------------------------------------------------ handlers

template <typename IO>
const typename IO::Storage* In(const ffi::AnyBuffer& a) {
  return static_cast<const typename IO::Storage*>(a.untyped_data());
}
template <typename IO>
typename IO::Storage* Out(ffi::Result<ffi::AnyBuffer>& a) {
  return static_cast<typename IO::Storage*>(a->untyped_data());
}

template <typename IO>
void Forward(const ScanShape& s, ffi::Span<const int64_t> dirs, int64_t chunk, bool normalize,
             const ffi::AnyBuffer& x, const ffi::AnyBuffer& lam, const ffi::AnyBuffer& w,
             ffi::Result<ffi::AnyBuffer>& h) {
  ParallelFor(s.D * s.B, s.H * s.W * s.C, [&](int64_t i) {
    const int64_t d = i / s.B, b = i % s.B;
    ForwardOne<IO>(s, d, b, dirs[d], chunk, normalize, In<IO>(x), In<IO>(lam), In<IO>(w),
                   Out<IO>(h));
  });
}

template <typename IO>
void Backward(const ScanShape& s, ffi::Span<const int64_t> dirs, int64_t chunk, bool normalize,
              const ffi::AnyBuffer& x, const ffi::AnyBuffer& lam, const ffi::AnyBuffer& w,
              const ffi::AnyBuffer& h, const ffi::AnyBuffer& dh, ffi::Result<ffi::AnyBuffer>& dx,
              ffi::Result<ffi::AnyBuffer>& dlam, ffi::Result<ffi::AnyBuffer>& dw) {
  ParallelFor(s.B, s.D * s.H * s.W * s.C, [&](int64_t b) {
    BackwardImage<IO>(s, b, dirs, chunk, normalize, In<IO>(x), In<IO>(lam), In<IO>(w), In<IO>(h),
                      In<IO>(dh), Out<IO>(dx), Out<IO>(dlam), Out<IO>(dw));
  });
}

// Calls fn.template operator()<IO>() for the element type of the call. Exceptions (a thread
// that cannot start, memory for the line buffers) come back as FFI errors: none may unwind
// into XLA and end the process.
template <typename Fn>
ffi::Error DispatchDtype(ffi::DataType dtype, Fn&& fn) {
  try {
    switch (dtype) {
      case ffi::DataType::F32: fn.template operator()<F32>(); return ffi::Error::Success();
      case ffi::DataType::BF16: fn.template operator()<BF16>(); return ffi::Error::Success();
      case ffi::DataType::F16: fn.template operator()<F16>(); return ffi::Error::Success();
      default:
        return ffi::Error::InvalidArgument(
            "gspn_scan: dtype must be float32, bfloat16 or float16");
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("gspn_scan (CPU): ") + e.what());
  }
}

ffi::Error FwdImpl(ffi::AnyBuffer x, ffi::AnyBuffer lam, ffi::AnyBuffer w,
                   ffi::Result<ffi::AnyBuffer> h, ffi::Span<const int64_t> directions,
                   int64_t chunk, bool normalize) {
  ScanShape s;
  if (auto err = CheckCall(x, lam, w, directions, chunk, &s); err.failure()) return err;
  return DispatchDtype(x.element_type(), [&]<typename IO>() {
    Forward<IO>(s, directions, chunk, normalize, x, lam, w, h);
  });
}

ffi::Error BwdImpl(ffi::AnyBuffer x, ffi::AnyBuffer lam, ffi::AnyBuffer w, ffi::AnyBuffer h,
                   ffi::AnyBuffer dh, ffi::Result<ffi::AnyBuffer> dx,
                   ffi::Result<ffi::AnyBuffer> dlam, ffi::Result<ffi::AnyBuffer> dw,
                   ffi::Span<const int64_t> directions, int64_t chunk, bool normalize) {
  ScanShape s;
  if (auto err = CheckCall(x, lam, w, directions, chunk, &s); err.failure()) return err;
  if (auto err = CheckBackwardCall(x, lam, w, h, dh, *dx, *dlam, *dw); err.failure()) return err;
  return DispatchDtype(x.element_type(), [&]<typename IO>() {
    Backward<IO>(s, directions, chunk, normalize, x, lam, w, h, dh, dx, dlam, dw);
  });
}

}  // namespace
}  // namespace cgspn

XLA_FFI_DEFINE_HANDLER_SYMBOL(GspnFwdCpu, cgspn::FwdImpl,
                              cgspn::BindForward(xla::ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GspnBwdCpu, cgspn::BwdImpl,
                              cgspn::BindBackward(xla::ffi::Ffi::Bind()));
