// Tiled transposes of per-image (R x Q) matrices on the CPU: the conversions
// between NCHW (C, P) and channels-last (P, C) planes.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu_capability.h"

namespace medmtl {
// One copy per CPU capability (cpu_capability.h): include it after
// cpu_capability_target.h.
inline namespace MEDMTL_CPU_NS {

constexpr int64_t kTransposeTile = 64;

// dst[q R + r] = src[r Q + q] (times row_scale[r] when given) for each of
// `count` (R x Q) matrices, matrix m at src + m R Q, dst + m R Q and
// row_scale + m R. In kTransposeTile x kTransposeTile tiles split among the
// threads; the inner loop writes dst along its rows (vectorised) and reads
// src down its columns.
template <typename T>
void transpose_matrices(const T* src, T* dst, int64_t count, int64_t R, int64_t Q, const T* row_scale = nullptr) {
  const int64_t r_tiles = (R + kTransposeTile - 1) / kTransposeTile;
  const int64_t q_tiles = (Q + kTransposeTile - 1) / kTransposeTile;
  at::parallel_for(0, count * r_tiles * q_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t m = k / (r_tiles * q_tiles), tile = k % (r_tiles * q_tiles);
      const int64_t r0 = tile / q_tiles * kTransposeTile, q0 = tile % q_tiles * kTransposeTile;
      const int64_t r1 = std::min(R, r0 + kTransposeTile), q1 = std::min(Q, q0 + kTransposeTile);
      const T* s = src + m * R * Q;
      T* d = dst + m * R * Q;
      if (row_scale == nullptr) {
        for (int64_t q = q0; q < q1; ++q) {
#pragma omp simd
          for (int64_t r = r0; r < r1; ++r) d[q * R + r] = s[r * Q + q];
        }
      } else {
        const T* scale = row_scale + m * R;
        for (int64_t q = q0; q < q1; ++q) {
#pragma omp simd
          for (int64_t r = r0; r < r1; ++r) d[q * R + r] = s[r * Q + q] * scale[r];
        }
      }
    }
  });
}

}  // namespace MEDMTL_CPU_NS
}  // namespace medmtl
