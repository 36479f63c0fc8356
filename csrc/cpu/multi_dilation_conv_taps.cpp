// multi_dilation_conv on small CPU maps as one GEMM per tap, forward and backward.
//
// A 3x3 convolution at dilation d is the sum over its taps (ky, kx) of a
// shifted 1x1 convolution: out[y, x] += W_tap x[y + dy, x + dx], with
// (dy, dx) = ((ky - 1) d, (kx - 1) d), over the output positions whose input
// lies in the map (a rectangle; empty when the tap reads only padding, as
// most taps of dilations 12 and 18 do on 14x14 and 28x28 maps). So only the
// multiply-adds that read the map are done, each in a GEMM over whole pixel
// rows:
//
// - The map is laid out as pixel rows (H, B, W, C): pixel (b, y, x) is row
//   (y B + b) W + x, so image rows [y0, y1) of the whole batch are one block
//   of consecutive rows, and a tap with dx = 0 is one GEMM straight between
//   the map and the accumulator.
// - The centre taps of all branches are one GEMM (their weights summed for a
//   sum, stacked for a concat); in the forward its initial value is the bias.
// - A tap with a narrow column shift (8 |dx| <= W, as in a dense 3x3) is also
//   one GEMM over whole pixel rows, with the input shifted by dx pixels: the
//   |dx| columns at one edge then read the neighbouring row instead of
//   padding, so the forward saves the accumulator's values there before the
//   group of taps with that dx and restores them after, and the backward
//   uses a copy of the gradient with those columns zeroed.
// - A tap with a wide column shift reads the columns [x0 + dx, x1 + dx),
//   which are copied once per dx into a compact (H, B, x1 - x0, C) block; the
//   taps' GEMMs run on it into a compact accumulator, which is added into the
//   columns it belongs to once.
//
// The backward runs the same GEMMs transposed: for each tap,
// grad_W_tap = G_r^T X_r' and grad_x[r'] += G_r W_tap, with r the tap's
// output rectangle and r' the input rectangle it reads.
//
// The weight is read in place when Cin is innermost (the DFE layer's weights
// are laid out so); otherwise it is transposed once per call, and the weight
// gradient (computed Cin-innermost) is transposed back to the weight's layout.
#include "multi_dilation_conv_taps.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <vector>

#include "../core/dilated_taps.h"
#include "../layout.h"

// Everything below is compiled per CPU capability (cpu_capability.h).
#include "cpu_capability_target.h"

namespace medmtl {
inline namespace MEDMTL_CPU_NS {
namespace {

// An off-centre tap that reads the map: output positions [y0, y1) x [x0, x1)
// read the input at (y + dy, x + dx).
struct Tap {
  int64_t branch, ky, kx, dy, dx, y0, y1, x0, x1;
};

// The off-centre taps that add into one slice of the output channels (all of
// them for a sum; branch `slice`'s for a concat), by column shift dx, the one
// with dy == 0 (which covers every row) first.
struct SliceTaps {
  int64_t slice;
  std::map<int64_t, std::vector<Tap>> by_column_shift;
};

// Whether the taps with column shift dx run on whole pixel rows (else on a
// compact block of the columns they read).
bool on_whole_rows(int64_t dx, int64_t W) { return 8 * std::abs(dx) <= W; }

// The columns [first, first + count) where a tap with column shift dx, run on
// whole pixel rows, reads the neighbouring row instead of padding.
struct WrappedColumns {
  int64_t first, count;
};

WrappedColumns wrapped_columns(int64_t dx, int64_t W) { return {dx > 0 ? W - dx : 0, std::abs(dx)}; }

// A tap on whole pixel rows: the output pixels [begin, begin + count) of the
// flattened (H B W) rows read the input pixels [begin + offset, ...). The
// |dx| outputs that would read before the first or past the last pixel are
// left out (they are wrapped columns).
struct PixelRange {
  int64_t begin, count, offset;
};

PixelRange pixel_range(const Tap& tap, int64_t B, int64_t W) {
  const int64_t row = B * W, lead = tap.dx < 0 ? -tap.dx : 0, trail = tap.dx > 0 ? tap.dx : 0;
  return {tap.y0 * row + lead, (tap.y1 - tap.y0) * row - lead - trail, tap.dy * row + tap.dx};
}

std::vector<SliceTaps> plan_taps(at::IntArrayRef dilations, bool concat, int64_t H, int64_t W) {
  const int64_t n = static_cast<int64_t>(dilations.size());
  std::vector<SliceTaps> slices;
  for (int64_t s = 0; s < (concat ? n : 1); ++s) {
    SliceTaps plan{s, {}};
    for (int64_t i = concat ? s : 0; i < (concat ? s + 1 : n); ++i)
      for (int64_t ky = 0; ky < 3; ++ky)
        for (int64_t kx = 0; kx < 3; ++kx) {
          if ((ky == 1 && kx == 1) || !core::tap_exists(ky, kx, dilations[i])) continue;
          const int64_t dy = core::tap_shift(ky, dilations[i]), dx = core::tap_shift(kx, dilations[i]);
          if (core::tap_only_padding(dy, dx, H, W)) continue;
          const Tap tap{i, ky, kx, dy, dx, core::tap_output_begin(dy, H), core::tap_output_end(dy, H),
                        core::tap_output_begin(dx, W), core::tap_output_end(dx, W)};
          plan.by_column_shift[dx].push_back(tap);
        }
    for (auto& [dx, taps] : plan.by_column_shift)
      std::stable_partition(taps.begin(), taps.end(), [](const Tap& tap) { return tap.dy == 0; });
    slices.push_back(std::move(plan));
  }
  return slices;
}

// dst[c * dst_stride + r] = act(src[r * src_stride + c]) for r < rows, c < cols:
// a transpose in tiles, so that both sides are read and written along lines.
template <typename scalar_t>
void transpose_tile(const scalar_t* src, int64_t src_stride, scalar_t* dst, int64_t dst_stride, int64_t rows,
                    int64_t cols, bool relu) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t v = src[r * src_stride + c];
          dst[c * dst_stride + r] = relu && v < scalar_t(0) ? scalar_t(0) : v;
        }
    }
}

// For each of `count` items, an (rows, cols) matrix at src + i * src_item,
// transposed to dst + i * dst_item (see transpose_tile), in parallel.
template <typename scalar_t>
void transpose_items(const scalar_t* src, int64_t src_item, int64_t src_stride, scalar_t* dst, int64_t dst_item,
                     int64_t dst_stride, int64_t count, int64_t rows, int64_t cols, bool relu) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      transpose_tile(src + i * src_item, src_stride, dst + i * dst_item, dst_stride, rows, cols, relu);
  });
}

// weight (n, Cout, Cin, 3, 3) with Cin innermost in memory, so that every
// tap's (Cout, Cin) matrix, and the stacked centre taps, are GEMM operands
// as they are (no copy when weight already is).
at::Tensor cin_innermost(const at::Tensor& weight_in) {
  if (weight_in.permute({0, 1, 3, 4, 2}).is_contiguous()) return weight_in;
  const at::Tensor weight = weight_in.contiguous();
  const int64_t items = weight.size(0) * weight.size(1), cin = weight.size(2);
  at::Tensor packed = at::empty({weight.size(0), weight.size(1), 3, 3, cin}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "cin_innermost", [&] {
    // Per output channel: (Cin, 9) -> (9, Cin).
    transpose_items(weight.const_data_ptr<scalar_t>(), cin * 9, 9, packed.data_ptr<scalar_t>(), 9 * cin, cin,
                    items, cin, 9, false);
  });
  return packed.permute({0, 1, 4, 2, 3});
}

// A Cin-innermost weight gradient (n, Cout, 3, 3, Cin) as (n, Cout, Cin, 3, 3)
// laid out as `like` (the weight).
at::Tensor weight_laid_out_like(const at::Tensor& packed, const at::Tensor& like) {
  const at::Tensor as_weight = packed.permute({0, 1, 4, 2, 3});
  if (!like.is_contiguous()) return laid_out_like(as_weight, like);
  const int64_t items = packed.size(0) * packed.size(1), cin = packed.size(4);
  at::Tensor out = at::empty(like.sizes(), like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, packed.scalar_type(), "weight_laid_out_like", [&] {
    // Per output channel: (9, Cin) -> (Cin, 9).
    transpose_items(packed.const_data_ptr<scalar_t>(), 9 * cin, cin, out.data_ptr<scalar_t>(), cin * 9, 9, items,
                    9, cin, false);
  });
  return out;
}

// Tap (ky, kx) of branch i as its (Cout, Cin) matrix.
at::Tensor tap_matrix(const at::Tensor& weight, int64_t i, int64_t ky, int64_t kx) {
  return weight.select(0, i).select(2, ky).select(2, kx);
}

// The sum over dim 0 of `parts` (n, rows, cols) as n - 1 adds along the rows
// (2x faster than ATen's reduction over the outer, strided dim); a view of
// the one part when n is 1.
at::Tensor sum_over_branches(const at::Tensor& parts) {
  if (parts.size(0) == 1) return parts.select(0, 0);
  at::Tensor total = parts.select(0, 0).clone(at::MemoryFormat::Contiguous);
  for (int64_t i = 1; i < parts.size(0); ++i) total.add_(parts.select(0, i));
  return total;
}

// A (..., C) block of pixel rows as a (pixels, C) matrix.
at::Tensor pixel_matrix(const at::Tensor& t) { return t.view({-1, t.size(-1)}); }

// The image rows [y0, y0 + count) of pixel rows, as a (pixels, C) matrix.
at::Tensor image_rows(const at::Tensor& t, int64_t y0, int64_t count) { return pixel_matrix(t.narrow(0, y0, count)); }

// The flattened pixels [begin, begin + count) of pixel rows, as a (pixels, C) matrix.
at::Tensor pixels(const at::Tensor& t, int64_t begin, int64_t count) {
  return pixel_matrix(t).narrow(0, begin, count);
}

// t (B, C, H, W) as pixel rows (H, B, W, C).
at::Tensor to_pixel_rows(const at::Tensor& t) {
  if (!t.is_contiguous()) return t.permute({2, 0, 3, 1}).contiguous();  // channels-last (row blocks) or strided
  const int64_t B = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  at::Tensor rows = at::empty({H, B, W, C}, t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "to_pixel_rows", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    scalar_t* dst = rows.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / H, y = i % H;  // the (C, W) plane row t[b, :, y, :] -> rows[y, b] (W, C)
        transpose_tile(src + (b * C * H + y) * W, H * W, dst + (y * B + b) * W * C, C, C, W, false);
      }
    });
  });
  return rows;
}

// act(rows) for pixel rows (H, B, W, N), as (B, N, H, W) in `format`.
at::Tensor from_pixel_rows(const at::Tensor& rows, bool relu, at::MemoryFormat format) {
  const int64_t H = rows.size(0), B = rows.size(1), W = rows.size(2), N = rows.size(3);
  at::Tensor out = at::empty({B, N, H, W}, rows.options().memory_format(format));
  if (format == at::MemoryFormat::ChannelsLast) {  // row blocks
    if (relu) rows.relu_();
    return out.copy_(rows.permute({1, 3, 0, 2}));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "from_pixel_rows", [&] {
    const scalar_t* src = rows.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / H, y = i % H;  // rows[y, b] (W, N) -> the plane row out[b, :, y, :]
        transpose_tile(src + (y * B + b) * W * N, N, dst + (b * N * H + y) * W, H * W, W, N, relu);
      }
    });
  });
  return out;
}

// The columns [x0, x0 + width) of pixel rows as a compact (H, B, width, C) block.
at::Tensor column_block(const at::Tensor& rows, int64_t x0, int64_t width) {
  return rows.narrow(2, x0, width).contiguous();
}

}  // namespace

at::Tensor multi_dilation_conv_taps(const at::Tensor& x, const at::Tensor& weight_in, at::IntArrayRef dilations,
                                    const std::optional<at::Tensor>& bias, bool concat, bool relu) {
  const int64_t B = x.size(0), cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t n = weight_in.size(0), cout = weight_in.size(1), channels = concat ? n * cout : cout;
  if (B == 0) return at::empty({0, channels, H, W}, x.options().memory_format(output_format(x)));
  const at::Tensor weight = cin_innermost(weight_in);
  const at::Tensor rows = to_pixel_rows(x);                         // (H, B, W, Cin)
  at::Tensor acc = at::empty({H, B, W, channels}, x.options());  // (H, B, W, channels)

  // All centre taps in one GEMM, on top of the bias.
  const at::Tensor centres = weight.select(3, 1).select(3, 1);  // (n, Cout, Cin)
  const at::Tensor centre = concat ? centres.reshape({n * cout, cin}) : sum_over_branches(centres);
  at::Tensor acc_pixels = pixel_matrix(acc);
  if (bias.has_value())
    at::addmm_out(acc_pixels, *bias, pixel_matrix(rows), centre.t());
  else
    at::mm_out(acc_pixels, pixel_matrix(rows), centre.t());

  std::map<int64_t, at::Tensor> shifted_columns;  // dx -> the compact block its taps read
  for (const SliceTaps& plan : plan_taps(dilations, concat, H, W)) {
    const at::Tensor acc_slice = acc.narrow(3, plan.slice * cout, cout);
    for (const auto& [dx, taps] : plan.by_column_shift) {
      if (on_whole_rows(dx, W)) {  // from the map straight into the accumulator
        const WrappedColumns wrapped = wrapped_columns(dx, W);
        const at::Tensor wrapped_acc = acc_slice.narrow(2, wrapped.first, wrapped.count);
        const at::Tensor saved = wrapped_acc.clone();  // empty for dx = 0
        for (const Tap& tap : taps) {
          const PixelRange r = pixel_range(tap, B, W);
          pixels(acc_slice, r.begin, r.count)
              .addmm_(pixels(rows, r.begin + r.offset, r.count), tap_matrix(weight, tap.branch, tap.ky, tap.kx).t());
        }
        wrapped_acc.copy_(saved);
        continue;
      }
      const int64_t x0 = taps[0].x0, width = taps[0].x1 - taps[0].x0;
      at::Tensor& columns = shifted_columns[dx];
      if (!columns.defined()) columns = column_block(rows, x0 + dx, width);  // (H, B, width, Cin)
      at::Tensor part;                                                     // (H, B, width, Cout)
      for (const Tap& tap : taps) {
        const int64_t count = tap.y1 - tap.y0;
        const at::Tensor w = tap_matrix(weight, tap.branch, tap.ky, tap.kx).t();
        if (!part.defined() && count == H) {
          part = at::mm(pixel_matrix(columns), w).view({H, B, width, cout});
          continue;
        }
        if (!part.defined()) part = at::zeros({H, B, width, cout}, x.options());
        image_rows(part, tap.y0, count).addmm_(image_rows(columns, tap.y0 + tap.dy, count), w);
      }
      acc_slice.narrow(2, x0, width).add_(part);
    }
  }
  return from_pixel_rows(acc, relu, output_format(x));
}

std::tuple<at::Tensor, at::Tensor> multi_dilation_conv_taps_backward(const at::Tensor& grad_pre, const at::Tensor& x,
                                                                     const at::Tensor& weight_in,
                                                                     at::IntArrayRef dilations, bool concat) {
  const int64_t B = x.size(0), cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t n = weight_in.size(0), cout = weight_in.size(1);
  if (B == 0) return {at::zeros_like(x), at::zeros_like(weight_in)};
  const at::Tensor weight = cin_innermost(weight_in);
  const at::Tensor rows = to_pixel_rows(x);          // (H, B, W, Cin)
  const at::Tensor grads = to_pixel_rows(grad_pre);  // (H, B, W, channels)
  // Cin innermost; the taps that read only padding keep a zero gradient.
  at::Tensor grad_weight = at::zeros({n, cout, 3, 3, cin}, x.options());
  at::Tensor grad_rows = at::empty({H, B, W, cin}, x.options());
  auto grad_tap = [&](const Tap& tap) { return grad_weight.select(0, tap.branch).select(1, tap.ky).select(1, tap.kx); };

  // The centre taps: one GEMM each for grad_x and grad_weight.
  const at::Tensor g = pixel_matrix(grads), rows_matrix = pixel_matrix(rows);
  const at::Tensor centres = weight.select(3, 1).select(3, 1);  // (n, Cout, Cin)
  at::Tensor grad_rows_matrix = pixel_matrix(grad_rows);
  at::Tensor grad_centres = grad_weight.select(2, 1).select(2, 1);  // (n, Cout, Cin)
  if (concat) {
    at::mm_out(grad_rows_matrix, g, centres.reshape({n * cout, cin}));
    at::Tensor stacked = grad_centres.view({n * cout, cin});
    at::mm_out(stacked, g.t(), rows_matrix);
  } else {  // every branch's centre sees the same gradient
    at::mm_out(grad_rows_matrix, g, sum_over_branches(centres));
    grad_centres.copy_(at::mm(g.t(), rows_matrix).unsqueeze(0).expand({n, cout, cin}));
  }

  std::map<int64_t, at::Tensor> shifted_columns;  // dx -> the compact block of x its taps read
  for (const SliceTaps& plan : plan_taps(dilations, concat, H, W)) {
    const at::Tensor grads_slice = grads.narrow(3, plan.slice * cout, cout);
    for (const auto& [dx, taps] : plan.by_column_shift) {
      if (on_whole_rows(dx, W)) {
        // The gradient with the wrapped columns zeroed: they add nothing.
        at::Tensor masked = grads_slice;
        if (dx != 0) {
          const WrappedColumns wrapped = wrapped_columns(dx, W);
          masked = grads_slice.clone(at::MemoryFormat::Contiguous);
          masked.narrow(2, wrapped.first, wrapped.count).zero_();
        }
        for (const Tap& tap : taps) {
          const PixelRange r = pixel_range(tap, B, W);
          const at::Tensor g_tap = pixels(masked, r.begin, r.count);
          at::Tensor gw = grad_tap(tap);
          at::mm_out(gw, g_tap.t(), pixels(rows, r.begin + r.offset, r.count));
          pixels(grad_rows, r.begin + r.offset, r.count).addmm_(g_tap, tap_matrix(weight, tap.branch, tap.ky, tap.kx));
        }
        continue;
      }
      const int64_t x0 = taps[0].x0, width = taps[0].x1 - taps[0].x0;
      at::Tensor& columns = shifted_columns[dx];
      if (!columns.defined()) columns = column_block(rows, x0 + dx, width);  // (H, B, width, Cin)
      const at::Tensor grad_columns = column_block(grads_slice, x0, width);  // (H, B, width, Cout)
      at::Tensor part;  // the gradient of x's columns [x0 + dx, x0 + dx + width), (H, B, width, Cin)
      for (const Tap& tap : taps) {
        const int64_t count = tap.y1 - tap.y0;
        const at::Tensor g_tap = image_rows(grad_columns, tap.y0, count);
        const at::Tensor w = tap_matrix(weight, tap.branch, tap.ky, tap.kx);
        at::Tensor gw = grad_tap(tap);
        at::mm_out(gw, g_tap.t(), image_rows(columns, tap.y0 + tap.dy, count));
        if (!part.defined() && count == H) {
          part = at::mm(g_tap, w).view({H, B, width, cin});
          continue;
        }
        if (!part.defined()) part = at::zeros({H, B, width, cin}, x.options());
        image_rows(part, tap.y0 + tap.dy, count).addmm_(g_tap, w);
      }
      grad_rows.narrow(2, x0 + dx, width).add_(part);
    }
  }
  const at::Tensor grad_x = from_pixel_rows(grad_rows, false, output_format(x));
  return {laid_out_like(grad_x, x), weight_laid_out_like(grad_weight, weight_in)};
}

}  // namespace MEDMTL_CPU_NS
}  // namespace medmtl
