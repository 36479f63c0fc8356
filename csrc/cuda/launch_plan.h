// The buffers the torch wrappers (csrc/cuda/*_cuda.cpp) allocate around the
// CUDA launchers, and how they reduce the launchers' partial sums to the
// gradients: one plan per op, torch-free and without the CUDA runtime, so
// that the wrappers and the CPU emulation of the kernels
// (tests/cuda_emulation/driver*.cpp, through ctypes) use the same arithmetic
// and a change to it is tested by the emulation tests.
//
// The grids and the scratch sizes come from the launchers' workspace
// functions (*_kernel.h, computed in the .cu); this file turns those numbers
// and the op's sizes into buffer shapes and reductions.
#pragma once

#include <cstdint>
#include <initializer_list>

namespace medmtl {
namespace cuda {

constexpr int kPlanMaxRank = 5;

// What a buffer holds: the op's dtype, its accumulation type (acc_type), or
// an index type.
enum class PlanElement : int64_t { kScalar = 0, kAcc = 1, kInt32 = 2, kInt64 = 3 };

// A buffer handed to a launcher. A buffer of partial sums (sum_dims != 0) is
// summed over the dims in the bit mask sum_dims, the sum then viewed as
// result_sizes (result_rank 0: kept as it is) and permuted by result_order,
// and cast to the op's dtype: that is the gradient. zero_fill: the launcher
// writes only some of its elements, the others must be 0; otherwise every
// element of a partial-sum buffer is written, and a scratch buffer (no
// reduction) may be left partly unwritten.
struct PlanBuffer {
  PlanElement element = PlanElement::kAcc;
  int64_t rank = 1;
  int64_t sizes[kPlanMaxRank] = {};
  bool zero_fill = false;
  int64_t sum_dims = 0;
  int64_t result_rank = 0;
  int64_t result_sizes[kPlanMaxRank] = {};
  int64_t result_order[kPlanMaxRank] = {};

  int64_t elements() const {
    int64_t n = 1;
    for (int64_t d = 0; d < rank; ++d) n *= sizes[d];
    return n;
  }
};

namespace plan_detail {

inline PlanBuffer buffer(PlanElement element, std::initializer_list<int64_t> sizes, int64_t sum_dims = 0) {
  PlanBuffer b;
  b.element = element;
  b.rank = static_cast<int64_t>(sizes.size());
  int64_t d = 0;
  for (int64_t s : sizes) b.sizes[d++] = s;
  b.sum_dims = sum_dims;
  return b;
}

// A flat scratch buffer of `elements` (0: the launcher takes nullptr).
inline PlanBuffer scratch(PlanElement element, int64_t elements) { return buffer(element, {elements}); }

inline void view_as(PlanBuffer& b, std::initializer_list<int64_t> sizes, std::initializer_list<int64_t> order) {
  b.result_rank = static_cast<int64_t>(sizes.size());
  int64_t d = 0;
  for (int64_t s : sizes) b.result_sizes[d++] = s;
  d = 0;
  for (int64_t o : order) b.result_order[d++] = o;
}

constexpr int64_t dim(int d) { return int64_t{1} << d; }

}  // namespace plan_detail

// --- multiscale_pool ------------------------------------------------------

// Per level: grad_scale / grad_shift partials (batch, channels,
// partials_per_plane) summed over dims 0 and 2 to the level's (channels)
// gradients; the max mode's argmax and the multi-launch gradient scratch.
struct MultiscalePoolBackwardPlan {
  PlanBuffer grad_scale_partial, grad_shift_partial, argmax, grad_scratch;
};

inline MultiscalePoolBackwardPlan multiscale_pool_backward_plan(int64_t batch, int64_t channels,
                                                                int64_t partials_per_plane, int64_t argmax_elements,
                                                                int64_t grad_elements) {
  using namespace plan_detail;
  MultiscalePoolBackwardPlan p;
  p.grad_scale_partial = buffer(PlanElement::kAcc, {batch, channels, partials_per_plane}, dim(0) | dim(2));
  p.grad_shift_partial = p.grad_scale_partial;
  p.argmax = scratch(PlanElement::kInt64, argmax_elements);
  p.grad_scratch = scratch(PlanElement::kAcc, grad_elements);
  return p;
}

// --- multi_dilation_conv --------------------------------------------------

struct MultiDilationConvForwardPlan {
  PlanBuffer forward_acc;
};

inline MultiDilationConvForwardPlan multi_dilation_conv_forward_plan(int64_t forward_acc_elements) {
  return {plan_detail::scratch(PlanElement::kAcc, forward_acc_elements)};
}

// grad_weight partials (weight_partials, n * 9, Cout, Cin), zero-filled,
// summed over dim 0 and taken from (n, 3, 3, Cout, Cin) to the weight's
// (n, Cout, Cin, 3, 3); grad_bias partials (C_out, bias_partials) summed over
// dim 1; the ReLU-masked gradient (op dtype) and the grad_x accumulator.
struct MultiDilationConvBackwardPlan {
  PlanBuffer grad_weight_partial, grad_bias_partial, grad_pre, grad_x_acc;
};

inline MultiDilationConvBackwardPlan multi_dilation_conv_backward_plan(int64_t branches, int64_t out_channels,
                                                                       int64_t in_channels, int64_t output_channels,
                                                                       int64_t weight_partials, int64_t bias_partials,
                                                                       int64_t grad_pre_elements,
                                                                       int64_t grad_x_acc_elements) {
  using namespace plan_detail;
  MultiDilationConvBackwardPlan p;
  p.grad_weight_partial =
      buffer(PlanElement::kAcc, {weight_partials, branches * 9, out_channels, in_channels}, dim(0));
  p.grad_weight_partial.zero_fill = true;
  view_as(p.grad_weight_partial, {branches, 3, 3, out_channels, in_channels}, {0, 3, 4, 1, 2});
  p.grad_bias_partial = buffer(PlanElement::kAcc, {output_channels, bias_partials}, dim(1));
  p.grad_pre = scratch(PlanElement::kScalar, grad_pre_elements);
  p.grad_x_acc = scratch(PlanElement::kAcc, grad_x_acc_elements);
  return p;
}

// --- spatial_attention ----------------------------------------------------

struct SpatialAttentionForwardPlan {
  PlanBuffer pooled, gate;
};

inline SpatialAttentionForwardPlan spatial_attention_forward_plan(int64_t pooled_elements, int64_t gate_elements) {
  using namespace plan_detail;
  return {scratch(PlanElement::kAcc, pooled_elements), scratch(PlanElement::kAcc, gate_elements)};
}

// grad_weight partials (2 K K, weight_partials) summed over dim 1 and viewed
// as the weight's (1, 2, K, K); the recomputed forward's scratch.
struct SpatialAttentionBackwardPlan {
  PlanBuffer grad_weight_partial, pooled, argmax, gate, grad_logit, grad_pooled;
};

inline SpatialAttentionBackwardPlan spatial_attention_backward_plan(int64_t kernel_size, int64_t weight_partials,
                                                                    int64_t pooled_elements, int64_t argmax_elements,
                                                                    int64_t gate_elements, int64_t grad_logit_elements,
                                                                    int64_t grad_pooled_elements) {
  using namespace plan_detail;
  SpatialAttentionBackwardPlan p;
  const int64_t k = kernel_size;
  p.grad_weight_partial = buffer(PlanElement::kAcc, {2 * k * k, weight_partials}, dim(1));
  view_as(p.grad_weight_partial, {1, 2, k, k}, {0, 1, 2, 3});
  p.pooled = scratch(PlanElement::kAcc, pooled_elements);
  p.argmax = scratch(PlanElement::kInt32, argmax_elements);
  p.gate = scratch(PlanElement::kAcc, gate_elements);
  p.grad_logit = scratch(PlanElement::kAcc, grad_logit_elements);
  p.grad_pooled = scratch(PlanElement::kAcc, grad_pooled_elements);
  return p;
}

// --- window_attention -----------------------------------------------------

// Per-window partials of the bias table's (partials, table_rows, heads) and
// the padding key's / value's (partials, heads, head_dim) gradients, summed
// over dim 0; the delta and grad_q accumulator scratch.
struct WindowAttentionBackwardPlan {
  PlanBuffer grad_table_partial, grad_pad_key_partial, grad_pad_value_partial, delta, grad_q_acc;
};

inline WindowAttentionBackwardPlan window_attention_backward_plan(int64_t table_rows, int64_t heads, int64_t head_dim,
                                                                  int64_t partials, int64_t delta_elements,
                                                                  int64_t grad_q_acc_elements) {
  using namespace plan_detail;
  WindowAttentionBackwardPlan p;
  p.grad_table_partial = buffer(PlanElement::kAcc, {partials, table_rows, heads}, dim(0));
  p.grad_pad_key_partial = buffer(PlanElement::kAcc, {partials, heads, head_dim}, dim(0));
  p.grad_pad_value_partial = p.grad_pad_key_partial;
  p.delta = scratch(PlanElement::kAcc, delta_elements);
  p.grad_q_acc = scratch(PlanElement::kAcc, grad_q_acc_elements);
  return p;
}

}  // namespace cuda
}  // namespace medmtl
