// Torch-free cores of the fused multi-scale pooling op on the CPU.
//
// One level of the op is a (B, C, D, H, W) map (D = 1 for 2-D input). For each
// channel plane the op computes t = act(x * scale + shift) and pools t to every
// output size s in `sizes` (bins s x s, or s x s x s in 3-D). The cores below
// pool one plane (NCHW layout, the W axis contiguous) or one block of channels
// at every position (channels-last layout, the C axis contiguous) into a compact
// per-plane buffer holding, size after size, the bins in row-major order.
// The torch wrappers in csrc/cpu place that buffer into the op's output.
//
// A PoolPlan, built once per level, holds the index tables (which output "bin
// rows" (bd, bh) each input row (d, h) falls in, the bins' column ranges and
// sizes), so the per-element loops do no integer division.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "adaptive_bins.h"
#include "cpu_copy.h"

namespace medmtl {
namespace core {
MEDMTL_CORE_CPU_COPY_BEGIN  // one copy per CPU capability in the CPU kernels (cpu_copy.h)

enum class PoolMode : int { kAvg = 0, kMax = 1 };

// Calls f(std::true_type) or f(std::false_type): the cores take the ReLU as a
// template argument kRelu, so their loops see it as a constant.
template <typename F>
inline decltype(auto) with_relu(bool relu, F&& f) {
  if (relu) return f(std::true_type{});
  return f(std::false_type{});
}

// Spatial extent of one level and the output sizes it is pooled to.
struct PoolGeometry {
  int64_t depth = 1, height = 1, width = 1;  // input spatial size; depth 1 in 2-D
  int spatial_dims = 2;                      // 2 or 3
  std::vector<int64_t> sizes;                // output sizes, each s -> s^spatial_dims bins

  int64_t out_depth(size_t k) const { return spatial_dims == 3 ? sizes[k] : 1; }
  int64_t plane_size() const { return depth * height * width; }
};

// Index tables of one level. A "bin row" is the row (bd, bh) of output bins of
// one size; bin rows are numbered across sizes, and so are bins (compact order).
struct PoolPlan {
  PoolGeometry g;
  int64_t total_bins = 0, total_bin_rows = 0;
  std::vector<int64_t> size_bin_offset;   // [k] first compact bin of size k
  std::vector<int64_t> size_row_offset;   // [k] first bin row of size k
  std::vector<int64_t> bin_row_size;      // [bin row] its size index k
  std::vector<int64_t> bin_count;         // [bin] number of input positions it covers
  std::vector<double> inv_count;          // [bin] 1 / bin_count
  std::vector<int64_t> bin_first_position;// [bin] flat plane index of its first position
  std::vector<int64_t> w_start, w_end;    // [size_w_offset[k] + bw] column range of bin column bw
  std::vector<int64_t> size_w_offset;     // [k]
  std::vector<int64_t> col_first, col_last;  // [k * W + w] bin columns of size k holding column w
  std::vector<int64_t> row_begin;         // [r], r = d * H + h: bin rows holding input row r are
  std::vector<int64_t> row_bin_rows;      //   row_bin_rows[row_begin[r] .. row_begin[r + 1])
  bool global_only = true;                // every size is 1 (global pooling)
  std::vector<int64_t> run_end;           // [r] end of the run of rows from r on that lie in
                                          //   the same bin rows as r (meaningful at run starts)

  explicit PoolPlan(PoolGeometry geometry) : g(std::move(geometry)) {
    const int64_t D = g.depth, H = g.height, W = g.width;
    for (size_t k = 0; k < g.sizes.size(); ++k) {
      const int64_t s = g.sizes[k], od = g.out_depth(k);
      global_only = global_only && s == 1;
      size_bin_offset.push_back(total_bins);
      size_row_offset.push_back(total_bin_rows);
      size_w_offset.push_back(static_cast<int64_t>(w_start.size()));
      for (int64_t bw = 0; bw < s; ++bw) {
        w_start.push_back(adaptive_bin_start(bw, W, s));
        w_end.push_back(adaptive_bin_end(bw, W, s));
      }
      for (int64_t w = 0; w < W; ++w) {
        col_first.push_back(first_bin_containing(w, W, s));
        col_last.push_back(last_bin_containing(w, W, s));
      }
      for (int64_t bd = 0; bd < od; ++bd)
        for (int64_t bh = 0; bh < s; ++bh) {
          bin_row_size.push_back(static_cast<int64_t>(k));
          const int64_t d0 = adaptive_bin_start(bd, D, od), d1 = adaptive_bin_end(bd, D, od);
          const int64_t h0 = adaptive_bin_start(bh, H, s), h1 = adaptive_bin_end(bh, H, s);
          for (int64_t bw = 0; bw < s; ++bw) {
            const int64_t w0 = adaptive_bin_start(bw, W, s), w1 = adaptive_bin_end(bw, W, s);
            bin_count.push_back((d1 - d0) * (h1 - h0) * (w1 - w0));
            inv_count.push_back(1.0 / double(bin_count.back()));
            bin_first_position.push_back((d0 * H + h0) * W + w0);
          }
        }
      total_bins += od * s * s;
      total_bin_rows += od * s;
    }
    for (int64_t d = 0; d < D; ++d)
      for (int64_t h = 0; h < H; ++h) {
        row_begin.push_back(static_cast<int64_t>(row_bin_rows.size()));
        for (size_t k = 0; k < g.sizes.size(); ++k) {
          const int64_t s = g.sizes[k], od = g.out_depth(k);
          for (int64_t bd = first_bin_containing(d, D, od); bd <= last_bin_containing(d, D, od); ++bd)
            for (int64_t bh = first_bin_containing(h, H, s); bh <= last_bin_containing(h, H, s); ++bh)
              row_bin_rows.push_back(size_row_offset[k] + bd * s + bh);
        }
      }
    row_begin.push_back(static_cast<int64_t>(row_bin_rows.size()));
    const int64_t R = D * H;
    run_end.assign(R, R);
    for (int64_t r = R - 2; r >= 0; --r) {
      const bool same = std::equal(row_bin_rows.begin() + row_begin[r], row_bin_rows.begin() + row_begin[r + 1],
                                   row_bin_rows.begin() + row_begin[r + 1],
                                   row_bin_rows.begin() + row_begin[r + 2]);
      run_end[r] = same ? run_end[r + 1] : r + 1;
    }
  }

  int64_t num_rows() const { return g.depth * g.height; }
  // Row length of the column accumulators: the width rounded up to 16 so that
  // their loops run whole vectors.
  int64_t padded_width() const { return (g.width + 15) / 16 * 16; }
  // Compact index of bin column bw in bin row R.
  int64_t bin_of(int64_t bin_row, int64_t bw) const {
    const int64_t k = bin_row_size[bin_row];
    return size_bin_offset[k] + (bin_row - size_row_offset[k]) * g.sizes[k] + bw;
  }
  // Scratch (accumulators) the NCHW cores need: a row, a row per bin row,
  // a plane and a value per bin.
  int64_t plane_scratch_size() const {
    return padded_width() * (1 + total_bin_rows) + g.plane_size() + total_bins;
  }
};

// ---------------------------------------------------------------------------
// NCHW: one contiguous plane of depth*height*width values.

// Pools one plane into out[total_bins]: means, or maxima (values only; see
// pool_plane_argmax for their positions). Each input row is transformed once
// and added (or max-ed) into the column accumulators of the bin rows holding
// it, a contiguous loop the compiler vectorizes; the columns are reduced to
// bins once per plane. scratch: plane_scratch_size() accumulators.
template <bool kRelu, typename scalar_t, typename acc_t>
void pool_plane_forward(const scalar_t* plane, const PoolPlan& plan, PoolMode mode, acc_t scale,
                        acc_t shift, acc_t* scratch, acc_t* out) {
  const int64_t W = plan.g.width;
  const bool is_max = mode == PoolMode::kMax;
  if (plan.global_only) {
    // Every size is 1: one flat loop over the plane (short rows would cost
    // more in loop overhead than in arithmetic).
    const int64_t n = plan.g.plane_size();
    acc_t v = is_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
    if (is_max) {
      for (int64_t i = 0; i < n; ++i) {
        const acc_t y = affine_activation<kRelu, acc_t>(static_cast<acc_t>(plane[i]), scale, shift);
        v = max_pool_takes(y, v) ? y : v;
      }
    } else {
#pragma omp simd reduction(+ : v)
      for (int64_t i = 0; i < n; ++i)
        v += affine_activation<kRelu, acc_t>(static_cast<acc_t>(plane[i]), scale, shift);
      v /= acc_t(n);
    }
    for (int64_t b = 0; b < plan.total_bins; ++b) out[b] = v;
    return;
  }
  acc_t* t = scratch;
  const int64_t Wp = plan.padded_width();
  acc_t* columns = scratch + Wp;  // [total_bin_rows][Wp]
  std::fill(t + W, t + Wp, acc_t(0));
  std::fill(columns, columns + plan.total_bin_rows * Wp,
            is_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0));
  // Rows come in runs that lie in the same bin rows: reduce a run into t
  // first, then add t into each of its bin rows' columns once.
  for (int64_t r = 0; r < plan.num_rows(); r = plan.run_end[r]) {
    const scalar_t* x = plane + r * W;
    for (int64_t w = 0; w < W; ++w)
      t[w] = affine_activation<kRelu, acc_t>(static_cast<acc_t>(x[w]), scale, shift);
    for (int64_t rr = r + 1; rr < plan.run_end[r]; ++rr) {
      const scalar_t* xr = plane + rr * W;
      if (is_max) {
        for (int64_t w = 0; w < W; ++w) {
          const acc_t y = affine_activation<kRelu, acc_t>(static_cast<acc_t>(xr[w]), scale, shift);
          t[w] = max_pool_takes(y, t[w]) ? y : t[w];
        }
      } else {
        for (int64_t w = 0; w < W; ++w)
          t[w] += affine_activation<kRelu, acc_t>(static_cast<acc_t>(xr[w]), scale, shift);
      }
    }
    for (int64_t i = plan.row_begin[r]; i < plan.row_begin[r + 1]; ++i) {
      acc_t* col = columns + plan.row_bin_rows[i] * Wp;
      if (is_max) {
        for (int64_t w = 0; w < Wp; ++w) col[w] = max_pool_takes(t[w], col[w]) ? t[w] : col[w];
      } else {
        for (int64_t w = 0; w < Wp; ++w) col[w] += t[w];
      }
    }
  }
  // Reduce each bin row's columns over each bin's column range.
  for (int64_t k = 0; k < static_cast<int64_t>(plan.g.sizes.size()); ++k) {
    const int64_t s = plan.g.sizes[k];
    const int64_t rows_k = plan.g.out_depth(k) * s;
    for (int64_t i = 0; i < rows_k; ++i) {
      const int64_t row = plan.size_row_offset[k] + i;
      const acc_t* col = columns + row * Wp;
      acc_t* o = out + plan.size_bin_offset[k] + i * s;
      for (int64_t bw = 0; bw < s; ++bw) {
        const int64_t w0 = plan.w_start[plan.size_w_offset[k] + bw];
        const int64_t w1 = plan.w_end[plan.size_w_offset[k] + bw];
        acc_t v = is_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
        if (is_max) {
          for (int64_t w = w0; w < w1; ++w) v = max_pool_takes(col[w], v) ? col[w] : v;
          o[bw] = v;
        } else {
          for (int64_t w = w0; w < w1; ++w) v += col[w];
          o[bw] = v * static_cast<acc_t>(plan.inv_count[plan.size_bin_offset[k] + i * s + bw]);
        }
      }
    }
  }
}

// Flat plane index of each bin's maximum, in PyTorch's scan order (row-major;
// a larger value or a NaN replaces the maximum, so ties keep the first).
template <bool kRelu, typename scalar_t, typename acc_t>
void pool_plane_argmax(const scalar_t* plane, const PoolPlan& plan, acc_t scale, acc_t shift,
                       acc_t* best, int64_t* argmax) {
  const int64_t W = plan.g.width;
  std::fill(best, best + plan.total_bins, -std::numeric_limits<acc_t>::infinity());
  std::copy(plan.bin_first_position.begin(), plan.bin_first_position.end(), argmax);
  for (int64_t r = 0; r < plan.num_rows(); ++r) {
    for (int64_t i = plan.row_begin[r]; i < plan.row_begin[r + 1]; ++i) {
      const int64_t row = plan.row_bin_rows[i], k = plan.bin_row_size[row], s = plan.g.sizes[k];
      for (int64_t bw = 0; bw < s; ++bw) {
        const int64_t bin = plan.bin_of(row, bw);
        const int64_t w1 = plan.w_end[plan.size_w_offset[k] + bw];
        for (int64_t w = plan.w_start[plan.size_w_offset[k] + bw]; w < w1; ++w) {
          const acc_t v = affine_activation<kRelu, acc_t>(static_cast<acc_t>(plane[r * W + w]), scale, shift);
          if (max_pool_takes(v, best[bin])) {
            best[bin] = v;
            argmax[bin] = r * W + w;
          }
        }
      }
    }
  }
}

// The gradient of the pre-activation y summed with and without the factor x:
// the plane's contribution to the gradients of scale and shift.
template <typename acc_t>
struct AffineGradSums {
  acc_t grad_scale = 0;
  acc_t grad_shift = 0;
};

// Backward of one plane. grad_out[total_bins] holds the gradient of the
// plane's pooled outputs; writes grad_plane (same layout as plane).
// scratch: plane_scratch_size() accumulators; argmax: total_bins (max mode).
template <bool kRelu, typename scalar_t, typename acc_t>
AffineGradSums<acc_t> pool_plane_backward(const scalar_t* plane, const acc_t* grad_out,
                                          const PoolPlan& plan, PoolMode mode, acc_t scale,
                                          acc_t shift, scalar_t* grad_plane,
                                          acc_t* scratch, int64_t* argmax) {
  const int64_t W = plan.g.width;
  AffineGradSums<acc_t> sums;
  auto finish_row = [&](const scalar_t* x, const acc_t* grad_t, scalar_t* grad_x) {
    acc_t sum_scale = 0, sum_shift = 0;
    for (int64_t w = 0; w < W; ++w) {
      const acc_t xv = static_cast<acc_t>(x[w]);
      const acc_t gy = activation_backward<kRelu, acc_t>(grad_t[w], xv * scale + shift);
      grad_x[w] = static_cast<scalar_t>(gy * scale);
      sum_scale += gy * xv;
      sum_shift += gy;
    }
    sums.grad_scale += sum_scale;
    sums.grad_shift += sum_shift;
  };
  acc_t* row = scratch;  // [W]
  if (mode == PoolMode::kAvg) {
    // spread[R][w]: what bin row R passes to column w (each bin gives grad/count
    // to every position it covers); an input row sums the spreads of its bin rows.
    acc_t* spread = scratch + W;
    for (int64_t R = 0; R < plan.total_bin_rows; ++R) {
      const int64_t k = plan.bin_row_size[R], s = plan.g.sizes[k];
      acc_t* sp = spread + R * W;
      std::fill(sp, sp + W, acc_t(0));
      for (int64_t bw = 0; bw < s; ++bw) {
        const int64_t bin = plan.bin_of(R, bw);
        const acc_t share = grad_out[bin] / acc_t(plan.bin_count[bin]);
        const int64_t w1 = plan.w_end[plan.size_w_offset[k] + bw];
        for (int64_t w = plan.w_start[plan.size_w_offset[k] + bw]; w < w1; ++w) sp[w] += share;
      }
    }
    for (int64_t r = 0; r < plan.num_rows(); ++r) {
      std::fill(row, row + W, acc_t(0));
      for (int64_t i = plan.row_begin[r]; i < plan.row_begin[r + 1]; ++i) {
        const acc_t* sp = spread + plan.row_bin_rows[i] * W;
        for (int64_t w = 0; w < W; ++w) row[w] += sp[w];
      }
      finish_row(plane + r * W, row, grad_plane + r * W);
    }
  } else {
    // Route each bin's gradient to its maximum's position.
    acc_t* plane_grad = scratch + W * (1 + plan.total_bin_rows);
    acc_t* best = plane_grad + plan.g.plane_size();
    pool_plane_argmax<kRelu, scalar_t, acc_t>(plane, plan, scale, shift, best, argmax);
    std::fill(plane_grad, plane_grad + plan.g.plane_size(), acc_t(0));
    for (int64_t b = 0; b < plan.total_bins; ++b) plane_grad[argmax[b]] += grad_out[b];
    for (int64_t r = 0; r < plan.num_rows(); ++r)
      finish_row(plane + r * W, plane_grad + r * W, grad_plane + r * W);
  }
  return sums;
}

// ---------------------------------------------------------------------------
// Channels-last: positions (d, h, w) in row-major order, position p's channels
// at x[p * position_stride + c]; the cores handle the channel block
// [0, channels). Buffers over bins are [total_bins][channels].

// Calls visit(bin) for every bin holding position (r, w), r = d * H + h.
template <typename Visit>
inline void for_each_bin_holding(const PoolPlan& plan, int64_t r, int64_t w, Visit&& visit) {
  const int64_t W = plan.g.width;
  for (int64_t i = plan.row_begin[r]; i < plan.row_begin[r + 1]; ++i) {
    const int64_t row = plan.row_bin_rows[i], k = plan.bin_row_size[row];
    const int64_t last = plan.col_last[k * W + w];
    for (int64_t bw = plan.col_first[k * W + w]; bw <= last; ++bw) visit(plan.bin_of(row, bw));
  }
}

// Pools into out[total_bins][channels]; with argmax (max mode), also the
// first position of each maximum. t: scratch of `channels`.
template <bool kRelu, typename scalar_t, typename acc_t>
void pool_channels_last_forward(const scalar_t* x, int64_t position_stride, int64_t channels,
                                const PoolPlan& plan, PoolMode mode, const acc_t* scale,
                                const acc_t* shift, acc_t* t, acc_t* out,
                                int64_t* argmax) {
  const int64_t C = channels, W = plan.g.width;
  const bool is_max = mode == PoolMode::kMax;
  std::fill(out, out + plan.total_bins * C, is_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0));
  if (argmax != nullptr)
    for (int64_t b = 0; b < plan.total_bins; ++b)
      std::fill(argmax + b * C, argmax + (b + 1) * C, plan.bin_first_position[b]);
  if (plan.global_only && argmax == nullptr) {
    // Every size is 1: accumulate every position into bin 0, then copy it.
    const int64_t n = plan.g.plane_size();
    for (int64_t pos = 0; pos < n; ++pos) {
      const scalar_t* xp = x + pos * position_stride;
      if (is_max) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t y = affine_activation<kRelu, acc_t>(static_cast<acc_t>(xp[c]), scale[c], shift[c]);
          out[c] = max_pool_takes(y, out[c]) ? y : out[c];
        }
      } else {
        for (int64_t c = 0; c < C; ++c)
          out[c] += affine_activation<kRelu, acc_t>(static_cast<acc_t>(xp[c]), scale[c], shift[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) out[c] = is_max ? out[c] : out[c] / acc_t(n);
    for (int64_t b = 1; b < plan.total_bins; ++b) std::copy(out, out + C, out + b * C);
    return;
  }
  for (int64_t r = 0; r < plan.num_rows(); ++r) {
    for (int64_t w = 0; w < W; ++w) {
      const int64_t pos = r * W + w;
      const scalar_t* xp = x + pos * position_stride;
      for (int64_t c = 0; c < C; ++c)
        t[c] = affine_activation<kRelu, acc_t>(static_cast<acc_t>(xp[c]), scale[c], shift[c]);
      for_each_bin_holding(plan, r, w, [&](int64_t bin) {
        acc_t* o = out + bin * C;
        if (!is_max) {
          for (int64_t c = 0; c < C; ++c) o[c] += t[c];
        } else if (argmax == nullptr) {
          for (int64_t c = 0; c < C; ++c) o[c] = max_pool_takes(t[c], o[c]) ? t[c] : o[c];
        } else {
          int64_t* a = argmax + bin * C;
          for (int64_t c = 0; c < C; ++c)
            if (max_pool_takes(t[c], o[c])) {
              o[c] = t[c];
              a[c] = pos;
            }
        }
      });
    }
  }
  if (!is_max) {
    for (int64_t b = 0; b < plan.total_bins; ++b) {
      const acc_t inv = acc_t(1) / acc_t(plan.bin_count[b]);
      for (int64_t c = 0; c < C; ++c) out[b * C + c] *= inv;
    }
  }
}

// grad_out is [total_bins][channels]; writes grad_x at the input's layout and
// adds per-channel sums into grad_scale[c], grad_shift[c].
// Scratch: t and gt of `channels`; bin_scratch and argmax of total_bins * channels.
template <bool kRelu, typename scalar_t, typename acc_t>
void pool_channels_last_backward(const scalar_t* x, int64_t position_stride, int64_t channels,
                                 const acc_t* grad_out, const PoolPlan& plan, PoolMode mode,
                                 const acc_t* scale, const acc_t* shift,
                                 scalar_t* grad_x, acc_t* grad_scale, acc_t* grad_shift,
                                 acc_t* t, acc_t* gt, acc_t* bin_scratch, int64_t* argmax) {
  const int64_t C = channels, W = plan.g.width;
  const bool is_max = mode == PoolMode::kMax;
  if (!is_max) {
    for (int64_t b = 0; b < plan.total_bins; ++b) {
      const acc_t inv = acc_t(1) / acc_t(plan.bin_count[b]);
      for (int64_t c = 0; c < C; ++c) bin_scratch[b * C + c] = grad_out[b * C + c] * inv;
    }
  } else {
    pool_channels_last_forward<kRelu, scalar_t, acc_t>(x, position_stride, C, plan, mode, scale,
                                                       shift, t, bin_scratch, argmax);
  }
  for (int64_t r = 0; r < plan.num_rows(); ++r) {
    for (int64_t w = 0; w < W; ++w) {
      const int64_t pos = r * W + w;
      std::fill(gt, gt + C, acc_t(0));
      for_each_bin_holding(plan, r, w, [&](int64_t b) {
        if (!is_max) {
          for (int64_t c = 0; c < C; ++c) gt[c] += bin_scratch[b * C + c];
        } else {
          for (int64_t c = 0; c < C; ++c)
            if (argmax[b * C + c] == pos) gt[c] += grad_out[b * C + c];
        }
      });
      const scalar_t* xp = x + pos * position_stride;
      scalar_t* gp = grad_x + pos * position_stride;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xv = static_cast<acc_t>(xp[c]);
        const acc_t gy = activation_backward<kRelu, acc_t>(gt[c], xv * scale[c] + shift[c]);
        gp[c] = static_cast<scalar_t>(gy * scale[c]);
        grad_scale[c] += gy * xv;
        grad_shift[c] += gy;
      }
    }
  }
}

MEDMTL_CORE_CPU_COPY_END
}  // namespace core
}  // namespace medmtl
