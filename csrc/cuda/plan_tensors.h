// The tensors of a launch plan (launch_plan.h): allocating a PlanBuffer and
// reducing a buffer of partial sums to its gradient, as the plan says.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "launch_plan.h"

namespace medmtl {

// A tensor for buffer b; options give the device and the op's dtype, acc its
// accumulation dtype. Zero-filled when the plan says so, else uninitialised.
inline at::Tensor plan_tensor(const cuda::PlanBuffer& b, const at::TensorOptions& options, at::ScalarType acc) {
  at::ScalarType dtype = acc;
  switch (b.element) {
    case cuda::PlanElement::kScalar: dtype = options.dtype().toScalarType(); break;
    case cuda::PlanElement::kAcc: dtype = acc; break;
    case cuda::PlanElement::kInt32: dtype = at::kInt; break;
    case cuda::PlanElement::kInt64: dtype = at::kLong; break;
  }
  const std::vector<int64_t> sizes(b.sizes, b.sizes + b.rank);
  return b.zero_fill ? at::zeros(sizes, options.dtype(dtype)) : at::empty(sizes, options.dtype(dtype));
}

// The gradient from buffer b's partial sums: summed over b.sum_dims, viewed
// as b.result_sizes and permuted by b.result_order (if given), cast to dtype.
inline at::Tensor plan_reduce(const cuda::PlanBuffer& b, const at::Tensor& partial, at::ScalarType dtype) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < b.rank; ++d)
    if ((b.sum_dims >> d) & 1) dims.push_back(d);
  at::Tensor r = partial.sum(dims);
  if (b.result_rank > 0)
    r = r.view(at::IntArrayRef(b.result_sizes, b.result_rank)).permute(at::IntArrayRef(b.result_order, b.result_rank));
  return r.to(dtype);
}

}  // namespace medmtl
