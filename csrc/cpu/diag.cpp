// CPU kernel of hessext::diag: exact Hessian or GGN diagonals. Narrow stacks with little work: one
// batched forward pass, then the fused per-sample recurrence (fused.h), samples split over threads.
// Otherwise the factored GEMM recurrence of diag.h with the CPU elementwise steps, for the summed
// diagonal once per block of samples (row_blocks.h).
#include "diag.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/elementwise_cpu.h"
#include "cpu/row_blocks.h"

namespace hessext {
namespace {

// Acc: the accumulators' type, float64 for float32 sums over samples (per-sample rows stay T).
template <typename T, typename Acc>
std::vector<at::Tensor> diag_fused_cpu(const Stack& s, bool ggn, bool per_sample) {
  const fused::Net<T> net = make_net<T>(s);
  const SlotLayout layout(s);
  const Forward f = forward<CpuElementwise>(s);
  const ForwardRows<T> rows(net, f);
  const int64_t M = s.M, C = s.width(s.L), P = layout.total, L = s.L;
  const int64_t nt = threads_for(M * P, int64_t(1) << 16);
  const auto acc_opts = s.x.options().dtype(c10::CppTypeToScalarType<Acc>::value);
  std::vector<at::Tensor> direct;  // one thread, summed: accumulate straight into the outputs
  at::Tensor acc;
  if (nt == 1 && !per_sample) {
    for (const auto& shape : s.slot_shapes({})) direct.push_back(at::zeros(shape, acc_opts));
  } else {
    acc = at::zeros({per_sample ? M : nt, P}, acc_opts);
  }
  const T* y = s.y.data_ptr<T>();
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    const int64_t W2 = int64_t(net.maxw) * net.maxw;
    std::vector<T> scratch(fused::Sample<T>::size(net) + 3 * W2);
    const fused::Sample<T> smp(net, scratch.data());
    T *G = smp.end(net), *Gn = G + W2, *Tm = Gn + W2;
    Acc* HW[fused::kMaxLayers];
    Acc* Hb[fused::kMaxLayers];
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m = t * M / nt; m < (t + 1) * M / nt; ++m) {
        const int64_t row = per_sample ? m : t;
        for (int64_t l = 0; l < L; ++l) {
          HW[l] = layout.slot_ptr<Acc>(s.slot_W[l], row, 1, direct, acc);
          Hb[l] = s.slot_b[l] >= 0 ? layout.slot_ptr<Acc>(s.slot_b[l], row, 1, direct, acc) : nullptr;
        }
        rows.load(net, m, smp);
        fused::loss(net, smp.a, y + m * C, smp.delta, smp.head);
        if (!ggn) fused::backward(net, smp.d, smp.delta, smp.e);
        fused::diag_sample(net, ggn, smp.a, smp.d, smp.d2, smp.e, smp.head, G, Gn, Tm, HW, Hb);
      }
  });
  if (!direct.empty()) {
    for (auto& t : direct) t = t.to(s.x.scalar_type());
    return direct;
  }
  const at::Tensor total = per_sample ? acc : (nt == 1 ? acc[0] : acc.sum(0));
  return layout.split_rows(total.to(s.x.scalar_type()), s,
                           per_sample ? std::vector<int64_t>{M} : std::vector<int64_t>{});
}

std::vector<at::Tensor> diag_cpu(HX_STACK_PARAMS, bool ggn, bool per_sample) {
  const Stack s(HX_STACK_ARGS);
  if (!PathChoice::fused_diag(s)) {
    if (per_sample) return diag<CpuElementwise>(s, ggn, per_sample);  // rows of every sample: one block
    return sum_over_row_blocks(s, s.M * SlotLayout(s).total,
                               [&](const Stack& part) { return diag<CpuElementwise>(part, ggn, false); });
  }
  if (s.x.scalar_type() == at::kFloat && !per_sample) return diag_fused_cpu<float, double>(s, ggn, per_sample);
  return AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "diag_fused_cpu",
                                    [&] { return diag_fused_cpu<scalar_t, scalar_t>(s, ggn, per_sample); });
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CPU, m) { m.impl("diag", &diag_cpu); }

}  // namespace hessext
