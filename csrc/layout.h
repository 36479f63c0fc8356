// The memory layouts the ops promise (their fake kernels say the same):
// multi_dilation_conv's output is channels-last when x is, and every gradient
// of an input comes back laid out as torch.empty_like(input).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace medmtl {

// x is dense channels-last (and not also plain contiguous, as with C == 1).
inline bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

// The memory format of an op's output computed from x.
inline at::MemoryFormat output_format(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// t (4-D) as an NCHW-contiguous tensor. A channels-last t is copied a band of
// rows at a time: ATen's one-shot copy strides across all C planes per pixel
// and was 3.6x slower at 64 x 112 x 112 (cache misses on every write).
inline at::Tensor contiguous_by_rows(const at::Tensor& t) {
  if (t.is_contiguous() || t.dim() != 4) return t.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  constexpr int64_t kRows = 16;
  for (int64_t r = 0; r < t.size(2); r += kRows) {
    const int64_t n = std::min(kRows, t.size(2) - r);
    out.narrow(2, r, n).copy_(t.narrow(2, r, n));
  }
  return out;
}

// t in the layout torch.empty_like(like) gives (no copy when it already is).
inline at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && like.is_non_overlapping_and_dense()) return t;
  if (like.is_contiguous()) return contiguous_by_rows(t);
  return at::empty_like(like).copy_(t);
}

}  // namespace medmtl
