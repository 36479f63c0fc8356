// Conversions between a kernel's storage type and its accumulation type
// (acc_type: float, double for double), shared by the .cu files. Explicit
// intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "multiscale_pool_kernel.h"  // acc_type

namespace medmtl {
namespace cuda {

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename scalar_t>
struct FromAcc {
  __device__ __forceinline__ static scalar_t cast(acc_type<scalar_t> v) { return v; }
};
template <>
struct FromAcc<__half> {
  __device__ __forceinline__ static __half cast(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cast(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace cuda
}  // namespace medmtl
