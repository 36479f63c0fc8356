// Index math of adaptive pooling, shared by the CPU and CUDA kernels.
//
// Adaptive pooling splits an axis of length `in` into `out` bins. Bin i covers
// the half-open range [start(i), end(i)) with
//   start(i) = floor(i * in / out),   end(i) = ceil((i + 1) * in / out),
// which is PyTorch's rule (bins may overlap by one when out does not divide in,
// and repeat positions when out > in). Conversely, position p lies in the bins
//   first(p) = floor(p * out / in)  ..  last(p) = ceil((p + 1) * out / in) - 1.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "cpu_copy.h"

namespace medmtl {
namespace core {
MEDMTL_CORE_CPU_COPY_BEGIN  // one copy per CPU capability in the CPU kernels (cpu_copy.h)

template <typename index_t>
MEDMTL_HOST_DEVICE inline index_t adaptive_bin_start(index_t bin, index_t in, index_t out) {
  return (bin * in) / out;
}

template <typename index_t>
MEDMTL_HOST_DEVICE inline index_t adaptive_bin_end(index_t bin, index_t in, index_t out) {
  return ((bin + 1) * in + out - 1) / out;
}

template <typename index_t>
MEDMTL_HOST_DEVICE inline index_t first_bin_containing(index_t pos, index_t in, index_t out) {
  return (pos * out) / in;
}

template <typename index_t>
MEDMTL_HOST_DEVICE inline index_t last_bin_containing(index_t pos, index_t in, index_t out) {
  return ((pos + 1) * out + in - 1) / in - 1;
}

// y = x * scale + shift, then ReLU if asked. NaN passes through ReLU as in
// torch.relu (the comparison is false for NaN).
template <typename acc_t>
MEDMTL_HOST_DEVICE inline acc_t affine_activation(acc_t x, acc_t scale, acc_t shift, bool relu) {
  const acc_t y = x * scale + shift;
  return (relu && y < acc_t(0)) ? acc_t(0) : y;
}

// The same with the activation a compile-time constant: CPU loops use this
// one, because GCC leaves a reduction over a runtime-flag select unvectorized.
template <bool kRelu, typename acc_t>
MEDMTL_HOST_DEVICE inline acc_t affine_activation(acc_t x, acc_t scale, acc_t shift) {
  const acc_t y = x * scale + shift;
  if constexpr (kRelu) return y < acc_t(0) ? acc_t(0) : y;
  return y;
}

template <bool kRelu, typename acc_t>
MEDMTL_HOST_DEVICE inline acc_t activation_backward(acc_t grad, acc_t y) {
  if constexpr (kRelu) return y > acc_t(0) ? grad : acc_t(0);
  return grad;
}

// Gradient of affine_activation with respect to y = x * scale + shift, given the
// gradient of its output: torch.relu's backward passes it where y > 0 only.
template <typename acc_t>
MEDMTL_HOST_DEVICE inline acc_t activation_backward(acc_t grad, acc_t y, bool relu) {
  return (!relu || y > acc_t(0)) ? grad : acc_t(0);
}

// Max-pool update in PyTorch's scan order: a larger value or a NaN replaces the
// running maximum, so ties keep the first position and the last NaN wins.
template <typename acc_t>
MEDMTL_HOST_DEVICE inline bool max_pool_takes(acc_t candidate, acc_t current) {
  return candidate > current || candidate != candidate;
}

MEDMTL_CORE_CPU_COPY_END
}  // namespace core
}  // namespace medmtl
