// Torch-free cores of the fused multi-scale pooling op on the CPU.
//
// One level of the op is a (B, C, D, H, W) map (D = 1 for 2-D input). For each
// channel plane the op computes t = act(x * scale + shift) and pools t to every
// output size s in `sizes` (bins s x s, or s x s x s in 3-D). The cores below
// pool one plane (NCHW layout, the W axis contiguous) or one block of channels
// at every position (channels-last layout, the C axis contiguous) into a compact
// per-plane buffer holding, size after size, the bins in row-major order.
// The torch wrappers in csrc/cpu place that buffer into the op's output.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "adaptive_bins.h"

namespace medmtl {
namespace core {

enum class PoolMode : int { kAvg = 0, kMax = 1 };

// Spatial extent of one level and the output sizes it is pooled to.
struct PoolGeometry {
  int64_t depth = 1, height = 1, width = 1;  // input spatial size; depth 1 in 2-D
  int spatial_dims = 2;                      // 2 or 3
  const int64_t* sizes = nullptr;            // output sizes, each s -> s^spatial_dims bins
  int64_t num_sizes = 0;

  int64_t out_depth(int64_t k) const { return spatial_dims == 3 ? sizes[k] : 1; }
  int64_t bins(int64_t k) const { return out_depth(k) * sizes[k] * sizes[k]; }
  int64_t total_bins() const {
    int64_t n = 0;
    for (int64_t k = 0; k < num_sizes; ++k) n += bins(k);
    return n;
  }
  int64_t plane_size() const { return depth * height * width; }
};

// Calls visit(bin_offset, d0, d1, h0, h1, w0, w1) for every bin of every size,
// bin_offset counting bins across sizes in the compact per-plane order.
template <typename Visit>
inline void for_each_bin(const PoolGeometry& g, Visit&& visit) {
  int64_t offset = 0;
  for (int64_t k = 0; k < g.num_sizes; ++k) {
    const int64_t s = g.sizes[k], od = g.out_depth(k);
    for (int64_t bd = 0; bd < od; ++bd)
      for (int64_t bh = 0; bh < s; ++bh)
        for (int64_t bw = 0; bw < s; ++bw, ++offset)
          visit(offset, adaptive_bin_start(bd, g.depth, od), adaptive_bin_end(bd, g.depth, od),
                adaptive_bin_start(bh, g.height, s), adaptive_bin_end(bh, g.height, s),
                adaptive_bin_start(bw, g.width, s), adaptive_bin_end(bw, g.width, s));
  }
}

// Calls visit(size_index, bin_offset_of_row, s) for every (size, output row
// (bd, bh)) whose bins contain input row (d, h); bin_offset_of_row is the
// compact offset of bin (bd, bh, 0).
template <typename Visit>
inline void for_each_bin_row_containing(const PoolGeometry& g, int64_t d, int64_t h,
                                        Visit&& visit) {
  int64_t size_offset = 0;
  for (int64_t k = 0; k < g.num_sizes; ++k) {
    const int64_t s = g.sizes[k], od = g.out_depth(k);
    const int64_t bd_last = last_bin_containing(d, g.depth, od);
    const int64_t bh_last = last_bin_containing(h, g.height, s);
    for (int64_t bd = first_bin_containing(d, g.depth, od); bd <= bd_last; ++bd)
      for (int64_t bh = first_bin_containing(h, g.height, s); bh <= bh_last; ++bh)
        visit(k, size_offset + (bd * s + bh) * s, s);
    size_offset += g.bins(k);
  }
}

// ---------------------------------------------------------------------------
// NCHW: one contiguous plane of depth*height*width values.

// Pools one plane into out[total_bins] (avg: means; max: maxima, and the flat
// plane index of each maximum into argmax when it is not null).
// `row` is scratch of `width` accumulators.
template <typename scalar_t, typename acc_t>
void pool_plane_forward(const scalar_t* plane, const PoolGeometry& g, PoolMode mode,
                        acc_t scale, acc_t shift, bool relu, acc_t* row, acc_t* out,
                        int64_t* argmax) {
  const int64_t total = g.total_bins(), W = g.width;
  const bool is_max = mode == PoolMode::kMax;
  std::fill(out, out + total,
            is_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0));
  if (is_max && argmax != nullptr) {
    for_each_bin(g, [&](int64_t b, int64_t d0, int64_t, int64_t h0, int64_t, int64_t w0,
                        int64_t) { argmax[b] = (d0 * g.height + h0) * W + w0; });
  }
  for (int64_t d = 0; d < g.depth; ++d) {
    for (int64_t h = 0; h < g.height; ++h) {
      const scalar_t* x = plane + (d * g.height + h) * W;
      for (int64_t w = 0; w < W; ++w)
        row[w] = affine_activation<acc_t>(static_cast<acc_t>(x[w]), scale, shift, relu);
      const int64_t row_index = (d * g.height + h) * W;
      for_each_bin_row_containing(g, d, h, [&](int64_t, int64_t bin_row, int64_t s) {
        for (int64_t bw = 0; bw < s; ++bw) {
          const int64_t w0 = adaptive_bin_start(bw, W, s), w1 = adaptive_bin_end(bw, W, s);
          if (!is_max) {
            acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t w = w0; w < w1; ++w) sum += row[w];
            out[bin_row + bw] += sum;
          } else {
            acc_t best = out[bin_row + bw];
            int64_t best_w = -1;
            for (int64_t w = w0; w < w1; ++w)
              if (max_pool_takes(row[w], best)) { best = row[w]; best_w = w; }
            if (best_w >= 0) {
              out[bin_row + bw] = best;
              if (argmax != nullptr) argmax[bin_row + bw] = row_index + best_w;
            }
          }
        }
      });
    }
  }
  if (!is_max) {
    for_each_bin(g, [&](int64_t b, int64_t d0, int64_t d1, int64_t h0, int64_t h1, int64_t w0,
                        int64_t w1) { out[b] /= acc_t((d1 - d0) * (h1 - h0) * (w1 - w0)); });
  }
}

// Sums returned by the backward cores: the gradient of the pre-activation y
// summed with and without the factor x, i.e. the plane's contribution to the
// gradients of shift and scale.
template <typename acc_t>
struct AffineGradSums {
  acc_t grad_scale = 0;
  acc_t grad_shift = 0;
};

// Backward of one plane. grad_out[total_bins] holds the gradient of the
// plane's pooled outputs; writes grad_plane (same layout as plane).
// Scratch: `row` of width accumulators; for max mode, `argmax` of total_bins
// and `plane_grad` of plane_size accumulators.
template <typename scalar_t, typename acc_t>
AffineGradSums<acc_t> pool_plane_backward(const scalar_t* plane, const acc_t* grad_out,
                                          const PoolGeometry& g, PoolMode mode, acc_t scale,
                                          acc_t shift, bool relu, scalar_t* grad_plane,
                                          acc_t* row, acc_t* bin_scratch, int64_t* argmax,
                                          acc_t* plane_grad) {
  const int64_t W = g.width;
  AffineGradSums<acc_t> sums;
  auto finish_row = [&](const scalar_t* x, const acc_t* grad_t, scalar_t* grad_x) {
    for (int64_t w = 0; w < W; ++w) {
      const acc_t xv = static_cast<acc_t>(x[w]);
      const acc_t gy = activation_backward<acc_t>(grad_t[w], xv * scale + shift, relu);
      grad_x[w] = static_cast<scalar_t>(gy * scale);
      sums.grad_scale += gy * xv;
      sums.grad_shift += gy;
    }
  };
  if (mode == PoolMode::kAvg) {
    // Each bin spreads grad/count over its region; gather those per input row.
    for_each_bin(g, [&](int64_t b, int64_t d0, int64_t d1, int64_t h0, int64_t h1, int64_t w0,
                        int64_t w1) {
      bin_scratch[b] = grad_out[b] / acc_t((d1 - d0) * (h1 - h0) * (w1 - w0));
    });
    for (int64_t d = 0; d < g.depth; ++d) {
      for (int64_t h = 0; h < g.height; ++h) {
        std::fill(row, row + W, acc_t(0));
        for_each_bin_row_containing(g, d, h, [&](int64_t, int64_t bin_row, int64_t s) {
          for (int64_t bw = 0; bw < s; ++bw) {
            const acc_t v = bin_scratch[bin_row + bw];
            const int64_t w1 = adaptive_bin_end(bw, W, s);
            for (int64_t w = adaptive_bin_start(bw, W, s); w < w1; ++w) row[w] += v;
          }
        });
        const int64_t offset = (d * g.height + h) * W;
        finish_row(plane + offset, row, grad_plane + offset);
      }
    }
  } else {
    // Recompute the maxima's positions, route each bin's gradient there.
    pool_plane_forward<scalar_t, acc_t>(plane, g, mode, scale, shift, relu, row, bin_scratch,
                                        argmax);
    const int64_t n = g.plane_size(), total = g.total_bins();
    std::fill(plane_grad, plane_grad + n, acc_t(0));
    for (int64_t b = 0; b < total; ++b) plane_grad[argmax[b]] += grad_out[b];
    for (int64_t r = 0; r < g.depth * g.height; ++r)
      finish_row(plane + r * W, plane_grad + r * W, grad_plane + r * W);
  }
  return sums;
}

// ---------------------------------------------------------------------------
// Channels-last: positions (d, h, w) in row-major order, each holding a run of
// `channels` values at stride `channel_stride` between positions; the cores
// handle the channel block [0, channels) of that run. out is
// [total_bins][channels].

template <typename scalar_t, typename acc_t>
void pool_channels_last_forward(const scalar_t* x, int64_t position_stride, int64_t channels,
                                const PoolGeometry& g, PoolMode mode, const acc_t* scale,
                                const acc_t* shift, bool relu, acc_t* t, acc_t* out,
                                int64_t* argmax) {
  const int64_t total = g.total_bins(), C = channels, W = g.width;
  const bool is_max = mode == PoolMode::kMax;
  std::fill(out, out + total * C, is_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0));
  if (is_max && argmax != nullptr) {
    for_each_bin(g, [&](int64_t b, int64_t d0, int64_t, int64_t h0, int64_t, int64_t w0,
                        int64_t) {
      std::fill(argmax + b * C, argmax + (b + 1) * C, (d0 * g.height + h0) * W + w0);
    });
  }
  for (int64_t d = 0; d < g.depth; ++d) {
    for (int64_t h = 0; h < g.height; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const int64_t pos = (d * g.height + h) * W + w;
        const scalar_t* xp = x + pos * position_stride;
        for (int64_t c = 0; c < C; ++c)
          t[c] = affine_activation<acc_t>(static_cast<acc_t>(xp[c]), scale[c], shift[c], relu);
        for_each_bin_row_containing(g, d, h, [&](int64_t, int64_t bin_row, int64_t s) {
          const int64_t bw_last = last_bin_containing(w, W, s);
          for (int64_t bw = first_bin_containing(w, W, s); bw <= bw_last; ++bw) {
            acc_t* o = out + (bin_row + bw) * C;
            if (!is_max) {
              for (int64_t c = 0; c < C; ++c) o[c] += t[c];
            } else {
              int64_t* a = argmax != nullptr ? argmax + (bin_row + bw) * C : nullptr;
              for (int64_t c = 0; c < C; ++c)
                if (max_pool_takes(t[c], o[c])) {
                  o[c] = t[c];
                  if (a != nullptr) a[c] = pos;
                }
            }
          }
        });
      }
    }
  }
  if (!is_max) {
    for_each_bin(g, [&](int64_t b, int64_t d0, int64_t d1, int64_t h0, int64_t h1, int64_t w0,
                        int64_t w1) {
      const acc_t inv = acc_t(1) / acc_t((d1 - d0) * (h1 - h0) * (w1 - w0));
      for (int64_t c = 0; c < C; ++c) out[b * C + c] *= inv;
    });
  }
}

// grad_out is [total_bins][channels]; writes grad_x at the input's layout and
// accumulates per-channel sums into grad_scale[c], grad_shift[c].
// Scratch: t and gt of `channels`; for max mode, bin_scratch of total_bins *
// channels and argmax of the same size.
template <typename scalar_t, typename acc_t>
void pool_channels_last_backward(const scalar_t* x, int64_t position_stride, int64_t channels,
                                 const acc_t* grad_out, const PoolGeometry& g, PoolMode mode,
                                 const acc_t* scale, const acc_t* shift, bool relu,
                                 scalar_t* grad_x, acc_t* grad_scale, acc_t* grad_shift,
                                 acc_t* t, acc_t* gt, acc_t* bin_scratch, int64_t* argmax) {
  const int64_t C = channels, W = g.width;
  const bool is_max = mode == PoolMode::kMax;
  if (!is_max) {
    for_each_bin(g, [&](int64_t b, int64_t d0, int64_t d1, int64_t h0, int64_t h1, int64_t w0,
                        int64_t w1) {
      const acc_t inv = acc_t(1) / acc_t((d1 - d0) * (h1 - h0) * (w1 - w0));
      for (int64_t c = 0; c < C; ++c) bin_scratch[b * C + c] = grad_out[b * C + c] * inv;
    });
  } else {
    pool_channels_last_forward<scalar_t, acc_t>(x, position_stride, C, g, mode, scale, shift,
                                                relu, t, bin_scratch, argmax);
  }
  for (int64_t d = 0; d < g.depth; ++d) {
    for (int64_t h = 0; h < g.height; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const int64_t pos = (d * g.height + h) * W + w;
        std::fill(gt, gt + C, acc_t(0));
        for_each_bin_row_containing(g, d, h, [&](int64_t, int64_t bin_row, int64_t s) {
          const int64_t bw_last = last_bin_containing(w, W, s);
          for (int64_t bw = first_bin_containing(w, W, s); bw <= bw_last; ++bw) {
            const int64_t b = bin_row + bw;
            if (!is_max) {
              for (int64_t c = 0; c < C; ++c) gt[c] += bin_scratch[b * C + c];
            } else {
              for (int64_t c = 0; c < C; ++c)
                if (argmax[b * C + c] == pos) gt[c] += grad_out[b * C + c];
            }
          }
        });
        const scalar_t* xp = x + pos * position_stride;
        scalar_t* gp = grad_x + pos * position_stride;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = static_cast<acc_t>(xp[c]);
          const acc_t gy = activation_backward<acc_t>(gt[c], xv * scale[c] + shift[c], relu);
          gp[c] = static_cast<scalar_t>(gy * scale[c]);
          grad_scale[c] += gy * xv;
          grad_shift[c] += gy;
        }
      }
    }
  }
}

}  // namespace core
}  // namespace medmtl
