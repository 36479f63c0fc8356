// Every schema of the medmtl operator library, and the Python module medmtl._C
// that loading registers them with.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/cpu_capability.h"
#include "cpu/derived_weight_cache.h"
#include "cpu/private_ops.h"
#include "cpu/winograd_conv3x3.h"

#ifndef MEDMTL_WITH_CUDA
#define MEDMTL_WITH_CUDA 0
#endif
#ifndef MEDMTL_CUDA_ARCHS
#define MEDMTL_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(medmtl, m) {
  // Multi-scale pooling: for each level, act(x * scale + shift) adaptively
  // pooled to every size, flattened, concatenated -> (B, sum_i C_i * sum_s s^d).
  // scale and shift are flat over the levels' channels (length sum_i C_i).
  m.def(
      "multiscale_pool(Tensor[] features, int[] output_sizes, str mode, Tensor? scale, "
      "Tensor? shift, bool relu) -> Tensor");
  // Gradients of the features, and of the flat scale and shift (computed as if
  // scale were 1 and shift 0 when they are absent).
  m.def(
      "multiscale_pool_backward(Tensor grad_output, Tensor[] features, int[] output_sizes, "
      "str mode, Tensor? scale, Tensor? shift, bool relu) -> (Tensor[], Tensor, Tensor)");

  // Parallel dilated 3x3 convolutions (dilation 0: a 1x1 branch) of one input:
  // weight (n, Cout, Cin, 3, 3); combine "sum" -> act(sum_i conv_i + bias),
  // "concat" -> cat_i act(conv_i + bias_i). Taps that read only padding are skipped.
  m.def(
      "multi_dilation_conv(Tensor x, Tensor weight, int[] dilations, Tensor? bias, str combine, "
      "bool relu) -> Tensor");
  // Gradients of x, weight and bias (bias's as if present); `output` is the
  // forward's result (its sign gives the ReLU's mask).
  m.def(
      "multi_dilation_conv_backward(Tensor grad_output, Tensor x, Tensor weight, int[] dilations, "
      "Tensor output, str combine, bool relu) -> (Tensor, Tensor, Tensor)");
  // x (B, C, H, W) laid out channels-last or NCHW-contiguous (a copy unless it
  // already is): how layers convert once for a chain of channels-last ops.
  m.def("relayout(Tensor x, bool channels_last) -> Tensor");
  // x * sigmoid(conv(cat(mean_c x, max_c x), weight)), weight (1, 2, K, K);
  // laid out as x, or NCHW-contiguous when contiguous_output (a layer that
  // converted its input to channels-last gets its output back in one pass).
  m.def("spatial_attention(Tensor x, Tensor weight, bool contiguous_output=False) -> Tensor");
  m.def("spatial_attention_backward(Tensor grad_output, Tensor x, Tensor weight) -> (Tensor, Tensor)");

  // Shifted-window attention (Swin) over token maps q, k, v (B, *S, heads,
  // head_dim), S = (H, W) or (D, H, W): pad, roll by -shift, windows,
  // softmax(scale q k^T + bias + region mask) v, and back, all by index
  // arithmetic (csrc/core/window_geometry.h). Padded keys and values are
  // pad_key and pad_value (heads, head_dim); the bias comes from
  // rel_pos_bias_table (prod(2 window - 1), heads). Returns the output
  // (B, *S, heads, head_dim) and the log-sum-exp of every query's scores
  // (B, *S, heads), float32 (float64 for float64 inputs).
  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, int[] window_size, int[] shift_size, "
      "Tensor rel_pos_bias_table, Tensor pad_key, Tensor pad_value, float scale) -> (Tensor, Tensor)");
  // Gradients of q, k, v, rel_pos_bias_table, pad_key and pad_value, from the
  // forward's output and log-sum-exp (scores are recomputed, flash style).
  m.def(
      "window_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int[] window_size, int[] shift_size, Tensor rel_pos_bias_table, Tensor pad_key, Tensor pad_value, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

// medmtl._C.weight_cache_info() -> (entries, bytes, budget in bytes) of the
// cpu backend's cache of derived weights (csrc/cpu/derived_weight_cache.h).
PyObject* weight_cache_info(PyObject*, PyObject*) {
  const auto [entries, bytes] = medmtl::derived_weight_cache_size();
  return Py_BuildValue("(LLL)", static_cast<long long>(entries), static_cast<long long>(bytes),
                       static_cast<long long>(medmtl::derived_weight_cache_budget()));
}

// medmtl._C.winograd_enabled() -> bool; medmtl._C.set_winograd_enabled(bool):
// the cpu backend's Winograd F(4x4, 3x3) switch (csrc/cpu/winograd_conv3x3.h).
PyObject* winograd_enabled(PyObject*, PyObject*) { return PyBool_FromLong(medmtl::winograd_enabled()); }

PyObject* set_winograd_enabled(PyObject*, PyObject* arg) {
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) return nullptr;
  medmtl::set_winograd_enabled(enabled != 0);
  Py_RETURN_NONE;
}

// medmtl._C.private_op_fallbacks() -> list of "op: reason", one per private
// PyTorch op the CPU kernels do not call (csrc/cpu/private_ops.h).
PyObject* private_op_fallbacks(PyObject*, PyObject*) {
  const std::vector<std::string> reasons = medmtl::private_op_fallbacks();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(reasons.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < reasons.size(); ++i) {
    PyObject* item = PyUnicode_FromString(reasons[i].c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyMethodDef module_methods[] = {
    {"private_op_fallbacks", private_op_fallbacks, METH_NOARGS,
     "[\"op: reason\"] for each private PyTorch op (oneDNN's fused convolutions) the CPU kernels replace by "
     "public ATen calls because its schema differs from the one they were written for"},
    {"weight_cache_info", weight_cache_info, METH_NOARGS,
     "(entries, bytes, budget) of the cpu backend's cache of derived weights (Winograd kernel transforms)"},
    {"winograd_enabled", winograd_enabled, METH_NOARGS, "whether the cpu backend may use Winograd tiles"},
    {"set_winograd_enabled", set_winograd_enabled, METH_O, "turns the cpu backend's Winograd tiles on or off"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "medmtl's compiled kernels (torch.ops.medmtl)", -1,
                                          module_methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  medmtl::private_op_fallbacks();  // each private op's schema is checked once, at load
  // The CPU kernels' copy in force (csrc/cpu/cpu_capability.h), the best this
  // CPU supports, and why they differ (or what was ignored).
  const medmtl::CpuCapabilityChoice& cpu = medmtl::cpu_capability();
  PyModule_AddStringConstant(module, "cpu_capability", medmtl::cpu_capability_name(cpu.in_force));
  PyModule_AddStringConstant(module, "cpu_capability_supported", medmtl::cpu_capability_name(cpu.supported));
  PyModule_AddStringConstant(module, "cpu_capability_note", cpu.note.c_str());
  PyModule_AddIntConstant(module, "with_cuda", MEDMTL_WITH_CUDA);
  PyModule_AddStringConstant(module, "cuda_arch_list", MEDMTL_CUDA_ARCHS);
  return module;
}
}
