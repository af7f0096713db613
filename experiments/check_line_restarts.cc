// LineRestarts (xla_ffi/gspn.h) against t % chunk on 35 M (chunk, line) pairs: every pair with
// chunk <= 3000 and t < 5000, random ones up to 2^31 (a quarter of them multiples of the chunk,
// an eighth one line off one), and both sides of every power of two. A CPU check of the
// arithmetic the kernels share:
//   g++ -O2 -std=c++17 -I<jaxlib>/include -Ixla_ffi -o /tmp/check experiments/check_line_restarts.cc
//   /tmp/check   # "... checked, 0 wrong", exit 0
#include <algorithm>
#include <cstdio>
#include <random>

#include "gspn.h"

int main() {
  using cgspn::LineRestarts;
  std::mt19937_64 rng(7);
  long bad = 0, n = 0;
  auto check = [&](int64_t chunk, int64_t t) {
    const bool want = t == 0 || (chunk > 0 && t % chunk == 0);
    if (LineRestarts::Make(chunk).At(t) != want) {
      if (bad < 10) std::printf("wrong: chunk %lld, line %lld\n", (long long)chunk, (long long)t);
      ++bad;
    }
    ++n;
  };
  const int64_t top = (int64_t(1) << 31) - 1;
  for (int64_t c = 0; c <= 3000; ++c)
    for (int64_t t = 0; t < 5000; ++t) check(c, t);
  for (int i = 0; i < 20000000; ++i) {
    const int64_t c = rng() % 2 ? int64_t(rng() % 70000) : int64_t(rng() % (top + 10));
    int64_t t = rng() % 2 ? int64_t(rng() % (top + 1)) : top - int64_t(rng() % 100000);
    if (c > 0 && rng() % 4 == 0) t = t / c * c;
    if (c > 0 && rng() % 8 == 0) t = std::clamp<int64_t>(t / c * c + (rng() % 2 ? -1 : 1), 0, top);
    check(c, t);
  }
  for (int l = 0; l <= 31; ++l)
    for (int64_t dd = -2; dd <= 2; ++dd) {
      const int64_t c = (int64_t(1) << l) + dd;
      if (c < 1) continue;
      for (int64_t k : {int64_t(0), int64_t(1), int64_t(2), top / c - 1, top / c})
        for (int64_t e = -1; e <= 1; ++e)
          if (k * c + e >= 0 && k * c + e <= top) check(c, k * c + e);
      check(c, top);
    }
  std::printf("%ld checked, %ld wrong\n", n, bad);
  return bad != 0;
}
