// Host launchers of the CUDA kernels of medmtl::window_attention (Swin
// shifted-window multi-head attention, flash-attention style), on raw device
// pointers and a cudaStream_t (no torch headers). The torch wrappers in
// window_attention_cuda.cpp check the inputs (csrc/window_attention_checks.h),
// allocate the outputs and the scratch buffers (sized by
// window_attention_workspace), and sum the per-window partials of the
// gradients of the bias table and of the padding key / value.
//
// Layouts: q, k, v, out (forward input) and grad_out are token maps
// (B, [D,] H, W, heads, head_dim) of any element strides with a contiguous
// head_dim (WindowTokenStrides; a 2-D map has depth stride 0). The outputs
// out, grad_q, grad_k, grad_v are contiguous (B, *S, heads, head_dim); lse and
// the delta scratch are contiguous (B, *S, heads) in acc_type. The bias table
// is contiguous (table_rows, heads); pad_key and pad_value contiguous
// (heads, head_dim). The window geometry (effective window, shift, padding,
// regions, bias rows) is core::WindowGeometry, csrc/core/window_geometry.h;
// the kernels use its 32-bit copy, so both launchers return
// cudaErrorInvalidValue, launching nothing, when core::window_index_extent of
// the geometry exceeds INT32_MAX (the torch wrappers check it first).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

// acc_type<scalar_t> (float, double for double) is defined with the first CUDA op.
#include "multiscale_pool_kernel.h"
#include "../core/window_geometry.h"

namespace medmtl {
namespace cuda {

// Token map strides: core::TokenStrides (csrc/core/window_geometry.h).
using WindowTokenStrides = core::TokenStrides;

// Scratch buffers of the backward (element counts, acc_type; 0 = pass
// nullptr), and the partials it writes:
//  - grad_table_partial: (partials, table_rows, heads), summed over dim 0;
//  - grad_pad_key_partial, grad_pad_value_partial: (partials, heads, head_dim),
//    summed over dim 0.
// partials = batch * windows (one per window of every image: deterministic,
// no atomics).
struct WindowAttentionWorkspace {
  int64_t delta_elements = 0;       // (B, *S, heads): rowsum(grad_out * out)
  int64_t grad_q_acc_elements = 0;  // (B, *S, heads, head_dim): 16-bit types only
                                    // (float / double accumulate in grad_q itself)
  int64_t partials = 0;
};

template <typename scalar_t>
WindowAttentionWorkspace window_attention_workspace(const core::WindowGeometry& geometry);

// out and lse (log-sum-exp over the visible keys of every real query).
// Launches nothing when the batch is empty. Returns the launch status.
template <typename scalar_t>
cudaError_t launch_window_attention_forward(const core::WindowGeometry& geometry, const scalar_t* q,
                                            const WindowTokenStrides& q_strides, const scalar_t* k,
                                            const WindowTokenStrides& k_strides, const scalar_t* v,
                                            const WindowTokenStrides& v_strides, const scalar_t* table,
                                            const scalar_t* pad_key, const scalar_t* pad_value, double scale,
                                            scalar_t* out, acc_type<scalar_t>* lse, cudaStream_t stream);

// grad_q, grad_k, grad_v and the partials of grad_table, grad_pad_key and
// grad_pad_value (see the workspace), from the forward's out and lse (the
// scores are recomputed). delta and grad_q_acc are scratch as sized by the
// workspace. Launches nothing when the batch is empty.
template <typename scalar_t>
cudaError_t launch_window_attention_backward(
    const core::WindowGeometry& geometry, const scalar_t* grad_out, const WindowTokenStrides& grad_out_strides,
    const scalar_t* q, const WindowTokenStrides& q_strides, const scalar_t* k, const WindowTokenStrides& k_strides,
    const scalar_t* v, const WindowTokenStrides& v_strides, const scalar_t* out,
    const WindowTokenStrides& out_strides, const acc_type<scalar_t>* lse, const scalar_t* table,
    const scalar_t* pad_key, const scalar_t* pad_value, double scale, scalar_t* grad_q, scalar_t* grad_k,
    scalar_t* grad_v, acc_type<scalar_t>* grad_table_partial, acc_type<scalar_t>* grad_pad_key_partial,
    acc_type<scalar_t>* grad_pad_value_partial, acc_type<scalar_t>* delta, acc_type<scalar_t>* grad_q_acc,
    cudaStream_t stream);

}  // namespace cuda
}  // namespace medmtl
