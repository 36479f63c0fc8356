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

// t in `format` (no copy when it already is). Between NCHW and channels-last
// a 4-D floating tensor on the CPU is transposed in tiles
// (csrc/cpu/relayout_cpu.cpp; at 64 x 112 x 112 1.4x faster than ATen's
// copy into channels-last and 8x out of it, where ATen's copy strides across
// all C planes per pixel); anything else is ATen's copy.
at::Tensor relayout(const at::Tensor& t, at::MemoryFormat format);

// t (4-D) as an NCHW-contiguous tensor.
inline at::Tensor contiguous_nchw(const at::Tensor& t) {
  return t.dim() == 4 ? relayout(t, at::MemoryFormat::Contiguous) : t.contiguous();
}

// t in the layout torch.empty_like(like) gives (no copy when it already is).
inline at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && like.is_non_overlapping_and_dense()) return t;
  if (like.is_contiguous()) return contiguous_nchw(t);
  return at::empty_like(like).copy_(t);
}

}  // namespace medmtl
