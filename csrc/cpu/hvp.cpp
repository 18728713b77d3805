// CPU kernels of hessext::hvp and hessext::ggn_vp (the same recurrence without the delta terms).
// Narrow stacks: one batched forward pass (ATen GEMMs, one activation pass), then the fused
// per-sample recurrence of fused.h with the K vectors innermost, samples split over threads, each
// thread accumulating into its own buffer. Wide stacks: the GEMM recurrence of hvp.h with the CPU
// elementwise steps, once per block of samples (row_blocks.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/elementwise_cpu.h"
#include "cpu/row_blocks.h"
#include "hvp.h"

namespace hessext {
namespace {

template <typename T, bool GGN>
std::vector<at::Tensor> hvp_fused_cpu(const Stack& s, at::TensorList vectors, const std::vector<int64_t>& lead) {
  const int64_t K = num_vectors(lead);
  const fused::Net<T> net = make_net<T>(s);
  const SlotLayout layout(s);
  const Forward f = forward<CpuElementwise>(s);
  const ForwardRows<T> rows(net, f);
  std::vector<at::Tensor> vt;  // each vector slot as [numel, K] (for K = 1 the given layout)
  for (const auto& v : vectors) vt.push_back(K == 1 ? v.contiguous() : v.reshape({K, -1}).t().contiguous());
  const int64_t M = s.M, C = s.width(s.L), P = layout.total, L = s.L;
  const int64_t nt = threads_for(M * K * P);
  std::vector<at::Tensor> direct;  // one thread, one vector: accumulate straight into the outputs
  at::Tensor acc;                  // else: slot j at offset[j] * K, as [numel, K], per thread
  if (nt == 1 && K == 1) {
    for (const auto& shape : s.slot_shapes(lead)) direct.push_back(at::zeros(shape, s.x.options()));
  } else {
    acc = at::zeros({nt, P * K}, s.x.options());
  }
  const T* y = s.y.data_ptr<T>();
  const T* V[fused::kMaxLayers];
  const T* vb[fused::kMaxLayers];
  for (int64_t l = 0; l < L; ++l) {
    V[l] = vt[s.slot_W[l]].data_ptr<T>();
    vb[l] = s.slot_b[l] >= 0 ? vt[s.slot_b[l]].data_ptr<T>() : nullptr;
  }
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    const int64_t U = net.off[net.L + 1];
    std::vector<T> scratch(fused::Sample<T>::size(net) + (U + 2 * net.maxw) * K);
    const fused::Sample<T> smp(net, scratch.data());
    T *Rz = smp.end(net), *r0 = Rz + U * K, *r1 = r0 + net.maxw * K;
    T* HW[fused::kMaxLayers];
    T* Hb[fused::kMaxLayers];
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t l = 0; l < L; ++l) {
        HW[l] = layout.slot_ptr<T>(s.slot_W[l], t, K, direct, acc);
        Hb[l] = s.slot_b[l] >= 0 ? layout.slot_ptr<T>(s.slot_b[l], t, K, direct, acc) : nullptr;
      }
      for (int64_t m = t * M / nt; m < (t + 1) * M / nt; ++m) {
        rows.load(net, m, smp);
        fused::loss(net, smp.a, y + m * C, smp.delta, smp.head);
        if (!GGN) fused::backward(net, smp.d, smp.delta, smp.e);
        if (K == 1)
          fused::hvp_sample<T, 1, GGN>(net, 1, smp.a, smp.d, smp.d2, smp.delta, smp.e, smp.head, V, vb, Rz, r0, r1,
                                       HW, Hb);
        else
          fused::hvp_sample<T, 0, GGN>(net, static_cast<int>(K), smp.a, smp.d, smp.d2, smp.delta, smp.e, smp.head, V,
                                       vb, Rz, r0, r1, HW, Hb);
      }
    }
  });
  if (!direct.empty()) return direct;
  return layout.unpack(nt == 1 ? acc[0] : acc.sum(0), s, lead);
}

template <bool GGN>
std::vector<at::Tensor> products_cpu(HX_STACK_PARAMS, at::TensorList vectors) {
  const Stack s(HX_STACK_ARGS);
  const std::vector<int64_t> lead = s.check_vectors(vectors);
  const int64_t K = num_vectors(lead);
  if (!PathChoice::fused(s, K))
    return sum_over_row_blocks(s, s.M * K * SlotLayout(s).total,
                               [&](const Stack& part) { return hvp<CpuElementwise>(part, vectors, lead, GGN); });
  return AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "hvp_fused_cpu",
                                    [&] { return hvp_fused_cpu<scalar_t, GGN>(s, vectors, lead); });
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CPU, m) {
  m.impl("hvp", &products_cpu<false>);
  m.impl("ggn_vp", &products_cpu<true>);
}

}  // namespace hessext
