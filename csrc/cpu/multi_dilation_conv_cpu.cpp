// CPU kernels of medmtl::multi_dilation_conv: parallel dilated 3x3
// convolutions of one input, as GEMMs per tap (ATen -> MKL/oneDNN), skipping
// taps that read only padding.
//
// A convolution is a sum over taps: tap (ky, kx) of a branch at dilation d
// multiplies weight[:, :, ky, kx] (Cout x Cin) with the input shifted by
// (dy, dx) = ((ky - 1) d, (kx - 1) d). Taps with the same shift form a group
// (the centre tap of every branch, at least); a group's GEMM runs only over the
// output rectangle where the shifted input lies inside the map, read as one
// contiguous copy. The centre group covers the whole map and initialises the
// accumulator; the epilogue adds the bias and applies the ReLU in one pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

#include "../core/dilated_taps.h"
#include "../multi_dilation_conv_checks.h"

namespace medmtl {
namespace {

using at::indexing::Slice;

// Taps that share one shift, and the output rectangle they write.
struct TapGroup {
  int64_t dy = 0, dx = 0;
  int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;             // output rows [y0, y1), columns [x0, x1)
  std::vector<std::pair<int64_t, int64_t>> members;  // (branch, ky * 3 + kx)
  bool full_map(int64_t H, int64_t W) const { return y0 == 0 && y1 == H && x0 == 0 && x1 == W; }
};

// The groups of taps that read at least one input value, centre group first.
std::vector<TapGroup> tap_groups(at::IntArrayRef dilations, int64_t H, int64_t W) {
  std::map<std::pair<int64_t, int64_t>, TapGroup> by_shift;
  for (int64_t i = 0; i < static_cast<int64_t>(dilations.size()); ++i) {
    for (int64_t ky = 0; ky < 3; ++ky) {
      for (int64_t kx = 0; kx < 3; ++kx) {
        if (!core::tap_exists(ky, kx, dilations[i])) continue;
        const int64_t dy = core::tap_shift(ky, dilations[i]), dx = core::tap_shift(kx, dilations[i]);
        TapGroup group;
        group.dy = dy;
        group.dx = dx;
        group.y0 = core::tap_output_begin(dy, H);
        group.y1 = core::tap_output_end(dy, H);
        group.x0 = core::tap_output_begin(dx, W);
        group.x1 = core::tap_output_end(dx, W);
        if (group.y0 >= group.y1 || group.x0 >= group.x1) continue;  // only padding
        auto it = by_shift.try_emplace({dy, dx}, group).first;
        it->second.members.emplace_back(i, ky * 3 + kx);
      }
    }
  }
  std::vector<TapGroup> groups;
  groups.push_back(by_shift.at({0, 0}));
  for (auto& [shift, group] : by_shift)
    if (shift != std::make_pair<int64_t, int64_t>(0, 0)) groups.push_back(std::move(group));
  return groups;
}

// The group's weight as one matrix: summed over members for "sum" (Cout x
// Cin), stacked for "concat" (members * Cout x Cin, member j's rows first).
at::Tensor group_weight(const at::Tensor& weight, const TapGroup& group, bool concat) {
  const at::Tensor taps = weight.flatten(3);  // (n, Cout, Cin, 9)
  std::vector<at::Tensor> parts;
  for (const auto& [branch, tap] : group.members) parts.push_back(taps.select(0, branch).select(2, tap));
  return concat ? at::cat(parts, 0) : at::stack(parts).sum(0);
}

// Output channels of member j: all of them for "sum", its branch's slice for "concat".
std::pair<int64_t, int64_t> member_channels(const TapGroup& group, size_t j, int64_t cout, bool concat) {
  if (!concat) return {0, cout};
  return {group.members[j].first * cout, (group.members[j].first + 1) * cout};
}

// x[:, :, rows + dy, cols + dx] for the group's rectangle, as (B, Cin, h * w).
at::Tensor input_rectangle(const at::Tensor& x, const TapGroup& group) {
  return x.index({Slice(), Slice(), Slice(group.y0 + group.dy, group.y1 + group.dy),
                  Slice(group.x0 + group.dx, group.x1 + group.dx)})
      .contiguous()
      .flatten(2);
}

at::Tensor output_rectangle(const at::Tensor& t, const TapGroup& group, int64_t c0, int64_t c1) {
  return t.index({Slice(), Slice(c0, c1), Slice(group.y0, group.y1), Slice(group.x0, group.x1)});
}

// y = act(acc + bias), in place, one pass over each (b, c) plane.
void bias_activation_(at::Tensor& acc, const std::optional<at::Tensor>& bias, bool relu) {
  if (!bias.has_value() && !relu) return;
  const int64_t B = acc.size(0), C = acc.size(1), plane = acc.size(2) * acc.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "multi_dilation_conv_epilogue", [&] {
    scalar_t* data = acc.data_ptr<scalar_t>();
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    const scalar_t* bias_data = bias.has_value() ? b.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t shift = bias_data != nullptr ? bias_data[p % C] : scalar_t(0);
        scalar_t* v = data + p * plane;
        if (relu) {
          for (int64_t i = 0; i < plane; ++i) {
            const scalar_t y = v[i] + shift;
            v[i] = y < scalar_t(0) ? scalar_t(0) : y;
          }
        } else {
          for (int64_t i = 0; i < plane; ++i) v[i] = v[i] + shift;
        }
      }
    });
  });
}

at::Tensor multi_dilation_conv_cpu(const at::Tensor& x_in, const at::Tensor& weight, at::IntArrayRef dilations,
                                   const std::optional<at::Tensor>& bias, c10::string_view combine, bool relu) {
  const MultiDilationConvShape shape = check_multi_dilation_conv_inputs(x_in, weight, dilations, bias, combine);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = shape.batch, H = shape.height, W = shape.width, cout = shape.out_channels;
  const std::vector<TapGroup> groups = tap_groups(dilations, H, W);
  // Centre group: every branch's centre tap over the whole map. In "concat"
  // its stacked rows are the branches in order, so it fills every channel.
  const TapGroup& centre = groups.front();
  at::Tensor acc = at::matmul(group_weight(weight, centre, shape.concat), x.flatten(2));  // (B, C_out, H * W)
  if (shape.concat && static_cast<int64_t>(centre.members.size()) != shape.branches)
    TORCH_CHECK(false, "multi_dilation_conv: internal error, a branch lacks its centre tap");
  acc = acc.view({B, shape.output_channels(), H, W});
  for (size_t g = 1; g < groups.size(); ++g) {
    const TapGroup& group = groups[g];
    const at::Tensor z = at::matmul(group_weight(weight, group, shape.concat), input_rectangle(x, group))
                             .view({B, -1, group.y1 - group.y0, group.x1 - group.x0});
    for (size_t j = 0; j < (shape.concat ? group.members.size() : 1); ++j) {
      const auto [c0, c1] = member_channels(group, j, cout, shape.concat);
      output_rectangle(acc, group, c0, c1).add_(z.narrow(1, static_cast<int64_t>(j) * cout, cout));
    }
  }
  bias_activation_(acc, bias, relu);
  return acc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_dilation_conv_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& x_in, const at::Tensor& weight, at::IntArrayRef dilations,
    const at::Tensor& output, c10::string_view combine, bool relu) {
  const MultiDilationConvShape shape = check_multi_dilation_conv_inputs(x_in, weight, dilations, std::nullopt, combine);
  check_multi_dilation_conv_backward_inputs(grad_output, output, shape, x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = shape.batch, H = shape.height, W = shape.width, cout = shape.out_channels;
  // Gradient of the pre-activation: the ReLU passes it where the output > 0.
  const at::Tensor grad_pre = relu ? grad_output * output.gt(0).to(grad_output.scalar_type()) : grad_output.contiguous();
  const at::Tensor grad_bias = grad_pre.sum({0, 2, 3});
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_taps = grad_weight.view({shape.branches, cout, shape.in_channels, 9});
  const std::vector<TapGroup> groups = tap_groups(dilations, H, W);
  at::Tensor grad_x;
  for (size_t g = 0; g < groups.size(); ++g) {
    const TapGroup& group = groups[g];
    const bool whole = group.full_map(H, W);
    // The group's output gradient (B, M, h * w) and its input rectangle (B, Cin, h * w).
    std::vector<at::Tensor> parts;
    for (size_t j = 0; j < (shape.concat ? group.members.size() : 1); ++j) {
      const auto [c0, c1] = member_channels(group, j, cout, shape.concat);
      parts.push_back(whole ? grad_pre.narrow(1, c0, c1 - c0) : output_rectangle(grad_pre, group, c0, c1));
    }
    const at::Tensor grad_rect = (parts.size() == 1 ? parts[0] : at::cat(parts, 1)).contiguous().flatten(2);
    const at::Tensor x_rect = whole ? x.flatten(2) : input_rectangle(x, group);
    // dL/dW_group = sum_b grad_rect_b @ x_rect_b^T; each member's tap gets its
    // rows (stacked, "concat") or the whole of it (summed, "sum").
    const at::Tensor grad_group = at::bmm(grad_rect, x_rect.transpose(1, 2)).sum(0);  // (M, Cin)
    for (size_t j = 0; j < group.members.size(); ++j) {
      const auto& [branch, tap] = group.members[j];
      const int64_t row = shape.concat ? static_cast<int64_t>(j) * cout : 0;
      grad_taps.select(0, branch).select(2, tap).copy_(grad_group.narrow(0, row, cout));
    }
    // dL/dx over the input rectangle += W_group^T @ grad_rect.
    const at::Tensor grad_in = at::matmul(group_weight(weight, group, shape.concat).t(), grad_rect);
    if (g == 0) {
      grad_x = grad_in.view({B, shape.in_channels, H, W});  // the centre group covers the map
    } else {
      grad_x
          .index({Slice(), Slice(), Slice(group.y0 + group.dy, group.y1 + group.dy),
                  Slice(group.x0 + group.dx, group.x1 + group.dx)})
          .add_(grad_in.view({B, shape.in_channels, group.y1 - group.y0, group.x1 - group.x0}));
    }
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(medmtl, CPU, m) {
  m.impl("multi_dilation_conv", &multi_dilation_conv_cpu);
  m.impl("multi_dilation_conv_backward", &multi_dilation_conv_backward_cpu);
}

}  // namespace medmtl
