// Host launchers of the CUDA kernels of medmtl::spatial_attention, on raw
// device pointers and a cudaStream_t (no torch headers). The torch wrappers in
// spatial_attention_cuda.cpp check the inputs, allocate the outputs and the
// scratch buffers (sized by spatial_attention_workspace), and sum the
// grad_weight partials.
//
// Layouts: x, out, grad_output, grad_x (B, C, H, W) and weight (1, 2, K, K),
// all contiguous; K odd, the convolution padded by K / 2.
// The kernels index x's elements in 32-bit: the caller checks x.numel() < 2^31
// (csrc/cuda/index_range.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

// acc_type<scalar_t> (float, double for double) is defined with the first CUDA op.
#include "multiscale_pool_kernel.h"

namespace medmtl {
namespace cuda {

struct SpatialAttentionDims {
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int64_t kernel_size = 1;  // K (odd)
};

// Scratch buffers (element counts, all (B, ...) per pixel), and the number of
// grad_weight partials: acc_t (2 * K * K, weight_partials), summed over dim 1
// by the caller, giving the weight's (2, K, K) elements in order.
struct SpatialAttentionWorkspace {
  int64_t pooled_elements = 0;      // acc_t (B, 2, H, W): channel mean, channel max
  int64_t gate_elements = 0;        // acc_t (B, H, W): sigmoid of the convolution
  int64_t argmax_elements = 0;      // int32 (B, H, W): first maximal channel (backward)
  int64_t grad_logit_elements = 0;  // acc_t (B, H, W): gradient before the sigmoid (backward)
  int64_t grad_pooled_elements = 0; // acc_t (B, 2, H, W): gradient of pooled (backward)
  int64_t weight_partials = 1;
};

SpatialAttentionWorkspace spatial_attention_workspace(const SpatialAttentionDims& dims);

// out = x * sigmoid(conv2d(cat(mean_c x, max_c x), weight, padding = K / 2)).
// pooled and gate as sized by the workspace. Launches nothing when the batch
// is empty. Returns the launch status.
template <typename scalar_t>
cudaError_t launch_spatial_attention_forward(const SpatialAttentionDims& dims, const scalar_t* x,
                                             const scalar_t* weight, scalar_t* out,
                                             acc_type<scalar_t>* pooled, acc_type<scalar_t>* gate,
                                             cudaStream_t stream);

// grad_x and the grad_weight partials; the forward's intermediates are
// recomputed into the scratch buffers.
template <typename scalar_t>
cudaError_t launch_spatial_attention_backward(
    const SpatialAttentionDims& dims, const scalar_t* grad_output, const scalar_t* x,
    const scalar_t* weight, scalar_t* grad_x, acc_type<scalar_t>* grad_weight_partial,
    acc_type<scalar_t>* pooled, int32_t* argmax, acc_type<scalar_t>* gate,
    acc_type<scalar_t>* grad_logit, acc_type<scalar_t>* grad_pooled, cudaStream_t stream);

}  // namespace cuda
}  // namespace medmtl
