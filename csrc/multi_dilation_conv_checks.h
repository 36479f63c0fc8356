// Input checks of multi_dilation_conv, shared by the CPU and CUDA wrappers (the
// Python functional checks the same things first, with the same wording).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace medmtl {

struct MultiDilationConvShape {
  int64_t batch = 0, in_channels = 0, height = 0, width = 0;
  int64_t branches = 0, out_channels = 0;  // per branch
  bool concat = false;
  int64_t output_channels() const { return concat ? branches * out_channels : out_channels; }
};

inline MultiDilationConvShape check_multi_dilation_conv_inputs(const at::Tensor& x, const at::Tensor& weight,
                                                               at::IntArrayRef dilations,
                                                               const std::optional<at::Tensor>& bias,
                                                               c10::string_view combine) {
  TORCH_CHECK(x.dim() == 4, "multi_dilation_conv: x must be 4-D (B, Cin, H, W), got ", x.dim(), "-D of shape ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "multi_dilation_conv: x must have a floating dtype, got ",
              x.scalar_type());
  TORCH_CHECK(weight.dim() == 5 && weight.size(3) == 3 && weight.size(4) == 3 && weight.size(0) > 0 &&
                  weight.size(1) > 0,
              "multi_dilation_conv: weight must have shape (n, Cout, Cin, 3, 3) with n, Cout >= 1, got ",
              weight.sizes());
  TORCH_CHECK(weight.size(2) == x.size(1), "multi_dilation_conv: weight's Cin (", weight.size(2),
              ") must equal x's channels (", x.size(1), ")");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "multi_dilation_conv: weight must have the dtype of x (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "multi_dilation_conv: weight must be on the device of x (",
              x.device(), "), got ", weight.device());
  for (int64_t d = 1; d < 4; ++d)
    TORCH_CHECK(x.size(d) > 0, "multi_dilation_conv: x must have non-empty channel and spatial dimensions, got ",
                x.sizes());
  TORCH_CHECK(static_cast<int64_t>(dilations.size()) == weight.size(0),
              "multi_dilation_conv: dilations must have one entry per branch of weight (", weight.size(0),
              "), got ", dilations.size());
  for (int64_t d : dilations)
    TORCH_CHECK(d >= 0, "multi_dilation_conv: dilations must be ints >= 0 (0: a 1x1 branch), got ", dilations);
  TORCH_CHECK(combine == "sum" || combine == "concat", "multi_dilation_conv: combine must be 'sum' or 'concat', got '",
              std::string(combine), "'");
  MultiDilationConvShape shape;
  shape.batch = x.size(0);
  shape.in_channels = x.size(1);
  shape.height = x.size(2);
  shape.width = x.size(3);
  shape.branches = weight.size(0);
  shape.out_channels = weight.size(1);
  shape.concat = combine == "concat";
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == shape.output_channels(), "multi_dilation_conv: bias must be 1-D of length ",
                shape.output_channels(), " for combine='", std::string(combine), "', got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "multi_dilation_conv: bias must have the dtype and device of x (", x.scalar_type(), ", ", x.device(),
                "), got ", bias->scalar_type(), ", ", bias->device());
  }
  return shape;
}

inline void check_multi_dilation_conv_backward_inputs(const at::Tensor& grad_output, const at::Tensor& output,
                                                      const MultiDilationConvShape& shape, const at::Tensor& x) {
  const std::vector<int64_t> expected = {shape.batch, shape.output_channels(), shape.height, shape.width};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "multi_dilation_conv_backward: grad_output must have shape ",
              at::IntArrayRef(expected), ", got ", grad_output.sizes());
  TORCH_CHECK(output.sizes() == at::IntArrayRef(expected), "multi_dilation_conv_backward: output must have shape ",
              at::IntArrayRef(expected), ", got ", output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == x.scalar_type() && output.scalar_type() == x.scalar_type(),
              "multi_dilation_conv_backward: grad_output and output must have the dtype of x (", x.scalar_type(), ")");
}

}  // namespace medmtl
