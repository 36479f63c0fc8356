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

#include "host_device.h"

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

// Whether a tap with shift (dy, dx) reads only padding on an H x W map (no
// output position has its input inside the map): such taps are skipped.
MEDMTL_HOST_DEVICE inline bool tap_only_padding(int64_t dy, int64_t dx, int64_t height, int64_t width) {
  return tap_output_begin(dy, height) >= tap_output_end(dy, height) ||
         tap_output_begin(dx, width) >= tap_output_end(dx, width);
}

// Whether a tap with shift `shift` reads at least one input value for the
// output positions [first, last) of an axis (a tile): the tap's range
// [tap_output_begin, tap_output_end) meets [first, last).
MEDMTL_HOST_DEVICE inline bool tap_reaches(int64_t shift, int64_t length, int64_t first, int64_t last) {
  const int64_t begin = tap_output_begin(shift, length), end = tap_output_end(shift, length);
  return (begin > first ? begin : first) < (end < last ? end : last);
}

// The same ranges seen from one output position: of the taps k in [0, size)
// of a dense window (dilation 1) centred on `radius` (k reads pos + k - radius),
// those whose input lies inside [0, length) are [window_tap_begin,
// window_tap_end). A transposed window (k reads pos - (k - radius)) is the
// window of the mirrored tap size - 1 - k.
MEDMTL_HOST_DEVICE inline int64_t window_tap_begin(int64_t pos, int64_t radius) {
  return radius > pos ? radius - pos : 0;
}

MEDMTL_HOST_DEVICE inline int64_t window_tap_end(int64_t pos, int64_t radius, int64_t size, int64_t length) {
  const int64_t end = radius + length - pos;
  return end < size ? end : size;
}

}  // namespace core
}  // namespace medmtl
