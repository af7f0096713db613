// Shared by the CPU and CUDA kernels of gspn_scan: the FFI handler symbols, the geometry of the
// four scan directions, and the checks of the call's operands and attributes.
//
// Every direction is the canonical scan "line t, position p; neighbour k of (t, p) is
// (t - 1, p + k - 1)" under an index map of (t, p) onto the image's (i, j). Nothing is ever
// transposed or flipped in memory: a direction is a base offset and two strides.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

// The handlers: forward (x, lam, w) -> h and backward (x, lam, w, h, dh) -> (dx, dlam, dw).
// Attributes of both: directions (int64 array of direction codes), chunk (int64, 0 = global),
// normalize (bool).
XLA_FFI_DECLARE_HANDLER_SYMBOL(GspnFwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GspnBwdCpu);
#ifdef CGSPN_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(GspnFwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GspnBwdCuda);
#endif

namespace cgspn {

namespace ffi = xla::ffi;

// The longest line (H or W) the CUDA kernels take, forward and backward (their blocks hold whole
// lines on chip). build_info() reports it; gspn_scan's "auto" backend uses the reference beyond.
constexpr int64_t kCudaMaxLineLength = 2048;

enum Direction : int64_t { kTopBottom = 0, kBottomTop = 1, kLeftRight = 2, kRightLeft = 3 };

#if defined(__CUDACC__)
#define CGSPN_HD __host__ __device__ __forceinline__
#else
#define CGSPN_HD inline
#endif

// Pixel (b, t, p) of direction `dir` in canonical coordinates, as an index into [B, H, W] (times C
// gives the element offset of channel 0; times G * 3 that of the gates).
struct LineGeometry {
  int64_t steps;        // T: lines scanned (H for tb/bt, W for lr/rl)
  int64_t length;       // L: positions per line (W for tb/bt, H for lr/rl)
  int64_t image;        // H * W
  int64_t base;         // pixel of (t = 0, p = 0) within one image
  int64_t step_stride;  // pixels between (t, p) and (t + 1, p)
  int64_t pos_stride;   // pixels between (t, p) and (t, p + 1)

  CGSPN_HD static LineGeometry Make(int64_t dir, int64_t H, int64_t W) {
    switch (dir) {
      case kTopBottom: return {H, W, H * W, 0, W, 1};
      case kBottomTop: return {H, W, H * W, (H - 1) * W, -W, 1};
      case kLeftRight: return {W, H, H * W, 0, 1, W};
      default:         return {W, H, H * W, W - 1, -1, W};  // kRightLeft
    }
  }
  CGSPN_HD int64_t Pixel(int64_t b, int64_t t, int64_t p) const {
    return b * image + base + t * step_stride + p * pos_stride;
  }
  // Whether line t starts afresh (h = lam * x): the first line, and every chunk-th with chunk > 0.
  CGSPN_HD static bool Restarts(int64_t t, int64_t chunk) {
    return t == 0 || (chunk > 0 && t % chunk == 0);
  }
};

// Which lines of a scan restart (h = lam * x): line 0, and every chunk-th with chunk > 0 (the
// test of LineGeometry::Restarts) for lines t < 2^31, without a division or a branch. On the GPU
// a remainder is a dozen or more instructions (a 64-bit `%` of operands that fit 32 bits takes a
// 32-bit `rem.u32`, behind a branch), and chunked scans cost the TMA kernels 1-4% over global ones
// (v42, docs/kernel_notes.md "v43-v44"); v43's plain 32-bit `%` made the register forward slower
// on global scans, likely issued in every line once predicated. t % d is t - q d with
// q = floor(m t / 2^shift), m = ceil(2^shift / d), shift = 31 + ceil(log2 d): exact for every
// 0 <= t < 2^31 (Granlund and Montgomery 1994, theorem 4.2: 2^shift <= m d <= 2^shift + 2^(shift
// - 31)), and m < 2^32. The global scan takes d = 2^31, past every line, so that only line 0
// restarts, with no branch.
struct LineRestarts {
  uint32_t d, m;
  int shift;

  static LineRestarts Make(int64_t chunk) {
    const uint64_t d = chunk > 0 && chunk < (int64_t(1) << 31) ? uint64_t(chunk) : uint64_t(1) << 31;
    int l = 0;
    while ((uint64_t(1) << l) < d) ++l;
    const uint64_t m = ((uint64_t(1) << (31 + l)) + d - 1) / d;
    return {uint32_t(d), uint32_t(m), 31 + l};
  }
  CGSPN_HD bool At(int64_t t) const {
    const uint32_t u = uint32_t(t);
    const uint32_t q = uint32_t((uint64_t(u) * m) >> shift);
    return u - q * d == 0u;
  }
};

// Shapes of one call, read off x [B, H, W, C] and w [D, B, H, W, G, 3].
struct ScanShape {
  int64_t D, B, H, W, C, G;
  int64_t group_size() const { return C / G; }
  int64_t pixels() const { return B * H * W; }
};

// Checks what XLA cannot: the attribute values and the agreement of all shapes. The Python
// wrapper validates first, so a failure here means the op was called around that wrapper.
inline ffi::Error CheckCall(const ffi::AnyBuffer& x, const ffi::AnyBuffer& lam,
                            const ffi::AnyBuffer& w, ffi::Span<const int64_t> directions,
                            int64_t chunk, ScanShape* shape) {
  auto xd = x.dimensions();
  auto ld = lam.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 4 || ld.size() != 5 || wd.size() != 6)
    return ffi::Error::InvalidArgument("gspn_scan: x, lam, w must have rank 4, 5, 6");
  *shape = {ld[0], xd[0], xd[1], xd[2], xd[3], wd[4]};
  const ScanShape& s = *shape;
  bool same = ld[1] == s.B && ld[2] == s.H && ld[3] == s.W && ld[4] == s.C && wd[0] == s.D &&
              wd[1] == s.B && wd[2] == s.H && wd[3] == s.W && wd[5] == 3;
  if (!same) return ffi::Error::InvalidArgument("gspn_scan: shapes of x, lam, w disagree");
  if (s.G < 1 || s.C % s.G != 0)
    return ffi::Error::InvalidArgument("gspn_scan: G must divide C");
  if (static_cast<int64_t>(directions.size()) != s.D)
    return ffi::Error::InvalidArgument("gspn_scan: len(directions) != lam.shape[0]");
  for (int64_t d : directions)
    if (d < kTopBottom || d > kRightLeft)
      return ffi::Error::InvalidArgument("gspn_scan: direction code out of range");
  if (chunk < 0) return ffi::Error::InvalidArgument("gspn_scan: chunk must be >= 0");
  // Line indices are 31-bit in the kernels (LineRestarts, the CUDA kernels' int lines).
  if (s.H >= (int64_t(1) << 31) || s.W >= (int64_t(1) << 31))
    return ffi::Error::InvalidArgument("gspn_scan: H and W must be below 2^31");
  if (x.element_type() != lam.element_type() || x.element_type() != w.element_type())
    return ffi::Error::InvalidArgument("gspn_scan: x, lam, w must share one dtype");
  return ffi::Error::Success();
}

// The backward's extra operands and its results must have the layout of what they stand for:
// h and dh that of lam; dx, dlam, dw those of x, lam, w; all one dtype.
inline ffi::Error CheckBackwardCall(const ffi::AnyBuffer& x, const ffi::AnyBuffer& lam,
                                    const ffi::AnyBuffer& w, const ffi::AnyBuffer& h,
                                    const ffi::AnyBuffer& dh, const ffi::AnyBuffer& dx,
                                    const ffi::AnyBuffer& dlam, const ffi::AnyBuffer& dw) {
  auto same = [](const ffi::AnyBuffer& a, const ffi::AnyBuffer& b) {
    auto da = a.dimensions(), db = b.dimensions();
    return a.element_type() == b.element_type() &&
           std::equal(da.begin(), da.end(), db.begin(), db.end());
  };
  if (!same(h, lam) || !same(dh, lam) || !same(dx, x) || !same(dlam, lam) || !same(dw, w))
    return ffi::Error::InvalidArgument(
        "gspn_scan backward: h and dh must match lam, and dx, dlam, dw match x, lam, w "
        "(shape and dtype)");
  return ffi::Error::Success();
}

// The operands and attributes of the two handlers, bound after each platform's context (the
// CUDA stream and scratch allocator; nothing on the CPU), so that every kernel takes the same
// call: forward (x, lam, w) -> h, backward (x, lam, w, h, dh) -> (dx, dlam, dw).
template <typename Binding>
auto BindAttrs(Binding b) {
  return std::move(b).template Attr<ffi::Span<const int64_t>>("directions")
      .template Attr<int64_t>("chunk")
      .template Attr<bool>("normalize");
}

template <typename Binding>
auto BindForward(Binding b) {
  return BindAttrs(std::move(b).template Arg<ffi::AnyBuffer>()  // x
                       .template Arg<ffi::AnyBuffer>()  // lam
                       .template Arg<ffi::AnyBuffer>()  // w
                       .template Ret<ffi::AnyBuffer>()  // h
  );
}

template <typename Binding>
auto BindBackward(Binding b) {
  return BindAttrs(std::move(b).template Arg<ffi::AnyBuffer>()  // x
                       .template Arg<ffi::AnyBuffer>()  // lam
                       .template Arg<ffi::AnyBuffer>()  // w
                       .template Arg<ffi::AnyBuffer>()  // h (forward output)
                       .template Arg<ffi::AnyBuffer>()  // dh
                       .template Ret<ffi::AnyBuffer>()  // dx
                       .template Ret<ffi::AnyBuffer>()  // dlam
                       .template Ret<ffi::AnyBuffer>()  // dw
  );
}

}  // namespace cgspn
