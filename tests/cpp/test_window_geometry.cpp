// The shifted-window index math against Swin's definition: pad at the end,
// roll by -shift, cut into windows; regions as Swin's mask slices them.
#include <algorithm>
#include <vector>

#include "check.h"
#include "core/window_geometry.h"

using namespace medmtl::core;

namespace {

// Swin's mask label of shifted coordinate p along one dim: the slices
// [0, P - w), [P - w, P - s), [P - s, P), with s = 0 meaning one region.
int swin_region(int64_t p, int64_t padded, int64_t w, int64_t s) {
  if (s == 0) return 0;
  if (p < padded - w) return 0;
  return p < padded - s ? 1 : 2;
}

void check_geometry(const int64_t* size, const int64_t* window_cfg, const int64_t* shift_cfg) {
  const WindowGeometry g = window_geometry(2, size, 3, 4, window_cfg, shift_cfg);
  CHECK(window_index_extent(g) == std::max(2 * g.padded[0] * g.padded[1] * g.padded[2] * 3,
                                           std::max(g.tokens * 4, g.table_rows * 3)));
  const WindowGeometry32 g32 = narrow_window_geometry(g);
  CHECK(g32.tokens == g.tokens && g32.windows == g.windows && g32.table_rows == g.table_rows);
  int64_t tokens = 1, windows = 1, rows = 1;
  for (int d = 0; d < kWindowDims; ++d) {
    const bool whole = size[d] <= window_cfg[d];
    CHECK(g.window[d] == (whole ? size[d] : window_cfg[d]));
    CHECK(g.shift[d] == (whole ? 0 : shift_cfg[d]));
    CHECK(g.padded[d] % g.window[d] == 0 && g.padded[d] >= size[d] && g.padded[d] - size[d] < g.window[d]);
    tokens *= g.window[d];
    windows *= g.padded[d] / g.window[d];
    rows *= 2 * window_cfg[d] - 1;
  }
  CHECK(g.tokens == tokens && g.windows == windows && g.table_rows == rows);
  // Every padded-map coordinate is hit exactly once, and token_window inverts window_token.
  std::vector<int> hits(g.padded[0] * g.padded[1] * g.padded[2], 0);
  for (int64_t w = 0; w < g.windows; ++w)
    for (int64_t r = 0; r < g.tokens; ++r) {
      int64_t pos[kWindowDims], coord[kWindowDims];
      const bool real = window_token(g, w, r, pos, coord);
      bool inside = true;
      int64_t flat = 0;
      for (int d = 0; d < kWindowDims; ++d) {
        // Rolled by -shift: shifted coordinate p holds map coordinate (p + shift) mod P.
        const int64_t n = (w / (d == 0 ? g.count[1] * g.count[2] : d == 1 ? g.count[2] : 1)) % g.count[d];
        const int64_t p = n * g.window[d] + pos[d];
        CHECK(coord[d] == (p + g.shift[d]) % g.padded[d]);
        inside = inside && coord[d] < size[d];
        flat = flat * g.padded[d] + coord[d];
      }
      CHECK(real == inside);
      ++hits[flat];
      int64_t w2 = -1, r2 = -1;
      token_window(g, coord, &w2, &r2);
      CHECK(w2 == w && r2 == r);
      // Region label: Swin's per-dim slices, combined.
      int expected = 0;
      for (int d = 0; d < kWindowDims; ++d) {
        const int64_t n = (w / (d == 0 ? g.count[1] * g.count[2] : d == 1 ? g.count[2] : 1)) % g.count[d];
        expected = expected * 3 + swin_region(n * g.window[d] + pos[d], g.padded[d], g.window[d], g.shift[d]);
      }
      CHECK(window_region(g, w, pos) == expected);
      // The 32-bit copy the CUDA kernels use gives the same tokens, regions and bias offsets.
      int32_t pos32[kWindowDims], coord32[kWindowDims];
      CHECK(window_token(g32, static_cast<int32_t>(w), static_cast<int32_t>(r), pos32, coord32) == real);
      for (int d = 0; d < kWindowDims; ++d) CHECK(pos32[d] == pos[d] && coord32[d] == coord[d]);
      CHECK(window_region(g32, static_cast<int32_t>(w), pos32) == expected);
      CHECK(bias_offset(g32, pos32) == bias_offset(g, pos));
    }
  for (int h : hits) CHECK(h == 1);
  // bias_row(q, k) = bias_offset(q) - bias_offset(k) + bias_center, for every pair of positions.
  for (int64_t a = 0; a < g.tokens; ++a)
    for (int64_t b = 0; b < g.tokens; ++b) {
      int64_t pa[kWindowDims], pb[kWindowDims], coord[kWindowDims];
      window_token(g, 0, a, pa, coord);
      window_token(g, 0, b, pb, coord);
      CHECK(bias_row(g, pa, pb) == bias_offset(g, pa) - bias_offset(g, pb) + bias_center(g));
    }
  // Bias rows: offsets (q - k + W - 1) in mixed radix (2W - 1), in range.
  int64_t pq[kWindowDims] = {0, 0, 0}, pk[kWindowDims] = {0, 0, 0};
  for (int d = 0; d < kWindowDims; ++d) pq[d] = g.window[d] - 1;
  CHECK(bias_row(g, pq, pk) < g.table_rows);
  CHECK(bias_row(g, pk, pq) >= 0);
  CHECK(bias_row(g, pq, pq) == ((window_cfg[0] - 1) * (2 * window_cfg[1] - 1) + window_cfg[1] - 1) *
                                   (2 * window_cfg[2] - 1) + window_cfg[2] - 1);
}

}  // namespace

int main() {
  const int64_t cases[][9] = {
      {1, 15, 9, 1, 4, 4, 0, 2, 1},   // 2-D, padded, shifted
      {1, 7, 7, 1, 7, 7, 0, 3, 3},    // window = map: whole map, no shift
      {1, 3, 4, 1, 7, 7, 0, 3, 3},    // map smaller than the window
      {9, 10, 11, 3, 4, 5, 1, 2, 0},  // 3-D, mixed shifts
      {5, 6, 7, 3, 3, 3, 1, 1, 1},
      {1, 8, 8, 1, 4, 4, 0, 0, 0},    // no shift
  };
  for (const auto& c : cases) check_geometry(c, c + 3, c + 6);
  return check_failures();
}
