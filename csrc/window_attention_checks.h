// Input checks of window_attention, shared by the CPU and CUDA wrappers, and
// the geometry and token strides the kernels take.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "core/window_geometry.h"

namespace medmtl {

using core::TokenStrides;

// t's strides (t's head_dim contiguous); 2-D maps get a depth stride of 0.
inline TokenStrides token_strides(const at::Tensor& t) {
  TokenStrides s;
  const int64_t nd = t.dim() - 3;
  s.batch = t.stride(0);
  for (int64_t d = 0; d < nd; ++d) s.dim[core::kWindowDims - nd + d] = t.stride(1 + d);
  s.head = t.stride(-2);
  return s;
}

// t with a contiguous last dim (a copy only when it is not).
inline at::Tensor with_contiguous_head_dim(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// t has q's shape, dtype and device.
inline void check_like_q(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q (", q.sizes(), "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of q (", q.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on the device of q (", q.device(), "), got ",
              t.device());
}

inline core::WindowGeometry check_window_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, at::IntArrayRef window_size,
                                                           at::IntArrayRef shift_size, const at::Tensor& table,
                                                           const at::Tensor& pad_key, const at::Tensor& pad_value,
                                                           double scale) {
  TORCH_CHECK(q.dim() == 5 || q.dim() == 6, op,
              ": q must be (B, H, W, heads, head_dim) or (B, D, H, W, heads, head_dim), got ", q.dim(),
              "-D of shape ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must have a floating dtype, got ", q.scalar_type());
  check_like_q(op, "k", k, q);
  check_like_q(op, "v", v, q);
  const int64_t nd = q.dim() - 3;
  TORCH_CHECK(static_cast<int64_t>(window_size.size()) == nd, op, ": window_size must have ", nd,
              " entries (one per spatial dim), got ", window_size);
  TORCH_CHECK(static_cast<int64_t>(shift_size.size()) == nd, op, ": shift_size must have ", nd,
              " entries (one per spatial dim), got ", shift_size);
  for (int64_t d = 0; d < nd; ++d) {
    TORCH_CHECK(window_size[d] >= 1, op, ": window_size entries must be >= 1, got ", window_size);
    TORCH_CHECK(shift_size[d] >= 0 && shift_size[d] < window_size[d], op,
                ": shift_size entries must be in [0, window_size), got shift ", shift_size, " for window ",
                window_size);
  }
  for (int64_t d = 1; d < q.dim(); ++d)
    TORCH_CHECK(q.size(d) > 0, op, ": q must have non-empty spatial, head and head_dim dims, got ", q.sizes());
  const int64_t heads = q.size(-2), head_dim = q.size(-1);
  int64_t table_rows = 1;
  for (int64_t d = 0; d < nd; ++d) table_rows *= 2 * window_size[d] - 1;
  TORCH_CHECK(table.dim() == 2 && table.size(0) == table_rows && table.size(1) == heads, op,
              ": rel_pos_bias_table must have shape (", table_rows, ", ", heads, "), got ", table.sizes());
  TORCH_CHECK(pad_key.dim() == 2 && pad_key.size(0) == heads && pad_key.size(1) == head_dim, op,
              ": pad_key must have shape (", heads, ", ", head_dim, "), got ", pad_key.sizes());
  TORCH_CHECK(pad_value.dim() == 2 && pad_value.size(0) == heads && pad_value.size(1) == head_dim, op,
              ": pad_value must have shape (", heads, ", ", head_dim, "), got ", pad_value.sizes());
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"rel_pos_bias_table", table}, {"pad_key", pad_key},
        {"pad_value", pad_value}}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of q (", q.scalar_type(),
                "), got ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on the device of q (", q.device(), "), got ",
                t.device());
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  int64_t size[core::kWindowDims] = {1, 1, 1}, win[core::kWindowDims] = {1, 1, 1},
          shift[core::kWindowDims] = {0, 0, 0};
  for (int64_t d = 0; d < nd; ++d) {
    size[core::kWindowDims - nd + d] = q.size(1 + d);
    win[core::kWindowDims - nd + d] = window_size[d];
    shift[core::kWindowDims - nd + d] = shift_size[d];
  }
  return core::window_geometry(q.size(0), size, heads, head_dim, win, shift);
}

// The backward's extra inputs: grad_out and out of q's shape and dtype, lse
// (B, *S, heads) in the accumulation dtype (float64 for float64 q, else float32).
inline void check_window_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q,
                                                   const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "window_attention_backward";
  check_like_q(op, "grad_out", grad_out, q);
  check_like_q(op, "out", out, q);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, q.dim() - 1), op, ": lse must have shape ",
              q.sizes().slice(0, q.dim() - 1), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype, op, ": lse must have dtype ", lse_dtype, ", got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": lse must be on the device of q (", q.device(), "), got ",
              lse.device());
}

}  // namespace medmtl
