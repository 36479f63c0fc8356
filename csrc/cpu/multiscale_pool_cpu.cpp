// CPU kernels of medmtl::multiscale_pool: one pass over each level, planes
// (NCHW) or channel blocks (channels-last) in parallel, the per-plane work in
// csrc/core/multiscale_pool.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../multiscale_pool_checks.h"

// Everything below is compiled per CPU capability (cpu_capability.h).
#include "cpu_capability_target.h"
// After the target: one copy of its loops per capability (core/cpu_copy.h).
#include "../core/multiscale_pool.h"

namespace medmtl {
inline namespace MEDMTL_CPU_NS {
namespace {

constexpr int64_t kChannelBlock = 64;  // channels per task in the channels-last path

bool is_channels_last(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  return x.is_contiguous(x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                      : at::MemoryFormat::ChannelsLast3d);
}

core::PoolPlan plan_of(const at::Tensor& x, at::IntArrayRef sizes) {
  core::PoolGeometry g;
  g.spatial_dims = static_cast<int>(x.dim()) - 2;
  g.depth = g.spatial_dims == 3 ? x.size(2) : 1;
  g.height = x.size(-2);
  g.width = x.size(-1);
  g.sizes.assign(sizes.begin(), sizes.end());
  return core::PoolPlan(std::move(g));
}

core::PoolMode mode_of(c10::string_view mode) {
  return mode == "max" ? core::PoolMode::kMax : core::PoolMode::kAvg;
}

// Per-level scale and shift in the accumulation type (1 and 0 when absent).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> affine_param(const std::optional<at::Tensor>& p, int64_t offset,
                                int64_t channels, acc_t fill) {
  std::vector<acc_t> v(channels, fill);
  if (p.has_value()) {
    const at::Tensor values = p->contiguous();
    const scalar_t* data = values.data_ptr<scalar_t>() + offset;
    for (int64_t c = 0; c < channels; ++c) v[c] = static_cast<acc_t>(data[c]);
  }
  return v;
}

template <typename scalar_t, bool kRelu>
void forward_level(const at::Tensor& input, at::IntArrayRef sizes, core::PoolMode mode,
                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                   const MultiscalePoolLayout& layout, size_t level, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const core::PoolPlan plan = plan_of(input, sizes);
  const int64_t B = input.size(0), C = input.size(1), total = plan.total_bins;
  const int64_t num_sizes = static_cast<int64_t>(sizes.size());
  const std::vector<acc_t> sc = affine_param<scalar_t, acc_t>(scale, layout.channel_offset[level], C, 1);
  const std::vector<acc_t> sh = affine_param<scalar_t, acc_t>(shift, layout.channel_offset[level], C, 0);
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const int64_t out_row = out.size(1), level_col = layout.output_offset[level];
  // Writes one channel's compact bins into its places in the output row of b.
  auto place = [&](int64_t b, int64_t c, const acc_t* bins) {
    scalar_t* o = out_data + b * out_row + level_col;
    for (int64_t k = 0; k < num_sizes; ++k) {
      const int64_t off = layout.size_offset[k];
      const int64_t n = (k + 1 < num_sizes ? layout.size_offset[k + 1] : total) - off;
      for (int64_t i = 0; i < n; ++i) o[C * off + c * n + i] = static_cast<scalar_t>(bins[off + i]);
    }
  };
  if (is_channels_last(input)) {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> t(kChannelBlock), bins(total * kChannelBlock), one(total);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, c0 = (task % blocks) * kChannelBlock;
        const int64_t cb = std::min(kChannelBlock, C - c0);
        core::pool_channels_last_forward<kRelu, scalar_t, acc_t>(
            x + b * input.stride(0) + c0, C, cb, plan, mode, sc.data() + c0, sh.data() + c0,
            t.data(), bins.data(), nullptr);
        for (int64_t c = 0; c < cb; ++c) {
          for (int64_t i = 0; i < total; ++i) one[i] = bins[i * cb + c];
          place(b, c0 + c, one.data());
        }
      }
    });
  } else {
    const at::Tensor xc = input.contiguous();
    const scalar_t* x = xc.data_ptr<scalar_t>();
    const int64_t plane = plan.g.plane_size();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(plan.plane_scratch_size()), bins(total);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        core::pool_plane_forward<kRelu, scalar_t, acc_t>(x + p * plane, plan, mode, sc[c], sh[c],
                                                         scratch.data(), bins.data());
        place(p / C, c, bins.data());
      }
    });
  }
}

at::Tensor multiscale_pool_cpu(at::TensorList features, at::IntArrayRef output_sizes,
                               c10::string_view mode, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift, bool relu) {
  const MultiscalePoolLayout layout =
      check_multiscale_pool_inputs(features, output_sizes, mode, scale, shift);
  at::Tensor out = at::empty({layout.batch, layout.total_columns}, features[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "multiscale_pool_cpu", [&] {
    core::with_relu(relu, [&](auto relu_constant) {
      for (size_t i = 0; i < features.size(); ++i)
        forward_level<scalar_t, decltype(relu_constant)::value>(features[i], output_sizes, mode_of(mode),
                                                                scale, shift, layout, i, out);
    });
  });
  return out;
}

template <typename scalar_t, bool kRelu>
void backward_level(const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef sizes,
                    core::PoolMode mode, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& shift,
                    const MultiscalePoolLayout& layout, size_t level, at::Tensor& grad_input,
                    at::Tensor& grad_scale_partial, at::Tensor& grad_shift_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const core::PoolPlan plan = plan_of(input, sizes);
  const int64_t B = input.size(0), C = input.size(1), total = plan.total_bins;
  const int64_t num_sizes = static_cast<int64_t>(sizes.size());
  const std::vector<acc_t> sc = affine_param<scalar_t, acc_t>(scale, layout.channel_offset[level], C, 1);
  const std::vector<acc_t> sh = affine_param<scalar_t, acc_t>(shift, layout.channel_offset[level], C, 0);
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  const int64_t out_row = grad_out.size(1), level_col = layout.output_offset[level];
  acc_t* gsc = grad_scale_partial.data_ptr<acc_t>();  // (B, C)
  acc_t* gsh = grad_shift_partial.data_ptr<acc_t>();
  // Gathers one channel's output gradient into compact bin order.
  auto gather = [&](int64_t b, int64_t c, acc_t* bins) {
    const scalar_t* o = go + b * out_row + level_col;
    for (int64_t k = 0; k < num_sizes; ++k) {
      const int64_t off = layout.size_offset[k];
      const int64_t n = (k + 1 < num_sizes ? layout.size_offset[k + 1] : total) - off;
      for (int64_t i = 0; i < n; ++i) bins[off + i] = static_cast<acc_t>(o[C * off + c * n + i]);
    }
  };
  const bool is_max = mode == core::PoolMode::kMax;
  if (is_channels_last(input)) {
    const scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* gx = grad_input.data_ptr<scalar_t>();
    const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> t(kChannelBlock), gt(kChannelBlock), one(total);
      std::vector<acc_t> go_bins(total * kChannelBlock), scratch(total * kChannelBlock);
      std::vector<int64_t> argmax(is_max ? total * kChannelBlock : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, c0 = (task % blocks) * kChannelBlock;
        const int64_t cb = std::min(kChannelBlock, C - c0);
        for (int64_t c = 0; c < cb; ++c) {
          gather(b, c0 + c, one.data());
          for (int64_t i = 0; i < total; ++i) go_bins[i * cb + c] = one[i];
        }
        std::fill(gsc + b * C + c0, gsc + b * C + c0 + cb, acc_t(0));
        std::fill(gsh + b * C + c0, gsh + b * C + c0 + cb, acc_t(0));
        core::pool_channels_last_backward<kRelu, scalar_t, acc_t>(
            x + b * input.stride(0) + c0, C, cb, go_bins.data(), plan, mode, sc.data() + c0,
            sh.data() + c0, gx + b * grad_input.stride(0) + c0, gsc + b * C + c0,
            gsh + b * C + c0, t.data(), gt.data(), scratch.data(), argmax.data());
      }
    });
  } else {
    const at::Tensor xc = input.contiguous();
    const scalar_t* x = xc.data_ptr<scalar_t>();
    scalar_t* gx = grad_input.data_ptr<scalar_t>();
    const int64_t plane = plan.g.plane_size();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> bins(total), scratch(plan.plane_scratch_size());
      std::vector<int64_t> argmax(is_max ? total : 0);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        gather(p / C, c, bins.data());
        const core::AffineGradSums<acc_t> sums = core::pool_plane_backward<kRelu, scalar_t, acc_t>(
            x + p * plane, bins.data(), plan, mode, sc[c], sh[c], gx + p * plane,
            scratch.data(), argmax.data());
        gsc[p] = sums.grad_scale;
        gsh[p] = sums.grad_shift;
      }
    });
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> multiscale_pool_backward_cpu(
    const at::Tensor& grad_output, at::TensorList features, at::IntArrayRef output_sizes,
    c10::string_view mode, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, bool relu) {
  const MultiscalePoolLayout layout = check_multiscale_pool_backward_inputs(
      grad_output, features, output_sizes, mode, scale, shift);
  const at::Tensor go = grad_output.contiguous();
  std::vector<at::Tensor> grads, scale_grads, shift_grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "multiscale_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = go.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    for (size_t i = 0; i < features.size(); ++i) {
      const at::Tensor& x = features[i];
      at::Tensor gx = is_channels_last(x) ? at::empty_like(x) : at::empty(x.sizes(), x.options());
      at::Tensor gsc = at::empty({layout.batch, layout.channels[i]}, acc_options);
      at::Tensor gsh = at::empty({layout.batch, layout.channels[i]}, acc_options);
      core::with_relu(relu, [&](auto relu_constant) {
        backward_level<scalar_t, decltype(relu_constant)::value>(go, x, output_sizes, mode_of(mode), scale,
                                                                 shift, layout, i, gx, gsc, gsh);
      });
      grads.push_back(gx);
      scale_grads.push_back(gsc.sum(0));
      shift_grads.push_back(gsh.sum(0));
    }
  });
  const auto dtype = features[0].scalar_type();
  return {grads, at::cat(scale_grads).to(dtype), at::cat(shift_grads).to(dtype)};
}

}  // namespace

// Called by cpu_capability.cpp for the capability in force (CPU kernels).
void register_multiscale_pool_cpu(torch::Library& m) {
  m.impl("multiscale_pool", &multiscale_pool_cpu);
  m.impl("multiscale_pool_backward", &multiscale_pool_backward_cpu);
}

}  // namespace MEDMTL_CPU_NS
}  // namespace medmtl
