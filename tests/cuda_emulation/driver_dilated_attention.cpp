// C entry points (for ctypes) to the host launchers of the CUDA kernels of
// medmtl::multi_dilation_conv and medmtl::spatial_attention, compiled with g++
// against the CPU emulation of cuda_emu.h.
// tests/test_dilated_attention_cuda_emulated.py builds it into a shared library
// together with copies of csrc/cuda/multi_dilation_conv_kernel.cu and
// csrc/cuda/spatial_attention_kernel.cu in which the `<<<...>>>` launches are
// rewritten to emu::launch(...), and compares what the launchers compute with
// the reference ops (medmtl.ops.reference).
//
// What it does: fills the launchers' dims structs from flat int64 arrays and
// calls the workspace functions and launch_*<T> on host pointers, the way the
// torch wrappers (csrc/cuda/*_cuda.cpp) do on device pointers, for T = float,
// double, __half, __nv_bfloat16. Launch errors come back as the launchers'
// cudaError_t (0 = success), with emu_error() saying what went wrong; every
// launch is logged (emu_log()). It also exposes the host's tap list (how many
// taps of a multi_dilation_conv read the map) and the tap range functions of
// csrc/core/dilated_taps.h, for the test to check against brute force.
//
// The buffers the wrappers allocate and the sums of the partials come from the
// wrappers' own launch plans (csrc/cuda/launch_plan.h: mdc_plan, sa_plan).
//
// What it does not do: the wrappers' input checks, weight packing and dtype
// dispatch (the test mirrors the packing in Python); see cuda_emu.h for what the emulation leaves out.
#include "cuda_emu.h"
// emu_reset, emu_error, emu_log; EMU_EXPORT, EMU_DISPATCH.
#include "driver_common.h"
// The kernels under test (the rewritten copies; on the include path).
#include "multi_dilation_conv_kernel.cu"
#include "spatial_attention_kernel.cu"

namespace {

using namespace medmtl::cuda;

// d: batch in_channels out_channels height width branches concat
MultiDilationConvDims make_mdc(const int64_t* d, const int64_t* dilations) {
  MultiDilationConvDims m;
  m.batch = d[0];
  m.in_channels = d[1];
  m.out_channels = d[2];
  m.height = d[3];
  m.width = d[4];
  m.branches = d[5];
  m.concat = d[6] != 0;
  m.dilations = dilations;
  return m;
}

// d: batch channels height width kernel_size
SpatialAttentionDims make_sa(const int64_t* d) {
  SpatialAttentionDims s;
  s.batch = d[0];
  s.channels = d[1];
  s.height = d[2];
  s.width = d[3];
  s.kernel_size = d[4];
  return s;
}

template <typename T>
int run_mdc_forward(const MultiDilationConvDims& m, const void* x, const void* w, const void* bias, int relu,
                void* out, void* acc) {
  return launch_multi_dilation_conv_forward<T>(m, static_cast<const T*>(x), static_cast<const T*>(w),
                                               static_cast<const T*>(bias), relu != 0, static_cast<T*>(out),
                                               static_cast<acc_type<T>*>(acc), nullptr);
}

template <typename T>
int run_mdc_backward(const MultiDilationConvDims& m, const void* grad_output, const void* x, const void* w,
                 const void* output, int relu, void* grad_x, void* grad_weight_partial,
                 void* grad_bias_partial, void* grad_pre, void* grad_x_acc) {
  using A = acc_type<T>;
  return launch_multi_dilation_conv_backward<T>(
      m, static_cast<const T*>(grad_output), static_cast<const T*>(x), static_cast<const T*>(w),
      static_cast<const T*>(output), relu != 0, static_cast<T*>(grad_x), static_cast<A*>(grad_weight_partial),
      static_cast<A*>(grad_bias_partial), static_cast<T*>(grad_pre), static_cast<A*>(grad_x_acc), nullptr);
}

template <typename T>
int run_sa_forward(const SpatialAttentionDims& s, const void* x, const void* w, void* out, void* pooled,
               void* gate) {
  using A = acc_type<T>;
  return launch_spatial_attention_forward<T>(s, static_cast<const T*>(x), static_cast<const T*>(w),
                                             static_cast<T*>(out), static_cast<A*>(pooled), static_cast<A*>(gate),
                                             nullptr);
}

template <typename T>
int run_sa_backward(const SpatialAttentionDims& s, const void* grad_output, const void* x, const void* w,
                void* grad_x, void* grad_weight_partial, void* pooled, void* argmax, void* gate,
                void* grad_logit, void* grad_pooled) {
  using A = acc_type<T>;
  return launch_spatial_attention_backward<T>(
      s, static_cast<const T*>(grad_output), static_cast<const T*>(x), static_cast<const T*>(w),
      static_cast<T*>(grad_x), static_cast<A*>(grad_weight_partial), static_cast<A*>(pooled),
      static_cast<int32_t*>(argmax), static_cast<A*>(gate), static_cast<A*>(grad_logit),
      static_cast<A*>(grad_pooled), nullptr);
}

}  // namespace

// res: forward_acc_elements grad_x_acc_elements grad_pre_elements weight_partials bias_partials
EMU_EXPORT void mdc_workspace(const int64_t* d, const int64_t* dilations, int relu, int64_t* res) {
  const MultiDilationConvWorkspace ws = multi_dilation_conv_workspace(make_mdc(d, dilations), relu != 0);
  res[0] = ws.forward_acc_elements;
  res[1] = ws.grad_x_acc_elements;
  res[2] = ws.grad_pre_elements;
  res[3] = ws.weight_partials;
  res[4] = ws.bias_partials;
}

// The wrappers' buffers (launch_plan.h), in the launchers' order. Forward:
// forward_acc; backward: grad_weight_partial grad_bias_partial grad_pre grad_x_acc.
EMU_EXPORT void mdc_plan(const int64_t* d, const int64_t* dilations, int relu, int backward, int64_t* out) {
  const MultiDilationConvDims m = make_mdc(d, dilations);
  const MultiDilationConvWorkspace ws = multi_dilation_conv_workspace(m, relu != 0);
  if (backward == 0) {
    write_plan({multi_dilation_conv_forward_plan(ws.forward_acc_elements).forward_acc}, out);
    return;
  }
  const MultiDilationConvBackwardPlan p = multi_dilation_conv_backward_plan(
      m.branches, m.out_channels, m.in_channels, m.output_channels(), ws.weight_partials, ws.bias_partials,
      ws.grad_pre_elements, ws.grad_x_acc_elements);
  write_plan({p.grad_weight_partial, p.grad_bias_partial, p.grad_pre, p.grad_x_acc}, out);
}

// Forward: pooled gate; backward: grad_weight_partial pooled argmax gate grad_logit grad_pooled.
EMU_EXPORT void sa_plan(const int64_t* d, int backward, int64_t* out) {
  const SpatialAttentionDims s = make_sa(d);
  const SpatialAttentionWorkspace ws = spatial_attention_workspace(s);
  if (backward == 0) {
    const SpatialAttentionForwardPlan p = spatial_attention_forward_plan(ws.pooled_elements, ws.gate_elements);
    write_plan({p.pooled, p.gate}, out);
    return;
  }
  const SpatialAttentionBackwardPlan p = spatial_attention_backward_plan(
      s.kernel_size, ws.weight_partials, ws.pooled_elements, ws.argmax_elements, ws.gate_elements,
      ws.grad_logit_elements, ws.grad_pooled_elements);
  write_plan({p.grad_weight_partial, p.pooled, p.argmax, p.gate, p.grad_logit, p.grad_pooled}, out);
}

// The taps that the launchers run (those that read the map): count, and up to
// `capacity` rows (slot, dy, dx) into `rows`.
EMU_EXPORT int64_t mdc_taps(const int64_t* d, const int64_t* dilations, int64_t capacity, int64_t* rows) {
  const auto taps = medmtl::cuda::multi_dilation_conv_detail::taps_reading_the_map(make_mdc(d, dilations));
  for (size_t i = 0; i < taps.size() && static_cast<int64_t>(i) < capacity; ++i) {
    rows[3 * i] = taps[i].slot;
    rows[3 * i + 1] = taps[i].dy;
    rows[3 * i + 2] = taps[i].dx;
  }
  return static_cast<int64_t>(taps.size());
}

EMU_EXPORT int mdc_forward(int dtype, const int64_t* d, const int64_t* dilations, const void* x,
                           const void* packed_weight, const void* bias, int relu, void* out, void* acc) {
  const MultiDilationConvDims m = make_mdc(d, dilations);
  EMU_DISPATCH(dtype, run_mdc_forward, m, x, packed_weight, bias, relu, out, acc)
}

EMU_EXPORT int mdc_backward(int dtype, const int64_t* d, const int64_t* dilations, const void* grad_output,
                            const void* x, const void* packed_weight, const void* output, int relu,
                            void* grad_x, void* grad_weight_partial, void* grad_bias_partial, void* grad_pre,
                            void* grad_x_acc) {
  const MultiDilationConvDims m = make_mdc(d, dilations);
  EMU_DISPATCH(dtype, run_mdc_backward, m, grad_output, x, packed_weight, output, relu, grad_x, grad_weight_partial,
               grad_bias_partial, grad_pre, grad_x_acc)
}

// res: pooled gate argmax grad_logit grad_pooled weight_partials
EMU_EXPORT void sa_workspace(const int64_t* d, int64_t* res) {
  const SpatialAttentionWorkspace ws = spatial_attention_workspace(make_sa(d));
  res[0] = ws.pooled_elements;
  res[1] = ws.gate_elements;
  res[2] = ws.argmax_elements;
  res[3] = ws.grad_logit_elements;
  res[4] = ws.grad_pooled_elements;
  res[5] = ws.weight_partials;
}

EMU_EXPORT int sa_forward(int dtype, const int64_t* d, const void* x, const void* weight, void* out,
                          void* pooled, void* gate) {
  const SpatialAttentionDims s = make_sa(d);
  EMU_DISPATCH(dtype, run_sa_forward, s, x, weight, out, pooled, gate)
}

EMU_EXPORT int sa_backward(int dtype, const int64_t* d, const void* grad_output, const void* x,
                           const void* weight, void* grad_x, void* grad_weight_partial, void* pooled,
                           void* argmax, void* gate, void* grad_logit, void* grad_pooled) {
  const SpatialAttentionDims s = make_sa(d);
  EMU_DISPATCH(dtype, run_sa_backward, s, grad_output, x, weight, grad_x, grad_weight_partial, pooled, argmax, gate,
               grad_logit, grad_pooled)
}

// The tap range functions of csrc/core/dilated_taps.h. which: 0 tap_output_begin(a, b),
// 1 tap_output_end(a, b), 2 tap_reaches(a, b, c, d), 3 tap_only_padding(a, b, c, d),
// 4 window_tap_begin(a, b), 5 window_tap_end(a, b, c, d).
EMU_EXPORT int64_t core_taps(int which, int64_t a, int64_t b, int64_t c, int64_t d) {
  namespace core = medmtl::core;
  switch (which) {
    case 0: return core::tap_output_begin(a, b);
    case 1: return core::tap_output_end(a, b);
    case 2: return core::tap_reaches(a, b, c, d);
    case 3: return core::tap_only_padding(a, b, c, d);
    case 4: return core::window_tap_begin(a, b);
    case 5: return core::window_tap_end(a, b, c, d);
    default: return -1;
  }
}
