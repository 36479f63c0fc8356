// C entry points (for ctypes) to the host launchers of the CUDA kernels of
// medmtl::window_attention, compiled with g++ against the CPU emulation of
// cuda_emu.h. tests/test_window_attention_cuda_emulated.py builds it into a
// shared library together with a copy of csrc/cuda/window_attention_kernel.cu in
// which the `<<<...>>>` launches are rewritten to emu::launch(...), and
// compares what the launchers compute with the reference op
// (medmtl.ops.reference.window_attention).
//
// What it does: builds the core::WindowGeometry from flat int64 arrays with
// core::window_geometry (as csrc/window_attention_checks.h does: three spatial
// dims, depth first; a 2-D map passes depth 1, window 1, shift 0) and the
// token strides from flat arrays (batch, depth, height, width, head), and calls
// window_attention_workspace<T> and launch_window_attention_*<T> on host
// pointers, the way csrc/cuda/window_attention_cuda.cpp does on device
// pointers, for T = float, double, __half, __nv_bfloat16. Launch errors come
// back as the launchers' cudaError_t (0 = success), with emu_error() saying
// what went wrong; every launch is logged (emu_log()).
//
// The buffers the wrapper allocates and the sums of the partials come from the
// wrapper's own launch plan (csrc/cuda/launch_plan.h, wa_backward_plan).
//
// What it does not do: the wrapper's input checks and dtype dispatch; see
// cuda_emu.h for what the emulation leaves out.
#include "cuda_emu.h"
// emu_reset, emu_error, emu_log; EMU_EXPORT, EMU_DISPATCH.
#include "driver_common.h"
// The kernels under test (the rewritten copy; on the include path).
#include "window_attention_kernel.cu"

namespace {

using namespace medmtl::cuda;
namespace core = medmtl::core;

// d: batch heads head_dim size[3] window[3] shift[3]
core::WindowGeometry make_geometry(const int64_t* d) {
  return core::window_geometry(d[0], d + 3, d[1], d[2], d + 6, d + 9);
}

// s: batch depth height width head
WindowTokenStrides make_strides(const int64_t* s) {
  WindowTokenStrides t;
  t.batch = s[0];
  for (int i = 0; i < core::kWindowDims; ++i) t.dim[i] = s[1 + i];
  t.head = s[4];
  return t;
}

template <typename T>
int run_workspace(const core::WindowGeometry& g, int64_t* res) {
  const WindowAttentionWorkspace ws = window_attention_workspace<T>(g);
  res[0] = ws.delta_elements;
  res[1] = ws.grad_q_acc_elements;
  res[2] = ws.partials;
  return 0;
}

template <typename T>
int run_backward_plan(const core::WindowGeometry& g, int64_t* out) {
  const WindowAttentionWorkspace ws = window_attention_workspace<T>(g);
  const WindowAttentionBackwardPlan p = window_attention_backward_plan(g.table_rows, g.heads, g.head_dim, ws.partials,
                                                                       ws.delta_elements, ws.grad_q_acc_elements);
  write_plan({p.grad_table_partial, p.grad_pad_key_partial, p.grad_pad_value_partial, p.delta, p.grad_q_acc}, out);
  return 0;
}

template <typename T>
int run_forward(const core::WindowGeometry& g, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                const void* v, const int64_t* vs, const void* table, const void* pad_key, const void* pad_value,
                double scale, void* out, void* lse) {
  return launch_window_attention_forward<T>(
      g, static_cast<const T*>(q), make_strides(qs), static_cast<const T*>(k), make_strides(ks),
      static_cast<const T*>(v), make_strides(vs), static_cast<const T*>(table), static_cast<const T*>(pad_key),
      static_cast<const T*>(pad_value), scale, static_cast<T*>(out), static_cast<acc_type<T>*>(lse), nullptr);
}

template <typename T>
int run_backward(const core::WindowGeometry& g, const void* grad_out, const int64_t* gos, const void* q,
                 const int64_t* qs, const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                 const void* out, const int64_t* outs, const void* lse, const void* table, const void* pad_key,
                 const void* pad_value, double scale, void* grad_q, void* grad_k, void* grad_v,
                 void* table_partial, void* pad_key_partial, void* pad_value_partial, void* delta,
                 void* grad_q_acc) {
  using A = acc_type<T>;
  return launch_window_attention_backward<T>(
      g, static_cast<const T*>(grad_out), make_strides(gos), static_cast<const T*>(q), make_strides(qs),
      static_cast<const T*>(k), make_strides(ks), static_cast<const T*>(v), make_strides(vs),
      static_cast<const T*>(out), make_strides(outs), static_cast<const A*>(lse), static_cast<const T*>(table),
      static_cast<const T*>(pad_key), static_cast<const T*>(pad_value), scale, static_cast<T*>(grad_q),
      static_cast<T*>(grad_k), static_cast<T*>(grad_v), static_cast<A*>(table_partial),
      static_cast<A*>(pad_key_partial), static_cast<A*>(pad_value_partial), static_cast<A*>(delta),
      static_cast<A*>(grad_q_acc), nullptr);
}

}  // namespace

// geo (12 int64 in, see make_geometry) -> res: tokens windows table_rows masked
// window[3] shift[3] padded[3] count[3]: the geometry the kernels get.
EMU_EXPORT void wa_geometry(const int64_t* d, int64_t* res) {
  const core::WindowGeometry g = make_geometry(d);
  res[0] = g.tokens;
  res[1] = g.windows;
  res[2] = g.table_rows;
  res[3] = g.masked;
  for (int i = 0; i < core::kWindowDims; ++i) {
    res[4 + i] = g.window[i];
    res[7 + i] = g.shift[i];
    res[10 + i] = g.padded[i];
    res[13 + i] = g.count[i];
  }
}

// res: delta_elements grad_q_acc_elements partials
EMU_EXPORT int wa_workspace(int dtype, const int64_t* d, int64_t* res) {
  const core::WindowGeometry g = make_geometry(d);
  EMU_DISPATCH(dtype, run_workspace, g, res)
}

// The wrapper's buffers of the backward (launch_plan.h), in the launcher's
// order: grad_table_partial grad_pad_key_partial grad_pad_value_partial delta grad_q_acc.
EMU_EXPORT int wa_backward_plan(int dtype, const int64_t* d, int64_t* out) {
  const core::WindowGeometry g = make_geometry(d);
  EMU_DISPATCH(dtype, run_backward_plan, g, out)
}

EMU_EXPORT int wa_forward(int dtype, const int64_t* d, const void* q, const int64_t* qs, const void* k,
                          const int64_t* ks, const void* v, const int64_t* vs, const void* table, const void* pad_key,
                          const void* pad_value, double scale, void* out, void* lse) {
  const core::WindowGeometry g = make_geometry(d);
  EMU_DISPATCH(dtype, run_forward, g, q, qs, k, ks, v, vs, table, pad_key, pad_value, scale, out, lse)
}

EMU_EXPORT int wa_backward(int dtype, const int64_t* d, const void* grad_out, const int64_t* gos, const void* q,
                           const int64_t* qs, const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                           const void* out, const int64_t* outs, const void* lse, const void* table,
                           const void* pad_key, const void* pad_value, double scale, void* grad_q, void* grad_k,
                           void* grad_v, void* table_partial, void* pad_key_partial, void* pad_value_partial,
                           void* delta, void* grad_q_acc) {
  const core::WindowGeometry g = make_geometry(d);
  EMU_DISPATCH(dtype, run_backward, g, grad_out, gos, q, qs, k, ks, v, vs, out, outs, lse, table, pad_key, pad_value,
               scale, grad_q, grad_k, grad_v, table_partial, pad_key_partial, pad_value_partial, delta, grad_q_acc)
}
