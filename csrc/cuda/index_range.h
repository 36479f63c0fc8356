// The CUDA kernels divide and take remainders in 32-bit (a 64-bit division is a
// subroutine call on the GPU, and the values live across it go to the stack);
// only the final element offsets are 64-bit. The torch wrappers check, with
// this, that the indices a launch forms fit.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace medmtl {

// Raises "op: name is too large for the CUDA kernels' 32-bit index math: what = value,
// must be below 2^31" unless value <= INT32_MAX.
inline void check_index_range(const char* op, const char* name, const char* what, int64_t value) {
  TORCH_CHECK(value <= std::numeric_limits<int32_t>::max(), op, ": ", name,
              " is too large for the CUDA kernels' 32-bit index math: ", what, " = ", value,
              ", must be below 2^31");
}

}  // namespace medmtl
