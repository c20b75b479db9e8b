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

// Everything a row kernel needs to know about row i before its passes.
template <typename scalar_t>
struct RowView {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* g;  // nullptr: no gradient
  int64_t c;    // target, clamped into [0, C) when out of range
  bool ignored, bad;
  acc_t w_c;

  __device__ RowView(const RowsArgs& a, int64_t i) {
    x = static_cast<const scalar_t*>(a.logits) + i * a.row_stride;
    g = a.grad ? static_cast<scalar_t*>(a.grad) + i * a.classes : nullptr;
    const int64_t t = a.target[i];
    ignored = t == a.cfg.ignore_index;
    // Never read with a bad index: clamp it, and mark the row's loss and gradient NaN.
    bad = !ignored && (t < 0 || t >= a.classes);
    c = ignored || bad ? 0 : t;
    w_c = a.weight ? static_cast<const acc_t*>(a.weight)[c] : acc_t(1);
  }
};

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
// forward), over 'mean''s denominator.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_out(const RowsArgs& a, int64_t i) {
  acc_t go = a.grad_loss ? static_cast<const acc_t*>(a.grad_loss)[i * a.grad_loss_stride] : acc_t(1);
  if (a.denominator) go /= *static_cast<const acc_t*>(a.denominator);
  return go;
}

// ---------------------------------------------------------------------------
// ce, nllr, crl, lace, focal
// ---------------------------------------------------------------------------
template <typename scalar_t, bool kVec>
__device__ void target_only_row(const RowsArgs& a, int64_t i, bool forward) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowView<scalar_t> r(a, i);
  const int64_t C = a.classes;
  acc_t* st = static_cast<acc_t*>(a.stats) + i * kStatsCols;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t eps = static_cast<acc_t>(a.cfg.label_smoothing);
  const acc_t x_c = loss_logit<acc_t>(a, static_cast<acc_t>(r.x[r.c]));
  const acc_t z = static_cast<acc_t>(a.cfg.z_loss);
  acc_t lse, lse_ex, x_sum = 0;
  if (forward) {
    LseState<acc_t> s = LseState<acc_t>::empty();
    acc_t xs[1] = {acc_t(0)};
    visit_row<scalar_t, kVec>(r.x, C, [&](int64_t j, acc_t v) {
      if (j == r.c) return;
      v = loss_logit<acc_t>(a, v);
      s.add(v, j);
      if (eps != acc_t(0)) xs[0] += weight ? weight[j] * v : v;
    });
    s = block_merge(s);
    if (eps != acc_t(0)) {
      block_sum(xs);
      x_sum = xs[0] + r.w_c * x_c;
    }
    lse_ex = s.lse();
    lse = logaddexp(lse_ex, x_c);
  } else {
    lse = st[0];
    lse_ex = st[1];
  }
  const auto terms = target_only_terms<acc_t>(a.cfg.variant, lse_ex - x_c, a.cfg.alpha, a.cfg.beta, a.cfg.gamma);
  const acc_t W = weight_total<acc_t>(a);
  if (forward && threadIdx.x == 0) {
    const acc_t loss = row_loss<acc_t>(terms.loss, r.w_c, lse, eps, acc_t(C), W, x_sum, z);
    static_cast<acc_t*>(a.loss_rows)[i] = r.bad ? nan_value<acc_t>() : loss;
    st[0] = lse;
    st[1] = lse_ex;
    st[2] = st[3] = acc_t(0);
  }
  if (!r.g) return;
  const acc_t go = grad_out<acc_t>(a, i);
  const auto k = target_only_grad<acc_t>(lse, lse_ex, x_c, terms.log_s, r.w_c,
                                         extra_terms<acc_t>(r.w_c * go, go, lse, eps, acc_t(C), W, z));
  map_row<scalar_t, kVec>(r.x, r.g, C, [&](int64_t j, acc_t v) {
    if (r.bad) return nan_value<acc_t>();
    if (j == r.c) return raw_grad<acc_t>(a, k.target, v);
    acc_t gj = std::exp(loss_logit<acc_t>(a, v) - k.shift) * k.scale;
    if (eps != acc_t(0)) gj -= k.smooth * (weight ? weight[j] : acc_t(1));
    return raw_grad<acc_t>(a, gj, v);
  });
}

// ---------------------------------------------------------------------------
// bce: lse_ex and the arg-max w; sums over k not in {c, w}; the gradient.
// ---------------------------------------------------------------------------
template <typename scalar_t, bool kVec>
__device__ void bce_row(const RowsArgs& a, int64_t i, bool forward) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowView<scalar_t> r(a, i);
  const int64_t C = a.classes, c = r.c;
  acc_t* st = static_cast<acc_t*>(a.stats) + i * kStatsCols;
  const acc_t x_c = loss_logit<acc_t>(a, static_cast<acc_t>(r.x[c]));
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t eps = static_cast<acc_t>(a.cfg.label_smoothing);
  const acc_t z = static_cast<acc_t>(a.cfg.z_loss);
  acc_t lse, lse_ex, x_sum = 0;
  int64_t w;
  if (forward) {
    LseState<acc_t> s = LseState<acc_t>::empty();
    acc_t xs[1] = {acc_t(0)};
    visit_row<scalar_t, kVec>(r.x, C, [&](int64_t j, acc_t v) {
      if (j == c) return;
      v = loss_logit<acc_t>(a, v);
      s.add(v, j);
      if (eps != acc_t(0)) xs[0] += weight ? weight[j] * v : v;
    });
    s = block_merge(s);
    if (eps != acc_t(0)) {
      block_sum(xs);
      x_sum = xs[0] + r.w_c * x_c;
    }
    lse_ex = s.lse();
    lse = logaddexp(lse_ex, x_c);
    w = s.max > x_c ? s.arg : c;  // ties: c (then p_w <= 1/2 and both forms are exact)
  } else {
    lse = st[0];
    lse_ex = st[1];
    w = static_cast<int64_t>(st[3]);
    if (w < 0 || w >= C) w = c;  // stats from elsewhere: never index with them unchecked
  }
  const bool w_is_c = w == c;
  const acc_t x_w = loss_logit<acc_t>(a, static_cast<acc_t>(r.x[w]));
  // Sums over k not in {c, w}: P = sum p_k, sum log1p(-p_k), sum a_k (p_k <= 1/2: exact).
  acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};
  visit_row<scalar_t, kVec>(r.x, C, [&](int64_t j, acc_t v) {
    if (j == c || j == w) return;
    const acc_t p = std::exp(loss_logit<acc_t>(a, v) - lse);
    sums[0] += p;
    sums[1] += ::log1p(-p);
    sums[2] += p / (acc_t(1) - p);
  });
  block_sum(sums);
  acc_t log1m_pw = forward ? acc_t(0) : st[2];
  if (forward && !w_is_c) {
    const acc_t one_minus_pw = sums[0] + std::exp(x_c - lse);
    if (one_minus_pw >= bce_sum_floor<acc_t>()) {
      log1m_pw = std::log(one_minus_pw);
    } else {
      // P lost its precision (a wrong class leads by ~41+ in fp32): the exact
      // lse over k not in {c, w}, shifted by its own max. Block-uniform branch.
      LseState<acc_t> s = LseState<acc_t>::empty();
      visit_row<scalar_t, kVec>(r.x, C, [&](int64_t j, acc_t v) {
        if (j != c && j != w) s.add(loss_logit<acc_t>(a, v), j);
      });
      s = block_merge(s);
      log1m_pw = logaddexp(s.lse(), x_c) - lse;
    }
  }
  const BceRow<acc_t> row = fusedloss::bce_row<acc_t>(w_is_c, lse, lse_ex, x_c, x_w, log1m_pw, sums[2]);
  if (forward && threadIdx.x == 0) {
    const acc_t h = bce_loss<acc_t>(w_is_c, lse_ex - x_c, row.log1m_pw, sums[1]);
    const acc_t loss = row_loss<acc_t>(h, r.w_c, lse, eps, acc_t(C), weight_total<acc_t>(a), x_sum, z);
    static_cast<acc_t*>(a.loss_rows)[i] = r.bad ? nan_value<acc_t>() : loss;
    st[0] = lse;
    st[1] = lse_ex;
    st[2] = row.log1m_pw;
    st[3] = static_cast<acc_t>(w);
  }
  if (!r.g) return;
  const acc_t go = grad_out<acc_t>(a, i);
  const ExtraTerms<acc_t> t =
      extra_terms<acc_t>(r.w_c * go, go, lse, eps, acc_t(C), weight_total<acc_t>(a), z);
  // g_j = own dh/dx_j + extra p_j - per_class w_j (losses.h, extra_terms).
  auto with_extra = [&](acc_t own_g, int64_t j, acc_t y) {
    return with_extra_terms<acc_t>(own_g, t, y, lse, weight ? weight[j] : acc_t(1));
  };
  const acc_t g_w = with_extra(bce_grad_argmax<acc_t>(w_is_c, x_w, lse, row.log1m_pw, row.r), w, x_w);
  const acc_t g_c = w_is_c ? g_w : with_extra(bce_grad_target<acc_t>(x_c, lse, row.r, row.log_aw), c, x_c);
  map_row<scalar_t, kVec>(r.x, r.g, C, [&](int64_t j, acc_t v) {
    if (r.bad) return nan_value<acc_t>();
    const acc_t y = loss_logit<acc_t>(a, v);
    acc_t gj;
    if (j == w) {
      gj = g_w;
    } else if (j == c) {
      gj = g_c;
    } else {
      gj = with_extra(bce_grad_other<acc_t>(w_is_c, y, lse, row.r, row.log_aw), j, y);
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
      sums[0] += wy(j);
    });
    s = block_merge(s);
    block_sum(sums);
    lse = s.lse();
    S = sums[0];
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

enum RowKind { kTargetOnlyRows = 0, kBceRows = 1, kSoftRows = 2 };

// One block per row (grid-stride over rows). Ignored rows: loss 0, gradient 0.
template <typename scalar_t, bool kVec, int kKind>
__global__ void __launch_bounds__(kMaxThreads, 1) rows_kernel(const RowsArgs a, bool forward) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    if constexpr (kKind == kSoftRows) {
      soft_row<scalar_t, kVec>(a, i, forward);
      continue;
    }
    if (a.target[i] == a.cfg.ignore_index) {  // block-uniform
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
    if constexpr (kKind == kBceRows) {
      bce_row<scalar_t, kVec>(a, i, forward);
    } else {
      target_only_row<scalar_t, kVec>(a, i, forward);
    }
  }
}

}  // namespace fusedloss::cuda
