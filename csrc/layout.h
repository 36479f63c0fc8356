// The memory layouts the ops promise (their fake kernels say the same):
// multi_dilation_conv's output is channels-last when x is, and every gradient
// of an input comes back laid out as torch.empty_like(input).
#pragma once

#include <ATen/ATen.h>

namespace medmtl {

// x is dense channels-last (and not also plain contiguous, as with C == 1).
inline bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

// The memory format of an op's output computed from x.
inline at::MemoryFormat output_format(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// t in the layout torch.empty_like(like) gives (no copy when it already is).
inline at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && like.is_non_overlapping_and_dense()) return t;
  if (like.is_contiguous()) return t.contiguous();
  return at::empty_like(like).copy_(t);
}

}  // namespace medmtl
