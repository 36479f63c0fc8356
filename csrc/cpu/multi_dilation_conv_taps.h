// multi_dilation_conv on small CPU maps: one GEMM per tap that reads the map,
// forward and backward (multi_dilation_conv_taps.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cpu_capability.h"

namespace medmtl {
inline namespace MEDMTL_CPU_NS {  // one copy per CPU capability (cpu_capability.h)

// act(combine_i(conv_i(x)) + bias) with branch i a 3x3 convolution at
// dilations[i] (0: 1x1), "same" padding.
//   x: (B, Cin, H, W), any layout; weight: (n, Cout, Cin, 3, 3), any strides
//   (no copy when Cin is innermost: weight.permute(0, 1, 3, 4, 2) contiguous);
//   bias: (Cout) for a sum, (n * Cout) for a concat.
// Returns (B, Cout or n * Cout, H, W), channels-last when x is, else NCHW.
at::Tensor multi_dilation_conv_taps(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef dilations,
                                    const std::optional<at::Tensor>& bias, bool concat, bool relu);

// (grad_x, grad_weight) of the above from grad_pre (B, Cout or n * Cout, H, W),
// the gradient of the output before its activation, laid out as
// empty_like(x) and empty_like(weight).
std::tuple<at::Tensor, at::Tensor> multi_dilation_conv_taps_backward(const at::Tensor& grad_pre, const at::Tensor& x,
                                                                     const at::Tensor& weight,
                                                                     at::IntArrayRef dilations, bool concat);

}  // namespace MEDMTL_CPU_NS
}  // namespace medmtl
