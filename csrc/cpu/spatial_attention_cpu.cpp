// CPU kernels of medmtl::spatial_attention: out = x * sigmoid(conv(cat(mean_c x,
// max_c x), weight)). One pass over x reduces the channels of every pixel
// (mean, max and the first maximal channel); the KxK convolution of that
// 2-channel map and its sigmoid run directly, a row of outputs at a time; a
// second pass multiplies x by the gate. The backward makes one pass over x
// and grad_output for the channel sums it needs, and one pass writing grad_x.
// NCHW x is reduced a block of pixels at a time across the channel planes;
// channels-last x one pixel's contiguous channels at a time. The output and
// grad_x are laid out as x (csrc/layout.h); asked for a contiguous output, a
// channels-last x is transposed in tiles as it is gated (no separate pass).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../layout.h"
#include "../spatial_attention_checks.h"

// Everything below is compiled per CPU capability (cpu_capability.h).
#include "cpu_capability_target.h"
// After the target: its loops vectorise with the capability's instructions.
#include "transpose_tiles.h"

namespace medmtl {
inline namespace MEDMTL_CPU_NS {
namespace {

constexpr int64_t kPixelBlock = 256;  // pixels per task: each task walks the channels of its block

template <typename acc_t>
struct RowReduction {
  acc_t sum, max, dot;
  int64_t argmax;
};

// Sum, max (NaN if any value is NaN) and, when asked, the first maximal (or
// first NaN) index of row[0, C), and sum_c grow[c] row[c] when grow is given.
template <typename scalar_t, typename acc_t>
RowReduction<acc_t> reduce_row(const scalar_t* __restrict row, const scalar_t* __restrict grow, int64_t C,
                               bool with_argmax) {
  acc_t sum = 0, best = -std::numeric_limits<acc_t>::infinity(), nans = 0, dot = 0;
#pragma omp simd reduction(+ : sum, nans) reduction(max : best)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(row[c]);
    sum += v;
    best = v > best ? v : best;
    nans += v != v ? acc_t(1) : acc_t(0);
  }
  if (grow != nullptr) {
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < C; ++c) dot += static_cast<acc_t>(grow[c]) * static_cast<acc_t>(row[c]);
  }
  RowReduction<acc_t> r{sum, nans > 0 ? std::numeric_limits<acc_t>::quiet_NaN() : best, dot, 0};
  if (with_argmax) {
    // torch.max(dim=1): the first maximal channel; a NaN wins.
    int64_t c = 0;
    for (; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(row[c]);
      if (nans > 0 ? v != v : v == r.max) break;
    }
    r.argmax = c < C ? c : 0;
  }
  return r;
}

// The channel mean and max of every pixel, the first maximal channel, and
// (when grad_output is given) sum_c grad_output * x. pooled is (B, 2, H, W)
// in x's dtype, argmax (B, H, W) int64, grad_gate (B, H, W) in x's dtype.
// x (and grad_output, in x's layout) is NCHW or channels-last contiguous.
// argmax is filled only when grad_output is given (the backward) or x is NCHW.
void reduce_channels(const at::Tensor& x, const at::Tensor* grad_output, at::Tensor& pooled, at::Tensor& argmax,
                     at::Tensor* grad_gate) {
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const int64_t blocks = (P + kPixelBlock - 1) / kPixelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xd = x.data_ptr<scalar_t>();
    const scalar_t* gd = grad_output != nullptr ? grad_output->data_ptr<scalar_t>() : nullptr;
    scalar_t* pd = pooled.data_ptr<scalar_t>();
    int64_t* ad = argmax.data_ptr<int64_t>();
    scalar_t* gg = grad_gate != nullptr ? grad_gate->data_ptr<scalar_t>() : nullptr;
    if (is_channels_last(x)) {
      // Channels-last: each pixel's channels are one contiguous row.
      at::parallel_for(0, B * P, kPixelBlock, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          const int64_t b = q / P, p = q % P;
          const RowReduction<acc_t> r = reduce_row<scalar_t, acc_t>(xd + q * C, gd != nullptr ? gd + q * C : nullptr,
                                                                   C, gd != nullptr);
          pd[(b * 2) * P + p] = static_cast<scalar_t>(r.sum / acc_t(C));
          pd[(b * 2 + 1) * P + p] = static_cast<scalar_t>(r.max);
          ad[q] = r.argmax;
          if (gg != nullptr) gg[q] = static_cast<scalar_t>(r.dot);
        }
      });
      return;
    }
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      acc_t sum[kPixelBlock], best[kPixelBlock], dot[kPixelBlock];
      int64_t best_c[kPixelBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, p0 = (task % blocks) * kPixelBlock;
        const int64_t n = std::min(kPixelBlock, P - p0);
        for (int64_t i = 0; i < n; ++i) {
          sum[i] = 0;
          dot[i] = 0;
          best[i] = -std::numeric_limits<acc_t>::infinity();
          best_c[i] = 0;
        }
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* row = xd + (b * C + c) * P + p0;
          for (int64_t i = 0; i < n; ++i) {
            const acc_t v = static_cast<acc_t>(row[i]);
            sum[i] += v;
            // torch.max(dim=1): the first maximal channel; a NaN wins and stays.
            const bool takes = v > best[i] || (std::isnan(v) && !std::isnan(best[i]));
            best[i] = takes ? v : best[i];
            best_c[i] = takes ? c : best_c[i];
          }
          if (gd != nullptr) {
            const scalar_t* grow = gd + (b * C + c) * P + p0;
            for (int64_t i = 0; i < n; ++i) dot[i] += static_cast<acc_t>(grow[i]) * static_cast<acc_t>(row[i]);
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          pd[(b * 2) * P + p0 + i] = static_cast<scalar_t>(sum[i] / acc_t(C));
          pd[(b * 2 + 1) * P + p0 + i] = static_cast<scalar_t>(best[i]);
          ad[b * P + p0 + i] = best_c[i];
          if (gg != nullptr) gg[b * P + p0 + i] = static_cast<scalar_t>(dot[i]);
        }
      }
    });
  });
}

// gate (B, 1, H, W) = sigmoid(conv2d(pooled, weight, padding=K / 2)) for
// pooled (B, 2, H, W) and weight (1, 2, K, K), all contiguous; accumulated in
// acc_t and rounded once.
// Each task convolves whole output rows: for every (channel, ky) whose input
// row is in the map, each kx adds a shifted input row into the row's
// accumulators over the columns where it reads the map (the padding is
// skipped, not multiplied).
template <typename scalar_t>
void gate_rows(const scalar_t* pooled, const scalar_t* weight, scalar_t* gate, int64_t B, int64_t H, int64_t W,
               int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pad = K / 2, P = H * W;
  at::parallel_for(0, B * H, 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t c = 0; c < 2; ++c)
        for (int64_t ky = 0; ky < K; ++ky) {
          const int64_t in_y = y + ky - pad;
          if (in_y < 0 || in_y >= H) continue;
          const scalar_t* in = pooled + (b * 2 + c) * P + in_y * W;
          for (int64_t kx = 0; kx < K; ++kx) {
            const acc_t w = static_cast<acc_t>(weight[(c * K + ky) * K + kx]);
            const int64_t shift = kx - pad;  // output column x reads input column x + shift
            const int64_t x0 = std::max<int64_t>(0, -shift), x1 = std::min(W, W - shift);
            acc_t* a = acc.data();
#pragma omp simd
            for (int64_t x = x0; x < x1; ++x) a[x] += w * static_cast<acc_t>(in[x + shift]);
          }
        }
      scalar_t* out = gate + b * P + y * W;
      for (int64_t x = 0; x < W; ++x) out[x] = static_cast<scalar_t>(acc_t(1) / (acc_t(1) + std::exp(-acc[x])));
    }
  });
}

// sigmoid(conv2d(pooled, weight, padding=K / 2)): (B, 1, H, W), contiguous.
// Direct: ATen's convolution of this 2 -> 1 channel map (oneDNN) took
// 0.4-0.6 ms on 2 x 112 x 112 for 5 MFLOP, mostly set-up and reorders.
at::Tensor gate_of(const at::Tensor& pooled_in, const at::Tensor& weight_in) {
  const at::Tensor pooled = pooled_in.contiguous(), weight = weight_in.contiguous();
  const int64_t B = pooled.size(0), H = pooled.size(2), W = pooled.size(3), K = weight.size(-1);
  at::Tensor gate = at::empty({B, 1, H, W}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), "spatial_attention_gate", [&] {
    gate_rows(pooled.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), B,
              H, W, K);
  });
  return gate;
}

at::Tensor spatial_attention_cpu(const at::Tensor& x_in, const at::Tensor& weight, bool contiguous_output) {
  check_spatial_attention_inputs(x_in, weight);
  const at::Tensor x = x_in.contiguous(output_format(x_in));
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor pooled = at::empty({B, 2, H, W}, x.options());
  at::Tensor argmax = at::empty({B, H, W}, x.options().dtype(at::kLong));
  reduce_channels(x, nullptr, pooled, argmax, nullptr);
  const at::Tensor gate = gate_of(pooled, weight);  // (B, 1, H, W)
  // A channels-last x asked for a contiguous output: gated as it is transposed.
  const bool transposed = contiguous_output && is_channels_last(x);
  at::Tensor out = transposed ? at::empty(x.sizes(), x.options()) : at::empty_like(x);
  const int64_t P = H * W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_apply", [&] {
    const scalar_t* xd = x.data_ptr<scalar_t>();
    const scalar_t* gd = gate.data_ptr<scalar_t>();
    scalar_t* od = out.data_ptr<scalar_t>();
    if (transposed) {  // per image: (P, C) -> (C, P), row p scaled by its gate
      transpose_matrices(xd, od, B, P, C, gd);
      return;
    }
    if (is_channels_last(x)) {
      at::parallel_for(0, B * P, kPixelBlock, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q)
          for (int64_t c = 0; c < C; ++c) od[q * C + c] = xd[q * C + c] * gd[q];
      });
      return;
    }
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t* g = gd + (plane / C) * P;
        for (int64_t i = 0; i < P; ++i) od[plane * P + i] = xd[plane * P + i] * g[i];
      }
    });
  });
  return contiguous_output ? contiguous_nchw(out) : laid_out_like(out, x_in);
}

std::tuple<at::Tensor, at::Tensor> spatial_attention_backward_cpu(const at::Tensor& grad_output_in,
                                                                   const at::Tensor& x_in, const at::Tensor& weight) {
  check_spatial_attention_inputs(x_in, weight);
  check_spatial_attention_backward_inputs(grad_output_in, x_in);
  const at::MemoryFormat format = output_format(x_in);
  const at::Tensor x = x_in.contiguous(format), grad_output = grad_output_in.contiguous(format);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W;
  at::Tensor pooled = at::empty({B, 2, H, W}, x.options());
  at::Tensor argmax = at::empty({B, H, W}, x.options().dtype(at::kLong));
  at::Tensor grad_gate = at::empty({B, 1, H, W}, x.options());
  reduce_channels(x, &grad_output, pooled, argmax, &grad_gate);
  const at::Tensor gate = gate_of(pooled, weight);
  // Through the sigmoid, then the convolution (ATen's backward of conv2d).
  const at::Tensor grad_logits = grad_gate * gate * (1 - gate);
  const int64_t pad = weight.size(-1) / 2;
  auto [grad_pooled, grad_weight, unused] = at::convolution_backward(
      grad_logits, pooled, weight, std::nullopt, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1, {true, true, false});
  const at::Tensor gp = grad_pooled.contiguous(), gt = gate.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spatial_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* god = grad_output.data_ptr<scalar_t>();
    const scalar_t* gated = gt.data_ptr<scalar_t>();
    const scalar_t* gpd = gp.data_ptr<scalar_t>();
    const int64_t* ad = argmax.data_ptr<int64_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    if (is_channels_last(x)) {
      at::parallel_for(0, B * P, kPixelBlock, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          const int64_t b = q / P, p = q % P;
          const acc_t g = static_cast<acc_t>(gated[q]);
          const acc_t from_mean = static_cast<acc_t>(gpd[(b * 2) * P + p]) / acc_t(C);
          const acc_t from_max = static_cast<acc_t>(gpd[(b * 2 + 1) * P + p]);
          const int64_t best = ad[q];
          for (int64_t c = 0; c < C; ++c)
            gx[q * C + c] = static_cast<scalar_t>(static_cast<acc_t>(god[q * C + c]) * g + from_mean +
                                                  (c == best ? from_max : acc_t(0)));
        }
      });
      return;
    }
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t b = plane / C, c = plane % C;
        const scalar_t* g = gated + b * P;
        const scalar_t* grad_mean = gpd + (b * 2) * P;
        const scalar_t* grad_max = gpd + (b * 2 + 1) * P;
        const int64_t* best = ad + b * P;
        for (int64_t i = 0; i < P; ++i) {
          acc_t v = static_cast<acc_t>(god[plane * P + i]) * static_cast<acc_t>(g[i]) +
                    static_cast<acc_t>(grad_mean[i]) / acc_t(C);
          if (best[i] == c) v += static_cast<acc_t>(grad_max[i]);
          gx[plane * P + i] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return {laid_out_like(grad_x, x_in), laid_out_like(grad_weight, weight)};
}

}  // namespace

// Called by cpu_capability.cpp for the capability in force (CPU kernels).
void register_spatial_attention_cpu(torch::Library& m) {
  m.impl("spatial_attention", &spatial_attention_cpu);
  m.impl("spatial_attention_backward", &spatial_attention_backward_cpu);
}

}  // namespace MEDMTL_CPU_NS
}  // namespace medmtl
