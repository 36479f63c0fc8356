// Dilated 3x3 convolutions on the CPU as Winograd F(4x4, 3x3) tiles, forward
// and backward (winograd_conv3x3.cpp): 36 multiply-adds per 16 outputs
// instead of 144, for the dense branches of multi_dilation_conv on large maps.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cpu_capability.h"

namespace medmtl {

// The Winograd switch (see below), shared by every CPU capability copy.
bool winograd_enabled();
void set_winograd_enabled(bool enabled);

inline namespace MEDMTL_CPU_NS {  // one copy per CPU capability (cpu_capability.h)

// Accuracy (benchmarks/winograd_accuracy.py, quoted in docs/layers.md): in float32
// the tiles' largest error is 0.6-1.0e-5 of max|y| (64 -> 64 to 1024 -> 256
// channels on 28x28 to 112x112 maps, dilations 1 and 6), up to 1.5e-5 seen,
// against 0.4-2.3e-6 for a direct (oneDNN) convolution: 4-17x less accurate,
// about 3-4 bits of float32's 24, not the "3 bits" this once said in general.
// float64 stays within 1e-12 of max|y|; half precision is never tiled.
//
// The switch: medmtl.set_flags(winograd=False) or MEDMTL_WINOGRAD=0 (read at
// load) turns the tiles off: every branch convolves directly. (One switch for
// all the capability copies: declared in medmtl:: below.)

// Whether a 3x3 convolution at dilation d (>= 1) on B x H x W maps of `dtype`
// is cheaper as Winograd tiles than as direct taps (float32 and float64 only;
// false when the switch above is off), with the kernel's transform made by
// the call...
bool winograd_pays(int64_t batch, int64_t height, int64_t width, int64_t dilation, at::ScalarType dtype);
// ... or kept from an earlier call (cache_kernel below), for a kernel
// (out_channels, in_channels, 3, 3).
bool winograd_pays_with_cached_kernel(int64_t batch, int64_t height, int64_t width, int64_t dilation,
                                      at::ScalarType dtype, int64_t in_channels, int64_t out_channels);

// out = act(base + conv2d(x, weight, padding=d, dilation=d)), written into
// out, with base = out's own values when `accumulate`, else bias (or 0).
//   x: (B, Cin, H, W) and out: (B, Cout, H, W), channels-last pixels
//   (stride(1) == 1; out may be a channel slice of a wider channels-last
//   tensor); weight: (Cout, Cin, 3, 3), any strides; bias: (Cout).
// Returns whether every value written is finite. A NaN or infinity read
// anywhere in a tile's 6x6 input spreads to all 16 of its outputs, also
// those whose 3x3 window does not hold it (and a finite value within ~100x
// of overflow can overflow in the transforms): the caller then computes the
// convolution directly instead. With `cache_kernel`, the kernel's transform
// is kept for the next call with the same, unchanged weight (when the weight
// is weight_cacheable: derived_weight_cache.h).
bool winograd_conv3x3_into(const at::Tensor& x, const at::Tensor& weight, int64_t dilation,
                           const std::optional<at::Tensor>& bias, bool accumulate, bool relu, at::Tensor& out,
                           bool cache_kernel);

// (grad_x, grad_weight, finite) of conv2d(x, weight, padding=d, dilation=d)
// from grad (B, Cout, H, W) with channels-last pixels (a channel slice
// allowed): grad_x channels-last, grad_weight (Cout, Cin, 3, 3) with Cin
// innermost; finite as above (false: use a direct convolution's gradients).
std::tuple<at::Tensor, at::Tensor, bool> winograd_conv3x3_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight, int64_t dilation);

}  // namespace MEDMTL_CPU_NS
}  // namespace medmtl
