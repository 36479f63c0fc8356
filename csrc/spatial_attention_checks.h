// Input checks of spatial_attention, shared by the CPU and CUDA wrappers.
#pragma once

#include <ATen/ATen.h>

namespace medmtl {

inline void check_spatial_attention_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, "spatial_attention: x must be 4-D (B, C, H, W), got ", x.dim(), "-D of shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "spatial_attention: x must have a floating dtype, got ",
              x.scalar_type());
  for (int64_t d = 1; d < 4; ++d)
    TORCH_CHECK(x.size(d) > 0, "spatial_attention: x must have non-empty channel and spatial dimensions, got ",
                x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == 2 && weight.size(2) == weight.size(3) &&
                  weight.size(2) % 2 == 1,
              "spatial_attention: weight must have shape (1, 2, K, K) with K odd, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "spatial_attention: weight must have the dtype of x (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "spatial_attention: weight must be on the device of x (", x.device(),
              "), got ", weight.device());
}

inline void check_spatial_attention_backward_inputs(const at::Tensor& grad_output, const at::Tensor& x) {
  TORCH_CHECK(grad_output.sizes() == x.sizes(), "spatial_attention_backward: grad_output must have the shape of x (",
              x.sizes(), "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == x.scalar_type(),
              "spatial_attention_backward: grad_output must have the dtype of x (", x.scalar_type(), "), got ",
              grad_output.scalar_type());
}

}  // namespace medmtl
