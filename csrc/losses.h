// The loss table: every loss the kernels serve, as one row each, shared by the CPU loops and the
// CUDA kernels (host/device functions). The total loss is scale * sum_m l(z_m, y_m) over the rows
// z_m [C] of the network output (scale carries the reduction: 1/(M C), 1/M or 1). A row gives, per
// sample, the scaled gradient g = scale dl/dz [C] and the scaled output Hessian in one of two forms:
//   diagonal   scale d^2l/dz^2 = diag(h)                        (MSE, Huber, BCE with logits)
//   softmax    scale d^2l/dz^2 = w (diag(p) - p p^T), h = p     (cross-entropy on logits)
// so that it is applied (and factored, diag.h) in O(C) per vector, never formed as C x C unless a
// dense Hessian needs it. Targets y [C] are real rows: for cross-entropy the target distribution
// (one-hot, label-smoothed or given probabilities; a zero row for an ignored sample).
// Adding a loss: an enum value, a case in loss_row, and its capture in hessext/capture.py.
#pragma once
#include "activations.h"

namespace hessext {

enum class Loss : int64_t {
  MSE = 0,                  // (z - y)^2
  Huber = 1,                // param delta: r^2 / 2 for |r| <= delta, else delta (|r| - delta / 2), r = z - y
  BCEWithLogits = 2,        // softplus(z) - y z
  SoftmaxCrossEntropy = 3,  // -sum_c y_c log softmax(z)_c
};
constexpr int64_t kNumLosses = 4;
// Each row's name, in enum order (hessext._C.table_names).
constexpr const char* kLossNames[kNumLosses] = {"mse", "huber", "bce_with_logits", "softmax_cross_entropy"};

HX_HD bool loss_is_softmax(Loss kind) { return kind == Loss::SoftmaxCrossEntropy; }

// One sample: g [C] = scale dl/dz; the output Hessian as h [C] and *w (see above).
template <typename T>
HX_HD void loss_row(Loss kind, T param, T scale, int C, const T* z, const T* y, T* g, T* h, T* w) {
  *w = T(0);
  switch (kind) {
    case Loss::MSE:
      for (int c = 0; c < C; ++c) g[c] = T(2) * scale * (z[c] - y[c]), h[c] = T(2) * scale;
      return;
    case Loss::Huber:                // torch's convention: the gradient is r for |r| <= delta (the branches agree at
      for (int c = 0; c < C; ++c) {  // |r| = delta), and autograd's second derivative 1 only for |r| < delta
        const T r = z[c] - y[c];
        g[c] = scale * (r > param ? param : (r < -param ? -param : r));
        h[c] = (r < param && r > -param) ? scale : T(0);
      }
      return;
    case Loss::BCEWithLogits:
      for (int c = 0; c < C; ++c) {
        const T s = sigmoid_of(z[c]);
        g[c] = scale * (s - y[c]), h[c] = scale * s * (T(1) - s);
      }
      return;
    case Loss::SoftmaxCrossEntropy: {  // g = scale (t p - y), t = sum_c y_c; Hessian scale t (diag(p) - p p^T)
      T top = z[0], sum = T(0), t = T(0);
      for (int c = 1; c < C; ++c) top = z[c] > top ? z[c] : top;
      for (int c = 0; c < C; ++c) h[c] = exp(z[c] - top), sum += h[c], t += y[c];
      for (int c = 0; c < C; ++c) h[c] /= sum, g[c] = scale * (t * h[c] - y[c]);
      *w = scale * t;
      return;
    }
  }
}

// out [C, K] = (scale d^2l/dz^2) x for x [C, K] (row-major, k innermost); out may alias x.
template <typename T>
HX_HD void loss_hessian_apply(Loss kind, int C, int K, const T* h, T w, const T* x, T* out) {
  if (!loss_is_softmax(kind)) {
    for (int c = 0; c < C; ++c)
      for (int k = 0; k < K; ++k) out[c * K + k] = h[c] * x[c * K + k];
    return;
  }
  for (int k = 0; k < K; ++k) {  // w (p * x - p (p . x))
    T px = T(0);
    for (int c = 0; c < C; ++c) px += h[c] * x[c * K + k];
    for (int c = 0; c < C; ++c) out[c * K + k] = w * h[c] * (x[c * K + k] - px);
  }
}

// G [C, C] = scale d^2l/dz^2 (row-major).
template <typename T>
HX_HD void loss_hessian_dense(Loss kind, int C, const T* h, T w, T* G) {
  const bool softmax = loss_is_softmax(kind);
  for (int c = 0; c < C; ++c)
    for (int q = 0; q < C; ++q)
      G[c * C + q] = softmax ? w * ((c == q ? h[c] : T(0)) - h[c] * h[q]) : (c == q ? h[c] : T(0));
}

}  // namespace hessext
