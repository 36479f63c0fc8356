// CUDA backend of medmtl::window_attention: torch wrappers around the
// launchers of window_attention_kernel.cu, with the input checks shared with
// the CPU wrappers (csrc/window_attention_checks.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../window_attention_checks.h"
#include "index_range.h"
#include "plan_tensors.h"
#include "tensor_pointers.h"
#include "window_attention_kernel.h"

namespace medmtl {
namespace {

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernels, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on the device of q (", q.device(), "), got ",
              t.device());
}


// What core::window_index_extent measures.
constexpr const char* kExtent =
    "the largest of batch * padded tokens * heads, window tokens * head_dim and table rows * heads";

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> window_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, at::IntArrayRef window_size,
                                                         at::IntArrayRef shift_size, const at::Tensor& table_in,
                                                         const at::Tensor& pad_key_in, const at::Tensor& pad_value_in,
                                                         double scale) {
  const char* op = "window_attention";
  const core::WindowGeometry g = check_window_attention_inputs(op, q_in, k_in, v_in, window_size, shift_size,
                                                               table_in, pad_key_in, pad_value_in, scale);
  check_cuda(op, "q", q_in, q_in);
  check_index_range(op, "q", kExtent, core::window_index_extent(g));
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_contiguous_head_dim(q_in), k = with_contiguous_head_dim(k_in),
                   v = with_contiguous_head_dim(v_in);
  const at::Tensor table = table_in.contiguous(), pad_key = pad_key_in.contiguous(),
                   pad_value = pad_value_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(lse_dtype(q)));
  if (g.batch == 0) return {out, lse};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention_cuda", [&] {
    using acc_t = cuda::acc_type<cuda_scalar_t<scalar_t>>;
    C10_CUDA_CHECK(cuda::launch_window_attention_forward(
        g, device_ptr<scalar_t>(q), token_strides(q), device_ptr<scalar_t>(k), token_strides(k),
        device_ptr<scalar_t>(v), token_strides(v), device_ptr<scalar_t>(table), device_ptr<scalar_t>(pad_key),
        device_ptr<scalar_t>(pad_value), scale, device_mutable_ptr<scalar_t>(out), lse.mutable_data_ptr<acc_t>(), stream));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const at::Tensor& table_in, const at::Tensor& pad_key_in, const at::Tensor& pad_value_in, double scale) {
  const char* op = "window_attention_backward";
  const core::WindowGeometry g = check_window_attention_inputs(op, q_in, k_in, v_in, window_size, shift_size,
                                                               table_in, pad_key_in, pad_value_in, scale);
  check_window_attention_backward_inputs(grad_out_in, q_in, out_in, lse_in);
  check_cuda(op, "q", q_in, q_in);
  check_index_range(op, "q", kExtent, core::window_index_extent(g));
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_contiguous_head_dim(q_in), k = with_contiguous_head_dim(k_in),
                   v = with_contiguous_head_dim(v_in);
  const at::Tensor grad_out = with_contiguous_head_dim(grad_out_in), out = with_contiguous_head_dim(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor table = table_in.contiguous(), pad_key = pad_key_in.contiguous(),
                   pad_value = pad_value_in.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(q.sizes(), q.options());
  at::Tensor grad_v = at::empty(q.sizes(), q.options());
  at::Tensor grad_table, grad_pad_key, grad_pad_value;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention_backward_cuda", [&] {
    using cuda_t = cuda_scalar_t<scalar_t>;
    using acc_t = cuda::acc_type<cuda_t>;
    constexpr at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const cuda::WindowAttentionWorkspace ws = cuda::window_attention_workspace<cuda_t>(g);
    const cuda::WindowAttentionBackwardPlan plan = cuda::window_attention_backward_plan(
        g.table_rows, g.heads, g.head_dim, ws.partials, ws.delta_elements, ws.grad_q_acc_elements);
    // Per-window partials, every element written by the kernels (none for an empty batch).
    at::Tensor table_partial = plan_tensor(plan.grad_table_partial, q.options(), acc);
    at::Tensor pad_key_partial = plan_tensor(plan.grad_pad_key_partial, q.options(), acc);
    at::Tensor pad_value_partial = plan_tensor(plan.grad_pad_value_partial, q.options(), acc);
    at::Tensor delta = plan_tensor(plan.delta, q.options(), acc);
    at::Tensor grad_q_acc = plan_tensor(plan.grad_q_acc, q.options(), acc);
    C10_CUDA_CHECK(cuda::launch_window_attention_backward(
        g, device_ptr<scalar_t>(grad_out), token_strides(grad_out), device_ptr<scalar_t>(q), token_strides(q),
        device_ptr<scalar_t>(k), token_strides(k), device_ptr<scalar_t>(v), token_strides(v), device_ptr<scalar_t>(out),
        token_strides(out), lse.const_data_ptr<acc_t>(), device_ptr<scalar_t>(table), device_ptr<scalar_t>(pad_key),
        device_ptr<scalar_t>(pad_value), scale, device_mutable_ptr<scalar_t>(grad_q),
        device_mutable_ptr<scalar_t>(grad_k), device_mutable_ptr<scalar_t>(grad_v), scratch_ptr<acc_t>(table_partial),
        scratch_ptr<acc_t>(pad_key_partial), scratch_ptr<acc_t>(pad_value_partial), scratch_ptr<acc_t>(delta),
        scratch_ptr<acc_t>(grad_q_acc), stream));
    grad_table = plan_reduce(plan.grad_table_partial, table_partial, q.scalar_type());
    grad_pad_key = plan_reduce(plan.grad_pad_key_partial, pad_key_partial, q.scalar_type());
    grad_pad_value = plan_reduce(plan.grad_pad_value_partial, pad_value_partial, q.scalar_type());
  });
  return {grad_q, grad_k, grad_v, grad_table, grad_pad_key, grad_pad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(medmtl, CUDA, m) {
  m.impl("window_attention", &window_attention_cuda);
  m.impl("window_attention_backward", &window_attention_backward_cuda);
}

}  // namespace medmtl
