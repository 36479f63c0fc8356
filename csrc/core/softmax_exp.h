// exp for softmax rows on the CPU, in a form the compiler vectorizes (std::exp
// is a scalar libm call: in the window-attention softmax it cost as much as
// both GEMMs together).
//
// exp(x) = 2^n * e^r with n = round(x log2 e) and r = x - n ln 2 (ln 2 split in
// two parts, Cody-Waite, so r is exact to float precision), |r| <= ln2 / 2 (+ ulp),
// and e^r by its degree-6 Taylor polynomial: relative error below 3e-7 for
// x in [-87, 88]. Below -87 (where e^x is under float's normal range) it
// returns 0, so -inf (a masked score) gives exactly 0. NaN gives NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include "cpu_copy.h"

namespace medmtl {
namespace core {
MEDMTL_CORE_CPU_COPY_BEGIN  // one copy per CPU capability in the CPU kernels (cpu_copy.h)

inline float softmax_exp(float x) {
  // In [-88, 88] (NaN -> -88; its result is replaced below) so that 2^n stays a
  // normal float. Comparisons, not std::fmin/fmax: those stay libm calls.
  float clamped = x > -88.0f ? x : -88.0f;
  clamped = clamped < 88.0f ? clamped : 88.0f;
  // n = round(x log2 e) by the 1.5 * 2^23 trick (exact for |.| < 2^22): std::floor
  // and std::nearbyint keep GCC from vectorizing the loop.
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (clamped - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  const float two_to_n = __builtin_bit_cast(float, exponent);  // std::bit_cast, also under C++17
  const float value = x < -87.0f ? 0.0f : p * two_to_n;
  return x == x ? value : x;
}

inline double softmax_exp(double x) { return std::exp(x); }

// row[j] = exp(row[j] - shift) for j < n; returns their sum. The exp loop and
// the sum loop are separate, and the sum has kLanes partial sums, so that
// both vectorize without -ffast-math.
template <typename T>
T exp_shifted_sum(T* row, int64_t n, T shift) {
  for (int64_t j = 0; j < n; ++j) row[j] = softmax_exp(row[j] - shift);
  constexpr int kLanes = 16;
  T partial[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) partial[l] += row[j + l];
  T sum = 0;
  for (; j < n; ++j) sum += row[j];
  for (int l = 0; l < kLanes; ++l) sum += partial[l];
  return sum;
}

// max_j row[j] for j < n (-inf for n = 0), with kLanes partial maxima.
template <typename T>
T row_max(const T* row, int64_t n) {
  constexpr int kLanes = 16;
  T partial[kLanes];
  for (int l = 0; l < kLanes; ++l) partial[l] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) partial[l] = row[j + l] > partial[l] ? row[j + l] : partial[l];
  T peak = -INFINITY;
  for (; j < n; ++j) peak = row[j] > peak ? row[j] : peak;
  for (int l = 0; l < kLanes; ++l) peak = partial[l] > peak ? partial[l] : peak;
  return peak;
}

MEDMTL_CORE_CPU_COPY_END
}  // namespace core
}  // namespace medmtl
