// medmtl::relayout: a 4-D tensor between NCHW and channels-last, transposed
// in tiles on the CPU (the layout.h declaration says why); also the op that
// layers use to convert once for a chain of channels-last ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "../layout.h"

// Everything below is compiled per CPU capability (cpu_capability.h).
#include "cpu_capability_target.h"
// After the target: its loops vectorise with the capability's instructions.
#include "transpose_tiles.h"

namespace medmtl {

// medmtl::relayout (layout.h) is one function that every file calls; it runs
// the copy of the capability in force, which registering the op sets.
using RelayoutKernel = at::Tensor (*)(const at::Tensor&, at::MemoryFormat);
void set_relayout_kernel(RelayoutKernel kernel);

inline namespace MEDMTL_CPU_NS {
namespace {

at::Tensor relayout_kernel(const at::Tensor& t, at::MemoryFormat format);

// The op: always a new tensor (an op's output may not alias its input).
at::Tensor relayout_op(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK(x.dim() == 4, "relayout: x must be 4-D (B, C, H, W), got ", x.dim(), "-D of shape ", x.sizes());
  const at::MemoryFormat format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = relayout_kernel(x, format);
  return out.is_same(x) ? x.clone(format) : out;
}

at::Tensor relayout_kernel(const at::Tensor& t, at::MemoryFormat format) {
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

}  // namespace

// Called by cpu_capability.cpp for the capability in force (CompositeExplicitAutograd kernels).
void register_relayout_cpu(torch::Library& m) {
  set_relayout_kernel(&relayout_kernel);
  m.impl("relayout", &relayout_op);
}

}  // namespace MEDMTL_CPU_NS

#if MEDMTL_CPU_CAPABILITY == 0  // defined once, in the default copy
namespace {
std::atomic<RelayoutKernel> relayout_in_force{&cap_default::relayout_kernel};
}  // namespace

void set_relayout_kernel(RelayoutKernel kernel) { relayout_in_force.store(kernel); }

at::Tensor relayout(const at::Tensor& t, at::MemoryFormat format) { return relayout_in_force.load()(t, format); }
#endif

}  // namespace medmtl
