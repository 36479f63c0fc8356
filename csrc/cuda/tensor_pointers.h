// What the CUDA wrappers hand to the torch-free launchers: raw pointers of the
// launchers' element types, and the layout helpers the fake kernels imply.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../layout.h"

namespace medmtl {

// The CUDA type of an ATen scalar type (same size and layout).
template <typename scalar_t>
struct CudaScalar {
  using type = scalar_t;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
using cuda_scalar_t = typename CudaScalar<scalar_t>::type;

// t's data (from element `offset` on) as the launchers' type; nullptr when t is undefined.
template <typename scalar_t>
const cuda_scalar_t<scalar_t>* device_ptr(const at::Tensor& t, int64_t offset = 0) {
  return t.defined() ? reinterpret_cast<const cuda_scalar_t<scalar_t>*>(t.const_data_ptr<scalar_t>()) + offset
                     : nullptr;
}

// t's data as the launchers' type; nullptr when t is empty.
template <typename scalar_t>
cuda_scalar_t<scalar_t>* device_mutable_ptr(at::Tensor& t) {
  return t.numel() > 0 ? reinterpret_cast<cuda_scalar_t<scalar_t>*>(t.mutable_data_ptr<scalar_t>()) : nullptr;
}

// A scratch buffer's data (accumulators, indices); nullptr when it is empty.
template <typename T>
T* scratch_ptr(at::Tensor& t) {
  return t.numel() > 0 ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace medmtl
