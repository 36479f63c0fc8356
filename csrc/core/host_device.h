// MEDMTL_HOST_DEVICE: marks the index math of csrc/core as callable from both
// host code and CUDA kernels (empty outside nvcc / hipcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MEDMTL_HOST_DEVICE __host__ __device__
#else
#define MEDMTL_HOST_DEVICE
#endif
