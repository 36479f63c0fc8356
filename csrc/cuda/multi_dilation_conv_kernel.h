// Host launchers of the CUDA kernels of medmtl::multi_dilation_conv, on raw
// device pointers and a cudaStream_t (no torch headers: the .cu builds in
// seconds). The torch wrappers in multi_dilation_conv_cuda.cpp check the
// inputs, allocate the outputs and scratch buffers (sized by
// multi_dilation_conv_workspace), and reduce the per-block partial sums.
//
// Layouts: x (B, Cin, H, W), output and grad_output (B, C_out, H, W) with
// C_out = Cout ("sum") or n * Cout ("concat", branch-major), all contiguous.
// The weight is passed PACKED as (n, 3, 3, Cin, Cout) contiguous, i.e.
// weight.permute(0, 3, 4, 2, 1): tap (ky, kx) of branch i is then one
// Cin x Cout matrix whose rows the kernels stage with coalesced loads.
// The conv and grad_bias kernels index the batch's pixels in 32-bit: the caller
// checks B * H * W < 2^31 (csrc/cuda/index_range.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

// acc_type<scalar_t> (float, double for double) is defined with the first CUDA op.
#include "multiscale_pool_kernel.h"

namespace medmtl {
namespace cuda {

struct MultiDilationConvDims {
  int64_t batch = 0, in_channels = 0, out_channels = 0;  // out_channels: per branch
  int64_t height = 0, width = 0;
  int64_t branches = 0;
  const int64_t* dilations = nullptr;  // host array of `branches` ints >= 0 (0: 1x1 branch)
  bool concat = false;                 // combine "concat" (else "sum")
  int64_t output_channels() const { return concat ? branches * out_channels : out_channels; }
};

// Scratch the launchers need (element counts; 0 = pass nullptr), and the
// number of partial sums the backward writes.
struct MultiDilationConvWorkspace {
  // acc_t (B, Cout, H, W): a "sum" forward whose taps take several launches.
  int64_t forward_acc_elements = 0;
  // acc_t (B, Cin, H, W): a grad_x whose taps take several launches.
  int64_t grad_x_acc_elements = 0;
  // scalar_t (B, C_out, H, W): grad_output masked by the ReLU (relu only).
  int64_t grad_pre_elements = 0;
  // grad_weight partials: acc_t (weight_partials, n * 9, Cout, Cin), slot
  // branch * 9 + ky * 3 + kx. The launcher writes the slots of the taps that
  // read the map; the caller zero-fills the buffer (the other slots, e.g. the
  // unused taps of 1x1 branches, have gradient 0) and sums over dim 0.
  int64_t weight_partials = 1;
  // grad_bias partials: acc_t (C_out, bias_partials), summed over dim 1.
  int64_t bias_partials = 1;
};

MultiDilationConvWorkspace multi_dilation_conv_workspace(const MultiDilationConvDims& dims, bool relu);

// out = act(sum_i conv_i(x) + bias) ("sum") or cat_i act(conv_i(x) + bias_i)
// ("concat"); bias may be nullptr. forward_acc as sized by the workspace.
// Launches nothing when batch == 0. Returns the launch status.
template <typename scalar_t>
cudaError_t launch_multi_dilation_conv_forward(const MultiDilationConvDims& dims, const scalar_t* x,
                                               const scalar_t* packed_weight, const scalar_t* bias,
                                               bool relu, scalar_t* out,
                                               acc_type<scalar_t>* forward_acc, cudaStream_t stream);

// grad_x, and the partial sums of grad_weight and grad_bias (see the
// workspace), given the forward's output (its sign is the ReLU's mask).
// grad_pre and grad_x_acc are scratch as sized by the workspace.
template <typename scalar_t>
cudaError_t launch_multi_dilation_conv_backward(
    const MultiDilationConvDims& dims, const scalar_t* grad_output, const scalar_t* x,
    const scalar_t* packed_weight, const scalar_t* output, bool relu, scalar_t* grad_x,
    acc_type<scalar_t>* grad_weight_partial, acc_type<scalar_t>* grad_bias_partial,
    scalar_t* grad_pre, acc_type<scalar_t>* grad_x_acc, cudaStream_t stream);

}  // namespace cuda
}  // namespace medmtl
