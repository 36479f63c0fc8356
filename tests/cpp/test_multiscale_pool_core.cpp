// The pooling cores against naive per-bin loops written from the definition:
// forward (avg/max, NCHW and channels-last) and backward (scatter form).
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "core/multiscale_pool.h"

using namespace medmtl::core;

namespace {

struct Problem {
  int64_t D, H, W, C;
  std::vector<int64_t> sizes;
  int dims;
};

double act(double x, double s, double b, bool relu) {
  const double y = x * s + b;
  return relu && y < 0 ? 0 : y;
}

// Naive forward of one channel: for each bin, loop over its region.
std::vector<double> naive_forward(const std::vector<double>& plane, const Problem& p, PoolMode mode,
                                  double s, double b, bool relu, std::vector<int64_t>* argmax) {
  std::vector<double> out;
  for (int64_t size : p.sizes) {
    const int64_t od = p.dims == 3 ? size : 1;
    for (int64_t i = 0; i < od; ++i)
      for (int64_t j = 0; j < size; ++j)
        for (int64_t k = 0; k < size; ++k) {
          const int64_t d0 = i * p.D / od, d1 = ((i + 1) * p.D + od - 1) / od;
          const int64_t h0 = j * p.H / size, h1 = ((j + 1) * p.H + size - 1) / size;
          const int64_t w0 = k * p.W / size, w1 = ((k + 1) * p.W + size - 1) / size;
          double acc = mode == PoolMode::kAvg ? 0 : -INFINITY;
          int64_t best = (d0 * p.H + h0) * p.W + w0;
          for (int64_t d = d0; d < d1; ++d)
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w = w0; w < w1; ++w) {
                const int64_t idx = (d * p.H + h) * p.W + w;
                const double v = act(plane[idx], s, b, relu);
                if (mode == PoolMode::kAvg) acc += v;
                else if (v > acc) { acc = v; best = idx; }
              }
          out.push_back(mode == PoolMode::kAvg ? acc / double((d1 - d0) * (h1 - h0) * (w1 - w0)) : acc);
          if (argmax) argmax->push_back(best);
        }
  }
  return out;
}

// Naive backward of one channel: scatter each bin's gradient over its region.
std::vector<double> naive_backward(const std::vector<double>& plane, const std::vector<double>& grad_out,
                                   const Problem& p, PoolMode mode, double s, double b, bool relu) {
  std::vector<int64_t> argmax;
  naive_forward(plane, p, mode, s, b, relu, &argmax);
  std::vector<double> grad_t(plane.size(), 0.0);
  int64_t bin = 0;
  for (int64_t size : p.sizes) {
    const int64_t od = p.dims == 3 ? size : 1;
    for (int64_t i = 0; i < od; ++i)
      for (int64_t j = 0; j < size; ++j)
        for (int64_t k = 0; k < size; ++k, ++bin) {
          if (mode == PoolMode::kMax) { grad_t[argmax[bin]] += grad_out[bin]; continue; }
          const int64_t d0 = i * p.D / od, d1 = ((i + 1) * p.D + od - 1) / od;
          const int64_t h0 = j * p.H / size, h1 = ((j + 1) * p.H + size - 1) / size;
          const int64_t w0 = k * p.W / size, w1 = ((k + 1) * p.W + size - 1) / size;
          const double share = grad_out[bin] / double((d1 - d0) * (h1 - h0) * (w1 - w0));
          for (int64_t d = d0; d < d1; ++d)
            for (int64_t h = h0; h < h1; ++h)
              for (int64_t w = w0; w < w1; ++w) grad_t[(d * p.H + h) * p.W + w] += share;
        }
  }
  std::vector<double> grad_x(plane.size());
  for (size_t e = 0; e < plane.size(); ++e) {
    const double y = plane[e] * s + b;
    grad_x[e] = (!relu || y > 0) ? grad_t[e] * s : 0.0;
  }
  return grad_x;
}

template <bool kRelu>
void check_problem(const Problem& p, std::mt19937& rng) {
  const bool relu = kRelu;
  std::normal_distribution<double> normal;
  PoolGeometry g;
  g.depth = p.D; g.height = p.H; g.width = p.W; g.spatial_dims = p.dims; g.sizes = p.sizes;
  const PoolPlan plan(g);
  const int64_t n = g.plane_size(), total = plan.total_bins, C = p.C;
  // channels-last data: x_cl[pos * C + c]; plane c is x_cl[c], x_cl[C + c], ...
  std::vector<double> x_cl(n * C), scale(C), shift(C), grad_cl(total * C);
  for (auto& v : x_cl) v = normal(rng);
  for (int64_t c = 0; c < C; ++c) { scale[c] = 0.5 + std::abs(normal(rng)); shift[c] = 0.3 * normal(rng); }
  for (auto& v : grad_cl) v = normal(rng);
  for (PoolMode mode : {PoolMode::kAvg, PoolMode::kMax}) {
    {
      std::vector<double> out_cl(total * C), t(C), gt(C), scratch(total * C), grad_x_cl(n * C), max_cl(total * C);
      std::vector<double> gscale(C, 0.0), gshift(C, 0.0);
      std::vector<int64_t> argmax_cl(total * C), first_max_cl(total * C);
      pool_channels_last_forward<kRelu, double, double>(x_cl.data(), C, C, plan, mode, scale.data(), shift.data(), t.data(), out_cl.data(), nullptr);
      pool_channels_last_forward<kRelu, double, double>(x_cl.data(), C, C, plan, PoolMode::kMax, scale.data(),
                                                 shift.data(), t.data(), max_cl.data(), first_max_cl.data());
      pool_channels_last_backward<kRelu, double, double>(x_cl.data(), C, C, grad_cl.data(), plan, mode, scale.data(),
                                                  shift.data(), grad_x_cl.data(), gscale.data(),
                                                  gshift.data(), t.data(), gt.data(), scratch.data(),
                                                  argmax_cl.data());
      for (int64_t c = 0; c < C; ++c) {
        std::vector<double> plane(n), grad_out(total), grad_plane(n), out(total), best(total),
            plane_scratch(plan.plane_scratch_size());
        std::vector<int64_t> argmax(total), first_max(total), expected_argmax;
        for (int64_t e = 0; e < n; ++e) plane[e] = x_cl[e * C + c];
        for (int64_t bin = 0; bin < total; ++bin) grad_out[bin] = grad_cl[bin * C + c];
        const std::vector<double> expected = naive_forward(plane, p, mode, scale[c], shift[c], relu, nullptr);
        naive_forward(plane, p, PoolMode::kMax, scale[c], shift[c], relu, &expected_argmax);
        pool_plane_forward<kRelu, double, double>(plane.data(), plan, mode, scale[c], shift[c],
                                           plane_scratch.data(), out.data());
        pool_plane_argmax<kRelu, double, double>(plane.data(), plan, scale[c], shift[c], best.data(),
                                          first_max.data());
        for (int64_t bin = 0; bin < total; ++bin) {
          CHECK_NEAR(out[bin], expected[bin], 1e-12);
          CHECK_NEAR(out_cl[bin * C + c], expected[bin], 1e-12);
          CHECK(first_max[bin] == expected_argmax[bin]);
          CHECK(first_max_cl[bin * C + c] == expected_argmax[bin]);
        }
        const std::vector<double> expected_grad = naive_backward(plane, grad_out, p, mode, scale[c], shift[c], relu);
        const AffineGradSums<double> sums = pool_plane_backward<kRelu, double, double>(
            plane.data(), grad_out.data(), plan, mode, scale[c], shift[c], grad_plane.data(),
            plane_scratch.data(), argmax.data());
        double expected_gscale = 0, expected_gshift = 0;
        for (int64_t e = 0; e < n; ++e) {
          CHECK_NEAR(grad_plane[e], expected_grad[e], 1e-12);
          CHECK_NEAR(grad_x_cl[e * C + c], expected_grad[e], 1e-12);
          expected_gshift += expected_grad[e] / scale[c];  // grad_y = grad_x / scale
          expected_gscale += expected_grad[e] / scale[c] * plane[e];
        }
        CHECK_NEAR(sums.grad_shift, expected_gshift, 1e-10);
        CHECK_NEAR(sums.grad_scale, expected_gscale, 1e-10);
        CHECK_NEAR(gshift[c], expected_gshift, 1e-10);
        CHECK_NEAR(gscale[c], expected_gscale, 1e-10);
      }
    }
  }
}

// Ties keep the first position in scan order: a plane of zeros after ReLU.
void check_ties() {
  PoolGeometry g;
  g.height = 4; g.width = 6; g.sizes = {1, 2, 4};
  const PoolPlan plan(g);
  std::vector<double> plane(24, -1.0), best(plan.total_bins);
  std::vector<int64_t> argmax(plan.total_bins);
  pool_plane_argmax<true, double, double>(plane.data(), plan, 1.0, 0.0, best.data(), argmax.data());
  for (int64_t b = 0; b < plan.total_bins; ++b) {
    CHECK(best[b] == 0.0);
    CHECK(argmax[b] == plan.bin_first_position[b]);
  }
  CHECK(argmax[0] == 0 && argmax[1] == 0 && argmax[2] == 3 && argmax[3] == 12);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const std::vector<Problem> problems = {
      {1, 7, 5, 3, {1, 2, 3, 6, 9}, 2},   // odd map, sizes past the sides
      {1, 1, 1, 2, {1, 3}, 2},            // 1x1 map
      {1, 14, 14, 4, {1, 2, 3, 6}, 2},    // pyramid pooling
      {3, 4, 5, 2, {1, 2, 4}, 3},         // 3-D
      {13, 29, 3, 1, {1, 5}, 3},
      {1, 5, 6, 3, {1}, 2},               // global pooling (its own fast paths)
      {2, 3, 4, 2, {1, 1}, 3},
  };
  for (const Problem& p : problems) {
    check_problem<false>(p, rng);
    check_problem<true>(p, rng);
  }
  check_ties();
  return check_failures();
}
