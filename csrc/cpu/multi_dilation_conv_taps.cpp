// multi_dilation_conv's CPU forward on small maps as one GEMM per tap.
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
//   of consecutive rows, and a tap with dx = 0 is one GEMM straight from the
//   map into the accumulator.
// - The centre taps of all branches are one GEMM whose initial value is the
//   bias (their weights summed for a sum, stacked for a concat).
// - The taps with a column shift dx != 0 read the columns [x0 + dx, x1 + dx):
//   those are copied once per dx into a compact (H, B, x1 - x0, C) block, the
//   taps' GEMMs run on it into a compact accumulator, which is added into
//   the output's columns [x0, x1) once.
//
// The weight is read in place when Cin is innermost (the DFE layer's folded
// weights are laid out so); otherwise it is copied once per call.
#include "multi_dilation_conv_taps.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <map>
#include <vector>

#include "../core/dilated_taps.h"
#include "../layout.h"

namespace medmtl {
namespace {

// An off-centre tap that reads the map: output positions [y0, y1) x [x0, x1)
// read the input at (y + dy, x + dx).
struct Tap {
  int64_t branch, ky, kx, dy, dx, y0, y1, x0, x1;
};

// The off-centre taps of `branches` that read an H x W map.
std::vector<Tap> taps_reading_map(at::IntArrayRef dilations, const std::vector<int64_t>& branches, int64_t H,
                                  int64_t W) {
  std::vector<Tap> taps;
  for (int64_t i : branches)
    for (int64_t ky = 0; ky < 3; ++ky)
      for (int64_t kx = 0; kx < 3; ++kx) {
        if ((ky == 1 && kx == 1) || !core::tap_exists(ky, kx, dilations[i])) continue;
        const int64_t dy = core::tap_shift(ky, dilations[i]), dx = core::tap_shift(kx, dilations[i]);
        if (core::tap_only_padding(dy, dx, H, W)) continue;
        taps.push_back({i, ky, kx, dy, dx, core::tap_output_begin(dy, H), core::tap_output_end(dy, H),
                        core::tap_output_begin(dx, W), core::tap_output_end(dx, W)});
      }
  return taps;
}

// weight (n, Cout, Cin, 3, 3) with Cin innermost in memory, so that every
// tap's (Cout, Cin) matrix, and the stacked centre taps, are GEMM operands
// as they are (no copy when weight already is).
at::Tensor cin_innermost(const at::Tensor& weight) {
  const at::Tensor tap_major = weight.permute({0, 1, 3, 4, 2});
  return tap_major.is_contiguous() ? weight : tap_major.contiguous().permute({0, 1, 4, 2, 3});
}

// Tap (ky, kx) of branch i as the (Cin, Cout) right-hand GEMM operand.
at::Tensor tap_operand(const at::Tensor& weight, int64_t i, int64_t ky, int64_t kx) {
  return weight.select(0, i).select(2, ky).select(2, kx).t();
}

// A (..., C) block of pixel rows as a (pixels, C) matrix.
at::Tensor pixel_matrix(const at::Tensor& t) { return t.view({-1, t.size(-1)}); }

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

// x (B, C, H, W) as pixel rows (H, B, W, C).
at::Tensor to_pixel_rows(const at::Tensor& x_in) {
  if (!x_in.is_contiguous()) return x_in.permute({2, 0, 3, 1}).contiguous();  // channels-last: row blocks
  const at::Tensor x = x_in;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor rows = at::empty({H, B, W, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "to_pixel_rows", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = rows.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / H, y = i % H;  // the (C, W) plane row x[b, :, y, :] -> rows[y, b] (W, C)
        transpose_tile(src + (b * C * H + y) * W, H * W, dst + (y * B + b) * W * C, C, C, W, false);
      }
    });
  });
  return rows;
}

// act(acc) for pixel rows acc (H, B, W, N), as (B, N, H, W) in `format`.
at::Tensor from_pixel_rows(const at::Tensor& acc, bool relu, at::MemoryFormat format) {
  const int64_t H = acc.size(0), B = acc.size(1), W = acc.size(2), N = acc.size(3);
  at::Tensor out = at::empty({B, N, H, W}, acc.options().memory_format(format));
  if (format == at::MemoryFormat::ChannelsLast) {  // row blocks
    if (relu) acc.relu_();
    return out.copy_(acc.permute({1, 3, 0, 2}));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "from_pixel_rows", [&] {
    const scalar_t* src = acc.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / H, y = i % H;  // acc[y, b] (W, N) -> the plane row out[b, :, y, :]
        transpose_tile(src + (y * B + b) * W * N, N, dst + (b * N * H + y) * W, H * W, W, N, relu);
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor multi_dilation_conv_taps(const at::Tensor& x, const at::Tensor& weight_in, at::IntArrayRef dilations,
                                    const std::optional<at::Tensor>& bias, bool concat, bool relu) {
  const int64_t B = x.size(0), cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t n = weight_in.size(0), cout = weight_in.size(1), channels = concat ? n * cout : cout;
  const at::Tensor weight = cin_innermost(weight_in);
  const at::Tensor rows = to_pixel_rows(x);  // (H, B, W, Cin)
  at::Tensor acc = at::empty({H, B, W, channels}, x.options());  // (H, B, W, channels)

  // All centre taps in one GEMM, on top of the bias.
  const at::Tensor centres = weight.select(3, 1).select(3, 1);  // (n, Cout, Cin)
  const at::Tensor centre = concat ? centres.reshape({n * cout, cin}) : centres.sum(0);
  at::Tensor acc_pixels = pixel_matrix(acc);
  if (bias.has_value())
    at::addmm_out(acc_pixels, *bias, pixel_matrix(rows), centre.t());
  else
    at::mm_out(acc_pixels, pixel_matrix(rows), centre.t());

  // The output channels each branch adds into: all of them for a sum, its
  // slice for a concat.
  std::vector<std::vector<int64_t>> slices;
  for (int64_t i = 0; i < (concat ? n : 1); ++i) {
    std::vector<int64_t> branches;
    for (int64_t j = 0; j < n; ++j)
      if (!concat || j == i) branches.push_back(j);
    slices.push_back(branches);
  }
  std::map<int64_t, at::Tensor> shifted_columns;  // dx -> the compact block its taps read
  for (size_t s = 0; s < slices.size(); ++s) {
    const at::Tensor acc_slice = acc.narrow(3, static_cast<int64_t>(s) * cout, cout);
    std::map<int64_t, std::vector<Tap>> by_column_shift;
    for (const Tap& tap : taps_reading_map(dilations, slices[s], H, W)) {
      if (tap.dx != 0) {
        by_column_shift[tap.dx].push_back(tap);
        continue;
      }
      // Whole image rows: from the map straight into the accumulator.
      const int64_t rows_read = tap.y1 - tap.y0;
      pixel_matrix(acc_slice.narrow(0, tap.y0, rows_read))
          .addmm_(pixel_matrix(rows.narrow(0, tap.y0 + tap.dy, rows_read)),
                  tap_operand(weight, tap.branch, tap.ky, tap.kx));
    }
    for (auto& [dx, taps] : by_column_shift) {
      // The tap that covers every row (dy = 0) first: its result is the accumulator.
      std::stable_partition(taps.begin(), taps.end(), [](const Tap& tap) { return tap.dy == 0; });
      const int64_t x0 = taps[0].x0, width = taps[0].x1 - taps[0].x0;
      at::Tensor& columns = shifted_columns[dx];
      if (!columns.defined()) columns = rows.narrow(2, x0 + dx, width).contiguous();  // (H, B, width, Cin)
      at::Tensor part;  // (H, B, width, Cout)
      for (const Tap& tap : taps) {
        const at::Tensor w = tap_operand(weight, tap.branch, tap.ky, tap.kx);
        if (!part.defined() && tap.dy == 0) {
          part = at::mm(pixel_matrix(columns), w).view({H, B, width, cout});
          continue;
        }
        if (!part.defined()) part = at::zeros({H, B, width, cout}, x.options());
        const int64_t rows_read = tap.y1 - tap.y0;
        pixel_matrix(part.narrow(0, tap.y0, rows_read))
            .addmm_(pixel_matrix(columns.narrow(0, tap.y0 + tap.dy, rows_read)), w);
      }
      acc_slice.narrow(2, x0, width).add_(part);
    }
  }
  return from_pixel_rows(acc, relu, output_format(x));
}

}  // namespace medmtl
