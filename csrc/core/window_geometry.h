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
//
// The geometry and the functions below are templates on the index type:
// int64_t for the CPU kernels (WindowGeometry), int32_t for the CUDA kernels
// (WindowGeometry32, made by narrow_window_geometry once window_index_extent
// is below 2^31; 64-bit division is a subroutine call on a GPU, and the values
// live across it go to the stack). Element offsets stay 64-bit in both.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace medmtl {
namespace core {

constexpr int kWindowDims = 3;

template <typename index_t>
struct BasicWindowGeometry {
  index_t batch = 0, heads = 0, head_dim = 0;
  index_t size[kWindowDims] = {1, 1, 1};          // L: the map
  index_t window[kWindowDims] = {1, 1, 1};        // w: effective window
  index_t shift[kWindowDims] = {0, 0, 0};         // t: effective shift
  index_t padded[kWindowDims] = {1, 1, 1};        // P = count * w
  index_t count[kWindowDims] = {1, 1, 1};         // windows along the dim
  index_t table_window[kWindowDims] = {1, 1, 1};  // W: the configured window (table layout)
  index_t tokens = 1;          // N = prod w, tokens per window
  index_t windows = 1;         // windows per image = prod count
  index_t table_rows = 1;      // prod (2 W - 1)
  bool masked = false;         // any t > 0
};
using WindowGeometry = BasicWindowGeometry<int64_t>;
using WindowGeometry32 = BasicWindowGeometry<int32_t>;

// The index type of a geometry, as a parameter type that takes part in no
// deduction (callers may pass any integer for the window and token).
template <typename index_t>
struct IndexOf {
  using type = index_t;
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

// The largest index the CUDA kernels form in 32-bit before an element offset:
// the tokens of the padded maps of all images and heads (rows, work items,
// windows x tokens), a window's tokens x head_dim, the table's rows x heads.
// narrow_window_geometry is exact when it is at most INT32_MAX.
inline int64_t window_index_extent(const WindowGeometry& g) {
  const int64_t padded_rows = g.batch * g.padded[0] * g.padded[1] * g.padded[2] * g.heads;
  const int64_t window_elements = g.tokens * g.head_dim, table_elements = g.table_rows * g.heads;
  const int64_t a = padded_rows > window_elements ? padded_rows : window_elements;
  return a > table_elements ? a : table_elements;
}

inline WindowGeometry32 narrow_window_geometry(const WindowGeometry& g) {
  WindowGeometry32 n;
  n.batch = static_cast<int32_t>(g.batch);
  n.heads = static_cast<int32_t>(g.heads);
  n.head_dim = static_cast<int32_t>(g.head_dim);
  for (int d = 0; d < kWindowDims; ++d) {
    n.size[d] = static_cast<int32_t>(g.size[d]);
    n.window[d] = static_cast<int32_t>(g.window[d]);
    n.shift[d] = static_cast<int32_t>(g.shift[d]);
    n.padded[d] = static_cast<int32_t>(g.padded[d]);
    n.count[d] = static_cast<int32_t>(g.count[d]);
    n.table_window[d] = static_cast<int32_t>(g.table_window[d]);
  }
  n.tokens = static_cast<int32_t>(g.tokens);
  n.windows = static_cast<int32_t>(g.windows);
  n.table_rows = static_cast<int32_t>(g.table_rows);
  n.masked = g.masked;
  return n;
}

// Window `window` (0 .. windows - 1, row-major over count) and in-window token
// `r` (0 .. tokens - 1, row-major over window) -> in-window position `pos` and
// map coordinate `coord` per dim. Returns whether the token is real (inside
// the map) rather than padding.
template <typename index_t>
MEDMTL_HOST_DEVICE inline bool window_token(const BasicWindowGeometry<index_t>& g,
                                            typename IndexOf<index_t>::type window,
                                            typename IndexOf<index_t>::type r, index_t* pos, index_t* coord) {
  bool real = true;
  for (int d = kWindowDims - 1; d >= 0; --d) {
    pos[d] = r % g.window[d];
    r /= g.window[d];
    const index_t n = window % g.count[d];
    window /= g.count[d];
    index_t x = n * g.window[d] + pos[d] + g.shift[d];
    if (x >= g.padded[d]) x -= g.padded[d];
    coord[d] = x;
    real = real && x < g.size[d];
  }
  return real;
}

// The inverse for a map coordinate: its window and in-window token.
template <typename index_t>
MEDMTL_HOST_DEVICE inline void token_window(const BasicWindowGeometry<index_t>& g, const index_t* coord,
                                            index_t* window, index_t* r) {
  index_t w = 0, t = 0;
  for (int d = 0; d < kWindowDims; ++d) {
    index_t p = coord[d] - g.shift[d];
    if (p < 0) p += g.padded[d];
    w = w * g.count[d] + p / g.window[d];
    t = t * g.window[d] + p % g.window[d];
  }
  *window = w;
  *r = t;
}

// Swin's additive attention mask: a key of another region than the query's gets
// kRegionMask added to its score (not -inf: the softmax still sees it, e^-100
// weaker, exactly as the reference and timm/Swin compute it).
constexpr float kRegionMask = -100.0f;

// The mask region of in-window position `pos` of window `window`: a query
// attends to the keys of other regions with kRegionMask added to the score
// (always 0 when no dim is shifted).
template <typename index_t>
MEDMTL_HOST_DEVICE inline int window_region(const BasicWindowGeometry<index_t>& g,
                                            typename IndexOf<index_t>::type window, const index_t* pos) {
  int label = 0;
  index_t n[kWindowDims];
  for (int d = kWindowDims - 1; d >= 0; --d) {
    n[d] = window % g.count[d];
    window /= g.count[d];
  }
  for (int d = 0; d < kWindowDims; ++d) {
    int region = 0;
    if (g.shift[d] > 0) {
      const index_t p = n[d] * g.window[d] + pos[d];
      region = p < g.padded[d] - g.window[d] ? 0 : (p < g.padded[d] - g.shift[d] ? 1 : 2);
    }
    label = label * 3 + region;
  }
  return label;
}

// The table row of the bias between query position pos_q and key position pos_k.
template <typename index_t>
MEDMTL_HOST_DEVICE inline index_t bias_row(const BasicWindowGeometry<index_t>& g, const index_t* pos_q,
                                           const index_t* pos_k) {
  index_t row = 0;
  for (int d = 0; d < kWindowDims; ++d)
    row = row * (2 * g.table_window[d] - 1) + (pos_q[d] - pos_k[d] + g.table_window[d] - 1);
  return row;
}

// bias_row is linear in pos_q - pos_k: with bias_offset(pos) = sum_d pos_d * prod_{e > d} (2 W_e - 1)
// and bias_center = bias_offset(W - 1), bias_row(pos_q, pos_k) = bias_offset(pos_q) - bias_offset(pos_k)
// + bias_center (one subtraction per score once each token's offset is known).
template <typename index_t>
MEDMTL_HOST_DEVICE inline index_t bias_offset(const BasicWindowGeometry<index_t>& g, const index_t* pos) {
  index_t offset = 0;
  for (int d = 0; d < kWindowDims; ++d) offset = offset * (2 * g.table_window[d] - 1) + pos[d];
  return offset;
}

template <typename index_t>
MEDMTL_HOST_DEVICE inline index_t bias_center(const BasicWindowGeometry<index_t>& g) {
  index_t center = 0;
  for (int d = 0; d < kWindowDims; ++d) center = center * (2 * g.table_window[d] - 1) + g.table_window[d] - 1;
  return center;
}

}  // namespace core
}  // namespace medmtl
