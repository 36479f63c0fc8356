// medmtl::relayout: a 4-D tensor between NCHW and channels-last, transposed
// in tiles on the CPU (the layout.h declaration says why); also the op that
// layers use to convert once for a chain of channels-last ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../layout.h"
#include "transpose_tiles.h"

namespace medmtl {
namespace {

// The op: always a new tensor (an op's output may not alias its input).
at::Tensor relayout_op(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK(x.dim() == 4, "relayout: x must be 4-D (B, C, H, W), got ", x.dim(), "-D of shape ", x.sizes());
  const at::MemoryFormat format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = relayout(x, format);
  return out.is_same(x) ? x.clone(format) : out;
}

}  // namespace

at::Tensor relayout(const at::Tensor& t, at::MemoryFormat format) {
  const bool to_channels_last = format == at::MemoryFormat::ChannelsLast;
  if (t.dim() != 4 || (format != at::MemoryFormat::Contiguous && !to_channels_last)) return t.contiguous(format);
  if (to_channels_last ? is_channels_last(t) || t.is_contiguous(format) : t.is_contiguous()) return t;
  const bool transposable = to_channels_last ? t.is_contiguous() : is_channels_last(t);
  if (!transposable || !t.device().is_cpu() || !at::isFloatingType(t.scalar_type()) || t.numel() == 0)
    return t.contiguous(format);
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(format));
  const int64_t B = t.size(0), C = t.size(1), P = t.size(2) * t.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "relayout", [&] {
    // Per image: (C, P) -> (P, C) into channels-last, (P, C) -> (C, P) out of it.
    transpose_matrices(t.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, to_channels_last ? C : P,
                       to_channels_last ? P : C);
  });
  return out;
}

TORCH_LIBRARY_IMPL(medmtl, CompositeExplicitAutograd, m) { m.impl("relayout", &relayout_op); }

}  // namespace medmtl
