// The description of a Linear/activation stack with its loss, shared by the CPU and CUDA kernels.
//
// Indices: m sample rows (M of them), i layer input, o layer output, k vector (K of them), c output.
// Layer l = 0..L-1 maps a_l: [M, n_l] to z_l = a_l W_l^T + b_l: [M, n_{l+1}], W_l: [o, i], b_l: [o].
// Hidden layers are followed by an activation (a row of activations.h): a_{l+1} = phi_l(z_l), with
// d_{l+1} = phi_l'(z_l) and d2_{l+1} = phi_l''(z_l). The output is z_{L-1} = a_L: [M, C].
// Loss (a row of losses.h): scale * sum_m l(a_L[m], y[m]), y: [M, C] real rows.
//
// Parameters travel as one list in "stack order": W_0, b_0 (if present), W_1, b_1, ...
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>

#include "checks.h"
#include "gemm.h"
#include "losses.h"
#include "workspace.h"

namespace hessext {

// The op arguments that describe a stack (the schemas in hessext.cpp), as every kernel takes them.
#define HX_STACK_PARAMS                                                                                                \
  const at::Tensor &inputs, const at::Tensor &targets, at::TensorList weights,                                         \
      const c10::List<c10::optional<at::Tensor>>&biases, at::IntArrayRef activations, at::ArrayRef<double> act_params, \
      int64_t loss, double loss_param, double scale
#define HX_STACK_ARGS inputs, targets, weights, biases, activations, act_params, loss, loss_param, scale

// The number of product vectors K for their leading shape lead, {K} or {} (one unbatched vector).
inline int64_t num_vectors(const std::vector<int64_t>& lead) { return lead.empty() ? 1 : lead[0]; }

struct Stack {
  at::Tensor x, y;                      // a_0 = x: [M, n_0], y: [M, C], both contiguous
  std::vector<at::Tensor> W;            // W[l]: [n_{l+1}, n_l]
  std::vector<at::Tensor> b;            // b[l]: [n_{l+1}] or undefined
  std::vector<Act> act;                 // act[l] follows layer l, l < L-1
  std::vector<double> p0, p1;           // its parameters
  std::vector<int64_t> slot_W, slot_b;  // positions in the stack-order parameter list, -1: no bias
  Loss loss;
  double loss_param, scale;
  int64_t L, M, num_slots;
  hessext::Workspace ws;  // the call's intermediates (never its outputs)

  Stack(const at::Tensor& inputs, const at::Tensor& targets, at::TensorList weights,
        const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef activations,
        at::ArrayRef<double> act_params, int64_t loss_kind, double loss_parameter, double loss_scale)
      : loss_param(loss_parameter),
        scale(loss_scale),
        L(static_cast<int64_t>(weights.size())),
        M(inputs.size(0)),
        num_slots(0),
        ws(inputs.device()) {
    TORCH_CHECK_VALUE(L >= 1, "weights must hold at least one Linear weight");
    TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == L, "biases must have one entry per layer (", L, "), got ",
                      biases.size());
    TORCH_CHECK_VALUE(static_cast<int64_t>(activations.size()) == L - 1,
                      "activations must have one entry per hidden layer (", L - 1, "), got ", activations.size());
    TORCH_CHECK_VALUE(static_cast<int64_t>(act_params.size()) == 2 * (L - 1),
                      "act_params must hold two values per hidden layer (", 2 * (L - 1), "), got ", act_params.size());
    TORCH_CHECK_VALUE(loss_kind >= 0 && loss_kind < kNumLosses, "loss must be in [0, ", kNumLosses, "), got ",
                      loss_kind);
    loss = static_cast<Loss>(loss_kind);
    const at::Tensor& W0 = weights[0];
    CHECK_FLOATING(W0);
    CHECK_DIM(inputs, 2);
    CHECK_SAME_DTYPE(inputs, W0);
    CHECK_SAME_DEVICE(inputs, W0);
    TORCH_CHECK_VALUE(M > 0, "inputs must hold at least one sample, got shape ", inputs.sizes());
    for (auto* v : {&W, &b}) v->reserve(L);  // one allocation each (small calls pay for every one)
    for (auto* v : {&slot_W, &slot_b}) v->reserve(L);
    for (auto* v : {&p0, &p1}) v->reserve(L);
    act.reserve(L);
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& w = weights[l];
      TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == (l == 0 ? inputs.size(1) : weights[l - 1].size(0)), "weights[", l,
                        "] must be [out, ", (l == 0 ? inputs.size(1) : weights[l - 1].size(0)), "], got ", w.sizes());
      TORCH_CHECK_TYPE(w.scalar_type() == W0.scalar_type() && w.device() == W0.device(), "weights[", l,
                       "] must match weights[0] in dtype and device");
      W.push_back(w.contiguous());
      slot_W.push_back(num_slots++);
      c10::optional<at::Tensor> bl = biases[l];
      if (bl.has_value() && bl->defined()) {
        TORCH_CHECK_VALUE(bl->sizes() == at::IntArrayRef({w.size(0)}), "biases[", l, "] must be [", w.size(0),
                          "], got ", bl->sizes());
        TORCH_CHECK_TYPE(bl->scalar_type() == W0.scalar_type() && bl->device() == W0.device(), "biases[", l,
                         "] must match weights[0] in dtype and device");
        b.push_back(bl->contiguous());
        slot_b.push_back(num_slots++);
      } else {
        b.emplace_back();
        slot_b.push_back(-1);
      }
      if (l < L - 1) {
        TORCH_CHECK_VALUE(activations[l] >= 0 && activations[l] < kNumActs, "activations[", l, "] must be in [0, ",
                          kNumActs, "), got ", activations[l]);
        act.push_back(static_cast<Act>(activations[l]));
        p0.push_back(act_params[2 * l]);
        p1.push_back(act_params[2 * l + 1]);
      }
    }
    CHECK_SAME_DTYPE(targets, W0);
    CHECK_SAME_DEVICE(targets, W0);
    CHECK_SHAPE(targets, M, W.back().size(0));
    x = inputs.contiguous();
    y = targets.contiguous();
  }

  // Samples [m0, m1) of this stack: the same layers, loss and scale, so that the losses of the row
  // blocks sum to this stack's loss (and so do their derivatives). Checked once, here, not again.
  Stack rows(int64_t m0, int64_t m1) const { return Stack(*this, m0, m1); }

  int64_t width(int64_t l) const { return l == 0 ? x.size(1) : W[l - 1].size(0); }
  // The widest of the inputs, hidden layers and outputs.
  int64_t max_width() const {
    int64_t w = 0;
    for (int64_t l = 0; l <= L; ++l) w = std::max(w, width(l));
    return w;
  }
  // An intermediate of this call (workspace.h), with the inputs' dtype and device.
  at::Tensor scratch(at::IntArrayRef shape) const { return ws.empty(shape, x.options()); }
  // alpha (a Wt + bias): a [M, n] x [n, o] product with an optional bias row [o], into scratch.
  at::Tensor affine(const at::Tensor& a, const at::Tensor& Wt, const at::Tensor& bias, double alpha = 1.0) const {
    at::Tensor z = scratch({a.size(0), Wt.size(1)});
    if (bias.defined()) {
      hessext::addmm_into(z, bias, a, Wt, alpha);
    } else {
      hessext::mm_into(z, a, Wt, alpha);
    }
    return z;
  }
  // Whether an activation other than the identity follows layer l (then d_{l+1} exists), and
  // whether it has a second derivative (then d2_{l+1} and the residual terms exist).
  bool act_after(int64_t l) const { return l < L - 1 && act[l] != Act::Identity; }
  bool curved_after(int64_t l) const { return l < L - 1 && act_is_curved(act[l]); }

  // New (uninitialised) tensors for per-parameter results, shapes as slot_shapes(lead).
  std::vector<at::Tensor> new_slots(const std::vector<int64_t>& lead) const {
    std::vector<at::Tensor> out;
    out.reserve(num_slots);
    for (const auto& shape : slot_shapes(lead)) out.push_back(hessext::empty_output(shape, x.options()));
    return out;
  }

  // Shapes of the parameter list in stack order, each with `lead` prepended.
  std::vector<std::vector<int64_t>> slot_shapes(std::vector<int64_t> lead) const {
    std::vector<std::vector<int64_t>> shapes(num_slots);
    for (int64_t l = 0; l < L; ++l) {
      shapes[slot_W[l]] = lead;
      shapes[slot_W[l]].insert(shapes[slot_W[l]].end(), {W[l].size(0), W[l].size(1)});
      if (slot_b[l] >= 0) {
        shapes[slot_b[l]] = lead;
        shapes[slot_b[l]].push_back(W[l].size(0));
      }
    }
    return shapes;
  }

  // The products' vectors (stack order), checked: each [K, *param shape], or [*param shape] for one
  // vector. Returns their leading shape, {K} or {} (the results take the same form).
  std::vector<int64_t> check_vectors(at::TensorList vectors) const {
    TORCH_CHECK_VALUE(static_cast<int64_t>(vectors.size()) == num_slots, "vectors must hold ", num_slots,
                      " tensors (one per parameter), got ", vectors.size());
    const bool single = vectors[0].dim() == 2;  // slot 0 is W_0
    TORCH_CHECK_VALUE(single || (vectors[0].dim() == 3 && vectors[0].size(0) >= 1),
                      "vectors[0] must have shape [K, out, in] with K >= 1, or [out, in] for one vector");
    const std::vector<int64_t> lead = single ? std::vector<int64_t>{} : std::vector<int64_t>{vectors[0].size(0)};
    const auto shapes = slot_shapes(lead);
    for (int64_t j = 0; j < num_slots; ++j) {
      TORCH_CHECK_VALUE(vectors[j].sizes() == at::IntArrayRef(shapes[j]), "vectors[", j, "] must have shape ",
                        at::IntArrayRef(shapes[j]), ", got ", vectors[j].sizes());
      TORCH_CHECK_TYPE(vectors[j].scalar_type() == x.scalar_type() && vectors[j].device() == x.device(), "vectors[", j,
                       "] must match inputs in dtype and device");
    }
    return lead;
  }

 private:
  Stack(const Stack& s, int64_t m0, int64_t m1)
      : x(s.x.narrow(0, m0, m1 - m0)),
        y(s.y.narrow(0, m0, m1 - m0)),
        W(s.W),
        b(s.b),
        act(s.act),
        p0(s.p0),
        p1(s.p1),
        slot_W(s.slot_W),
        slot_b(s.slot_b),
        loss(s.loss),
        loss_param(s.loss_param),
        scale(s.scale),
        L(s.L),
        M(m1 - m0),
        num_slots(s.num_slots),
        ws(s.x.device()) {}
};

// Forward pass, computed once and shared by every vector:
//   z_l = a_l W_l^T + b_l;  a_{l+1} = phi_l(z_l), d_{l+1} = phi_l'(z_l), d2_{l+1} = phi_l''(z_l).
struct Forward {
  std::vector<at::Tensor> a;   // a[0..L], a[L] the network output
  std::vector<at::Tensor> d;   // d[l] where an activation other than the identity produced a[l]
  std::vector<at::Tensor> d2;  // d2[l] where that activation is curved (else its residual terms vanish)
};

template <class E>
Forward forward(const Stack& s) {
  Forward f;
  for (auto* v : {&f.a, &f.d, &f.d2}) v->reserve(s.L + 1);
  f.a.push_back(s.x);
  f.d.emplace_back();
  f.d2.emplace_back();
  for (int64_t l = 0; l < s.L; ++l) {
    at::Tensor z = s.affine(f.a[l], s.W[l].t(), s.b[l], s.act_after(l) ? E::input_scale(s.act[l]) : 1.0);
    at::Tensor d, d2;
    if (s.act_after(l)) {
      d = s.scratch(z.sizes());
      if (s.curved_after(l)) d2 = s.scratch(z.sizes());
      E::activation(z, s.act[l], s.p0[l], s.p1[l], d, d2);
    }
    f.a.push_back(z);
    f.d.push_back(d);
    f.d2.push_back(d2);
  }
  return f;
}

// The loss at the network output, per sample (losses.h): g = scale dl/dz [M, C], and the output
// Hessian diag(h) or w (diag(p) - p p^T) with h = p [M, C], w [M].
struct LossHead {
  Loss kind;
  at::Tensor g, h, w;

  bool softmax() const { return loss_is_softmax(kind); }
  // x [M, K, C] -> the output Hessian times x, [M, K, C].
  at::Tensor apply(const at::Tensor& x) const {
    const at::Tensor p = h.unsqueeze(1);
    if (!softmax()) return x * p;
    return (x - (x * p).sum(2, true)).mul_(p).mul_(w.view({-1, 1, 1}));
  }
  // The output Hessians of samples [m0, m0 + mc): [mc, C, C].
  at::Tensor dense(int64_t m0, int64_t mc) const {
    const at::Tensor p = h.narrow(0, m0, mc);
    if (!softmax()) return at::diag_embed(p);
    return (at::diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mul_(w.narrow(0, m0, mc).view({-1, 1, 1}));
  }
  // softmax: a square root F [C, M, C] with F[:, m, :] F[:, m, :]^T = w_m (diag(p_m) - p_m p_m^T):
  // F = sqrt(w) (diag(s) - p s^T), s = sqrt(p), since s^T s = 1.
  at::Tensor factor() const {
    const at::Tensor s = h.sqrt();
    const at::Tensor F = (at::diag_embed(s) - h.unsqueeze(2) * s.unsqueeze(1)).mul_(w.sqrt().view({-1, 1, 1}));
    return F.permute({1, 0, 2}).contiguous();
  }
};

template <class E>
LossHead loss_head(const Stack& s, const at::Tensor& out) {
  LossHead head{s.loss, s.scratch(out.sizes()), s.scratch(out.sizes()), s.scratch({s.M})};
  E::loss_rows(s.loss, s.loss_param, s.scale, out, s.y, head.g, head.h, head.w);
  return head;
}

// Backward pass of the loss through the activations (no parameter gradients):
//   delta_{L-1} = g;  e_l = delta_l W_l;  delta_{l-1} = d_l * e_l (or e_l).
// delta_l = dLoss/dz_l: [M, n_{l+1}];  e_l = dLoss/da_l: [M, n_l] for l >= 1.
struct Backward {
  std::vector<at::Tensor> delta, e;  // empty where not needed (GGN quantities)
};

inline Backward backward(const Stack& s, const Forward& f, const LossHead& head) {
  Backward g;
  g.delta.resize(s.L);
  g.e.resize(s.L);
  g.delta[s.L - 1] = head.g;
  for (int64_t l = s.L - 1; l >= 1; --l) {
    g.e[l] = s.scratch({s.M, s.width(l)});
    hessext::mm_into(g.e[l], g.delta[l], s.W[l]);
    g.delta[l - 1] = g.e[l];
    if (f.d[l].defined()) {
      g.delta[l - 1] = s.scratch(g.e[l].sizes());
      at::mul_out(g.delta[l - 1], g.e[l], f.d[l]);
    }
  }
  return g;
}

// The residual (second-derivative) coefficient of layer l's activation: R_{l-1} = phi''(z_{l-1}) e_l
// = d2_l * e_l, [M, n_l]; undefined where phi is piecewise linear (or for the GGN).
inline at::Tensor residual(const Stack& s, const Forward& f, const Backward& g, int64_t l) {
  if (!f.d2[l].defined() || !g.e[l].defined()) return at::Tensor();
  at::Tensor r = s.scratch(g.e[l].sizes());
  return at::mul_out(r, f.d2[l], g.e[l]);
}

}  // namespace hessext

#include "fused.h"

namespace hessext {

// Which CPU/CUDA path serves a call: the fused per-sample kernels (fused.h) while the stack is
// narrow and the work small, else the GEMM recurrences. The limit is adjustable (tests force both).
struct PathChoice {
  static int64_t& max_width() {
    static int64_t w = 64;
    return w;
  }
  static int64_t& max_work() {  // sample x vector x parameter products
    static int64_t work = int64_t(1) << 22;
    return work;
  }
  // The fused diagonal holds each sample's whole pre-activation Hessian: cost M * sum n_{l+1}^2 n_l.
  static bool fused_diag(const Stack& s) {
    if (s.L > fused::kMaxLayers) return false;
    int64_t work = 0;
    for (int64_t l = 0; l < s.L; ++l) work += s.width(l + 1) * s.width(l + 1) * s.width(l);
    return s.max_width() <= max_width() && s.M * work <= max_work();
  }
  // The fused HVP runs its M K P multiply-adds in per-sample loops (samples in SIMD lanes on the CPU)
  // at about 0.2-0.4 ns each, the GEMM path pays a fixed cost per layer and product and then runs at
  // BLAS speed, which products with a dimension of 16 or less hardly reach: fused while
  // M K P <= L max_work / 64 for CPU stacks no wider than 16, L max_work / 256 otherwise (the measured
  // crossovers: docs/internals.md, "Measurements behind the kernels' choices").
  // The fused dense Hessian adds P^2 products per sample in scalar loops: for small M P^2.
  static bool fused_hessian(const Stack& s) {
    if (s.L > fused::kMaxLayers) return false;
    int64_t P = 0;
    for (int64_t l = 0; l < s.L; ++l) P += s.W[l].numel() + (s.b[l].defined() ? s.W[l].size(0) : 0);
    return s.max_width() <= max_width() && s.M * P * P <= max_work() / 4;
  }
  static bool fused(const Stack& s, int64_t K) {
    if (s.L > fused::kMaxLayers) return false;
    int64_t P = 0;
    for (int64_t l = 0; l < s.L; ++l) P += s.W[l].numel();
    return s.max_width() <= max_width() &&
           s.M * K * P <= s.L * (max_work() / (s.x.is_cpu() && s.max_width() <= 16 ? 64 : 256));
  }
};

template <typename T>
fused::Net<T> make_net(const Stack& s) {
  fused::Net<T> net{};
  net.L = static_cast<int>(s.L);
  net.scale = static_cast<T>(s.scale);
  net.loss = s.loss;
  net.loss_param = static_cast<T>(s.loss_param);
  net.off[0] = 0;
  net.maxw = 0;
  for (int l = 0; l <= s.L; ++l) {
    net.n[l] = static_cast<int>(s.width(l));
    net.off[l + 1] = net.off[l] + net.n[l];
    net.maxw = std::max(net.maxw, net.n[l]);
  }
  for (int l = 0; l < s.L; ++l) {
    net.W[l] = s.W[l].data_ptr<T>();
    net.b[l] = s.b[l].defined() ? s.b[l].data_ptr<T>() : nullptr;
    net.act[l] = s.act_after(l) ? s.act[l] : Act::Identity;
    net.p0[l] = l < s.L - 1 ? static_cast<T>(s.p0[l]) : T(0);
    net.p1[l] = l < s.L - 1 ? static_cast<T>(s.p1[l]) : T(0);
  }
  return net;
}

// Offsets and sizes of the stack-order parameters in one flat buffer of all of them (per_layer: in
// one buffer per layer, each layer's W_l at 0); per layer, W_l's offset woff[l] and b_l's boff[l]
// (-1: no bias). The one parameter layout: the products' accumulators, the Hessians' rows and columns,
// the fused kernels' LayerVectors.
struct SlotLayout {
  std::vector<int64_t> offset, numel, woff, boff;
  int64_t total = 0;
  explicit SlotLayout(const Stack& s, bool per_layer = false) : offset(s.num_slots), numel(s.num_slots) {
    for (int64_t l = 0; l < s.L; ++l) {
      if (per_layer) total = 0;
      numel[s.slot_W[l]] = s.W[l].numel();
      woff.push_back(offset[s.slot_W[l]] = total);
      total += s.W[l].numel();
      boff.push_back(s.slot_b[l] >= 0 ? total : -1);
      if (s.slot_b[l] >= 0) {
        numel[s.slot_b[l]] = s.W[l].size(0);
        offset[s.slot_b[l]] = total;
        total += s.W[l].size(0);
      }
    }
  }
  // Slot j's accumulator for thread t: the output tensors themselves when there is one thread and
  // one column (the [numel, 1] layout is the output's own), else thread t's part of the buffer.
  template <typename T>
  T* slot_ptr(int64_t j, int64_t t, int64_t K, const std::vector<at::Tensor>& direct, const at::Tensor& acc) const {
    return direct.empty() ? acc.data_ptr<T>() + t * total * K + offset[j] * K : direct[j].data_ptr<T>();
  }
  // The per-slot [*lead, *shape] outputs (each in its own storage) of a [*lead, P] buffer in slot order.
  std::vector<at::Tensor> split_rows(const at::Tensor& rows, const Stack& s, std::vector<int64_t> lead) const {
    const auto shapes = s.slot_shapes(lead);
    std::vector<at::Tensor> out;
    for (int64_t j = 0; j < s.num_slots; ++j)
      out.push_back(rows.narrow(-1, offset[j], numel[j]).reshape(shapes[j]).clone());
    return out;
  }
  // The per-slot [*lead, *shape] outputs, lead {K} or {} (K = 1; each in its own storage; outputs never
  // alias) of a flat [P * K] buffer holding slot j at offset[j] * K as [numel, K].
  std::vector<at::Tensor> unpack(const at::Tensor& flat, const Stack& s, const std::vector<int64_t>& lead) const {
    const int64_t K = num_vectors(lead);
    const auto shapes = s.slot_shapes(lead);
    std::vector<at::Tensor> out;
    for (int64_t j = 0; j < s.num_slots; ++j) {
      const at::Tensor slot = flat.narrow(0, offset[j] * K, numel[j] * K).view({numel[j], K});
      out.push_back(at::empty(shapes[j], flat.options()).view({K, numel[j]}).copy_(slot.t()).view(shapes[j]));
    }
    return out;
  }
};

// fused::LayerVectors of vt, the vectors in slot order, in the layout the caller's kernel reads
// ([numel, K] for the CUDA kernel, [K, numel] as given for the CPU lanes).
template <typename T>
fused::LayerVectors<T> layer_vectors(const Stack& s, const SlotLayout& layout, const std::vector<at::Tensor>& vt) {
  fused::LayerVectors<T> lv{};
  for (int64_t l = 0; l < s.L; ++l) {
    lv.V[l] = vt[s.slot_W[l]].data_ptr<T>();
    lv.vb[l] = s.slot_b[l] >= 0 ? vt[s.slot_b[l]].data_ptr<T>() : nullptr;
    lv.offW[l] = layout.woff[l];
    lv.offb[l] = layout.boff[l];
  }
  return lv;
}

}  // namespace hessext
