// CPU kernel of hessext::diag: exact Hessian or GGN diagonals. Narrow stacks with little work: one
// batched forward pass, then the fused per-sample recurrence (fused.h), samples split over threads.
// Otherwise the factored GEMM recurrence of diag.h with the CPU elementwise steps.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/elementwise_cpu.h"
#include "diag.h"

namespace hessext {
namespace {

// Acc: the accumulators' type, float64 for float32 sums over samples (per-sample rows stay T).
template <typename T, typename Acc>
std::vector<at::Tensor> diag_fused_cpu(const Stack& s, bool ggn, bool per_sample) {
  const fused::Net<T> net = make_net<T>(s);
  const SlotLayout layout(s);
  const Forward f = forward<CpuElementwise>(s);
  const int64_t M = s.M, C = s.width(s.L), P = layout.total, L = s.L;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M * P / (int64_t(1) << 16)));
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
    const int64_t U = net.off[net.L + 1], W2 = int64_t(net.maxw) * net.maxw;
    std::vector<T> scratch(4 * U + 3 * W2);
    T *a = scratch.data(), *d = a + U, *delta = d + U, *e = delta + U, *G = e + U, *Gn = G + W2, *Tm = Gn + W2;
    Acc* HW[fused::kMaxLayers];
    Acc* Hb[fused::kMaxLayers];
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m = t * M / nt; m < (t + 1) * M / nt; ++m) {
        const int64_t row = per_sample ? m : t;
        for (int64_t l = 0; l < L; ++l) {
          HW[l] = layout.slot_ptr<Acc>(s.slot_W[l], row, 1, direct, acc);
          Hb[l] = s.slot_b[l] >= 0 ? layout.slot_ptr<Acc>(s.slot_b[l], row, 1, direct, acc) : nullptr;
        }
        for (int64_t l = 0; l <= L; ++l) {
          const int64_t n = net.n[l];
          std::copy_n(f.a[l].data_ptr<T>() + m * n, n, a + net.off[l]);
          if (f.d[l].defined()) std::copy_n(f.d[l].data_ptr<T>() + m * n, n, d + net.off[l]);
        }
        if (!ggn) fused::backward(net, a, d, y + m * C, delta, e);
        fused::diag_sample(net, ggn, a, d, e, G, Gn, Tm, HW, Hb);
      }
  });
  if (!direct.empty()) {
    for (auto& t : direct) t = t.to(s.x.scalar_type());
    return direct;
  }
  const at::Tensor total = per_sample ? acc : (nt == 1 ? acc[0] : acc.sum(0));
  return layout.split_rows(total.to(s.x.scalar_type()), s, per_sample ? std::vector<int64_t>{M} : std::vector<int64_t>{});
}

std::vector<at::Tensor> diag_cpu(const at::Tensor& inputs, const at::Tensor& targets, at::TensorList weights,
                                 const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                                 double scale, bool ggn, bool per_sample) {
  const Stack s(inputs, targets, weights, biases, activations, scale);
  if (!PathChoice::fused_diag(s)) return diag<CpuElementwise>(s, ggn, per_sample);
  if (s.x.scalar_type() == at::kFloat && !per_sample) return diag_fused_cpu<float, double>(s, ggn, per_sample);
  return AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "diag_fused_cpu",
                                    [&] { return diag_fused_cpu<scalar_t, scalar_t>(s, ggn, per_sample); });
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CPU, m) { m.impl("diag", &diag_cpu); }

}  // namespace hessext
