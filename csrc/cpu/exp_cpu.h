// e^y for the CPU's activation loops, branch-free, so that a loop over it compiles to this CPU's
// vectors (run_simd) and tanh, sigmoid and their derivatives come out of one pass over memory:
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

}  // namespace hessext
