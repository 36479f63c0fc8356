// Host launchers of the CUDA kernels of medmtl::multiscale_pool, on raw device
// pointers and a cudaStream_t (no torch headers: the .cu builds in seconds).
// The torch wrappers in multiscale_pool_cuda.cpp check the inputs, allocate
// the outputs and scratch buffers, and call these once per level.
//
// Layout (the same as the CPU kernels): a level is a contiguous (B, C, D, H, W)
// map (D = 1 in 2-D); its values go to columns
//   level_col + C * size_offset[k] + c * bins_k + bin
// of the (B, out_row) output, bins_k = s_k^spatial_dims, bins in row-major
// order. scale and shift point at the level's first channel (nullptr: 1 / 0).
// The backward kernel indexes in 32-bit: the caller checks B * C, the plane size
// and (largest spatial size + 1) * (largest output size + 1) against 2^31
// (csrc/cuda/index_range.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace medmtl {
namespace cuda {

// Accumulation type: float, and double for double.
template <typename scalar_t>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccumulateType<scalar_t>::type;

// Output sizes handled by one launch of the backward kernel (they are passed by
// value as kernel arguments); more sizes take several launches that accumulate
// the pooled gradient in a scratch buffer (see MultiscalePoolBackwardWorkspace).
constexpr int64_t kMaxSizesPerLaunch = 16;

// One level of the op, and where its values go in the output.
struct MultiscalePoolLevel {
  int64_t batch = 0, channels = 0;
  int64_t depth = 1, height = 1, width = 1;  // depth 1 in 2-D
  int spatial_dims = 2;                      // 2 or 3
  const int64_t* sizes = nullptr;            // host array of num_sizes output sizes
  const int64_t* size_offset = nullptr;      // host array: bins before size k in a channel
  int64_t num_sizes = 0;
  int64_t bins_per_channel = 0;              // sum over sizes of s^spatial_dims
  int64_t out_row = 0;                       // columns of the (B, out_row) output
  int64_t level_col = 0;                     // column of the level's first value
};

// Scratch the backward launcher needs (element counts; 0 = pass nullptr), and
// the number of per-plane partial sums of grad_scale / grad_shift it writes:
// the partial buffers are (batch, channels, partials_per_plane), to be summed
// over dims 0 and 2.
struct MultiscalePoolBackwardWorkspace {
  int64_t partials_per_plane = 1;
  int64_t argmax_elements = 0;  // int64: batch * channels * bins_per_channel (max mode)
  int64_t grad_elements = 0;    // acc_type: batch * channels * plane (more than
                                // kMaxSizesPerLaunch sizes only)
};

MultiscalePoolBackwardWorkspace multiscale_pool_backward_workspace(const MultiscalePoolLevel& level,
                                                                   bool is_max);

// out[b, level_col + ...] = pooled act(x * scale + shift). Launches nothing
// when batch == 0. Returns the launch status (cudaGetLastError).
template <typename scalar_t>
cudaError_t launch_multiscale_pool_forward(const MultiscalePoolLevel& level, const scalar_t* x,
                                           const scalar_t* scale, const scalar_t* shift, bool relu,
                                           bool is_max, scalar_t* out, cudaStream_t stream);

// grad_x (contiguous like x) and the per-(b, c, partial) sums of
// grad_y * x and grad_y, grad_y the gradient of y = x * scale + shift.
// grad_output is the whole (B, out_row) contiguous gradient of the output.
// argmax and grad_scratch as sized by multiscale_pool_backward_workspace.
template <typename scalar_t>
cudaError_t launch_multiscale_pool_backward(const MultiscalePoolLevel& level,
                                            const scalar_t* grad_output, const scalar_t* x,
                                            const scalar_t* scale, const scalar_t* shift,
                                            bool relu, bool is_max, scalar_t* grad_x,
                                            acc_type<scalar_t>* grad_scale_partial,
                                            acc_type<scalar_t>* grad_shift_partial,
                                            int64_t* argmax, acc_type<scalar_t>* grad_scratch,
                                            cudaStream_t stream);

}  // namespace cuda
}  // namespace medmtl
