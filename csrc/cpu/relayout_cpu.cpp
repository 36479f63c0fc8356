// medmtl::relayout: a 4-D tensor between NCHW and channels-last, transposed
// in tiles on the CPU (the layout.h declaration says why); also the op that
// layers use to convert once for a chain of channels-last ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../layout.h"

namespace medmtl {
namespace {

constexpr int64_t kTile = 64;

// dst[q R + r] = src[r Q + q] for each of `count` (R x Q) matrices, in
// kTile x kTile tiles split among the threads; the inner loop writes dst
// along its rows (vectorised) and reads src down its columns.
template <typename T>
void transpose_matrices(const T* src, T* dst, int64_t count, int64_t R, int64_t Q) {
  const int64_t r_tiles = (R + kTile - 1) / kTile, q_tiles = (Q + kTile - 1) / kTile;
  at::parallel_for(0, count * r_tiles * q_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t m = k / (r_tiles * q_tiles), tile = k % (r_tiles * q_tiles);
      const int64_t r0 = tile / q_tiles * kTile, q0 = tile % q_tiles * kTile;
      const int64_t r1 = std::min(R, r0 + kTile), q1 = std::min(Q, q0 + kTile);
      const T* s = src + m * R * Q;
      T* d = dst + m * R * Q;
      for (int64_t q = q0; q < q1; ++q) {
#pragma omp simd
        for (int64_t r = r0; r < r1; ++r) d[q * R + r] = s[r * Q + q];
      }
    }
  });
}

bool is_dense_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

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
  if (to_channels_last ? is_dense_channels_last(t) || t.is_contiguous(format) : t.is_contiguous()) return t;
  const bool transposable = to_channels_last ? t.is_contiguous() : is_dense_channels_last(t);
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
