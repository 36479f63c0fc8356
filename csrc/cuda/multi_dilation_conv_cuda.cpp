// CUDA backend of medmtl::multi_dilation_conv: torch wrappers around the
// launchers of multi_dilation_conv_kernel.cu, with the input checks shared
// with the CPU wrappers (csrc/multi_dilation_conv_checks.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../multi_dilation_conv_checks.h"
#include "index_range.h"
#include "multi_dilation_conv_kernel.h"
#include "plan_tensors.h"
#include "tensor_pointers.h"

namespace medmtl {
namespace {

// The launchers' weight layout: (n, 3, 3, Cin, Cout) contiguous.
at::Tensor packed_weight(const at::Tensor& weight) { return weight.permute({0, 3, 4, 2, 1}).contiguous(); }

cuda::MultiDilationConvDims dims_of(const MultiDilationConvShape& shape, at::IntArrayRef dilations) {
  cuda::MultiDilationConvDims dims;
  dims.batch = shape.batch;
  dims.in_channels = shape.in_channels;
  dims.out_channels = shape.out_channels;
  dims.height = shape.height;
  dims.width = shape.width;
  dims.branches = shape.branches;
  dims.dilations = dilations.data();
  dims.concat = shape.concat;
  return dims;
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernels, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t.device());
}

// The kernels index planes and shifts in 32-bit tap fields.
void check_sizes(const char* op, const MultiDilationConvShape& shape) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(shape.height < kMax && shape.width < kMax && shape.branches * 9 < kMax,
              op, ": x's spatial sizes and the number of branches must fit 32-bit tap indices, got H = ",
              shape.height, ", W = ", shape.width, ", n = ", shape.branches);
  // The conv and grad_bias kernels index the pixels of the batch in 32-bit.
  check_index_range(op, "x", "its number of pixels B * H * W", shape.batch * shape.height * shape.width);
}

at::Tensor multi_dilation_conv_cuda(const at::Tensor& x_in, const at::Tensor& weight, at::IntArrayRef dilations,
                                    const std::optional<at::Tensor>& bias, c10::string_view combine, bool relu) {
  const MultiDilationConvShape shape = check_multi_dilation_conv_inputs(x_in, weight, dilations, bias, combine);
  check_cuda("multi_dilation_conv", "x", x_in, x_in);
  check_sizes("multi_dilation_conv", shape);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  at::Tensor out = at::empty({shape.batch, shape.output_channels(), shape.height, shape.width}, x_in.options());
  if (shape.batch == 0) return out.contiguous(output_format(x_in));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous(), w = packed_weight(weight);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const cuda::MultiDilationConvDims dims = dims_of(shape, dilations);
  const cuda::MultiDilationConvWorkspace ws = cuda::multi_dilation_conv_workspace(dims, relu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_dilation_conv_cuda", [&] {
    using acc_t = cuda::acc_type<cuda_scalar_t<scalar_t>>;
    const cuda::MultiDilationConvForwardPlan plan = cuda::multi_dilation_conv_forward_plan(ws.forward_acc_elements);
    at::Tensor acc = plan_tensor(plan.forward_acc, x.options(), c10::CppTypeToScalarType<acc_t>::value);
    C10_CUDA_CHECK(cuda::launch_multi_dilation_conv_forward(
        dims, device_ptr<scalar_t>(x), device_ptr<scalar_t>(w), device_ptr<scalar_t>(b), relu,
        device_mutable_ptr<scalar_t>(out), scratch_ptr<acc_t>(acc), stream));
  });
  return out.contiguous(output_format(x_in));  // the kernels write NCHW
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_dilation_conv_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& x_in, const at::Tensor& weight, at::IntArrayRef dilations,
    const at::Tensor& output_in, c10::string_view combine, bool relu) {
  const MultiDilationConvShape shape =
      check_multi_dilation_conv_inputs(x_in, weight, dilations, std::nullopt, combine);
  check_multi_dilation_conv_backward_inputs(grad_output_in, output_in, shape, x_in);
  check_cuda("multi_dilation_conv_backward", "x", x_in, x_in);
  check_cuda("multi_dilation_conv_backward", "grad_output", grad_output_in, x_in);
  check_cuda("multi_dilation_conv_backward", "output", output_in, x_in);
  check_sizes("multi_dilation_conv_backward", shape);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous(), w = packed_weight(weight);
  const at::Tensor grad_output = grad_output_in.contiguous(), output = output_in.contiguous();
  const cuda::MultiDilationConvDims dims = dims_of(shape, dilations);
  const cuda::MultiDilationConvWorkspace ws = cuda::multi_dilation_conv_workspace(dims, relu);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_dilation_conv_backward_cuda", [&] {
    using acc_t = cuda::acc_type<cuda_scalar_t<scalar_t>>;
    constexpr at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const cuda::MultiDilationConvBackwardPlan plan = cuda::multi_dilation_conv_backward_plan(
        shape.branches, shape.out_channels, shape.in_channels, shape.output_channels(), ws.weight_partials,
        ws.bias_partials, ws.grad_pre_elements, ws.grad_x_acc_elements);
    // Slots of taps that read only padding (and the unused taps of 1x1 branches) stay 0 (zero_fill).
    at::Tensor weight_partial = plan_tensor(plan.grad_weight_partial, x.options(), acc);
    at::Tensor bias_partial = plan_tensor(plan.grad_bias_partial, x.options(), acc);
    at::Tensor grad_pre = plan_tensor(plan.grad_pre, x.options(), acc);
    at::Tensor grad_x_acc = plan_tensor(plan.grad_x_acc, x.options(), acc);
    C10_CUDA_CHECK(cuda::launch_multi_dilation_conv_backward(
        dims, device_ptr<scalar_t>(grad_output), device_ptr<scalar_t>(x), device_ptr<scalar_t>(w),
        device_ptr<scalar_t>(output), relu, device_mutable_ptr<scalar_t>(grad_x), scratch_ptr<acc_t>(weight_partial),
        scratch_ptr<acc_t>(bias_partial), device_mutable_ptr<scalar_t>(grad_pre), scratch_ptr<acc_t>(grad_x_acc), stream));
    // (n, 3, 3, Cout, Cin) -> (n, Cout, Cin, 3, 3).
    grad_weight = plan_reduce(plan.grad_weight_partial, weight_partial, x.scalar_type());
    grad_bias = plan_reduce(plan.grad_bias_partial, bias_partial, x.scalar_type());
  });
  return {laid_out_like(grad_x, x_in), laid_out_like(grad_weight.contiguous(), weight), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(medmtl, CUDA, m) {
  m.impl("multi_dilation_conv", &multi_dilation_conv_cuda);
  m.impl("multi_dilation_conv_backward", &multi_dilation_conv_backward_cuda);
}

}  // namespace medmtl
