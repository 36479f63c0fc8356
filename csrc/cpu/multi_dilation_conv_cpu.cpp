// CPU kernels of medmtl::multi_dilation_conv: parallel dilated 3x3
// convolutions of one input, combined by sum or concatenation.
//
// Small maps (fewer than kChannelsLastPixels pixels), forward and backward:
// one GEMM per tap that reads the map (multi_dilation_conv_taps.cpp). There
// most taps of the large dilations read only padding, and oneDNN's per-call
// weight reorder costs about as much as its convolution (512 channels on
// 14x14); its NCHW backward ran at half the GEMMs' rate. A small map whose
// taps mostly read it, with enough pixels in the batch, goes to oneDNN as a
// large map does (uses_tap_gemms), and so does one whose dilated branches all
// take Winograd tiles with cached kernel transforms (an inference weight seen
// before: derived_weight_cache.h).
//
// Forward, channels-last: a branch whose off-centre taps all read padding (a
// 1x1 branch, or a dilation at least the map's size) is a GEMM over the pixel
// rows (for a sum, all such branches in one GEMM with their weights summed);
// a dense branch (winograd_pays, or winograd_pays_with_cached_kernel for an
// inference weight seen before) runs as Winograd tiles
// (winograd_conv3x3.cpp), and if any value it writes is not finite the whole
// op is computed again without them; every other branch is one oneDNN
// convolution, which skips the padding-only taps itself. A float32 sum goes
// through oneDNN's fused convolutions: the first result carries the bias,
// every further branch is added inside its convolution and the last one
// applies the ReLU, so no separate pass touches the output; a float32 concat
// applies each branch's bias slice and ReLU inside its convolution.
//
// Layouts: the output is channels-last when x is, else NCHW (a channels-last
// result is transposed out in tiles: relayout); input gradients come back
// laid out as empty_like(input) (csrc/layout.h).
//
// Backward, channels-last: the centre GEMM's gradients are GEMMs on the
// pixel rows; a dense branch takes the Winograd tiles' backward (ATen's when
// that meets a non-finite value); every other branch takes ATen's
// convolution backward (the NCHW one was 1.4-4x slower at 56x56 and 112x112).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <vector>

#include "../core/dilated_taps.h"
#include "../layout.h"
#include "../multi_dilation_conv_checks.h"
#include "derived_weight_cache.h"
#include "multi_dilation_conv_taps.h"
#include "private_ops.h"
#include "winograd_conv3x3.h"

// Everything below is compiled per CPU capability (cpu_capability.h).
#include "cpu_capability_target.h"

namespace medmtl {
inline namespace MEDMTL_CPU_NS {
namespace {

// Whether branch `dilation` reads the map only through its centre tap.
bool centre_only(int64_t dilation, int64_t H, int64_t W) {
  for (int64_t ky = 0; ky < 3; ++ky)
    for (int64_t kx = 0; kx < 3; ++kx)
      if ((ky != 1 || kx != 1) && core::tap_exists(ky, kx, dilation) &&
          !core::tap_only_padding(core::tap_shift(ky, dilation), core::tap_shift(kx, dilation), H, W))
        return false;
  return true;
}

struct BranchPlan {
  std::vector<int64_t> centre;  // branches computed as 1x1 convolutions
  std::vector<int64_t> full;    // branches computed as dilated convolutions
};

BranchPlan plan_branches(at::IntArrayRef dilations, int64_t H, int64_t W) {
  BranchPlan plan;
  for (int64_t i = 0; i < static_cast<int64_t>(dilations.size()); ++i)
    (centre_only(dilations[i], H, W) ? plan.centre : plan.full).push_back(i);
  return plan;
}

// The centre-only branches' centre weights summed, (Cout, Cin).
at::Tensor centre_weight(const at::Tensor& weight, const std::vector<int64_t>& branches) {
  at::Tensor total;
  for (int64_t i : branches) {
    const at::Tensor centre = weight.select(0, i).select(2, 1).select(2, 1);
    total = total.defined() ? total.add_(centre) : centre.clone(at::MemoryFormat::Contiguous);
  }
  return total;
}

// Maps of at least this many pixels are convolved by oneDNN, channels-last
// (its NCHW path reorders large maps on every call: measured 2-3x slower for
// 64 channels at 112x112 and 1.2-2x for 128 at 56x56); smaller maps take the
// tap GEMMs, forward and backward.
constexpr int64_t kChannelsLastPixels = 40 * 40;

// On a smaller map the tap GEMMs are used for at most this many pixels of the
// batch whatever the taps' density (up to there oneDNN's per-call weight
// reorder costs more than the taps it skips: 512 channels on 2 x 14 x 14)...
constexpr int64_t kTapGemmPixels = 1024;
// ... and beyond that while the off-centre taps read the map on less than
// this fraction of their positions (denser branches, as 6 and 12 alone or a
// dense 3x3 on 2 x 28 x 28, were 10-25% faster through oneDNN).
constexpr double kTapGemmDensity = 0.4;

// The fraction of the off-centre tap positions of all branches that read the
// map (0 when every branch is 1x1).
double off_centre_density(at::IntArrayRef dilations, int64_t H, int64_t W) {
  int64_t read = 0, taps = 0;
  for (int64_t d : dilations)
    for (int64_t ky = 0; ky < 3; ++ky)
      for (int64_t kx = 0; kx < 3; ++kx) {
        if ((ky == 1 && kx == 1) || !core::tap_exists(ky, kx, d)) continue;
        const int64_t dy = core::tap_shift(ky, d), dx = core::tap_shift(kx, d);
        read += (core::tap_output_end(dy, H) - core::tap_output_begin(dy, H)) *
                (core::tap_output_end(dx, W) - core::tap_output_begin(dx, W));
        ++taps;
      }
  return taps == 0 ? 0.0 : static_cast<double>(read) / (static_cast<double>(taps) * H * W);
}

// Whether x's convolutions take the tap GEMMs (else oneDNN, channels-last).
bool uses_tap_gemms(int64_t batch, int64_t H, int64_t W, at::IntArrayRef dilations) {
  return H * W < kChannelsLastPixels &&
         (batch * H * W <= kTapGemmPixels || off_centre_density(dilations, H, W) < kTapGemmDensity);
}

// oneDNN's fused convolutions, as PyTorch's mkldnn build registers them for
// Inductor: conv + bias (+ ReLU) into a new tensor, and conv + bias added
// into an existing one (+ ReLU), so a sum of branches needs no add passes.
// Absent (nullopt) in builds without oneDNN, and when their schemas differ
// from the ones the stacks below are built for (private_ops.h): then
// at::conv2d computes the branches.
struct FusedConvolutionOps {
  std::optional<c10::OperatorHandle> into_new, added_into;
};

const FusedConvolutionOps& fused_convolution_ops() {
  static const FusedConvolutionOps ops{checked_private_op(kFusedConvolution),
                                       checked_private_op(kFusedConvolutionAddedInto)};
  return ops;
}

// y = act(conv2d(x, w, bias, padding=d, dilation=d)), or acc += that before
// the activation (act(acc + conv + bias)) when acc is defined; returns y / acc.
at::Tensor fused_convolution(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                             int64_t d, bool relu, const at::Tensor& acc) {
  const FusedConvolutionOps& ops = fused_convolution_ops();
  const std::vector<int64_t> pad{d, d}, stride{1, 1};
  torch::jit::Stack stack;
  if (acc.defined()) stack.emplace_back(acc);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias);
  stack.emplace_back(pad);
  stack.emplace_back(stride);
  stack.emplace_back(pad);
  stack.emplace_back(int64_t{1});
  if (acc.defined()) {
    stack.emplace_back(std::string("add"));
    stack.emplace_back(at::Scalar(1.0));
    stack.emplace_back(relu ? c10::IValue(std::string("relu")) : c10::IValue());
    stack.emplace_back(c10::List<std::optional<at::Scalar>>());
    stack.emplace_back(c10::IValue());
    ops.added_into->callBoxed(&stack);
  } else {
    stack.emplace_back(std::string(relu ? "relu" : "none"));
    stack.emplace_back(c10::List<std::optional<at::Scalar>>());
    stack.emplace_back(c10::IValue());
    ops.into_new->callBoxed(&stack);
  }
  return stack.back().toTensor();
}

// Whether x's branches go through the fused convolutions (float32, the ops
// exist, and torch.backends.mkldnn is enabled).
bool fuses_convolutions(const at::Tensor& x_conv, const BranchPlan& plan) {
  const FusedConvolutionOps& ops = fused_convolution_ops();
  return ops.into_new.has_value() && ops.added_into.has_value() && at::globalContext().userEnabledMkldnn() &&
         x_conv.scalar_type() == at::kFloat && !plan.full.empty() && x_conv.numel() > 0;
}

// A channels-last (B, C, H, W) tensor as its (B H W, C) pixel matrix (a view;
// not the tap GEMMs' (H, B, W, C) rows).
at::Tensor channels_last_pixels(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

// Whether a dilated branch at dilation d with kernel w (Cout, Cin, 3, 3) runs
// as Winograd tiles on x (else through oneDNN), with its transform made by
// the call or, when `kernel_cached` (an inference weight used before), kept
// between calls.
bool winograd_branch(const at::Tensor& x, const at::Tensor& w, int64_t d, bool kernel_cached) {
  return winograd_pays(x.size(0), x.size(2), x.size(3), d, x.scalar_type()) ||
         (kernel_cached && winograd_pays_with_cached_kernel(x.size(0), x.size(2), x.size(3), d, x.scalar_type(),
                                                            w.size(1), w.size(0)));
}

// Whether every branch that reads the map off-centre runs as Winograd tiles
// with a cached kernel (such a map then goes channels-last even when small:
// a dense 2048 -> 512 on 2 x 14 x 14 was 1.6x faster so than as tap GEMMs).
bool dilated_branches_take_cached_winograd(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef dilations,
                                           const BranchPlan& plan, bool kernels_cached) {
  if (plan.full.empty() || !kernels_cached) return false;
  for (int64_t i : plan.full)
    if (!winograd_branch(x, weight.select(0, i), dilations[i], /*kernel_cached=*/true)) return false;
  return true;
}

// Whether dilated branches may take Winograd tiles, whether their kernels'
// transforms are cached, and whether one of them wrote a non-finite value
// (then the op is computed again without them).
struct WinogradUse {
  bool allowed = true, kernels_cached = false, non_finite = false;
};

// Sum through oneDNN (large maps, or dense ones), channels-last:
// act(bias + centre GEMM + each dilated branch). The first result carries the
// bias; the later ones are added into it.
at::Tensor sum_branches(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef dilations,
                        const std::optional<at::Tensor>& bias, bool relu, const BranchPlan& plan,
                        WinogradUse& winograd) {
  const bool fused = fuses_convolutions(x, plan);
  at::Tensor acc;
  if (!plan.centre.empty()) {
    const at::Tensor centre = centre_weight(weight, plan.centre).t();  // (Cin, Cout)
    const at::Tensor pixels = channels_last_pixels(x);
    const at::Tensor rows = bias.has_value() ? at::addmm(*bias, pixels, centre) : at::mm(pixels, centre);
    acc = rows.view({x.size(0), x.size(2), x.size(3), -1}).permute({0, 3, 1, 2});
  }
  bool relu_applied = false;
  for (size_t k = 0; k < plan.full.size(); ++k) {
    const int64_t i = plan.full[k], d = dilations[i];
    const bool last = k + 1 == plan.full.size();
    const at::Tensor w = weight.select(0, i);
    const std::optional<at::Tensor> first_bias = acc.defined() ? std::nullopt : bias;
    if (winograd.allowed && winograd_branch(x, w, d, winograd.kernels_cached)) {
      const bool accumulate = acc.defined();
      if (!accumulate)
        acc = at::empty({x.size(0), w.size(0), x.size(2), x.size(3)},
                        x.options().memory_format(at::MemoryFormat::ChannelsLast));
      winograd.non_finite |=
          !winograd_conv3x3_into(x, w, d, first_bias, accumulate, relu && last, acc, winograd.kernels_cached);
      relu_applied = relu && last;
    } else if (fused) {
      acc = fused_convolution(x, w.contiguous(at::MemoryFormat::ChannelsLast), first_bias, d, relu && last, acc);
      relu_applied = relu && last;
    } else {
      const at::Tensor y = at::conv2d(x, w.contiguous(at::MemoryFormat::ChannelsLast), first_bias, 1, d, d);
      acc = acc.defined() ? acc.add_(y) : y;
    }
  }
  if (relu && !relu_applied) acc.relu_();
  return acc;
}

// rows (P, C) = act(rows + bias) in place, rows with unit column stride (a
// channel slice of a channels-last pixel matrix): one pass after the GEMM,
// where addmm would first broadcast the bias into the strided slice and a
// ReLU would be another pass.
template <typename T>
void add_bias_relu_rows(T* data, int64_t ld, int64_t count, int64_t channels, const T* shift, bool relu) {
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* row = data + p * ld;
      if (shift != nullptr) {
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) row[c] = row[c] + shift[c];
      }
      if (relu) {
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) row[c] = row[c] < T(0) ? T(0) : row[c];  // keeps NaN, as torch.relu
      }
    }
  });
}

void add_bias_relu_(at::Tensor& rows, const std::optional<at::Tensor>& bias, bool relu) {
  if (!bias.has_value() && !relu) return;
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1, "add_bias_relu_: expected rows with unit column stride");
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "add_bias_relu_", [&] {
    add_bias_relu_rows(rows.data_ptr<scalar_t>(), rows.stride(0), rows.size(0), rows.size(1),
                       b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, relu);
  });
}

// Concat through oneDNN (large maps, or dense ones), channels-last: each
// branch, with its bias slice and activation, into its slice of the output
// channels.
at::Tensor concat_branches(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef dilations,
                           const std::optional<at::Tensor>& bias, bool relu, const BranchPlan& plan,
                           WinogradUse& winograd) {
  const int64_t n = weight.size(0), cout = weight.size(1);
  const bool fused = fuses_convolutions(x, plan);
  at::Tensor out = at::empty({x.size(0), n * cout, x.size(2), x.size(3)},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto bias_of = [&](int64_t i) {
    return bias.has_value() ? std::optional<at::Tensor>(bias->narrow(0, i * cout, cout)) : std::nullopt;
  };
  for (int64_t i : plan.centre) {
    at::Tensor slice = channels_last_pixels(out).narrow(1, i * cout, cout);
    const at::Tensor centre = weight.select(0, i).select(2, 1).select(2, 1).t();  // (Cin, Cout)
    at::mm_out(slice, channels_last_pixels(x), centre);
    add_bias_relu_(slice, bias_of(i), relu);
  }
  for (int64_t i : plan.full) {
    const int64_t d = dilations[i];
    if (winograd.allowed && winograd_branch(x, weight.select(0, i), d, winograd.kernels_cached)) {
      at::Tensor slice = out.narrow(1, i * cout, cout);
      winograd.non_finite |=
          !winograd_conv3x3_into(x, weight.select(0, i), d, bias_of(i), false, relu, slice, winograd.kernels_cached);
      continue;
    }
    const at::Tensor w = weight.select(0, i).contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor y = fused ? fused_convolution(x, w, bias_of(i), d, relu, at::Tensor())
                         : at::conv2d(x, w, bias_of(i), 1, d, d);
    if (relu && !fused) y.relu_();
    out.narrow(1, i * cout, cout).copy_(y);
  }
  return out;
}

at::Tensor multi_dilation_conv_cpu(const at::Tensor& x_in, const at::Tensor& weight, at::IntArrayRef dilations,
                                   const std::optional<at::Tensor>& bias, c10::string_view combine, bool relu) {
  const MultiDilationConvShape shape = check_multi_dilation_conv_inputs(x_in, weight, dilations, bias, combine);
  const BranchPlan plan = plan_branches(dilations, shape.height, shape.width);
  // An inference weight seen before (weight_seen_before) keeps its branches'
  // Winograd transforms between calls.
  const bool kernels_cached = weight_seen_before(weight);
  if (uses_tap_gemms(shape.batch, shape.height, shape.width, dilations) &&
      !dilated_branches_take_cached_winograd(x_in, weight, dilations, plan, kernels_cached))
    return multi_dilation_conv_taps(x_in, weight, dilations, bias, shape.concat, relu);
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  auto run = [&](WinogradUse& winograd) {
    return shape.concat ? concat_branches(x, weight, dilations, bias, relu, plan, winograd)
                        : sum_branches(x, weight, dilations, bias, relu, plan, winograd);
  };
  WinogradUse winograd{/*allowed=*/true, kernels_cached};
  at::Tensor out = run(winograd);
  if (winograd.non_finite) {  // NaN or infinity in x (or an overflow): exactly where direct taps put them
    WinogradUse direct{/*allowed=*/false};
    out = run(direct);
  }
  return output_format(x_in) == at::MemoryFormat::Contiguous ? contiguous_nchw(out) : out;
}


// ATen's convolution backward of one dilated branch,
// channels-last (oneDNN's NCHW backward was 1.4-4x slower at 56x56 and
// 112x112): (grad_x, grad_weight).
std::tuple<at::Tensor, at::Tensor> branch_convolution_backward(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& weight, int64_t d) {
  if (winograd_branch(x, weight, d, /*kernel_cached=*/false)) {
    auto [gx, gw, finite] = winograd_conv3x3_backward(grad, x, weight, d);
    if (finite) return {gx, gw};
    // A NaN or infinity spread through the tiles: the direct gradients below.
  }
  constexpr at::MemoryFormat kChannelsLast = at::MemoryFormat::ChannelsLast;
  auto [gx, gw, unused] =
      at::convolution_backward(grad.contiguous(kChannelsLast), x, weight.contiguous(kChannelsLast), std::nullopt,
                               {1, 1}, {d, d}, {d, d}, false, {0, 0}, 1, {true, true, false});
  return {gx, gw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_dilation_conv_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& x_in, const at::Tensor& weight, at::IntArrayRef dilations,
    const at::Tensor& output, c10::string_view combine, bool relu) {
  const MultiDilationConvShape shape = check_multi_dilation_conv_inputs(x_in, weight, dilations, std::nullopt, combine);
  check_multi_dilation_conv_backward_inputs(grad_output, output, shape, x_in);
  const int64_t B = shape.batch, H = shape.height, W = shape.width, cout = shape.out_channels;
  // Gradient of the pre-activation: torch.relu's backward zeroes it where the
  // output <= 0 (and passes it at NaN).
  const at::Tensor grad_pre = relu ? grad_output.masked_fill(output.le(0), 0) : grad_output;
  const at::Tensor grad_bias = grad_pre.sum({0, 2, 3});
  // The gradients come back laid out as empty_like(x) and empty_like(weight).
  if (uses_tap_gemms(B, H, W, dilations)) {
    auto [grad_x, grad_weight] = multi_dilation_conv_taps_backward(grad_pre, x_in, weight, dilations, shape.concat);
    return {grad_x, grad_weight, grad_bias};
  }
  // oneDNN's path (large maps, or dense ones): channels-last.
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad = grad_pre.contiguous(at::MemoryFormat::ChannelsLast);
  const BranchPlan plan = plan_branches(dilations, H, W);
  if (plan.full.size() == 1 && dilations.size() == 1) {
    // One dilated branch (the layer's train mode calls one per branch): its
    // convolution's gradients, copied only if their layout differs from the inputs'.
    auto [gx, gw] = branch_convolution_backward(grad, x, weight.select(0, 0), dilations[0]);
    return {laid_out_like(gx, x_in), laid_out_like(gw.unsqueeze(0), weight), grad_bias};
  }
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  auto grad_centre_of = [&](int64_t i) { return grad_weight.select(0, i).select(2, 1).select(2, 1); };
  at::Tensor grad_x;
  if (!plan.centre.empty()) {
    // The centre GEMMs on the pixel rows: grad_W = G^T X and grad_x = G W.
    const at::Tensor x_rows = channels_last_pixels(x), grad_rows = channels_last_pixels(grad);
    at::Tensor grad_x_rows;
    if (!shape.concat) {  // the centre-only branches all see the whole gradient
      const at::Tensor grad_centre = at::mm(grad_rows.t(), x_rows);
      for (int64_t i : plan.centre) grad_centre_of(i).copy_(grad_centre);
      grad_x_rows = at::mm(grad_rows, centre_weight(weight, plan.centre));
    } else {
      for (int64_t i : plan.centre) {
        const at::Tensor g = grad_rows.narrow(1, i * cout, cout);
        grad_centre_of(i).copy_(at::mm(g.t(), x_rows));
        const at::Tensor part = at::mm(g, weight.select(0, i).select(2, 1).select(2, 1));
        grad_x_rows = grad_x_rows.defined() ? grad_x_rows.add_(part) : part;
      }
    }
    grad_x = grad_x_rows.view({B, H, W, -1}).permute({0, 3, 1, 2});
  }
  for (int64_t i : plan.full) {
    const at::Tensor g = shape.concat ? grad.narrow(1, i * cout, cout) : grad;
    auto [gx, gw] = branch_convolution_backward(g, x, weight.select(0, i), dilations[i]);
    grad_weight.select(0, i).copy_(gw);
    grad_x = grad_x.defined() ? grad_x.add_(gx) : gx;
  }
  return {laid_out_like(grad_x, x_in), laid_out_like(grad_weight, weight), grad_bias};
}

}  // namespace

// Called by cpu_capability.cpp for the capability in force (CPU kernels).
void register_multi_dilation_conv_cpu(torch::Library& m) {
  m.impl("multi_dilation_conv", &multi_dilation_conv_cpu);
  m.impl("multi_dilation_conv_backward", &multi_dilation_conv_backward_cpu);
}

}  // namespace MEDMTL_CPU_NS
}  // namespace medmtl
