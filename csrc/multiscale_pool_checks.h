// Input checks and output layout of multiscale_pool, shared by the CPU and
// CUDA wrappers (the Python functional checks the same things first, with the
// same wording, so every backend rejects the same inputs).
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <string>
#include <vector>

namespace medmtl {

// Where each level's values go in the (B, total) output and in the flat
// scale/shift vectors.
struct MultiscalePoolLayout {
  int spatial_dims = 2;
  int64_t batch = 0;
  int64_t bins_per_channel = 0;          // sum over sizes of s^spatial_dims
  std::vector<int64_t> channels;         // C_i
  std::vector<int64_t> channel_offset;   // sum_{j<i} C_j, index into scale/shift
  std::vector<int64_t> output_offset;    // column of level i's first value
  std::vector<int64_t> size_offset;      // per size, bins before it (within a channel)
  int64_t total_columns = 0;
};

inline MultiscalePoolLayout check_multiscale_pool_inputs(
    at::TensorList features, at::IntArrayRef output_sizes, c10::string_view mode,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(!features.empty(), "multiscale_pool: features must be a non-empty list of tensors, got an empty list");
  const at::Tensor& first = features[0];
  TORCH_CHECK(first.dim() == 4 || first.dim() == 5,
              "multiscale_pool: features[0] must be 4-D (B, C, H, W) or 5-D (B, C, D, H, W), got ",
              first.dim(), "-D of shape ", first.sizes());
  MultiscalePoolLayout layout;
  layout.spatial_dims = static_cast<int>(first.dim()) - 2;
  layout.batch = first.size(0);
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& x = features[i];
    TORCH_CHECK(x.dim() == first.dim(), "multiscale_pool: features[", i, "] must be ", first.dim(),
                "-D like features[0], got ", x.dim(), "-D of shape ", x.sizes());
    TORCH_CHECK(at::isFloatingType(x.scalar_type()), "multiscale_pool: features[", i,
                "] must have a floating dtype, got ", x.scalar_type());
    TORCH_CHECK(x.scalar_type() == first.scalar_type(), "multiscale_pool: features[", i,
                "] must have the dtype of features[0] (", first.scalar_type(), "), got ",
                x.scalar_type());
    TORCH_CHECK(x.device() == first.device(), "multiscale_pool: features[", i,
                "] must be on the device of features[0] (", first.device(), "), got ", x.device());
    TORCH_CHECK(x.size(0) == layout.batch, "multiscale_pool: features[", i,
                "] must have the batch size of features[0] (", layout.batch, "), got ", x.size(0));
    for (int64_t d = 1; d < x.dim(); ++d)
      TORCH_CHECK(x.size(d) > 0, "multiscale_pool: features[", i,
                  "] must have non-empty channel and spatial dimensions, got shape ", x.sizes());
    layout.channel_offset.push_back(
        layout.channels.empty() ? 0 : layout.channel_offset.back() + layout.channels.back());
    layout.channels.push_back(x.size(1));
  }
  TORCH_CHECK(!output_sizes.empty(), "multiscale_pool: output_sizes must be a non-empty list of positive ints, got []");
  // Bins per channel (sum of s^d) below 2^31, as the Python checks: the kernels
  // index a channel's bins in int32. s <= 46340 first, so s * s * s cannot overflow.
  constexpr int64_t kMaxOutputSize = 46340, kMaxBinsPerChannel = (int64_t{1} << 31) - 1;
  for (int64_t s : output_sizes) {
    TORCH_CHECK(s > 0, "multiscale_pool: output_sizes must hold positive ints, got ", output_sizes);
    TORCH_CHECK(s <= kMaxOutputSize, "multiscale_pool: output_sizes must each be at most ", kMaxOutputSize,
                " (s^2 bins per channel must fit int32), got ", output_sizes);
    layout.size_offset.push_back(layout.bins_per_channel);
    int64_t bins = s * s;
    if (layout.spatial_dims == 3) bins *= s;
    layout.bins_per_channel += bins;
    TORCH_CHECK(layout.bins_per_channel <= kMaxBinsPerChannel, "multiscale_pool: output_sizes must give at most ",
                kMaxBinsPerChannel, " bins per channel (the sum of s^", layout.spatial_dims, "), got ",
                output_sizes);
  }
  TORCH_CHECK(mode == "avg" || mode == "max", "multiscale_pool: mode must be 'avg' or 'max', got '",
              std::string(mode), "'");
  const int64_t total_channels = layout.channel_offset.back() + layout.channels.back();
  for (const auto& [name, param] : {std::make_pair("scale", &scale), std::make_pair("shift", &shift)}) {
    if (!param->has_value()) continue;
    const at::Tensor& p = param->value();
    TORCH_CHECK(p.dim() == 1 && p.size(0) == total_channels, "multiscale_pool: ", name,
                " must be 1-D of length ", total_channels, " (the levels' channels), got shape ",
                p.sizes());
    TORCH_CHECK(p.scalar_type() == first.scalar_type(), "multiscale_pool: ", name,
                " must have the features' dtype ", first.scalar_type(), ", got ", p.scalar_type());
    TORCH_CHECK(p.device() == first.device(), "multiscale_pool: ", name,
                " must be on the features' device ", first.device(), ", got ", p.device());
  }
  for (int64_t c : layout.channels) {
    layout.output_offset.push_back(layout.total_columns);
    TORCH_CHECK(c <= (std::numeric_limits<int64_t>::max() - layout.total_columns) / layout.bins_per_channel,
                "multiscale_pool: the output of features (channels ", layout.channels, ") pooled to output_sizes ",
                output_sizes, " has more columns than int64 holds");
    layout.total_columns += c * layout.bins_per_channel;
  }
  return layout;
}

// The backward's checks: the forward's, and grad_output's shape and dtype.
inline MultiscalePoolLayout check_multiscale_pool_backward_inputs(
    const at::Tensor& grad_output, at::TensorList features, at::IntArrayRef output_sizes,
    c10::string_view mode, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift) {
  MultiscalePoolLayout layout = check_multiscale_pool_inputs(features, output_sizes, mode, scale, shift);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == layout.batch &&
                  grad_output.size(1) == layout.total_columns,
              "multiscale_pool_backward: grad_output must have shape (", layout.batch, ", ",
              layout.total_columns, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == features[0].scalar_type(),
              "multiscale_pool_backward: grad_output must have the features' dtype ",
              features[0].scalar_type(), ", got ", grad_output.scalar_type());
  return layout;
}

}  // namespace medmtl
