// The tap ranges of dilated convolutions against their definition.
#include "check.h"
#include "core/dilated_taps.h"

using namespace medmtl::core;

int main() {
  for (int64_t length = 1; length <= 30; ++length)
    for (int64_t dilation = 0; dilation <= 40; ++dilation)
      for (int64_t tap = 0; tap < 3; ++tap) {
        const int64_t shift = tap_shift(tap, dilation);
        const int64_t begin = tap_output_begin(shift, length), end = tap_output_end(shift, length);
        for (int64_t p = 0; p < length; ++p) {
          const bool inside = 0 <= p + shift && p + shift < length;
          CHECK(inside == (begin <= p && p < end));
        }
        CHECK(0 <= begin && begin <= length && 0 <= end && end <= length);
      }
  CHECK(tap_exists(1, 1, 0) && !tap_exists(0, 1, 0) && tap_exists(0, 2, 6));
  return check_failures();
}
