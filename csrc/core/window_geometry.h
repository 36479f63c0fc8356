// Index math of shifted-window attention (Swin), shared by the CPU and CUDA
// kernels. 2-D maps are handled as 3-D maps with a leading depth of 1 (window
// 1, shift 0), so every kernel sees three spatial dims.
//
// Per spatial dim of size L with configured window W and shift s:
//   effective window w = L and shift t = 0 when L <= W, else w = W, t = s;
//   padded size P = ceil(L / w) * w, count = P / w windows.
// The map is padded at the end to P, rolled by -t and cut into windows: the
// token at in-window position r of window n sits at shifted coordinate
// p = n * w + r and comes from map coordinate x = (p + t) mod P; x >= L is a
// padded token. With any t > 0, a query only sees keys of its own region,
// region_d(p) = 0 if t_d == 0, else 0 for p < P - w, 1 for p < P - t, 2 after.
// The bias of query position r_i and key r_j is the table row
// sum_d (r_i,d - r_j,d + W_d - 1) * prod_{e > d} (2 W_e - 1), indexed with the
// configured window W (its table has prod(2 W - 1) rows).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace medmtl {
namespace core {

constexpr int kWindowDims = 3;

struct WindowGeometry {
  int64_t batch = 0, heads = 0, head_dim = 0;
  int64_t size[kWindowDims] = {1, 1, 1};          // L: the map
  int64_t window[kWindowDims] = {1, 1, 1};        // w: effective window
  int64_t shift[kWindowDims] = {0, 0, 0};         // t: effective shift
  int64_t padded[kWindowDims] = {1, 1, 1};        // P = count * w
  int64_t count[kWindowDims] = {1, 1, 1};         // windows along the dim
  int64_t table_window[kWindowDims] = {1, 1, 1};  // W: the configured window (table layout)
  int64_t tokens = 1;          // N = prod w, tokens per window
  int64_t windows = 1;         // windows per image = prod count
  int64_t table_rows = 1;      // prod (2 W - 1)
  bool masked = false;         // any t > 0
};

// Element strides of a token map (B, [D,] H, W, heads, head_dim) whose
// head_dim is contiguous (depth first; 0 for the depth of a 2-D map).
struct TokenStrides {
  int64_t batch = 0, dim[kWindowDims] = {0, 0, 0}, head = 0;
};

// size, window_cfg, shift_cfg: three entries each (depth first; 2-D callers
// pass 1, 1, 0 for the depth). Callers have checked 1 <= W and 0 <= s < W.
inline WindowGeometry window_geometry(int64_t batch, const int64_t* size, int64_t heads, int64_t head_dim,
                                      const int64_t* window_cfg, const int64_t* shift_cfg) {
  WindowGeometry g;
  g.batch = batch;
  g.heads = heads;
  g.head_dim = head_dim;
  g.tokens = 1;
  g.windows = 1;
  g.table_rows = 1;
  g.masked = false;
  for (int d = 0; d < kWindowDims; ++d) {
    g.size[d] = size[d];
    g.table_window[d] = window_cfg[d];
    const bool whole = size[d] <= window_cfg[d];
    g.window[d] = whole ? (size[d] > 0 ? size[d] : 1) : window_cfg[d];
    g.shift[d] = whole ? 0 : shift_cfg[d];
    g.count[d] = (size[d] + g.window[d] - 1) / g.window[d];
    g.padded[d] = g.count[d] * g.window[d];
    g.tokens *= g.window[d];
    g.windows *= g.count[d];
    g.table_rows *= 2 * window_cfg[d] - 1;
    g.masked = g.masked || g.shift[d] > 0;
  }
  return g;
}

// Window `window` (0 .. windows - 1, row-major over count) and in-window token
// `r` (0 .. tokens - 1, row-major over window) -> in-window position `pos` and
// map coordinate `coord` per dim. Returns whether the token is real (inside
// the map) rather than padding.
MEDMTL_HOST_DEVICE inline bool window_token(const WindowGeometry& g, int64_t window, int64_t r,
                                            int64_t* pos, int64_t* coord) {
  bool real = true;
  for (int d = kWindowDims - 1; d >= 0; --d) {
    pos[d] = r % g.window[d];
    r /= g.window[d];
    const int64_t n = window % g.count[d];
    window /= g.count[d];
    int64_t x = n * g.window[d] + pos[d] + g.shift[d];
    if (x >= g.padded[d]) x -= g.padded[d];
    coord[d] = x;
    real = real && x < g.size[d];
  }
  return real;
}

// The inverse for a map coordinate: its window and in-window token.
MEDMTL_HOST_DEVICE inline void token_window(const WindowGeometry& g, const int64_t* coord, int64_t* window,
                                            int64_t* r) {
  int64_t w = 0, t = 0;
  for (int d = 0; d < kWindowDims; ++d) {
    int64_t p = coord[d] - g.shift[d];
    if (p < 0) p += g.padded[d];
    w = w * g.count[d] + p / g.window[d];
    t = t * g.window[d] + p % g.window[d];
  }
  *window = w;
  *r = t;
}

// The mask region of in-window position `pos` of window `window`: tokens of a
// window see each other only when their regions are equal (always 0 when no
// dim is shifted).
MEDMTL_HOST_DEVICE inline int window_region(const WindowGeometry& g, int64_t window, const int64_t* pos) {
  int label = 0;
  int64_t n[kWindowDims];
  for (int d = kWindowDims - 1; d >= 0; --d) {
    n[d] = window % g.count[d];
    window /= g.count[d];
  }
  for (int d = 0; d < kWindowDims; ++d) {
    int region = 0;
    if (g.shift[d] > 0) {
      const int64_t p = n[d] * g.window[d] + pos[d];
      region = p < g.padded[d] - g.window[d] ? 0 : (p < g.padded[d] - g.shift[d] ? 1 : 2);
    }
    label = label * 3 + region;
  }
  return label;
}

// The table row of the bias between query position pos_q and key position pos_k.
MEDMTL_HOST_DEVICE inline int64_t bias_row(const WindowGeometry& g, const int64_t* pos_q, const int64_t* pos_k) {
  int64_t row = 0;
  for (int d = 0; d < kWindowDims; ++d)
    row = row * (2 * g.table_window[d] - 1) + (pos_q[d] - pos_k[d] + g.table_window[d] - 1);
  return row;
}

}  // namespace core
}  // namespace medmtl
