// exp for softmax rows on the CPU, in a form the compiler vectorizes (std::exp
// is a scalar libm call: in the window-attention softmax it cost as much as
// both GEMMs together).
//
// exp(x) = 2^n * e^r with n = round(x log2 e) and r = x - n ln 2 (ln 2 split in
// two parts, Cody-Waite, so r is exact to float precision), |r| <= ln2 / 2,
// and e^r by its degree-6 Taylor polynomial: relative error below 3e-7 for
// x in [-87, 88]. Below -87 (where e^x is under float's normal range) it
// returns 0, so -inf (a masked score) gives exactly 0. NaN gives NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace medmtl {
namespace core {

inline float softmax_exp(float x) {
  // In [-88, 88] (NaN too, whose result is replaced below) so that 2^n stays a normal float.
  const float clamped = x > 88.0f ? 88.0f : (x > -88.0f ? x : -88.0f);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = (clamped - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &exponent, sizeof two_to_n);
  const float value = p * two_to_n;
  return x < -87.0f ? 0.0f : (x != x ? x : value);
}

inline double softmax_exp(double x) { return std::exp(x); }

// row[j] = exp(row[j] - shift) for j < n; returns their sum.
template <typename T>
T exp_shifted_sum(T* row, int64_t n, T shift) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    row[j] = softmax_exp(row[j] - shift);
    sum += row[j];
  }
  return sum;
}

// max_j row[j] for j < n (-inf for n = 0).
template <typename T>
T row_max(const T* row, int64_t n) {
  T peak = -INFINITY;
#pragma omp simd reduction(max : peak)
  for (int64_t j = 0; j < n; ++j) peak = row[j] > peak ? row[j] : peak;
  return peak;
}

}  // namespace core
}  // namespace medmtl
