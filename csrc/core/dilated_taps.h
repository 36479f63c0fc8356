// Index math of dilated 3x3 convolutions with "same" padding, shared by the
// CPU and CUDA kernels.
//
// Tap k (0, 1, 2) of an axis at dilation d reads input position p + s for
// output position p, with the shift s = (k - 1) * d; a dilation of 0 marks a
// 1x1 branch (only the centre tap). Output positions whose input lies inside
// [0, length) form the range [tap_output_begin, tap_output_end); when it is
// empty the tap reads only padding and is skipped.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEDMTL_HOST_DEVICE __host__ __device__
#else
#define MEDMTL_HOST_DEVICE
#endif

namespace medmtl {
namespace core {

MEDMTL_HOST_DEVICE inline int64_t tap_shift(int64_t tap, int64_t dilation) { return (tap - 1) * dilation; }

MEDMTL_HOST_DEVICE inline int64_t tap_output_begin(int64_t shift, int64_t length) {
  return shift < 0 ? (-shift < length ? -shift : length) : 0;
}

MEDMTL_HOST_DEVICE inline int64_t tap_output_end(int64_t shift, int64_t length) {
  return shift > 0 ? (length - shift > 0 ? length - shift : 0) : length;
}

// Whether tap (ky, kx) of a branch exists: a 1x1 branch (dilation 0) has only
// the centre tap.
MEDMTL_HOST_DEVICE inline bool tap_exists(int64_t ky, int64_t kx, int64_t dilation) {
  return dilation > 0 || (ky == 1 && kx == 1);
}

}  // namespace core
}  // namespace medmtl
