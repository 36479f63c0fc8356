// CUDA backend of medmtl::spatial_attention: torch wrappers around the
// launchers of spatial_attention_kernel.cu, with the input checks shared with
// the CPU wrappers (csrc/spatial_attention_checks.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../spatial_attention_checks.h"
#include "index_range.h"
#include "plan_tensors.h"
#include "spatial_attention_kernel.h"
#include "tensor_pointers.h"

namespace medmtl {
namespace {

cuda::SpatialAttentionDims dims_of(const at::Tensor& x, const at::Tensor& weight) {
  cuda::SpatialAttentionDims dims;
  dims.batch = x.size(0);
  dims.channels = x.size(1);
  dims.height = x.size(2);
  dims.width = x.size(3);
  dims.kernel_size = weight.size(-1);
  return dims;
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernels, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t.device());
}

// The first maximal channel is kept as an int32; the element index of x is 32-bit.
void check_channels(const char* op, const at::Tensor& x) {
  check_index_range(op, "x", "its number of elements B * C * H * W", x.numel());
}

at::Tensor spatial_attention_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, bool contiguous_output) {
  check_spatial_attention_inputs(x_in, weight_in);
  check_cuda("spatial_attention", "x", x_in, x_in);
  check_channels("spatial_attention", x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  // The kernels write NCHW: kept so when contiguous_output, else laid out as x.
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.size(0) == 0) return contiguous_output ? out : laid_out_like(out, x_in);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cuda::SpatialAttentionDims dims = dims_of(x, weight);
  const cuda::SpatialAttentionWorkspace ws = cuda::spatial_attention_workspace(dims);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_cuda", [&] {
    using acc_t = cuda::acc_type<cuda_scalar_t<scalar_t>>;
    constexpr at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const cuda::SpatialAttentionForwardPlan plan =
        cuda::spatial_attention_forward_plan(ws.pooled_elements, ws.gate_elements);
    at::Tensor pooled = plan_tensor(plan.pooled, x.options(), acc);
    at::Tensor gate = plan_tensor(plan.gate, x.options(), acc);
    C10_CUDA_CHECK(cuda::launch_spatial_attention_forward(
        dims, device_ptr<scalar_t>(x), device_ptr<scalar_t>(weight), device_mutable_ptr<scalar_t>(out),
        scratch_ptr<acc_t>(pooled), scratch_ptr<acc_t>(gate), stream));
  });
  return contiguous_output ? out : laid_out_like(out, x_in);
}

std::tuple<at::Tensor, at::Tensor> spatial_attention_backward_cuda(const at::Tensor& grad_output_in,
                                                                    const at::Tensor& x_in,
                                                                    const at::Tensor& weight_in) {
  check_spatial_attention_inputs(x_in, weight_in);
  check_spatial_attention_backward_inputs(grad_output_in, x_in);
  check_cuda("spatial_attention_backward", "x", x_in, x_in);
  check_cuda("spatial_attention_backward", "grad_output", grad_output_in, x_in);
  check_channels("spatial_attention_backward", x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  const cuda::SpatialAttentionDims dims = dims_of(x, weight);
  const cuda::SpatialAttentionWorkspace ws = cuda::spatial_attention_workspace(dims);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_backward_cuda", [&] {
    using acc_t = cuda::acc_type<cuda_scalar_t<scalar_t>>;
    constexpr at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const cuda::SpatialAttentionBackwardPlan plan = cuda::spatial_attention_backward_plan(
        dims.kernel_size, ws.weight_partials, ws.pooled_elements, ws.argmax_elements, ws.gate_elements,
        ws.grad_logit_elements, ws.grad_pooled_elements);
    at::Tensor weight_partial = plan_tensor(plan.grad_weight_partial, x.options(), acc);
    at::Tensor pooled = plan_tensor(plan.pooled, x.options(), acc);
    at::Tensor argmax = plan_tensor(plan.argmax, x.options(), acc);
    at::Tensor gate = plan_tensor(plan.gate, x.options(), acc);
    at::Tensor grad_logit = plan_tensor(plan.grad_logit, x.options(), acc);
    at::Tensor grad_pooled = plan_tensor(plan.grad_pooled, x.options(), acc);
    C10_CUDA_CHECK(cuda::launch_spatial_attention_backward(
        dims, device_ptr<scalar_t>(grad_output), device_ptr<scalar_t>(x), device_ptr<scalar_t>(weight),
        device_mutable_ptr<scalar_t>(grad_x), weight_partial.mutable_data_ptr<acc_t>(), scratch_ptr<acc_t>(pooled),
        scratch_ptr<int32_t>(argmax), scratch_ptr<acc_t>(gate), scratch_ptr<acc_t>(grad_logit),
        scratch_ptr<acc_t>(grad_pooled), stream));
    grad_weight = plan_reduce(plan.grad_weight_partial, weight_partial, x.scalar_type());
  });
  return {laid_out_like(grad_x, x_in), laid_out_like(grad_weight, weight_in)};
}

}  // namespace

TORCH_LIBRARY_IMPL(medmtl, CUDA, m) {
  m.impl("spatial_attention", &spatial_attention_cuda);
  m.impl("spatial_attention_backward", &spatial_attention_backward_cuda);
}

}  // namespace medmtl
