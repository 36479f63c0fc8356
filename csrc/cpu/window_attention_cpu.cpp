// CPU kernels of medmtl::window_attention (Swin shifted-window attention).
//
// One task per (batch, window, head). A task gathers its window's tokens by
// index arithmetic (csrc/core/window_geometry.h: padding, cyclic shift and
// partition are never materialised) into small per-thread buffers, then works
// through blocks of real queries (query_block_rows): scores = (scale q) k^T
// by GEMM, plus the bias (expanded once per call from the table, heads x N x N,
// shared by every window) and the region mask, a softmax in place, and P v by
// GEMM, written straight to the output rows. Padded queries are never
// computed; padded keys read pad_key / pad_value. The forward keeps the
// log-sum-exp of every query; the backward recomputes P from it, flash style.
// The GEMMs are ATen's (MKL/oneDNN): the kernel fuses around them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../window_attention_checks.h"

// Everything below is compiled per CPU capability (cpu_capability.h).
#include "cpu_capability_target.h"
// After the target: one copy of its loops per capability (core/cpu_copy.h).
#include "core/softmax_exp.h"

namespace medmtl {
inline namespace MEDMTL_CPU_NS {
namespace {

using core::WindowGeometry;

// Query rows per score block: blocks of about kScoreBlock scores (1 MB in
// float64, 256 KB in float32), at least 16 rows, a multiple of 16 rows.
constexpr int64_t kScoreBlock = 1 << 16;

int64_t query_block_rows(int64_t tokens) {
  const int64_t rows = std::max<int64_t>(16, kScoreBlock / tokens / 16 * 16);
  return std::min(rows, tokens);
}

// The in-window positions of the N tokens of a window (the same for every window).
std::vector<int64_t> window_positions(const WindowGeometry& g) {
  std::vector<int64_t> pos(g.tokens * core::kWindowDims);
  int64_t coord[core::kWindowDims];
  for (int64_t r = 0; r < g.tokens; ++r) core::window_token(g, 0, r, &pos[r * core::kWindowDims], coord);
  return pos;
}

// Table rows of every (query, key) pair of a window, (N * N) int64.
at::Tensor bias_rows(const WindowGeometry& g) {
  const std::vector<int64_t> pos = window_positions(g);
  at::Tensor rows = at::empty({g.tokens * g.tokens}, at::kLong);
  int64_t* out = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < g.tokens; ++i)
    for (int64_t j = 0; j < g.tokens; ++j)
      out[i * g.tokens + j] = core::bias_row(g, &pos[i * core::kWindowDims], &pos[j * core::kWindowDims]);
  return rows;
}

// The tokens of one window: their offsets in a token map of the given strides
// (-1 when padded) and mask regions.
struct WindowTokens {
  std::vector<int64_t> offset;      // (N,) element offset of the token's head 0, or -1
  std::vector<int64_t> out_offset;  // (N,) offset in the contiguous (B, *S, heads, hd) output, or -1
  std::vector<int> region;          // (N,) mask region
  std::vector<int64_t> real;        // in-window indices of the real tokens
  bool mixed = false;               // regions differ within the window

  explicit WindowTokens(const WindowGeometry& g)
      : offset(g.tokens), out_offset(g.tokens), region(g.tokens, 0) {
    real.reserve(g.tokens);
  }

  void fill(const WindowGeometry& g, const TokenStrides& s, int64_t b, int64_t window) {
    int64_t pos[core::kWindowDims], coord[core::kWindowDims];
    real.clear();
    mixed = false;
    for (int64_t r = 0; r < g.tokens; ++r) {
      const bool is_real = core::window_token(g, window, r, pos, coord);
      region[r] = g.masked ? core::window_region(g, window, pos) : 0;
      mixed = mixed || region[r] != region[0];
      if (!is_real) {
        offset[r] = out_offset[r] = -1;
        continue;
      }
      real.push_back(r);
      int64_t flat = b, off = b * s.batch;
      for (int d = 0; d < core::kWindowDims; ++d) {
        flat = flat * g.size[d] + coord[d];
        off += coord[d] * s.dim[d];
      }
      offset[r] = off;
      out_offset[r] = flat * g.heads * g.head_dim;
    }
  }
};

// Rows of a token map (one head) into a dense (N, hd) buffer; padded tokens take `pad`.
template <typename scalar_t>
void gather_rows(const WindowTokens& t, const scalar_t* map, int64_t head_offset, const scalar_t* pad,
                 int64_t hd, scalar_t* dst) {
  for (size_t r = 0; r < t.offset.size(); ++r) {
    const scalar_t* src = t.offset[r] < 0 ? pad : map + t.offset[r] + head_offset;
    std::copy(src, src + hd, dst + r * hd);
  }
}

at::Tensor matrix(void* data, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  return at::from_blob(data, {rows, cols}, options);
}

// scores (m, N) += bias rows of the block's queries; keys of another region
// also get Swin's additive mask, core::kRegionMask (-100).
template <typename scalar_t>
void add_bias_and_mask(const WindowTokens& t, const int64_t* queries, int64_t m, int64_t n,
                       const scalar_t* bias, scalar_t* scores) {
  constexpr scalar_t kMasked = static_cast<scalar_t>(core::kRegionMask);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = queries[i];
    scalar_t* row = scores + i * n;
    const scalar_t* brow = bias + r * n;
    for (int64_t j = 0; j < n; ++j) row[j] += brow[j];
    if (t.mixed) {
      const int own = t.region[r];
      for (int64_t j = 0; j < n; ++j) row[j] += t.region[j] == own ? scalar_t(0) : kMasked;
    }
  }
}

// One thread's current (batch, window, head) task: the window's tokens in q,
// k and v, and the head's keys and values gathered into (N, hd) matrices
// (padded keys take pad_key / pad_value). The token tables are refilled only
// when the window changes (tasks run head-fastest).
template <typename scalar_t>
struct WindowTask {
  const WindowGeometry& g;
  const TokenStrides sq, sk, sv;
  const scalar_t *kd, *vd, *pkd, *pvd;
  WindowTokens qt, kt, vt;
  std::vector<scalar_t> kbuf, vbuf;
  at::Tensor kmat, vmat;  // (N, hd) views of kbuf and vbuf
  int64_t head = -1, window = -1;

  WindowTask(const WindowGeometry& geometry, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& pad_key, const at::Tensor& pad_value)
      : g(geometry), sq(token_strides(q)), sk(token_strides(k)), sv(token_strides(v)),
        kd(k.const_data_ptr<scalar_t>()), vd(v.const_data_ptr<scalar_t>()),
        pkd(pad_key.const_data_ptr<scalar_t>()), pvd(pad_value.const_data_ptr<scalar_t>()), qt(geometry),
        kt(geometry), vt(geometry), kbuf(geometry.tokens * geometry.head_dim),
        vbuf(geometry.tokens * geometry.head_dim) {
    const auto options = q.options().dtype(c10::CppTypeToScalarType<scalar_t>::value);
    kmat = matrix(kbuf.data(), g.tokens, g.head_dim, options);
    vmat = matrix(vbuf.data(), g.tokens, g.head_dim, options);
  }

  void load(int64_t task) {
    head = task % g.heads;
    const int64_t bw = task / g.heads, b = bw / g.windows, w = bw % g.windows;
    if (window != bw) {
      qt.fill(g, sq, b, w);
      kt.fill(g, sk, b, w);
      vt.fill(g, sv, b, w);
      window = bw;
    }
    gather_rows(kt, kd, head * sk.head, pkd + head * g.head_dim, g.head_dim, kbuf.data());
    gather_rows(vt, vd, head * sv.head, pvd + head * g.head_dim, g.head_dim, vbuf.data());
  }
};

template <typename scalar_t>
void forward_kernel(const WindowGeometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& bias, const at::Tensor& pad_key, const at::Tensor& pad_value, double scale,
                    at::Tensor& out, at::Tensor& lse) {
  const int64_t n = g.tokens, hd = g.head_dim, heads = g.heads;
  const int64_t q_head = token_strides(q).head;
  const scalar_t *qd = q.const_data_ptr<scalar_t>(), *bd = bias.const_data_ptr<scalar_t>();
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  scalar_t* ld = lse.mutable_data_ptr<scalar_t>();
  const auto options = q.options().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const int64_t tasks = g.batch * g.windows * heads;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t qb = query_block_rows(n);
    std::vector<scalar_t> qbuf(qb * hd), scores(qb * n), obuf(qb * hd), inv_sum(qb);
    WindowTask<scalar_t> t(g, q, k, v, pad_key, pad_value);
    const WindowTokens& qt = t.qt;
    for (int64_t task = begin; task < end; ++task) {
      t.load(task);
      const int64_t h = t.head;
      const int64_t real = static_cast<int64_t>(qt.real.size());
      for (int64_t start = 0; start < real; start += qb) {
        const int64_t m = std::min(qb, real - start);
        const int64_t* rows = qt.real.data() + start;
        for (int64_t i = 0; i < m; ++i) {
          const scalar_t* src = qd + qt.offset[rows[i]] + h * q_head;
          for (int64_t c = 0; c < hd; ++c) qbuf[i * hd + c] = static_cast<scalar_t>(src[c] * scale);
        }
        at::Tensor smat = matrix(scores.data(), m, n, options);
        at::mm_out(smat, matrix(qbuf.data(), m, hd, options), t.kmat.t());
        add_bias_and_mask(qt, rows, m, n, bd + h * n * n, scores.data());
        for (int64_t i = 0; i < m; ++i) {
          scalar_t* row = scores.data() + i * n;
          const scalar_t peak = core::row_max(row, n);
          const scalar_t sum = core::exp_shifted_sum(row, n, peak);
          inv_sum[i] = scalar_t(1) / sum;
          ld[qt.out_offset[rows[i]] / hd + h] = peak + std::log(sum);
        }
        at::Tensor omat = matrix(obuf.data(), m, hd, options);
        at::mm_out(omat, smat, t.vmat);
        for (int64_t i = 0; i < m; ++i) {
          scalar_t* dst = od + qt.out_offset[rows[i]] + h * hd;
          for (int64_t c = 0; c < hd; ++c) dst[c] = obuf[i * hd + c] * inv_sum[i];
        }
      }
    }
  });
}

// Backward of one call. Per task, for each block of real queries: P = exp(S - lse)
// from recomputed scores, dV += P^T dO, dS = P * (dO v^T - D) with
// D = rowsum(dO * O), dQ = scale dS k, dK += dS^T (scale q). dS is also
// summed into a per-thread (heads, N, N) buffer that is folded into the
// table's rows once at the end; dK and dV of padded keys are summed into
// per-thread pad_key / pad_value gradients.
template <typename scalar_t>
void backward_kernel(const WindowGeometry& g, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& bias,
                     const at::Tensor& pad_key, const at::Tensor& pad_value, double scale, at::Tensor& gq,
                     at::Tensor& gk, at::Tensor& gv, at::Tensor& grad_bias, at::Tensor& grad_pad_key,
                     at::Tensor& grad_pad_value) {
  const int64_t n = g.tokens, hd = g.head_dim, heads = g.heads;
  const int64_t q_head = token_strides(q).head;
  const scalar_t *qd = q.const_data_ptr<scalar_t>(), *bd = bias.const_data_ptr<scalar_t>(),
                 *god = grad_out.const_data_ptr<scalar_t>(), *od = out.const_data_ptr<scalar_t>(),
                 *ld = lse.const_data_ptr<scalar_t>();
  scalar_t *gqd = gq.mutable_data_ptr<scalar_t>(), *gkd = gk.mutable_data_ptr<scalar_t>(),
           *gvd = gv.mutable_data_ptr<scalar_t>();
  // Per-thread partial sums: grad_bias (threads, heads, N, N), pad grads (threads, heads, hd).
  scalar_t *gbd = grad_bias.mutable_data_ptr<scalar_t>(), *gpkd = grad_pad_key.mutable_data_ptr<scalar_t>(),
           *gpvd = grad_pad_value.mutable_data_ptr<scalar_t>();
  const int64_t threads = grad_bias.size(0);
  const auto options = q.options().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const int64_t tasks = g.batch * g.windows * heads;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "window_attention_backward: thread ", tid, " beyond the ", threads,
                " partial buffers");
    const int64_t qb = query_block_rows(n);
    std::vector<scalar_t> qbuf(qb * hd), dobuf(qb * hd), dqbuf(qb * hd), dkbuf(n * hd), dvbuf(n * hd),
        probs(qb * n), dprobs(qb * n), delta(qb), row_lse(qb);
    WindowTask<scalar_t> t(g, q, k, v, pad_key, pad_value);
    const WindowTokens &qt = t.qt, &kt = t.kt;
    const at::Tensor &kmat = t.kmat, &vmat = t.vmat;
    for (int64_t task = begin; task < end; ++task) {
      t.load(task);
      const int64_t h = t.head;
      at::Tensor dkmat = matrix(dkbuf.data(), n, hd, options), dvmat = matrix(dvbuf.data(), n, hd, options);
      dkmat.zero_();
      dvmat.zero_();
      scalar_t* grad_bias_h = gbd + (tid * heads + h) * n * n;
      const int64_t real = static_cast<int64_t>(qt.real.size());
      for (int64_t start = 0; start < real; start += qb) {
        const int64_t m = std::min(qb, real - start);
        const int64_t* rows = qt.real.data() + start;
        for (int64_t i = 0; i < m; ++i) {
          const int64_t r = rows[i];
          const scalar_t* src = qd + qt.offset[r] + h * q_head;
          const scalar_t* go = god + qt.out_offset[r] + h * hd;
          const scalar_t* o = od + qt.out_offset[r] + h * hd;
          scalar_t dot = 0;
          for (int64_t c = 0; c < hd; ++c) {
            qbuf[i * hd + c] = static_cast<scalar_t>(src[c] * scale);
            dobuf[i * hd + c] = go[c];
            dot += go[c] * o[c];
          }
          delta[i] = dot;
          row_lse[i] = ld[qt.out_offset[r] / hd + h];
        }
        const at::Tensor qmat = matrix(qbuf.data(), m, hd, options), domat = matrix(dobuf.data(), m, hd, options);
        at::Tensor pmat = matrix(probs.data(), m, n, options), dpmat = matrix(dprobs.data(), m, n, options);
        at::mm_out(pmat, qmat, kmat.t());
        add_bias_and_mask(qt, rows, m, n, bd + h * n * n, probs.data());
        for (int64_t i = 0; i < m; ++i) {
          core::exp_shifted_sum(probs.data() + i * n, n, row_lse[i]);
        }
        dvmat.addmm_(pmat.t(), domat);
        at::mm_out(dpmat, domat, vmat.t());
        for (int64_t i = 0; i < m; ++i) {
          const scalar_t* p = probs.data() + i * n;
          scalar_t* ds = dprobs.data() + i * n;
          scalar_t* gb = grad_bias_h + rows[i] * n;
          for (int64_t j = 0; j < n; ++j) {
            ds[j] = p[j] * (ds[j] - delta[i]);
            gb[j] += ds[j];
          }
        }
        at::Tensor dqmat = matrix(dqbuf.data(), m, hd, options);
        at::mm_out(dqmat, dpmat, kmat);
        for (int64_t i = 0; i < m; ++i) {
          scalar_t* dst = gqd + qt.out_offset[rows[i]] + h * hd;
          for (int64_t c = 0; c < hd; ++c) dst[c] = static_cast<scalar_t>(dqbuf[i * hd + c] * scale);
        }
        dkmat.addmm_(dpmat.t(), qmat);
      }
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t* dk = dkbuf.data() + r * hd;
        const scalar_t* dv = dvbuf.data() + r * hd;
        scalar_t* dst_k = kt.out_offset[r] < 0 ? gpkd + (tid * heads + h) * hd : nullptr;
        if (dst_k != nullptr) {
          scalar_t* dst_v = gpvd + (tid * heads + h) * hd;
          for (int64_t c = 0; c < hd; ++c) {
            dst_k[c] += dk[c];
            dst_v[c] += dv[c];
          }
        } else {
          std::copy(dk, dk + hd, gkd + kt.out_offset[r] + h * hd);
          std::copy(dv, dv + hd, gvd + kt.out_offset[r] + h * hd);
        }
      }
    }
  });
}

// Inputs as the kernels take them: head_dim contiguous, and float32 in place
// of float16/bfloat16 (the CPU kernels compute in float32 and float64).
at::Tensor kernel_input(const at::Tensor& t) {
  const at::Tensor c = with_contiguous_head_dim(t);
  return c.scalar_type() == at::kHalf || c.scalar_type() == at::kBFloat16 ? c.to(at::kFloat) : c;
}

// The expanded bias (heads, N, N): table rows gathered once per call.
at::Tensor expanded_bias(const WindowGeometry& g, const at::Tensor& table, const at::Tensor& rows) {
  return table.index_select(0, rows).t().reshape({g.heads, g.tokens, g.tokens}).contiguous();
}

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, at::IntArrayRef window_size,
                                                        at::IntArrayRef shift_size, const at::Tensor& table_in,
                                                        const at::Tensor& pad_key_in, const at::Tensor& pad_value_in,
                                                        double scale) {
  const WindowGeometry g = check_window_attention_inputs("window_attention", q_in, k_in, v_in, window_size,
                                                         shift_size, table_in, pad_key_in, pad_value_in, scale);
  TORCH_CHECK(q_in.device().is_cpu(), "window_attention: q must be a CPU tensor for the CPU kernels, got ",
              q_in.device());
  const at::Tensor q = kernel_input(q_in), k = kernel_input(k_in), v = kernel_input(v_in);
  const at::Tensor table = kernel_input(table_in), pad_key = kernel_input(pad_key_in).contiguous(),
                   pad_value = kernel_input(pad_value_in).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), out.options());
  if (g.batch > 0) {
    const at::Tensor bias = expanded_bias(g, table, bias_rows(g));
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "window_attention_cpu", [&] {
      forward_kernel<scalar_t>(g, q, k, v, bias, pad_key, pad_value, scale, out, lse);
    });
  }
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const at::Tensor& table_in, const at::Tensor& pad_key_in, const at::Tensor& pad_value_in, double scale) {
  const WindowGeometry g =
      check_window_attention_inputs("window_attention_backward", q_in, k_in, v_in, window_size, shift_size, table_in,
                                    pad_key_in, pad_value_in, scale);
  check_window_attention_backward_inputs(grad_out_in, q_in, out_in, lse_in);
  TORCH_CHECK(q_in.device().is_cpu(), "window_attention_backward: q must be a CPU tensor for the CPU kernels, got ",
              q_in.device());
  const at::Tensor q = kernel_input(q_in), k = kernel_input(k_in), v = kernel_input(v_in);
  const at::Tensor grad_out = kernel_input(grad_out_in).contiguous(), out = kernel_input(out_in).contiguous();
  const at::Tensor lse = lse_in.contiguous().to(q.scalar_type());
  const at::Tensor table = kernel_input(table_in), pad_key = kernel_input(pad_key_in).contiguous(),
                   pad_value = kernel_input(pad_value_in).contiguous();
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor gq = at::empty(q.sizes(), contiguous), gk = at::empty(q.sizes(), contiguous),
             gv = at::empty(q.sizes(), contiguous);
  const int64_t threads = at::get_num_threads();
  at::Tensor grad_bias = at::zeros({threads, g.heads, g.tokens, g.tokens}, q.options());
  at::Tensor grad_pad_key = at::zeros({threads, g.heads, g.head_dim}, q.options());
  at::Tensor grad_pad_value = at::zeros({threads, g.heads, g.head_dim}, q.options());
  const at::Tensor rows = bias_rows(g);
  if (g.batch > 0) {
    const at::Tensor bias = expanded_bias(g, table, rows);
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "window_attention_backward_cpu", [&] {
      backward_kernel<scalar_t>(g, grad_out, q, k, v, out, lse, bias, pad_key, pad_value, scale, gq, gk, gv,
                                grad_bias, grad_pad_key, grad_pad_value);
    });
  }
  // Fold the (heads, N, N) pair gradients into the table rows (index_add_ is sequential on CPU: deterministic).
  at::Tensor grad_table = at::zeros({g.heads, table.size(0)}, q.options());
  grad_table.index_add_(1, rows, grad_bias.sum(0).view({g.heads, g.tokens * g.tokens}));
  const auto dtype = q_in.scalar_type();
  return {gq.to(dtype), gk.to(dtype), gv.to(dtype), grad_table.t().contiguous().to(dtype),
          grad_pad_key.sum(0).to(dtype), grad_pad_value.sum(0).to(dtype)};
}

}  // namespace

// Called by cpu_capability.cpp for the capability in force (CPU kernels).
void register_window_attention_cpu(torch::Library& m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace MEDMTL_CPU_NS
}  // namespace medmtl
