// The adaptive-pooling index math against its definition with real numbers.
#include <cmath>

#include "check.h"
#include "core/adaptive_bins.h"

using namespace medmtl::core;

int main() {
  for (int64_t in = 1; in <= 40; ++in) {
    for (int64_t out = 1; out <= 40; ++out) {
      int64_t covered_until = 0;
      for (int64_t bin = 0; bin < out; ++bin) {
        const int64_t start = adaptive_bin_start(bin, in, out), end = adaptive_bin_end(bin, in, out);
        CHECK(start == static_cast<int64_t>(std::floor(double(bin) * in / out)));
        CHECK(end == static_cast<int64_t>(std::ceil(double(bin + 1) * in / out)));
        CHECK(0 <= start && start < end && end <= in);
        CHECK(start <= covered_until);  // bins leave no gap
        covered_until = end;
      }
      CHECK(covered_until == in);
      // first/last_bin_containing list exactly the bins whose range holds pos
      for (int64_t pos = 0; pos < in; ++pos) {
        const int64_t first = first_bin_containing(pos, in, out), last = last_bin_containing(pos, in, out);
        for (int64_t bin = 0; bin < out; ++bin) {
          const bool holds = adaptive_bin_start(bin, in, out) <= pos && pos < adaptive_bin_end(bin, in, out);
          CHECK(holds == (first <= bin && bin <= last));
        }
      }
    }
  }
  CHECK(affine_activation<float>(-2.f, 1.f, 0.f, true) == 0.f);
  CHECK(affine_activation<float>(-2.f, 1.f, 0.f, false) == -2.f);
  CHECK(std::isnan(affine_activation<float>(NAN, 1.f, 0.f, true)));
  CHECK(activation_backward<float>(3.f, 0.f, true) == 0.f);
  CHECK(activation_backward<float>(3.f, 0.f, false) == 3.f);
  CHECK(max_pool_takes<float>(NAN, 1.f) && !max_pool_takes<float>(1.f, 1.f) && !max_pool_takes<float>(1.f, NAN));
  return check_failures();
}
