// CUDA backend of medmtl::multiscale_pool: torch wrappers around the launchers
// of multiscale_pool_kernel.cu (one set of launches per level), mirroring the
// CPU wrappers in csrc/cpu/multiscale_pool_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "../multiscale_pool_checks.h"
#include "index_range.h"
#include "multiscale_pool_kernel.h"
#include "plan_tensors.h"
#include "tensor_pointers.h"

namespace medmtl {
namespace {

bool is_channels_last(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  return x.is_contiguous(x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                      : at::MemoryFormat::ChannelsLast3d);
}

// The launchers' view of level i (of a contiguous x).
cuda::MultiscalePoolLevel level_of(const at::Tensor& x, at::IntArrayRef sizes,
                                   const MultiscalePoolLayout& layout, size_t i) {
  cuda::MultiscalePoolLevel level;
  level.batch = x.size(0);
  level.channels = x.size(1);
  level.spatial_dims = layout.spatial_dims;
  level.depth = layout.spatial_dims == 3 ? x.size(2) : 1;
  level.height = x.size(-2);
  level.width = x.size(-1);
  level.sizes = sizes.data();
  level.size_offset = layout.size_offset.data();
  level.num_sizes = static_cast<int64_t>(sizes.size());
  level.bins_per_channel = layout.bins_per_channel;
  level.out_row = layout.total_columns;
  level.level_col = layout.output_offset[i];
  return level;
}

// Contiguous scale / shift, or an undefined tensor when absent.
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& p) {
  return p.has_value() ? p->contiguous() : at::Tensor();
}

template <typename scalar_t>
const cuda_scalar_t<scalar_t>* param_ptr(const at::Tensor& p, int64_t offset) {
  return p.defined() ? device_ptr<scalar_t>(p, offset) : nullptr;
}

// The backward kernel's 32-bit index math: planes (B * C), positions in a plane and the
// adaptive-bin products (position + 1) * (output size + 1).
void check_backward_index_range(at::TensorList features, at::IntArrayRef output_sizes) {
  const char* op = "multiscale_pool_backward";
  int64_t largest_size = 0;
  for (int64_t s : output_sizes) largest_size = std::max(largest_size, s);
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& x = features[i];
    const std::string name = "features[" + std::to_string(i) + "]";
    int64_t extent = 0, plane = 1;
    for (int64_t d = 2; d < x.dim(); ++d) {
      extent = std::max(extent, x.size(d));
      plane *= x.size(d);
    }
    check_index_range(op, name.c_str(), "its number of planes B * C", x.size(0) * x.size(1));
    check_index_range(op, name.c_str(), "its plane size", plane);
    check_index_range(op, name.c_str(), "(largest spatial size + 1) * (largest output size + 1)",
                      (extent + 1) * (largest_size + 1));
  }
}

void check_on_cuda(const at::Tensor& first, const char* op) {
  TORCH_CHECK(first.is_cuda(), op, ": features must be CUDA tensors for the CUDA kernels, got ",
              first.device());
}

at::Tensor multiscale_pool_cuda(at::TensorList features, at::IntArrayRef output_sizes,
                                c10::string_view mode, const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift, bool relu) {
  const MultiscalePoolLayout layout =
      check_multiscale_pool_inputs(features, output_sizes, mode, scale, shift);
  check_on_cuda(features[0], "multiscale_pool");
  const c10::cuda::CUDAGuard device_guard(features[0].device());
  at::Tensor out = at::empty({layout.batch, layout.total_columns}, features[0].options());
  if (layout.batch == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor sc = contiguous_or_undefined(scale), sh = contiguous_or_undefined(shift);
  const bool is_max = mode == "max";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "multiscale_pool_cuda", [&] {
    for (size_t i = 0; i < features.size(); ++i) {
      const at::Tensor x = features[i].contiguous();
      const int64_t c0 = layout.channel_offset[i];
      C10_CUDA_CHECK(cuda::launch_multiscale_pool_forward(
          level_of(x, output_sizes, layout, i), device_ptr<scalar_t>(x),
          param_ptr<scalar_t>(sc, c0), param_ptr<scalar_t>(sh, c0), relu, is_max,
          device_mutable_ptr<scalar_t>(out), stream));
    }
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> multiscale_pool_backward_cuda(
    const at::Tensor& grad_output, at::TensorList features, at::IntArrayRef output_sizes,
    c10::string_view mode, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, bool relu) {
  const MultiscalePoolLayout layout = check_multiscale_pool_backward_inputs(
      grad_output, features, output_sizes, mode, scale, shift);
  check_on_cuda(features[0], "multiscale_pool_backward");
  check_backward_index_range(features, output_sizes);
  TORCH_CHECK(grad_output.device() == features[0].device(),
              "multiscale_pool_backward: grad_output must be on the features' device ",
              features[0].device(), ", got ", grad_output.device());
  const c10::cuda::CUDAGuard device_guard(features[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor sc = contiguous_or_undefined(scale), sh = contiguous_or_undefined(shift);
  const bool is_max = mode == "max";
  std::vector<at::Tensor> grads, scale_grads, shift_grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "multiscale_pool_backward_cuda", [&] {
    using cuda_t = cuda_scalar_t<scalar_t>;
    using acc_t = cuda::acc_type<cuda_t>;
    constexpr at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    for (size_t i = 0; i < features.size(); ++i) {
      const at::Tensor x = features[i].contiguous();
      const cuda::MultiscalePoolLevel level = level_of(x, output_sizes, layout, i);
      const cuda::MultiscalePoolBackwardWorkspace ws =
          cuda::multiscale_pool_backward_workspace(level, is_max);
      const cuda::MultiscalePoolBackwardPlan plan = cuda::multiscale_pool_backward_plan(
          layout.batch, layout.channels[i], ws.partials_per_plane, ws.argmax_elements, ws.grad_elements);
      at::Tensor gx = at::empty(x.sizes(), x.options());
      at::Tensor gsc = plan_tensor(plan.grad_scale_partial, go.options(), acc);
      at::Tensor gsh = plan_tensor(plan.grad_shift_partial, go.options(), acc);
      at::Tensor argmax = plan_tensor(plan.argmax, go.options(), acc);
      at::Tensor scratch = plan_tensor(plan.grad_scratch, go.options(), acc);
      const int64_t c0 = layout.channel_offset[i];
      C10_CUDA_CHECK(cuda::launch_multiscale_pool_backward(
          level, device_ptr<scalar_t>(go), device_ptr<scalar_t>(x), param_ptr<scalar_t>(sc, c0),
          param_ptr<scalar_t>(sh, c0), relu, is_max, device_mutable_ptr<scalar_t>(gx),
          gsc.mutable_data_ptr<acc_t>(), gsh.mutable_data_ptr<acc_t>(),
          ws.argmax_elements > 0 ? argmax.mutable_data_ptr<int64_t>() : nullptr,
          ws.grad_elements > 0 ? scratch.mutable_data_ptr<acc_t>() : nullptr, stream));
      // Same memory format as the CPU kernel (and the fake kernel's empty_like).
      grads.push_back(is_channels_last(features[i])
                          ? gx.contiguous(x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                       : at::MemoryFormat::ChannelsLast3d)
                          : gx);
      scale_grads.push_back(plan_reduce(plan.grad_scale_partial, gsc, acc));
      shift_grads.push_back(plan_reduce(plan.grad_shift_partial, gsh, acc));
    }
  });
  const auto dtype = features[0].scalar_type();
  return {grads, at::cat(scale_grads).to(dtype), at::cat(shift_grads).to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(medmtl, CUDA, m) {
  m.impl("multiscale_pool", &multiscale_pool_cuda);
  m.impl("multiscale_pool_backward", &multiscale_pool_backward_cuda);
}

}  // namespace medmtl
