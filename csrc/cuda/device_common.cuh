// Device helpers shared by the .cu files: conversions between a kernel's
// storage type and its accumulation type (acc_type: float, double for double;
// explicit intrinsics, as torch builds with __CUDA_NO_HALF_CONVERSIONS__), and
// warp and block sums.
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

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32; every thread calls it);
// the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t partial[kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < warps ? partial[lane] : acc_t(0));
  __syncthreads();  // `partial` may be reused by the next call
  return v;
}

}  // namespace cuda
}  // namespace medmtl
