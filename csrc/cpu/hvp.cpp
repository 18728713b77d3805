// CPU kernels of hessext::hvp and hessext::ggn_vp (the same recurrence without the delta terms).
// Narrow stacks: one batched forward pass (ATen GEMMs, one activation pass), then the fused
// per-sample recurrence of fused.h, one register of samples at a time in SIMD lanes (lanes.h), the vectors in
// groups of kGroup, samples split over threads, each thread accumulating into its own buffer. Wide
// stacks: the GEMM recurrence of hvp.h on raw rows (hvp_rows) with the CPU elementwise steps, per
// block of samples (row_blocks.h) or of vectors (hvp_vector_blocks).
#include "hvp.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "cpu/elementwise_cpu.h"
#include "cpu/lanes.h"
#include "cpu/row_blocks.h"

namespace hessext {
namespace {

// out [n] = (add: out +) the sums of the columns of x [M, n] (row-major), in blocks of kRows rows summed
// apart and then added, so that the rounding grows with kRows + M / kRows, not with M.
template <typename T>
void column_sums(const T* x, int64_t M, int64_t n, T* out, bool add) {
  constexpr int64_t kRows = 64;
  if (!add) std::fill_n(out, n, T(0));
  std::vector<T> part(n);
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    std::copy_n(x + m0 * n, n, part.data());
    for (int64_t m = m0 + 1; m < std::min(M, m0 + kRows); ++m) {
      const T* __restrict__ row = x + m * n;
      T* __restrict__ acc = part.data();
      for (int64_t j = 0; j < n; ++j) acc[j] += row[j];
    }
    for (int64_t j = 0; j < n; ++j) out[j] += part[j];
  }
}

// hvp_rows' row chunks: the fewest rows a chunk takes (its products keep long sums over samples), and
// the widest stack that is cut into chunks.
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kChunkMaxWidth = 128;
inline bool rows_in_chunks(const Stack& s) { return s.max_width() <= kChunkMaxWidth; }

// Vectors per group of the sample lanes: a group's vectors run through fused.h's recurrence together
// (KC = kGroup), so that each sample value, derivative and weight loaded serves all of them.
constexpr int64_t kGroup = 4;

// Where vector k's product for parameter q (slot order) accumulates among the [K, P] lanes of a thread:
// the first G = K / kGroup groups as [G][P][kGroup], the rest (K % kGroup vectors, one at a time) as
// [k][P] after them.
inline int64_t acc_index(int64_t k, int64_t q, int64_t P, int64_t G) {
  return k < G * kGroup ? (k / kGroup) * P * kGroup + q * kGroup + k % kGroup : k * P + q;
}

// K products for rows [m0, m1), W samples per pass of fused.h's recurrence in SIMD lanes
// (lanes.h): the loss head and backward once per pass, then hvp_sample on Lanes<T> once per group of
// kGroup vectors (their entries interleaved, lv[g]) and once per remaining vector (the vectors as
// given, [K, numel] per slot, lv.back()), each lane's terms summed into acc (acc_index). Lanes past m1
// are zero rows: with a zero loss head and delta every term of theirs is zero.
template <typename T, bool GGN, int W>
struct HvpLanes {
  using S = Lanes<T, W>;
  const Stack& s;
  const fused::Net<T>& net;
  const ForwardRows<T>& rows;
  const std::vector<fused::LayerVectors<T>>& lv;
  int64_t K, P, m0, m1;
  S* acc;

  void operator()() const {
    const int L = net.L, C = net.n[L], U = net.off[L + 1];
    const int64_t G = K / kGroup;
    std::vector<S> scratch(fused::Sample<S>::size(net) + kGroup * (U + 2 * net.maxw));
    std::vector<T> head_row(3 * C + 1);  // one lane's z, g, h and w
    const fused::Sample<S> smp(net, scratch.data());
    S *Rz = smp.end(net), *r0 = Rz + kGroup * U, *r1 = r0 + kGroup * net.maxw;
    S* HW[fused::kMaxLayers];
    S* Hb[fused::kMaxLayers];
    const T* V[fused::kMaxLayers];
    const T* vb[fused::kMaxLayers];
    const T* y = s.y.data_ptr<T>();
    const fused::LayerVectors<T>& single = lv.back();
    T *z = head_row.data(), *g = z + C, *h = g + C;
    for (int64_t m = m0; m < m1; m += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, m1 - m));
      rows.load_lanes(net, m, count, smp);
      for (int j = 0; j < W; ++j) {  // the loss head, lane by lane
        T w = T(0);
        std::fill_n(g, 2 * C, T(0));
        if (j < count) {
          for (int c = 0; c < C; ++c) z[c] = smp.a[net.off[L] + c].v[j];
          loss_row<T>(net.loss, net.loss_param, net.scale, C, z, y + (m + j) * C, g, h, &w);
        }
        for (int c = 0; c < C; ++c) smp.delta[net.off[L] + c].v[j] = g[c], smp.head[c].v[j] = h[c];
        smp.head[C].v[j] = w;
      }
      if (!GGN) fused::backward<T, S>(net, smp.d, smp.delta, smp.e);
      for (int64_t grp = 0; grp < G; ++grp) {
        lv[grp].targets(L, kGroup, acc + grp * P * kGroup, HW, Hb);
        fused::hvp_sample<T, kGroup, GGN, S>(net, kGroup, smp.a, smp.d, smp.d2, smp.delta, smp.e, smp.head, lv[grp].V,
                                             lv[grp].vb, Rz, r0, r1, HW, Hb);
      }
      for (int64_t k = G * kGroup; k < K; ++k) {
        for (int l = 0; l < L; ++l) {
          V[l] = single.V[l] + k * net.n[l] * net.n[l + 1];
          vb[l] = single.vb[l] ? single.vb[l] + k * net.n[l + 1] : nullptr;
        }
        single.targets(L, 1, acc + k * P, HW, Hb);
        fused::hvp_sample<T, 1, GGN, S>(net, 1, smp.a, smp.d, smp.d2, smp.delta, smp.e, smp.head, V, vb, Rz, r0, r1, HW,
                                        Hb);
      }
    }
  }
};

template <typename T, bool GGN, int W>
std::vector<at::Tensor> hvp_lanes_cpu(const Stack& s, at::TensorList vectors, const std::vector<int64_t>& lead) {
  const fused::Net<T> net = make_net<T>(s);
  const SlotLayout layout(s);
  const Forward f = forward<CpuElementwise>(s);
  const ForwardRows<T> rows(net, f);
  std::vector<at::Tensor> vt;
  vt.reserve(vectors.size());
  for (const auto& v : vectors) vt.push_back(v.contiguous());
  const int64_t M = s.M, K = num_vectors(lead), P = layout.total, blocks = (M + W - 1) / W;
  const int64_t G = K / kGroup;
  // groups' vectors interleaved, [G][P][kGroup] in slot order (fused.h's V_l [o, i, K] per group)
  std::vector<T> grouped(G * P * kGroup);
  for (int64_t j = 0; j < s.num_slots; ++j) {
    const T* v = vt[j].data_ptr<T>();
    const int64_t n = layout.numel[j];
    for (int64_t k = 0; k < G * kGroup; ++k)
      for (int64_t p = 0; p < n; ++p) grouped[acc_index(k, layout.offset[j] + p, P, G)] = v[k * n + p];
  }
  const fused::LayerVectors<T> given = layer_vectors<T>(s, layout, vt);  // the remaining vectors, as given
  std::vector<fused::LayerVectors<T>> lv;
  lv.reserve(G + 1);
  for (int64_t grp = 0; grp < G; ++grp) {
    fused::LayerVectors<T> group = given;  // the slots' offsets; the vectors from the interleaved copy
    for (int64_t l = 0; l < s.L; ++l) {
      group.V[l] = grouped.data() + grp * P * kGroup + layout.offset[s.slot_W[l]] * kGroup;
      group.vb[l] =
          s.slot_b[l] >= 0 ? grouped.data() + grp * P * kGroup + layout.offset[s.slot_b[l]] * kGroup : nullptr;
    }
    lv.push_back(group);
  }
  lv.push_back(given);
  const int64_t nt = std::min(threads_for(M * K * P, int64_t(1) << 15), blocks);
  std::vector<std::vector<Lanes<T, W>>> acc(nt);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      acc[t].assign(K * P, Lanes<T, W>(T(0)));
      const int64_t m0 = t * blocks / nt * W, m1 = std::min(M, (t + 1) * blocks / nt * W);
      run_simd(HvpLanes<T, GGN, W>{s, net, rows, lv, K, P, m0, m1, acc[t].data()});
    }
  });
  const std::vector<at::Tensor> out = s.new_slots(lead);
  for (int64_t j = 0; j < s.num_slots; ++j) {
    T* o = out[j].data_ptr<T>();
    const int64_t n = layout.numel[j];
    for (int64_t k = 0; k < K; ++k)
      for (int64_t p = 0; p < n; ++p) {
        const int64_t at = acc_index(k, layout.offset[j] + p, P, G);
        T sum = acc[0][at].sum();
        for (int64_t t = 1; t < nt; ++t) sum += acc[t][at].sum();
        o[k * n + p] = sum;
      }
  }
  return out;
}

// The GEMM path's R-recurrence (hvp.h has the math) for the K vectors (stack order, [K, *param shape]
// or [*param shape]) into out (the same shapes, contiguous), given s's shared passes. The same products
// and fused passes as hvp.h's hvp_into, but every operand a Mat over the shared passes' rows, the
// vectors, the outputs and one scratch block: no ATen view, select or expand per step (a fixed cost of
// about 0.2 us each, some 140 per HVP of three layers). On stacks no wider than kChunkMaxWidth the
// rows run in chunks whose [rows, K, width] intermediates take an eighth of the L2 cache each (about
// eight are live at a step), the products over the samples accumulating into out from chunk to chunk,
// so that every pass and product finds its operands in L2. Wider stacks' products are bound by their
// multiply-adds, not by memory, and the chunks' shorter sums over samples cost more than they save, so
// they run whole.
//   buffers: Rz_l [rows, K, n_{l+1}] per layer (Ra_{l+1} in place where phi is not curved, else
//   Ra_{l+1} beside it, Rz_l kept for the residual without the bias components that the residual
//   step adds back), and two [rows, K, max width] for Re.
template <typename T, bool GGN>
void hvp_rows(const Stack& s, const SharedPasses& sh, at::TensorList vectors, const std::vector<at::Tensor>& out) {
  const int64_t L = s.L, K = vectors[s.slot_W[0]].numel() / s.W[0].numel(), maxw = s.max_width();
  const int64_t fit =
      !rows_in_chunks(s) ? s.M : std::max(kMinChunkRows, l2_cache_bytes() / 8 / (K * maxw * int64_t(sizeof(T))));
  const int64_t chunks = (s.M + fit - 1) / fit;
  const int64_t rows = (s.M + chunks - 1) / chunks;
  const Forward& f = sh.f;
  const Backward& g = sh.g;
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  std::vector<at::Tensor> vt(s.num_slots);
  for (int64_t j = 0; j < s.num_slots; ++j) vt[j] = vectors[j].contiguous();
  int64_t total = 2 * rows * K * maxw;
  for (int64_t l = 0; l < L; ++l) total += rows * K * s.width(l + 1) * (!GGN && s.curved_after(l) ? 2 : 1);
  const at::Tensor block = s.scratch({total});

  for (int64_t m0 = 0; m0 < s.M; m0 += rows) {
    const int64_t M = std::min(rows, s.M - m0);
    const T beta0 = m0 == 0 ? 0 : 1;  // the first chunk sets the sums over samples, the others add
    // a row-major per-sample quantity [s.M, w] of the shared passes, from this chunk's first row
    const auto at_rows = [&](const at::Tensor& t, int64_t w) { return t.defined() ? ptr(t) + m0 * w : nullptr; };
    T* next = block.data_ptr<T>();
    const auto take = [&](int64_t n) { return std::exchange(next, next + n); };

    std::vector<T*> Rz(L), Ra(L, nullptr), Rzs(L, nullptr);
    std::vector<const T*> Rzb(L, nullptr);  // the bias components Rzs[l] is without (r_scale_rows)
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i = s.width(l), o = s.width(l + 1);
      const T* V = ptr(vt[s.slot_W[l]]);
      const T* vb = s.slot_b[l] >= 0 ? ptr(vt[s.slot_b[l]]) : nullptr;
      T* Z = Rz[l] = take(M * K * o);
      T beta = 0;
      if (vb && !s.act_after(l)) {  // else vb joins the activation step's pass
        for (int64_t m = 0; m < M; ++m) std::copy_n(vb, K * o, Z + m * K * o);
        beta = 1;
      }
      gemm<T>(rows_of(at_rows(f.a[l], i), M, i), rows_of(V, K * o, i).t(), rows_of(Z, M, K * o), 1, beta);
      if (l > 0) gemm<T>(rows_of(Ra[l], M * K, i), rows_of(ptr(s.W[l]), o, i).t(), rows_of(Z, M * K, o), 1, 1);
      if (l == L - 1) break;
      const T* d = at_rows(f.d[l + 1], o);
      if (!GGN && s.curved_after(l)) {
        Rzs[l + 1] = Z;
        Rzb[l + 1] = vb;
        Ra[l + 1] = take(M * K * o);
        CpuElementwise::r_scale_rows<T>(Ra[l + 1], Z, d, vb, M, K, o);
      } else {
        if (s.act_after(l)) CpuElementwise::r_scale_rows<T>(Z, Z, d, vb, M, K, o);
        Ra[l + 1] = Z;
      }
    }

    T* Rdelta = Rz[L - 1];
    const int64_t C = s.width(L);
    const T *h = at_rows(sh.head.h, C), *w = at_rows(sh.head.w, 1);
    for (int64_t r = 0; r < M * K; ++r)  // each row [C] of Rz_{L-1} [M, K, C] times its sample's H_out
      loss_hessian_apply<T>(s.loss, static_cast<int>(C), 1, h + r / K * C, w[r / K], Rdelta + r * C, Rdelta + r * C);
    T* Re_buf[2] = {take(M * K * maxw), take(M * K * maxw)};
    for (int64_t l = L - 1; l >= 0; --l) {
      const int64_t i = s.width(l), o = s.width(l + 1);
      const T* V = ptr(vt[s.slot_W[l]]);
      const T* delta = GGN ? nullptr : at_rows(g.delta[l], o);
      T* HW = ptr(out[s.slot_W[l]]);
      gemm<T>(rows_of(Rdelta, M, K * o).t(), rows_of(at_rows(f.a[l], i), M, i), rows_of(HW, K * o, i), 1, beta0);
      if (l > 0 && !GGN)
        for (int64_t k = 0; k < K; ++k)
          gemm<T>(rows_of(delta, M, o).t(), rows_of(Ra[l] + k * i, M, i, K * i), hessext::rows_of(HW + k * o * i, o, i),
                  1, 1);
      if (s.slot_b[l] >= 0) column_sums<T>(Rdelta, M, K * o, ptr(out[s.slot_b[l]]), m0 > 0);
      if (l == 0) break;
      T* Re = Re_buf[l % 2];
      if (!GGN)
        for (int64_t k = 0; k < K; ++k)
          gemm<T>(rows_of(delta, M, o), rows_of(V + k * o * i, o, i), rows_of(Re + k * i, M, i, K * i), 1, 0);
      gemm<T>(rows_of(Rdelta, M * K, o), rows_of(ptr(s.W[l]), o, i), rows_of(Re, M * K, i), 1, GGN ? 0 : 1);
      if (Rzs[l]) {
        CpuElementwise::r_residual_rows<T>(Re, at_rows(f.d[l], i), at_rows(f.d2[l], i), at_rows(g.e[l], i), Rzs[l],
                                           Rzb[l], M, K, i);
      } else if (f.d[l].defined()) {
        CpuElementwise::r_scale_rows<T>(Re, Re, at_rows(f.d[l], i), nullptr, M, K, i);
      }
      Rdelta = Re;
    }
  }
}

// hvp_rows into new outputs [*lead, *param shape], the shared passes computed here.
template <bool GGN>
std::vector<at::Tensor> hvp_gemm(const Stack& s, at::TensorList vectors, const std::vector<int64_t>& lead) {
  const std::vector<at::Tensor> out = s.new_slots(lead);
  const SharedPasses sh = shared_passes<CpuElementwise>(s, GGN);
  AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "hvp_rows", [&] { hvp_rows<scalar_t, GGN>(s, sh, vectors, out); });
  return out;
}

// K > 1 vectors on the GEMM path, with at least one vector per thread: the shared passes once (their
// products split over the threads), then one block of vectors per thread, its recurrence over all M
// rows with single-threaded products, written straight into its rows of the outputs. Against the
// row blocks (or one recurrence with every product split) this saves the fork and join of each step
// and the sum of the blocks' results, and each thread's products keep their full M-row sums. A thread
// runs its block in chunks of vectors whose [rows, chunk, width] intermediates fill about half its L2
// cache: rows = M, or at most 256 where hvp_rows runs the rows in chunks that fit L2 (stacks no wider
// than kChunkMaxWidth).
template <bool GGN>
std::vector<at::Tensor> hvp_vector_blocks(const Stack& s, at::TensorList vectors, const std::vector<int64_t>& lead,
                                          int64_t nt) {
  const SharedPasses sh = shared_passes<CpuElementwise>(s, GGN);
  const int64_t K = num_vectors(lead);
  const int64_t rows = rows_in_chunks(s) ? std::min<int64_t>(s.M, 256) : s.M;  // hvp_rows' chunks
  const int64_t chunk = std::max<int64_t>(1, l2_cache_bytes() / 2 / (rows * s.max_width() * s.x.element_size()));
  const std::vector<at::Tensor> out = s.new_slots(lead);
  run_per_thread(nt, [&](int64_t t) {
    for (int64_t k0 = t * K / nt, k1 = (t + 1) * K / nt; k0 < k1; k0 += chunk) {
      const int64_t kc = std::min(chunk, k1 - k0);
      const Stack part = s.rows(0, s.M);  // the same stack, its intermediates in this thread's workspace
      std::vector<at::Tensor> v, o;
      for (int64_t j = 0; j < s.num_slots; ++j) {
        v.push_back(vectors[j].narrow(0, k0, kc));
        o.push_back(out[j].narrow(0, k0, kc));
      }
      AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "hvp_rows", [&] { hvp_rows<scalar_t, GGN>(part, sh, v, o); });
    }
  });
  return out;
}

template <bool GGN>
std::vector<at::Tensor> products_cpu(HX_STACK_PARAMS, at::TensorList vectors) {
  const Stack s(HX_STACK_ARGS);
  const std::vector<int64_t> lead = s.check_vectors(vectors);
  const int64_t K = num_vectors(lead);
  if (!PathChoice::fused(s, K)) {
    const int64_t work = s.M * K * SlotLayout(s).total, nt = threads_for(work);
    if (K >= nt && nt > 1 && !at::in_parallel_region()) return hvp_vector_blocks<GGN>(s, vectors, lead, nt);
    return sum_over_row_blocks(s, work, [&](const Stack& part) { return hvp_gemm<GGN>(part, vectors, lead); });
  }
  return AT_DISPATCH_FLOATING_TYPES(s.x.scalar_type(), "hvp_fused_cpu", [&] {
    switch (simd_in_use()) {  // lanes of one register of the instruction set run_simd runs
      case Simd::AVX512:
        return hvp_lanes_cpu<scalar_t, GGN, lanes_of<scalar_t>(Simd::AVX512)>(s, vectors, lead);
      case Simd::AVX2:
        return hvp_lanes_cpu<scalar_t, GGN, lanes_of<scalar_t>(Simd::AVX2)>(s, vectors, lead);
      default:
        return hvp_lanes_cpu<scalar_t, GGN, lanes_of<scalar_t>(Simd::Baseline)>(s, vectors, lead);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hessext, CPU, m) {
  m.impl("hvp", &products_cpu<false>);
  m.impl("ggn_vp", &products_cpu<true>);
}

}  // namespace hessext
