// e^y for the CPU's activation loops, branch-free, so that a loop over it compiles to this CPU's
// vectors (run_simd) and tanh, sigmoid and their derivatives come out of one pass over memory.
// float64:
//   y = k ln2 + r,  k = round(y / ln2),  |r| <= ln2 / 2
//   (ln2 in two parts, Cody-Waite: k ln2_hi is exact for |k| < 2^21; k is rounded by adding 1.5 2^52)
//   e^r = p(r), p of degree 11 (Horner): mpmath.chebyfit of e^r on [-ln2/2, ln2/2] at 40 digits, its
//         coefficients rounded to double; p(r) / e^r - 1 stays below 1.7e-17 there (2.2e-16 at degree 10)
//   2^k = the bits (k + 1023) << 52, taken from the low bits of the rounding sum.
// y is clamped to [-708, 708], where 2^k stays a normal number; the clamp moves only results that are
// already +-1 or 0 after the activations' rounding (tanh from |z| > 19.1; sigmoid below z = -708 gives
// 3.3e-308). Measured against torch (tests/test_activation_values.py): tanh = 1 - 2 / (1 + e^(2 z)) is
// off by at most 3.3e-16 absolute, sigmoid by 4.1e-16 relative down to z = -700.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace hessext {

inline double exp_clamped(double y) {
  constexpr double kShift = 0x1.8p52, kLog2e = 1.4426950408889634, kLn2Hi = 0x1.62e42fee00000p-1,
                   kLn2Lo = 0x1.a39ef35793c76p-33;
  y = std::min(std::max(y, -708.0), 708.0);
  const double shifted = y * kLog2e + kShift;
  const double k = shifted - kShift;
  const double r = (y - k * kLn2Hi) - k * kLn2Lo;
  double p = 2.5110037605963777e-08;
  for (const double c : {2.763263963904103e-07, 2.755724091857897e-06, 2.4801485482328494e-05, 0.00019841269890047113,
                         0.0013888888952314775, 0.008333333333319601, 0.0416666666664881, 0.1666666666666668,
                         0.5000000000000019, 1.0, 1.0})
    p = p * r + c;
  uint64_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits << 52) + (uint64_t{1023} << 52);
  double two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return p * two_k;
}

// tanh z from y = 2 z (the loops' doubled input) and sigmoid y, float64: 1 - 2 / (1 + e^(2 z)), 1 / (1 + e^(-y)).
inline double tanh_of_doubled(double y) { return 1.0 - 2.0 / (1.0 + exp_clamped(y)); }
inline double sigmoid_of_exp(double y) { return 1.0 / (1.0 + exp_clamped(-y)); }

// float32, in float arithmetic (twice the lanes of float64 and half the polynomial):
//   e^y = 2^k (1 + q),  k = round(y / ln2),  r = y - k ln2 (ln2_hi of 9 bits: k ln2_hi is exact),
//   q = e^r - 1 = r + r^2 P(r), P of degree 5 fitted to q's relative error on [-ln2/2, ln2/2]
//   (2.4e-10 before its coefficients are rounded to float; 7.5e-8, one unit in the last place, in float).
// Returns q and sets 2^k; y must lie in [-87, 88], where 2^k and e^y are normal floats.
inline float expm1_of_reduced(float y, float& two_k) {
  constexpr float kShift = 0x1.8p23f, kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float shifted = y * kLog2e + kShift;
  const float k = shifted - kShift;
  const float r = (y - k * kLn2Hi) - k * kLn2Lo;
  float p = 0.00019845877f;
  for (const float c : {0.0013940617f, 0.0083333896f, 0.041666362f, 0.16666666f, 0.5f}) p = p * r + c;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits << 23) + (uint32_t{127} << 23);
  std::memcpy(&two_k, &bits, sizeof two_k);
  return r + r * r * p;
}

// tanh |z| = (1 - E) / (1 + E) with E = e^m, m = -|y|, in one of two forms from the same 2^k and q, so
// that only the last rounding lands at the value's scale: -u / (1 + E) with u = E - 1 = 2^k q + (2^k - 1)
// while tanh |z| < 1/2 (small |z| keep their relative accuracy: no 1 - 2 / (...) cancelling), else
// 1 - 2 E / (1 + E). m is clamped at -20, past which tanh rounds to 1 in float. NaN stays NaN (std::max
// keeps its first argument when unordered).
inline float tanh_of_doubled(float y) {
  float two_k;
  const float m = std::max(-std::fabs(y), -20.0f);
  const float q = expm1_of_reduced(m, two_k);
  const float E = two_k + two_k * q, u = two_k * q + (two_k - 1.0f);
  const bool small = E > 1.0f / 3.0f;
  const float ratio = (small ? -u : 2.0f * E) / (1.0f + E);
  return std::copysign(small ? ratio : 1.0f - ratio, y);
}

// -y clamped to [-87, 88]: below z = -88 the value is e^-88 / (1 + e^-88) = 6e-39 (torch: smaller or 0).
inline float sigmoid_of_exp(float y) {
  float two_k;
  const float m = std::min(std::max(-y, -87.0f), 88.0f);
  const float q = expm1_of_reduced(m, two_k);
  return 1.0f / (1.0f + (two_k + two_k * q));
}

}  // namespace hessext
