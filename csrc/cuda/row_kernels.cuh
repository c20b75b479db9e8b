// Block-per-row CUDA kernels for all six losses, forward (+ gradient) and backward.
// The per-variant math is losses.h, shared with the CPU kernels.
//
// Traffic per row of C logits (b bytes each), forward with the gradient:
//   pass 1: online lse_ex (+ arg-max)   read C*b
//   pass 2: gradient                    read C*b (mostly L2 for rows in flight), write C*b
// bce adds one read pass for its second reduction. Loads are 128-bit when the
// rows allow it (kVec: row starts 16-byte aligned and C a multiple of the
// pack), else one element per thread per step, still coalesced. Every row and
// column offset is 64-bit: N * C may pass 2^31.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../losses.h"
#include "reduce.cuh"

namespace fusedloss::cuda {

// One call's rows; "acc" is the math type (float, or double for double logits).
struct RowsArgs {
  const void* logits;  // (N, C), unit class stride, row_stride between rows
  int64_t rows, classes, row_stride;
  const int64_t* target;       // (N,); out-of-range values are clamped and the row marked NaN
  // Mixup's second target (N,) and lam (N,) acc, or nullptr: row loss k_a L(target) + k_b L(target_b)
  // with k_a = lam / mix_denominator_a, k_b = (1 - lam) / mix_denominator_b (device scalars acc:
  // each part's 'mean' denominator, or nullptr: 1); `denominator` is then nullptr.
  const int64_t* target_b;
  const void* lam;
  const void* mix_denominator_a;
  const void* mix_denominator_b;
  const void* probs;           // class-probability targets (ce) instead of target: (N, C), unit class stride
  int64_t probs_stride;
  const void* weight;          // (C,) acc, or nullptr
  const void* weight_total;    // device scalar acc: sum of weights (label smoothing), or nullptr: C
  const void* denominator;     // device scalar acc: what 'mean' divides by, or nullptr
  LossConfig cfg;
  void* stats;                 // (N, kStatsCols) acc
  void* loss_rows;             // forward: (N,) acc
  void* grad;                  // (N, C) contiguous, or nullptr
  const void* grad_loss;       // backward: acc, scalar or (N,) with grad_loss_stride
  int64_t grad_loss_stride;    // 0 for a scalar
};

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// f(j, x_j) over this thread's share of the row (in increasing j).
template <typename scalar_t, bool kVec, typename F>
__device__ __forceinline__ void visit_row(const scalar_t* x, int64_t C, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kVec) {
    constexpr int V = Pack<scalar_t>::kSize;
    const auto* packs = reinterpret_cast<const Pack<scalar_t>*>(x);
    for (int64_t p = threadIdx.x; p < C / V; p += blockDim.x) {
      const Pack<scalar_t> in = packs[p];
#pragma unroll
      for (int k = 0; k < V; ++k) f(p * V + k, static_cast<acc_t>(in.v[k]));
    }
  } else {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) f(j, static_cast<acc_t>(x[j]));
  }
}

// g[j] = f(j, x_j) over this thread's share of the row.
template <typename scalar_t, bool kVec, typename F>
__device__ __forceinline__ void map_row(const scalar_t* x, scalar_t* g, int64_t C, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kVec) {
    constexpr int V = Pack<scalar_t>::kSize;
    const auto* in_packs = reinterpret_cast<const Pack<scalar_t>*>(x);
    auto* out_packs = reinterpret_cast<Pack<scalar_t>*>(g);
    for (int64_t p = threadIdx.x; p < C / V; p += blockDim.x) {
      const Pack<scalar_t> in = in_packs[p];
      Pack<scalar_t> out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = static_cast<scalar_t>(f(p * V + k, static_cast<acc_t>(in.v[k])));
      out_packs[p] = out;
    }
  } else {
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      g[j] = static_cast<scalar_t>(f(j, static_cast<acc_t>(x[j])));
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t nan_value() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// Everything a row kernel needs to know about row i before its passes: its targets,
// one (b == a, k_b = 0) or mixup's two (RowsArgs::target_b), each part weighted by k
// (lam or 1 - lam times 'mean''s 1/denominator of its part; 0 for an ignored part,
// whose target is then the other's). kMix: a kernel of its own, so the one-target kernels
// keep their registers.
template <typename scalar_t, bool kMix>
struct RowView {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* g;   // nullptr: no gradient
  int64_t a, b;  // targets, clamped into [0, C) when out of range
  bool same;     // a == b: one part, the terms of both summed
  bool bad;      // a target out of range: NaN loss and gradient
  acc_t k_a, k_b, w_a, w_b;

  __device__ RowView(const RowsArgs& args, int64_t i) {
    x = static_cast<const scalar_t*>(args.logits) + i * args.row_stride;
    g = args.grad ? static_cast<scalar_t*>(args.grad) + i * args.classes : nullptr;
    const int64_t ignore = args.cfg.ignore_index, C = args.classes;
    const int64_t ta = args.target[i], tb = kMix ? args.target_b[i] : ta;
    const bool ign_a = ta == ignore, ign_b = tb == ignore;
    // Never read with a bad index: clamp it, and mark the row's loss and gradient NaN.
    const bool bad_a = !ign_a && (ta < 0 || ta >= C), bad_b = !ign_b && (tb < 0 || tb >= C);
    bad = bad_a || bad_b;
    a = ign_a || bad_a ? 0 : ta;
    b = ign_b || bad_b ? 0 : tb;
    k_a = acc_t(1);
    k_b = acc_t(0);
    if constexpr (kMix) {
      const acc_t lam = static_cast<const acc_t*>(args.lam)[i];
      k_a = lam * (args.mix_denominator_a ? acc_t(1) / *static_cast<const acc_t*>(args.mix_denominator_a) : acc_t(1));
      k_b = (acc_t(1) - lam) *
            (args.mix_denominator_b ? acc_t(1) / *static_cast<const acc_t*>(args.mix_denominator_b) : acc_t(1));
    }
    if (ign_a) a = b, k_a = acc_t(0);
    if (ign_b) b = a, k_b = acc_t(0);
    same = !kMix || a == b;
    const acc_t* weight = static_cast<const acc_t*>(args.weight);
    w_a = weight ? weight[a] : acc_t(1);
    w_b = kMix ? (weight ? weight[b] : acc_t(1)) : w_a;
  }
};

// Whether row i counts at all (every target ignored: loss 0, gradient 0). Block-uniform.
template <bool kMix>
__device__ __forceinline__ bool row_ignored(const RowsArgs& a, int64_t i) {
  return a.target[i] == a.cfg.ignore_index && (!kMix || a.target_b[i] == a.cfg.ignore_index);
}

// A logit as the loss reads it: soft-capped when cfg.softcap > 0 (losses.h).
template <typename acc_t>
__device__ __forceinline__ acc_t loss_logit(const RowsArgs& a, acc_t v) {
  return a.cfg.softcap > 0 ? soft_capped<acc_t>(v, static_cast<acc_t>(a.cfg.softcap)).value : v;
}

// The gradient w.r.t. the raw logit v from the one w.r.t. the capped logit.
template <typename acc_t>
__device__ __forceinline__ acc_t raw_grad(const RowsArgs& a, acc_t g, acc_t v) {
  return a.cfg.softcap > 0 ? g * soft_capped<acc_t>(v, static_cast<acc_t>(a.cfg.softcap)).slope : g;
}

template <typename acc_t>
__device__ __forceinline__ acc_t weight_total(const RowsArgs& a) {
  return a.weight_total ? *static_cast<const acc_t*>(a.weight_total) : acc_t(a.classes);
}

// dLoss/dloss_i without the class weight: the backward's grad_loss (1 in the
// forward), over 'mean''s denominator (one target; mixup's parts carry theirs in k).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_out(const RowsArgs& a, int64_t i) {
  acc_t go = a.grad_loss ? static_cast<const acc_t*>(a.grad_loss)[i * a.grad_loss_stride] : acc_t(1);
  if (a.denominator) go /= *static_cast<const acc_t*>(a.denominator);
  return go;
}

// The forward's first pass over a row with targets a and b: the lse over k not in {a, b},
// and from it both lse_ex (exact, as for one target), lse, the smoothing sum, and the
// row's arg-max w (bce; ties: a target).
template <typename acc_t>
struct RowStats {
  acc_t lse, lse_ex_a, lse_ex_b, x_sum;
  int64_t w;
};

template <typename scalar_t, bool kVec, bool kMix>
__device__ RowStats<at::opmath_type<scalar_t>> first_pass(const RowsArgs& a, const RowView<scalar_t, kMix>& r,
                                                          at::opmath_type<scalar_t> x_a,
                                                          at::opmath_type<scalar_t> x_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const bool smooth = a.cfg.label_smoothing != 0;
  LseState<acc_t> s = LseState<acc_t>::empty();
  acc_t xs[1] = {acc_t(0)};
  visit_row<scalar_t, kVec>(r.x, a.classes, [&](int64_t j, acc_t v) {
    if (j == r.a || j == r.b) return;
    v = loss_logit<acc_t>(a, v);
    s.add(v, j);
    if (smooth) xs[0] += weight ? weight[j] * v : v;
  });
  s = block_merge(s);
  RowStats<acc_t> st;
  st.x_sum = 0;
  if (smooth) {
    block_sum(xs);
    st.x_sum = xs[0] + r.w_a * x_a + (r.same ? acc_t(0) : r.w_b * x_b);
  }
  const acc_t rest = s.lse();
  st.lse_ex_a = r.same ? rest : logaddexp(rest, x_b);
  st.lse_ex_b = r.same ? rest : logaddexp(rest, x_a);
  st.lse = logaddexp(st.lse_ex_a, x_a);
  st.w = s.max > (x_a > x_b ? x_a : x_b) ? s.arg : (x_b > x_a ? r.b : r.a);
  return st;
}

// ---------------------------------------------------------------------------
// ce, nllr, crl, lace, focal (one target, or mixup's two: losses.h mix_grad)
// ---------------------------------------------------------------------------
template <typename scalar_t, bool kVec, bool kMix>
__device__ void target_only_row(const RowsArgs& a, int64_t i, bool forward) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowView<scalar_t, kMix> r(a, i);
  const int64_t C = a.classes;
  acc_t* st = static_cast<acc_t*>(a.stats) + i * kStatsCols;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t eps = static_cast<acc_t>(a.cfg.label_smoothing);
  const acc_t x_a = loss_logit<acc_t>(a, static_cast<acc_t>(r.x[r.a]));
  const acc_t x_b = loss_logit<acc_t>(a, static_cast<acc_t>(r.x[r.b]));
  const acc_t z = static_cast<acc_t>(a.cfg.z_loss);
  RowStats<acc_t> s{};
  if (forward) {
    s = first_pass<scalar_t, kVec, kMix>(a, r, x_a, x_b);
  } else {  // stats: lse, lse_ex_a, lse_ex_b (one target: 0)
    s.lse = st[0];
    s.lse_ex_a = st[1];
    s.lse_ex_b = r.same ? st[1] : st[2];
  }
  const auto& cfg = a.cfg;
  const auto ta = target_only_terms<acc_t>(cfg.variant, s.lse_ex_a - x_a, cfg.alpha, cfg.beta, cfg.gamma);
  const auto tb = target_only_terms<acc_t>(cfg.variant, s.lse_ex_b - x_b, cfg.alpha, cfg.beta, cfg.gamma);
  const acc_t W = weight_total<acc_t>(a);
  if (forward && threadIdx.x == 0) {
    const acc_t loss =
        mix_row_loss<acc_t>(r.k_a, ta.loss, r.w_a, r.k_b, tb.loss, r.w_b, s.lse, eps, acc_t(C), W, s.x_sum, z);
    static_cast<acc_t*>(a.loss_rows)[i] = r.bad ? nan_value<acc_t>() : loss;
    st[0] = s.lse;
    st[1] = s.lse_ex_a;
    st[2] = kMix ? s.lse_ex_b : acc_t(0);
    st[3] = acc_t(0);
  }
  if (!r.g) return;
  const acc_t go = grad_out<acc_t>(a, i);
  const auto k = target_only_mix_grad<acc_t>(r.same, s.lse, s.lse_ex_a, s.lse_ex_b, x_a, x_b, ta.log_s, tb.log_s,
                                             r.w_a, r.w_b,
                                             part_terms<acc_t>(r.k_a, r.w_a, go, s.lse, eps, acc_t(C), W, z),
                                             part_terms<acc_t>(r.k_b, r.w_b, go, s.lse, eps, acc_t(C), W, z));
  map_row<scalar_t, kVec>(r.x, r.g, C, [&](int64_t j, acc_t v) {
    if (r.bad) return nan_value<acc_t>();
    if (j == r.a) return raw_grad<acc_t>(a, k.target_a, v);
    if (j == r.b) return raw_grad<acc_t>(a, k.target_b, v);
    acc_t gj = std::exp(loss_logit<acc_t>(a, v) - k.shift) * k.scale;
    if (eps != acc_t(0)) gj -= k.smooth * (weight ? weight[j] : acc_t(1));
    return raw_grad<acc_t>(a, gj, v);
  });
}

// ---------------------------------------------------------------------------
// bce (one target, or mixup's two: both parts share lse, w and log(1 - p_w), each has
// its own R and loss, losses.h bce_part): lse_ex and the arg-max w; the sums over k not
// in {a, b, w}; the gradient of all parts.
// ---------------------------------------------------------------------------
template <typename scalar_t, bool kVec, bool kMix>
__device__ void bce_row(const RowsArgs& a, int64_t i, bool forward) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowView<scalar_t, kMix> r(a, i);
  const int64_t C = a.classes;
  acc_t* st = static_cast<acc_t*>(a.stats) + i * kStatsCols;
  const acc_t x_a = loss_logit<acc_t>(a, static_cast<acc_t>(r.x[r.a]));
  const acc_t x_b = loss_logit<acc_t>(a, static_cast<acc_t>(r.x[r.b]));
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t eps = static_cast<acc_t>(a.cfg.label_smoothing);
  const acc_t z = static_cast<acc_t>(a.cfg.z_loss);
  const acc_t W = weight_total<acc_t>(a);
  RowStats<acc_t> s{};
  if (forward) {
    s = first_pass<scalar_t, kVec, kMix>(a, r, x_a, x_b);
  } else {  // stats: lse, lse_ex_a, log(1 - p_w), w
    s.lse = st[0];
    s.lse_ex_a = st[1];
    s.w = static_cast<int64_t>(st[3]);
    if (s.w < 0 || s.w >= C) s.w = r.a;  // stats from elsewhere: never index with them unchecked
  }
  const int64_t w = s.w;
  const acc_t lse = s.lse;
  const acc_t x_w = loss_logit<acc_t>(a, static_cast<acc_t>(r.x[w]));
  // Sums over k not in {a, b, w}: P = sum p_k, sum log1p(-p_k), sum a_k (p_k <= 1/2: exact).
  acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};
  visit_row<scalar_t, kVec>(r.x, C, [&](int64_t j, acc_t v) {
    if (j == r.a || j == r.b || j == w) return;
    const acc_t p = std::exp(loss_logit<acc_t>(a, v) - lse);
    sums[0] += p;
    sums[1] += ::log1p(-p);
    sums[2] += p / (acc_t(1) - p);
  });
  block_sum(sums);
  const BceSums<acc_t> bs{sums[0], sums[1], sums[2]};
  const acc_t p_a = std::exp(x_a - lse), p_b = std::exp(x_b - lse);
  acc_t log1m_pw = forward ? acc_t(0) : st[2];
  if (forward) {
    const Log1mPw<acc_t> l = bce_log1m_pw<acc_t>(w, r.a, r.b, lse, s.lse_ex_a, s.lse_ex_b, bs, p_a, p_b);
    log1m_pw = l.value;
    if (!l.exact) {
      // P lost its precision (a wrong class leads by ~41+ in fp32): the exact lse over
      // k != w, shifted by its own max. Block-uniform branch.
      LseState<acc_t> e = LseState<acc_t>::empty();
      visit_row<scalar_t, kVec>(r.x, C, [&](int64_t j, acc_t v) {
        if (j != w) e.add(loss_logit<acc_t>(a, v), j);
      });
      e = block_merge(e);
      log1m_pw = e.lse() - lse;
    }
  }
  const auto pa = bce_part<acc_t>(w == r.a, r.b != r.a && r.b != w, lse, s.lse_ex_a, x_a, x_w, p_b, log1m_pw, bs);
  const auto pb = bce_part<acc_t>(w == r.b, r.a != r.b && r.a != w, lse, s.lse_ex_b, x_b, x_w, p_a, log1m_pw, bs);
  if (forward && threadIdx.x == 0) {
    const acc_t loss =
        mix_row_loss<acc_t>(r.k_a, pa.loss, r.w_a, r.k_b, pb.loss, r.w_b, lse, eps, acc_t(C), W, s.x_sum, z);
    static_cast<acc_t*>(a.loss_rows)[i] = r.bad ? nan_value<acc_t>() : loss;
    st[0] = lse;
    st[1] = s.lse_ex_a;
    st[2] = log1m_pw;
    st[3] = static_cast<acc_t>(w);
  }
  if (!r.g) return;
  const acc_t go = grad_out<acc_t>(a, i);
  ExtraTerms<acc_t> ta = part_terms<acc_t>(r.k_a, r.w_a, go, lse, eps, acc_t(C), W, z);
  const ExtraTerms<acc_t> tb = part_terms<acc_t>(r.k_b, r.w_b, go, lse, eps, acc_t(C), W, z);
  if (r.same) ta = sum_terms(ta, tb);
  BceGradCoef<acc_t> k{};
  add_bce_part<acc_t>(k, w == r.a, pa.row, ta);
  if (!r.same) add_bce_part<acc_t>(k, w == r.b, pb.row, tb);
  // The arg-max and the targets: each part's own form (losses.h, bce_entry).
  auto entry = [&](int64_t j) {
    const acc_t x_j = loss_logit<acc_t>(a, static_cast<acc_t>(r.x[j]));
    const acc_t w_j = weight ? weight[j] : acc_t(1);
    const acc_t v = bce_entry<acc_t>(j, w, r.a, x_j, lse, w_j, pa.row, ta);
    return r.same ? v : v + bce_entry<acc_t>(j, w, r.b, x_j, lse, w_j, pb.row, tb);
  };
  const acc_t g_w = entry(w), g_a = entry(r.a), g_b = entry(r.b);
  map_row<scalar_t, kVec>(r.x, r.g, C, [&](int64_t j, acc_t v) {
    if (r.bad) return nan_value<acc_t>();
    acc_t gj;
    if (j == w) {
      gj = g_w;
    } else if (j == r.a) {
      gj = g_a;
    } else if (j == r.b) {
      gj = g_b;
    } else {
      gj = bce_grad_rest<acc_t>(k, loss_logit<acc_t>(a, v), lse, weight ? weight[j] : acc_t(1));
    }
    return raw_grad<acc_t>(a, gj, v);
  });
}

// ---------------------------------------------------------------------------
// Class-probability targets (ce): y' = (1 - eps) y + eps / C, wy = w y',
//   L = sum_k wy_k (lse - x_k) (terms >= 0: no cancellation), g_j = go (S p_j - wy_j),
//   S = sum_k wy_k; stats (lse, S, 0, 0). 'mean''s 1/N arrives as the denominator.
// ---------------------------------------------------------------------------
template <typename scalar_t, bool kVec>
__device__ void soft_row(const RowsArgs& a, int64_t i, bool forward) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.classes;
  const scalar_t* x = static_cast<const scalar_t*>(a.logits) + i * a.row_stride;
  const scalar_t* y = static_cast<const scalar_t*>(a.probs) + i * a.probs_stride;
  scalar_t* g = a.grad ? static_cast<scalar_t*>(a.grad) + i * C : nullptr;
  acc_t* st = static_cast<acc_t*>(a.stats) + i * kStatsCols;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t eps = static_cast<acc_t>(a.cfg.label_smoothing);
  auto wy = [&](int64_t j) {
    acc_t v = static_cast<acc_t>(y[j]);
    if (eps != acc_t(0)) v = (acc_t(1) - eps) * v + eps / acc_t(C);
    return weight ? v * weight[j] : v;
  };
  acc_t lse, S;
  if (forward) {
    LseState<acc_t> s = LseState<acc_t>::empty();
    acc_t sums[1] = {acc_t(0)};
    visit_row<scalar_t, kVec>(x, C, [&](int64_t j, acc_t v) {
      s.add(v, j);
      sums[0] += weight ? weight[j] * static_cast<acc_t>(y[j]) : static_cast<acc_t>(y[j]);
    });
    s = block_merge(s);
    block_sum(sums);
    lse = s.lse();
    // S = (1 - eps) sum_k w_k y_k + (eps / C) W: the smoothing's part exact, not C sums of eps / C.
    S = eps != acc_t(0) ? (acc_t(1) - eps) * sums[0] + eps / acc_t(C) * weight_total<acc_t>(a) : sums[0];
    acc_t loss[1] = {acc_t(0)};
    visit_row<scalar_t, kVec>(x, C, [&](int64_t j, acc_t v) {
      const acc_t w = wy(j);
      if (w != acc_t(0)) loss[0] += w * (lse - v);  // a -inf logit without mass adds 0
    });
    block_sum(loss);
    if (threadIdx.x == 0) {
      static_cast<acc_t*>(a.loss_rows)[i] = loss[0];
      st[0] = lse;
      st[1] = S;
      st[2] = st[3] = acc_t(0);
    }
  } else {
    lse = st[0];
    S = st[1];
  }
  if (!g) return;
  const acc_t go = grad_out<acc_t>(a, i);
  map_row<scalar_t, kVec>(x, g, C, [&](int64_t j, acc_t v) { return (std::exp(v - lse) * S - wy(j)) * go; });
}

// ---------------------------------------------------------------------------
// The expected loss sum_k m_k L(x, k) (docs/losses.md, "Soft targets"; the CPU's expected_row):
// class-probability targets for every loss but ce (kSource 0), and label smoothing of a loss
// other than ce with class indices (kSource 1) or mixup's two (kSource 2). The mass is
//   m_k = ay w_k y_k + u w_k + sum_t beta_t w_k [k == c_t]
// Only the arg-max w can have p_w > 1/2: the sums run over k != w with log1p(-p_k); w and the
// spikes are scalars; log(1 - p_w) from P = sum_{k != w} p_k or, below bce_sum_floor, the lse
// over k != w. Stats: lse, S, log(1 - p_w), w.
// ---------------------------------------------------------------------------
template <typename scalar_t, bool kVec, int kSource>
__device__ void expected_row(const RowsArgs& a, int64_t i, bool forward) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kMix = kSource == 2;
  const int64_t C = a.classes;
  const scalar_t* x = static_cast<const scalar_t*>(a.logits) + i * a.row_stride;
  scalar_t* g = a.grad ? static_cast<scalar_t*>(a.grad) + i * C : nullptr;
  acc_t* st = static_cast<acc_t*>(a.stats) + i * kStatsCols;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t eps = static_cast<acc_t>(a.cfg.label_smoothing);
  const acc_t W = weight_total<acc_t>(a);
  auto wt = [&](int64_t j) { return weight ? weight[j] : acc_t(1); };
  const scalar_t* y = nullptr;
  acc_t ay = acc_t(0), u = eps / acc_t(C), zc = acc_t(0), beta0 = acc_t(0), beta1 = acc_t(0);
  int64_t c0 = -1, c1 = -1;
  bool bad = false;
  if constexpr (kSource == 0) {
    y = static_cast<const scalar_t*>(a.probs) + i * a.probs_stride;
    ay = acc_t(1) - eps;
  } else {
    const RowView<scalar_t, kMix> r(a, i);
    u = eps / acc_t(C) * (r.k_a + r.k_b);
    c0 = r.a;
    c1 = r.b;
    beta0 = (acc_t(1) - eps) * r.k_a;
    beta1 = (acc_t(1) - eps) * r.k_b;
    if (r.same) {
      beta0 += beta1;
      beta1 = acc_t(0);
      c1 = -1;
    }
    zc = static_cast<acc_t>(a.cfg.z_loss) * (r.k_a * r.w_a + r.k_b * r.w_b);
    bad = r.bad;
  }
  auto yv = [&](int64_t j) { return y ? static_cast<acc_t>(y[j]) : acc_t(0); };
  // The mass at j without its spikes, and with them.
  auto mass_of = [&](int64_t j) {
    acc_t m = ay * yv(j) + u;
    if (j == c0) m += beta0;
    if (j == c1) m += beta1;
    return m * wt(j);
  };
  const int64_t variant = a.cfg.variant;
  const int64_t sv = variant == kBCE ? int64_t(kNLLR) : variant;  // bce's s is nllr's
  const acc_t alpha = static_cast<acc_t>(a.cfg.alpha), beta = static_cast<acc_t>(a.cfg.beta),
              gamma = static_cast<acc_t>(a.cfg.gamma);
  acc_t lse, S, log1m_w = acc_t(0);
  int64_t w;
  if (forward) {
    LseState<acc_t> s = LseState<acc_t>::empty();
    acc_t sums[1] = {acc_t(0)};
    visit_row<scalar_t, kVec>(x, C, [&](int64_t j, acc_t v) {
      s.add(loss_logit<acc_t>(a, v), j);
      if (y) sums[0] += wt(j) * yv(j);
    });
    s = block_merge(s);
    block_sum(sums);
    lse = s.lse();
    w = s.arg >= 0 && s.arg < C ? s.arg : 0;
    S = ay * sums[0] + u * W + (c0 >= 0 ? beta0 * wt(c0) : acc_t(0)) + (c1 >= 0 ? beta1 * wt(c1) : acc_t(0));
  } else {
    lse = st[0];
    S = st[1];
    log1m_w = st[2];
    w = static_cast<int64_t>(st[3]);
    if (w < 0 || w >= C) w = 0;  // stats from elsewhere: never index with them unchecked
  }
  // Pass 2 over k != w: sum m h split as ay sum w y h + u sum w h (so is every sum of the mass).
  enum { LY, LU, AY, AU, SY, TY, TU, T, R, P, kSums };
  acc_t sums[kSums] = {};
  visit_row<scalar_t, kVec>(x, C, [&](int64_t j, acc_t v) {
    if (j == w) return;
    const acc_t lp = loss_logit<acc_t>(a, v) - lse;
    const acc_t p = std::exp(lp), l1m = ::log1p(-p);
    const auto t = target_only_terms<acc_t>(sv, l1m - lp, alpha, beta, gamma);
    const acc_t h = variant == kBCE ? -lp : t.loss, s = std::exp(t.log_s);
    const acc_t wk = wt(j), my = wk * yv(j);
    if (my != acc_t(0)) sums[LY] += my * h, sums[AY] += my * s, sums[SY] += my, sums[TY] += my * l1m;
    if (wk != acc_t(0)) sums[LU] += wk * h, sums[AU] += wk * s, sums[TU] += wk * l1m;
    sums[T] += l1m;
    sums[R] += p / (acc_t(1) - p);
    sums[P] += p;
  });
  block_sum(sums);
  const acc_t x_w = loss_logit<acc_t>(a, static_cast<acc_t>(x[w]));
  if (forward) {
    if (C == 1) {
      log1m_w = neg_inf<acc_t>();
    } else if (sums[P] >= bce_sum_floor<acc_t>()) {
      log1m_w = std::log(sums[P]);
    } else {  // block-uniform: P lost its precision (a class leads by ~41+ in fp32)
      LseState<acc_t> e = LseState<acc_t>::empty();
      visit_row<scalar_t, kVec>(x, C, [&](int64_t j, acc_t v) {
        if (j != w) e.add(loss_logit<acc_t>(a, v), j);
      });
      e = block_merge(e);
      log1m_w = e.lse() - lse;
    }
  }
  const acc_t m_w = mass_of(w);
  const auto tw = target_only_terms<acc_t>(sv, (lse + log1m_w) - x_w, alpha, beta, gamma);
  // The spikes off w.
  acc_t loss_sp = 0, a_sp = 0, s_sp = 0, t_sp = 0;
  for (int t = 0; t < 2; ++t) {
    const int64_t c = t == 0 ? c0 : c1;
    const acc_t bt = t == 0 ? beta0 : beta1;
    if (c < 0 || c == w || bt == acc_t(0)) continue;
    const acc_t mc = bt * wt(c);
    const acc_t lp = loss_logit<acc_t>(a, static_cast<acc_t>(x[c])) - lse, l1m = ::log1p(-std::exp(lp));
    const auto tc = target_only_terms<acc_t>(sv, l1m - lp, alpha, beta, gamma);
    loss_sp += mc * (variant == kBCE ? -lp : tc.loss);
    a_sp += mc * std::exp(tc.log_s);
    s_sp += mc;
    t_sp += mc * l1m;
  }
  const acc_t A_w = ay * sums[AY] + u * sums[AU] + a_sp;
  const acc_t S_w = ay * sums[SY] + u * (W - wt(w)) + s_sp;
  if (forward && threadIdx.x == 0) {
    acc_t loss;
    if (variant == kBCE) {
      const acc_t ce = ay * sums[LY] + u * sums[LU] + loss_sp + (m_w == acc_t(0) ? acc_t(0) : m_w * softplus((lse + log1m_w) - x_w));
      const acc_t rest = ay * sums[TY] + u * sums[TU] + t_sp - S * sums[T];
      loss = ce + rest - (S_w == acc_t(0) ? acc_t(0) : S_w * log1m_w);
    } else {
      loss = ay * sums[LY] + u * sums[LU] + loss_sp + (m_w == acc_t(0) ? acc_t(0) : m_w * tw.loss);
    }
    if (zc != acc_t(0)) loss += zc * lse * lse;
    static_cast<acc_t*>(a.loss_rows)[i] = bad ? nan_value<acc_t>() : loss;
    st[0] = lse;
    st[1] = S;
    st[2] = log1m_w;
    st[3] = static_cast<acc_t>(w);
  }
  if (!g) return;
  const acc_t go = grad_out<acc_t>(a, i);
  const acc_t zt = zc == acc_t(0) ? acc_t(0) : acc_t(2) * zc * lse;
  // g_j = go (p_j B1 + r_j B2 - m_j s_j [+ S a_j]), r_j = p_j / (1 - p_w) = exp(x_j - lse_{k != w})
  const acc_t b1 = variant == kBCE ? A_w - S * sums[R] + S + zt : A_w + zt;
  const acc_t b2 = variant == kBCE ? -S_w : (m_w == acc_t(0) ? acc_t(0) : m_w * std::exp(tw.log_s + log1m_w));
  const acc_t lse_ex_w = lse + log1m_w;
  const acc_t p_w = std::exp(x_w - lse);
  const acc_t g_w = variant == kBCE ? p_w * (A_w - S * sums[R] + zt) + S_w - S * std::exp(log1m_w)
                                    : p_w * (A_w + zt) - (m_w == acc_t(0) ? acc_t(0) : m_w * std::exp(tw.log_s + log1m_w));
  map_row<scalar_t, kVec>(x, g, C, [&](int64_t j, acc_t v) {
    if (bad) return nan_value<acc_t>();
    if (j == w) return raw_grad<acc_t>(a, g_w * go, v);
    const acc_t xj = loss_logit<acc_t>(a, v);
    const acc_t lp = xj - lse;
    const acc_t p = std::exp(lp), l1m = ::log1p(-p);
    const acc_t s = std::exp(target_only_terms<acc_t>(sv, l1m - lp, alpha, beta, gamma).log_s);
    const acc_t m = mass_of(j);
    acc_t gj = p * b1 - (m == acc_t(0) ? acc_t(0) : m * s);
    if (b2 != acc_t(0)) gj += std::exp(xj - lse_ex_w) * b2;
    if (variant == kBCE) gj += S * (p / (acc_t(1) - p));
    return raw_grad<acc_t>(a, gj * go, v);
  });
}

enum RowKind {
  kTargetOnlyRows = 0, kBceRows = 1, kSoftRows = 2, kMixTargetOnlyRows = 3, kMixBceRows = 4,
  // the expected loss: probabilities (loss != ce), and smoothing of loss != ce with one or two targets
  kSoftLossRows = 5, kExpectedRows = 6, kMixExpectedRows = 7
};

// One block per row (grid-stride over rows). Ignored rows: loss 0, gradient 0.
template <typename scalar_t, bool kVec, int kKind>
__global__ void __launch_bounds__(kMaxThreads, 1) rows_kernel(const RowsArgs a, bool forward) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    if constexpr (kKind == kSoftRows) {
      soft_row<scalar_t, kVec>(a, i, forward);
      continue;
    }
    if constexpr (kKind == kSoftLossRows) {
      expected_row<scalar_t, kVec, 0>(a, i, forward);
      continue;
    }
    constexpr bool kMix = kKind == kMixTargetOnlyRows || kKind == kMixBceRows || kKind == kMixExpectedRows;
    if (row_ignored<kMix>(a, i)) {  // block-uniform
      if (forward && threadIdx.x == 0) {
        static_cast<acc_t*>(a.loss_rows)[i] = acc_t(0);
        acc_t* st = static_cast<acc_t*>(a.stats) + i * kStatsCols;
        for (int k = 0; k < kStatsCols; ++k) st[k] = acc_t(0);
      }
      if (a.grad) {
        scalar_t* g = static_cast<scalar_t*>(a.grad) + i * a.classes;
        for (int64_t j = threadIdx.x; j < a.classes; j += blockDim.x) g[j] = scalar_t(0);
      }
      continue;
    }
    if constexpr (kKind == kExpectedRows || kKind == kMixExpectedRows) {
      expected_row<scalar_t, kVec, kMix ? 2 : 1>(a, i, forward);
    } else if constexpr (kKind == kBceRows || kKind == kMixBceRows) {
      bce_row<scalar_t, kVec, kMix>(a, i, forward);
    } else {
      target_only_row<scalar_t, kVec, kMix>(a, i, forward);
    }
  }
}

}  // namespace fusedloss::cuda
