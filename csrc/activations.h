// The activation table: every elementwise activation the kernels serve, as one row each, shared by
// the CPU loops and the CUDA kernels (host/device functions). A row gives, for a pre-activation z,
// the value a = phi(z), the first derivative d1 = phi'(z) and the second derivative d2 = phi''(z)
// (act_eval), and the third (act_third, for the reverse of the input jets), at autograd's convention
// where phi is not differentiable (the branch torch's backward takes).
// Two parameters per row (p0, p1): LeakyReLU's negative_slope, Softplus's beta and threshold, ELU's alpha.
// Adding an activation: an enum value, a case in act_eval and in act_third, and its name in
// hessext/capture.py.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define HX_HD __host__ __device__ __forceinline__
#else
#define HX_HD inline
#endif

namespace hessext {

enum class Act : int64_t {
  Identity = 0,
  Tanh = 1,
  ReLU = 2,
  LeakyReLU = 3,  // p0 negative_slope
  Sigmoid = 4,
  SiLU = 5,
  GELU = 6,      // approximate="none": z Phi(z)
  GELUTanh = 7,  // approximate="tanh"
  Softplus = 8,  // p0 beta, p1 threshold
  ELU = 9,       // p0 alpha
};
constexpr int64_t kNumActs = 10;
// Each row's name, in enum order: hessext/capture.py builds its codes from these (hessext._C.table_names).
constexpr const char* kActNames[kNumActs] = {"identity", "tanh", "relu",      "leaky_relu", "sigmoid",
                                             "silu",     "gelu", "gelu_tanh", "softplus",   "elu"};

// Piecewise-linear rows have d2 = 0 everywhere: their R-backward has no residual term, and their
// Hessian diagonal is the GGN's.
HX_HD bool act_is_curved(Act kind) { return !(kind == Act::Identity || kind == Act::ReLU || kind == Act::LeakyReLU); }

// The derivatives of tanh and sigmoid from their value a (the CPU's vectorised loops take a from
// exp_cpu.h and then these, the same formulas act_eval uses).
template <typename T>
HX_HD void act_derivatives_of_value(Act kind, T a, T& d1, T& d2) {
  if (kind == Act::Tanh) {  // 1 - a^2, -2 a (1 - a^2)
    d1 = T(1) - a * a, d2 = T(-2) * a * d1;
  } else {  // sigmoid: a (1 - a), a (1 - a) (1 - 2 a)
    d1 = a * (T(1) - a), d2 = d1 * (T(1) - T(2) * a);
  }
}

template <typename T>
HX_HD T sigmoid_of(T z) {
  return T(1) / (T(1) + exp(-z));
}

template <typename T>
HX_HD void act_eval(Act kind, T p0, T p1, T z, T& a, T& d1, T& d2) {
  switch (kind) {
    case Act::Identity:
      a = z, d1 = T(1), d2 = T(0);
      return;
    case Act::Tanh:
      a = tanh(z);
      act_derivatives_of_value(kind, a, d1, d2);
      return;
    case Act::ReLU:  // torch: z <= 0 ? 0 : z, gradient 0 at z = 0; a NaN z passes through (value NaN, gradient 1)
      a = z <= T(0) ? T(0) : z, d1 = z <= T(0) ? T(0) : T(1), d2 = T(0);
      return;
    case Act::LeakyReLU:  // gradient negative_slope at z = 0
      a = z > T(0) ? z : z * p0, d1 = z > T(0) ? T(1) : p0, d2 = T(0);
      return;
    case Act::Sigmoid:
      a = sigmoid_of(z);
      act_derivatives_of_value(kind, a, d1, d2);
      return;
    case Act::SiLU: {  // z s: s (1 + z (1 - s)), s (1 - s) (2 + z (1 - 2 s))
      const T s = sigmoid_of(z);
      a = z * s, d1 = s * (T(1) + z * (T(1) - s)), d2 = s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s));
      return;
    }
    case Act::GELU: {  // z Phi(z): Phi + z phi, phi (2 - z^2)
      const T Phi = T(0.5) * erfc(-z * T(0.70710678118654752440));
      const T phi = T(0.39894228040143267794) * exp(T(-0.5) * z * z);
      a = z * Phi, d1 = Phi + z * phi, d2 = phi * (T(2) - z * z);
      return;
    }
    case Act::GELUTanh: {  // z (1 + t) / 2, t = tanh(u), u = k (z + c z^3)
      const T k = T(0.79788456080286535588), c = T(0.044715);
      const T t = tanh(k * (z + c * z * z * z)), s = T(1) - t * t;
      a = T(0.5) * z * (T(1) + t);
      if (s == T(0)) {  // tanh saturated: the terms below are 0 * (z^5 overflowing to inf), torch's 0
        d1 = T(0.5) * (T(1) + t), d2 = T(0);
        return;
      }
      const T du = k * (T(1) + T(3) * c * z * z), ddu = k * T(6) * c * z;
      d1 = T(0.5) * (T(1) + t) + T(0.5) * z * s * du;
      d2 = s * (du + T(0.5) * z * (ddu - T(2) * t * du * du));
      return;
    }
    case Act::Softplus: {   // log(1 + exp(beta z)) / beta; linear where beta z > threshold (torch's rule),
      const T bz = p0 * z;  // and autograd's second derivative is 0 from beta z = threshold on
      if (bz > p1) {
        a = z, d1 = T(1), d2 = T(0);
      } else {
        const T s = sigmoid_of(bz);
        a = log1p(exp(bz)) / p0, d1 = s, d2 = bz < p1 ? p0 * s * (T(1) - s) : T(0);
      }
      return;
    }
    case Act::ELU: {   // torch: z <= 0 takes the exponential branch (gradient alpha at z = 0), and
      if (z > T(0)) {  // autograd's second derivative only z < 0 (0 at z = 0)
        a = z, d1 = T(1), d2 = T(0);
      } else {
        const T ez = p0 * exp(z);
        a = ez - p0, d1 = ez, d2 = z < T(0) ? ez : T(0);
      }
      return;
    }
  }
}

// The third derivative phi'''(z), given the row's a, d1 and d2 at z from act_eval (the pieces it
// shares with them). Piecewise-linear rows and the linear pieces of Softplus and ELU: 0, as autograd
// differentiates them.
template <typename T>
HX_HD T act_third(Act kind, T p0, T z, T a, T d1, T d2) {
  switch (kind) {
    case Act::Tanh:  // d/dz (-2 a d1) = -2 d1^2 - 2 a d2
      return T(-2) * d1 * d1 - T(2) * a * d2;
    case Act::Sigmoid:  // d/dz (d1 (1 - 2 a)) = d2 (1 - 2 a) - 2 d1^2
      return d2 * (T(1) - T(2) * a) - T(2) * d1 * d1;
    case Act::SiLU: {  // z s: 3 s'' + z s''', s' = s (1 - s), s'' = s' (1 - 2 s), s''' = s'' (1 - 2 s) - 2 s'^2
      const T s = sigmoid_of(z), s1 = s * (T(1) - s), s2 = s1 * (T(1) - T(2) * s);
      return T(3) * s2 + z * (s2 * (T(1) - T(2) * s) - T(2) * s1 * s1);
    }
    case Act::GELU:  // d/dz phi (2 - z^2) = phi z (z^2 - 4)
      return T(0.39894228040143267794) * exp(T(-0.5) * z * z) * z * (z * z - T(4));
    case Act::GELUTanh: {  // d2 = s B, B = u' + z (u'' - 2 t u'^2) / 2, s = 1 - t^2, t' = s u', s' = -2 t s u'
      const T k = T(0.79788456080286535588), c = T(0.044715);
      const T t = tanh(k * (z + c * z * z * z)), s = T(1) - t * t;
      if (s == T(0)) return T(0);  // saturated, as act_eval's d2
      const T du = k * (T(1) + T(3) * c * z * z), ddu = k * T(6) * c * z, dddu = k * T(6) * c;
      const T B = du + T(0.5) * z * (ddu - T(2) * t * du * du);
      const T dB = T(1.5) * ddu - t * du * du + T(0.5) * z * (dddu - T(2) * s * du * du * du - T(4) * t * du * ddu);
      return s * (dB - T(2) * t * du * B);
    }
    case Act::Softplus:  // beta^2 s (1 - s) (1 - 2 s) = beta d2 (1 - 2 d1) where d2 is not 0 (d1 = s)
      return d2 == T(0) ? T(0) : p0 * d2 * (T(1) - T(2) * d1);
    case Act::ELU:  // alpha e^z where d2 is (z < 0)
      return d2;
    default:
      return T(0);
  }
}

}  // namespace hessext
