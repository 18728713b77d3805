// CPU kernels of hessext::hessian (dense and block-diagonal weight Hessians, hessian.h) and
// hessext::input_derivatives (Laplacians and input Hessians: jets.h, or the backward recurrence of
// hessian.h when the input is wide).
#include "hessian.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/elementwise_cpu.h"
#include "cpu/row_blocks.h"

namespace hessext {
namespace {

// Narrow stacks, small M P^2: one batched forward pass, then fused::hessian_sample per sample, samples
// split over threads with one [P, P] accumulator each; then the mirror and symmetrisation of hessian.h.
template <typename T>
at::Tensor hessian_fused_cpu(const Stack& s) {
  const fused::Net<T> net = make_net<T>(s);
  const SlotLayout off(s);
  const Forward f = forward<CpuElementwise>(s);
  const ForwardRows<T> rows(net, f);
  const int64_t M = s.M, C = s.width(s.L), P = off.total, L = s.L;
  const int64_t nt = threads_for(M * P * P, int64_t(1) << 16);
  at::Tensor acc = at::zeros({nt, P, P}, s.x.options());
  const T* y = s.y.data_ptr<T>();
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    const int64_t W2 = int64_t(net.maxw) * net.maxw;
    std::vector<T> scratch(fused::Sample<T>::size(net) + (2 * L + 3) * W2);
    const fused::Sample<T> smp(net, scratch.data());
    T *G = smp.end(net), *GWs = G + L * W2, *A = GWs + L * W2, *An = A + W2, *B = An + W2;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m = t * M / nt; m < (t + 1) * M / nt; ++m) {
        rows.load(net, m, smp);
        fused::loss(net, smp.a, y + m * C, smp.delta, smp.head);
        fused::backward(net, smp.d, smp.delta, smp.e);
        fused::hessian_sample(net, smp.a, smp.d, smp.d2, smp.delta, smp.e, smp.head, G, GWs, A, An, B, off.woff.data(),
                              off.boff.data(), P, acc.data_ptr<T>() + t * P * P);
      }
  });
  at::Tensor H = nt == 1 ? acc[0] : acc.sum(0);
  symmetrize_from_lower(H, s);
  return H;
}

std::vector<at::Tensor> hessian_cpu(HX_STACK_PARAMS, bool layer_blocks) {
  const Stack s(HX_STACK_ARGS);
  if (layer_blocks || !PathChoice::fused_hessian(s))
    return hessian<CpuElementwise>(s, layer_blocks, kHessianChunkElems);
  return {AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "hessian_fused_cpu",
                                     [&] { return hessian_fused_cpu<scalar_t>(s); })};
}

// Per-sample results: each thread runs the whole pass for its block of samples (row_blocks.h).
at::Tensor input_derivatives_cpu(HX_STACK_PARAMS, int64_t mode) {
  const Stack s(HX_STACK_ARGS);
  const InputDerivativesPlan plan = input_derivatives_plan(s, mode);
  return cat_over_row_blocks(s, s.M * plan.per_sample, [&](const Stack& part) {
    return input_derivatives_any<CpuElementwise>(part, plan, kHessianChunkElems);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CPU, m) {
  m.impl("hessian", &hessian_cpu);
  m.impl("input_derivatives", &input_derivatives_cpu);
}

}  // namespace hessext
