// The per-variant math of docs/losses.md, written once for the CPU and the CUDA
// kernels: everything a kernel computes per row that is not a pass over the row.
//
// A kernel's passes produce the row statistics (lse, lse_ex = log sum_{k != c}
// exp(x_k), the target logit x_c, and for bce the arg-max w and three sums);
// the functions here turn them into the row's loss and the coefficients of its
// gradient. T is float for float/half/bfloat16 logits and double for double.
//
// Mirrors python/fusedloss/reference.py function for function; the numerics
// are explained there and in docs/losses.md, and repeated here where the order of
// operations matters.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HD __host__ __device__ __forceinline__
#else
// Always inlined on the host too: this header is compiled into every CPU capability object
// (kernels.cpp with -mavx2, -mavx512f, ...) outside their namespaces, so an out-of-line copy
// would be one symbol that the linker takes from any of them, and code built for any CPU
// (the DEFAULT object, the ops) could then call AVX-512 instructions (SIGILL on an older CPU;
// test_cpu_kernel's objdump check).
#define FL_HD inline __attribute__((always_inline))
#endif

namespace fusedloss {

// Variant and reduction ids: python/fusedloss/variants.py (part of the op ABI).
enum Variant : int64_t { kCE = 0, kBCE = 1, kNLLR = 2, kCRL = 3, kLACE = 4, kFocal = 5 };
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };
constexpr int64_t kNumVariants = 6;
constexpr int64_t kStatsCols = 4;  // lse, lse_ex, then bce's log(1 - p_w) and w

// The op's scalar arguments, as the kernels use them.
struct LossConfig {
  int64_t variant;
  int64_t reduction;
  int64_t ignore_index;
  double label_smoothing;
  double alpha, beta, gamma;
  double z_loss;   // PaLM's z * lse^2 (0: off)
  double softcap;  // Gemma's s tanh(x / s) on every logit (0: off)
};

template <typename T>
FL_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// log(e^a + e^b), exact for both signs and for infinite arguments.
template <typename T>
FL_HD T logaddexp(T a, T b) {
  T m = a > b ? a : b;
  // Both -inf, or one +inf: a - b would be NaN. (Comparisons, not std::isinf,
  // which is not a device function everywhere.)
  if (m == neg_inf<T>() || m == -neg_inf<T>()) return m;
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

// log(1 + e^t) = logaddexp(t, 0).
template <typename T>
FL_HD T softplus(T t) {
  return logaddexp(t, T(0));
}

// log(softplus(t)); below -30, softplus(t) = e^t (1 - e^t / 2 ...) so the
// answer is t to within e^-30, while e^t itself may already be subnormal.
template <typename T>
FL_HD T log_softplus(T t) {
  return t < T(-30) ? t : std::log(softplus(t));
}

// k * t with 0 * (-inf) = 0: the factor (1 - p_c)^0 is 1 even when p_c = 1.
template <typename T>
FL_HD T scaled(T k, T t) {
  return k == T(0) ? T(0) : k * t;
}

template <typename T>
FL_HD T log_or_neg_inf(T v) {
  return v > T(0) ? std::log(v) : neg_inf<T>();
}

// ---------------------------------------------------------------------------
// The target-only family (ce, nllr, crl, lace, focal): L = h(p_c) and
// dL/dx_j = s (p_j - [j == c]). Everything comes from d = lse_ex - x_c:
//   log p_c = -softplus(d),  log(1 - p_c) = -softplus(-d)
// so neither 1 - p_c nor lse - x_c is ever formed by a subtraction that cancels.
// ---------------------------------------------------------------------------
template <typename T>
struct TargetOnlyTerms {
  T loss;   // h(p_c), unweighted
  T log_s;  // log of the gradient factor s
};

template <typename T>
FL_HD TargetOnlyTerms<T> target_only_terms(int64_t variant, T d, T alpha, T beta, T gamma) {
  switch (variant) {
    case kCE:
      return {softplus(d), T(0)};
    case kNLLR:
      // log(1 - p_c) - log p_c = lse_ex - x_c = d exactly; s = 1 / (1 - p_c).
      return {d, softplus(-d)};
    case kCRL: {
      const T log_p = -softplus(d), log_q = -softplus(-d);
      // log(alpha + q) as logaddexp(log alpha, log q): exact for alpha = 0 (then log q).
      const T log_alpha_q = logaddexp(log_or_neg_inf(alpha), log_q);
      // s = 1 + beta p / (alpha + q): log s = softplus(log beta + log p - log(alpha + q)),
      // finite for alpha = 0 and q -> 0, where beta p / q overflows.
      // beta = 0 is ce (s = 1), also where alpha = 0 and q = 0 make the argument (-inf) + inf.
      return {scaled(beta, log_alpha_q) + softplus(d),
              beta == T(0) ? T(0) : softplus(log_or_neg_inf(beta) + log_p - log_alpha_q)};
    }
    default: {  // kLACE (gamma = 1) and kFocal
      const T g = variant == kLACE ? T(1) : gamma;
      const T log_p = -softplus(d), log_q = -softplus(-d);
      const T q_g = scaled(g, log_q);  // log q^g
      // s = q^g + g p q^(g-1) (-log p): both terms >= 0, summed in log space so a
      // large q^(g-1) (g < 1, q -> 0) times a small -log p ~ q never overflows.
      // g = 0, or d = -inf (no competitor: q = 0 exactly, g p q^(g-1) (-log p) ~ g q^g -> 0):
      // the second term is 0, where the sum would be (-inf) + inf = NaN.
      const T second = (g == T(0) || d == neg_inf<T>())
                           ? neg_inf<T>()
                           : log_or_neg_inf(g) + log_p + scaled(g - T(1), log_q) + log_softplus(d);
      return {std::exp(q_g) * softplus(d), logaddexp(q_g, second)};
    }
  }
}

// Gemma's soft cap: every logit x is read as s tanh(x / s) (s = 0: no cap), and the
// gradient w.r.t. x is the one w.r.t. the capped logit times the cap's slope
// 1 - tanh^2(x / s). Both from e = exp(-2|x / s|): tanh|u| = (1 - e) / (1 + e) and
// slope = 4 e / (1 + e)^2, which keeps its relative accuracy where the cap
// saturates (1 - t^2 would cancel to 0 or to rounding noise there).
template <typename T>
struct Capped {
  T value, slope;
};

template <typename T>
FL_HD Capped<T> soft_capped(T x, T s) {
  const T u = x / s;
  const T e = std::exp(T(-2) * std::fabs(u));
  const T t = (T(1) - e) / (T(1) + e);
  const T one_e = T(1) + e;
  // NaN stays NaN (u < 0 is false for NaN, and t is NaN).
  return {s * (u < T(0) ? -t : t), T(4) * e / (one_e * one_e)};
}

// What label smoothing (eps) and z-loss (z) add to every loss's gradient, beside the
// loss's own gradient dh/dx_j (docs/losses.md, "label smoothing", "z-loss"):
//   g_j = own * dh/dx_j + extra * p_j - per_class * w_j
//   own = (1 - eps) rs,  per_class = (eps / C) go,  extra = per_class W + 2 z lse rs
// with rs = w_c go, go = dLoss/dloss_row and W = sum_k w_k (C without weights).
template <typename T>
struct ExtraTerms {
  T own, extra, per_class;
};

template <typename T>
FL_HD ExtraTerms<T> extra_terms(T rs, T go, T lse, T eps, T num_classes, T weight_total, T z) {
  const T per_class = eps / num_classes * go;
  // z = 0 adds nothing, also where lse or rs is not finite (0 * inf would be NaN).
  const T z_term = z == T(0) ? T(0) : T(2) * z * lse * rs;
  return {(T(1) - eps) * rs, per_class * weight_total + z_term, per_class};
}

// One gradient entry with those terms: own_grad (the loss's own dh/dx_j, unscaled) times
// own, plus extra p_j - per_class w_j, with p_j = exp(x_j - lse). For the entries a kernel
// stores one by one (bce's arg-max and target; every entry on the CUDA kernels).
template <typename T>
FL_HD T with_extra_terms(T own_grad, const ExtraTerms<T>& t, T x_j, T lse, T w_j) {
  T v = own_grad * t.own;
  if (t.extra != T(0)) v += t.extra * std::exp(x_j - lse);
  if (t.per_class != T(0)) v -= t.per_class * w_j;
  return v;
}

// Coefficients of a row's gradient, for a kernel's last pass:
//   g_j = exp(x_j - shift) * scale - smooth * w_j   (j != c; w_j = 1 without weights)
//   g_c = target
// The pass writes the first expression for every j and then stores g_c over it.
template <typename T>
struct GradCoef {
  T shift, scale, smooth, target;
};

// Gradient of the target-only family, dh/dx_j = s (p_j - [j == c]), with the terms above:
//   j != c: g_j = p_j (own s + extra) - per_class w_j
//   j == c: g_c = -own s (1 - p_c) + extra p_c - per_class w_c
// s (1 - p_c) = exp(log s + (lse_ex - lse)) exactly, never p_c - 1. Without smoothing and
// z-loss, p_j own s = exp(x_j - (lse - log s)) * rs. Otherwise s may be huge (nllr near
// p_c = 1) or tiny (focal), so the shift is lse - m with m = max(log s, 0): both parts of
// the scale are then a coefficient times a number <= 1 (own s + extra may be negative, so
// it cannot go into the log).
template <typename T>
FL_HD GradCoef<T> target_only_grad(T lse, T lse_ex, T x_c, T log_s, T w_c, const ExtraTerms<T>& t) {
  const T log1m_pc = lse_ex - lse;  // log(1 - p_c), exact
  const T own_target = -std::exp(log_s + log1m_pc) * t.own;
  if (t.extra == T(0) && t.per_class == T(0)) return {lse - log_s, t.own, T(0), own_target};
  const T m = log_s > T(0) ? log_s : T(0);  // a NaN log s gives m = 0 and a NaN scale
  return {lse - m, t.own * std::exp(log_s - m) + t.extra * std::exp(-m), t.per_class,
          own_target + t.extra * std::exp(x_c - lse) - t.per_class * w_c};
}

// Mixup's two targets a != b (lam and 1 - lam folded into each part's terms ta, tb; a part
// whose target is ignored has go = 0): the gradient is the sum of the parts' gradients,
//   j not in {a, b}: g_j = p_j (own_a s_a + own_b s_b + extra) - per_class w_j
//   j == a:          g_a = -own_a s_a (1 - p_a) + p_a (own_b s_b + extra) - per_class w_a
// (b likewise), extra and per_class the sums of the parts'. Scaled as target_only_grad,
// with m = max(log s_a, log s_b, 0); p_a s_b = exp(x_a - lse + log s_b) stays <= 1 + beta
// for every variant (s_b grows like 1 / (1 - p_b) at most, and p_a <= 1 - p_b).
template <typename T>
struct MixCoef {
  T shift, scale, smooth, target_a, target_b;
};

template <typename T>
FL_HD MixCoef<T> mix_grad(T lse, T lse_ex_a, T lse_ex_b, T x_a, T x_b, T log_s_a, T log_s_b, T w_a, T w_b,
                          const ExtraTerms<T>& ta, const ExtraTerms<T>& tb) {
  // log s multiplies only its part's own. A part with own = 0 (lam or 1 - lam is 0, its target
  // ignored or weighted 0, eps = 1) adds nothing, but its s may be NaN (focal's at p = 0, where
  // its loss is inf): leave it out rather than multiply it by 0.
  if (ta.own == T(0)) log_s_a = neg_inf<T>();
  if (tb.own == T(0)) log_s_b = neg_inf<T>();
  const T extra = ta.extra + tb.extra, per_class = ta.per_class + tb.per_class;
  T m = log_s_a > log_s_b ? log_s_a : log_s_b;
  if (!(m > T(0))) m = T(0);  // also for a NaN log s: then the scale is NaN
  const T p_a = std::exp(x_a - lse), p_b = std::exp(x_b - lse);
  return {lse - m,
          ta.own * std::exp(log_s_a - m) + tb.own * std::exp(log_s_b - m) + extra * std::exp(-m),
          per_class,
          -ta.own * std::exp(log_s_a + lse_ex_a - lse) + tb.own * std::exp(x_a - lse + log_s_b) + extra * p_a -
              per_class * w_a,
          -tb.own * std::exp(log_s_b + lse_ex_b - lse) + ta.own * std::exp(x_b - lse + log_s_a) + extra * p_b -
              per_class * w_b};
}

// Row loss of any variant from its own unweighted term h:
//   (1 - eps) w_c h + w_c z lse^2 + (eps / C) (W lse - sum_k w_k x_k)
// `weighted_x_sum` is sum_k w_k x_k (sum_k x_k without weights), read only when eps > 0.
// A zero weight gives 0 by a select, not a product: h can be inf.
template <typename T>
FL_HD T row_loss(T h, T w_c, T lse, T eps, T num_classes, T weight_total, T weighted_x_sum, T z) {
  T own = eps == T(0) ? h : (T(1) - eps) * h;
  if (z != T(0)) own += z * lse * lse;
  T loss = w_c == T(0) ? T(0) : own * w_c;
  if (eps != T(0)) loss += eps / num_classes * (weight_total * lse - weighted_x_sum);
  return loss;
}

// ---------------------------------------------------------------------------
// Mixup's two targets a and b, each part weighted by k (lam or 1 - lam, times 'mean''s
// 1/denominator of its part; 0 for an ignored part, whose target is then the other's).
// ---------------------------------------------------------------------------

// A part's terms (extra_terms with dLoss/dloss = k go); none for k = 0, also where lse is
// not finite (z-loss's 2 z lse times 0 would be NaN).
template <typename T>
FL_HD ExtraTerms<T> part_terms(T k, T w_c, T go, T lse, T eps, T num_classes, T weight_total, T z) {
  if (k == T(0)) return {T(0), T(0), T(0)};
  return extra_terms<T>(w_c * go * k, go * k, lse, eps, num_classes, weight_total, z);
}

// Both parts' terms as one (a == b: the gradient is linear in them).
template <typename T>
FL_HD ExtraTerms<T> sum_terms(const ExtraTerms<T>& ta, const ExtraTerms<T>& tb) {
  return {ta.own + tb.own, ta.extra + tb.extra, ta.per_class + tb.per_class};
}

// k_a loss_a + k_b loss_b (row_loss of each); a part with k = 0 adds 0 by a select (its
// loss may be inf).
template <typename T>
FL_HD T mix_row_loss(T k_a, T h_a, T w_a, T k_b, T h_b, T w_b, T lse, T eps, T num_classes, T weight_total,
                     T weighted_x_sum, T z) {
  const T la = k_a == T(0) ? T(0) : k_a * row_loss<T>(h_a, w_a, lse, eps, num_classes, weight_total, weighted_x_sum, z);
  const T lb = k_b == T(0) ? T(0) : k_b * row_loss<T>(h_b, w_b, lse, eps, num_classes, weight_total, weighted_x_sum, z);
  return la + lb;
}

// The target-only family's gradient coefficients for one target (same: a == b, ta and tb
// summed) or two (mix_grad), as MixCoef (target_a == target_b when same).
template <typename T>
FL_HD MixCoef<T> target_only_mix_grad(bool same, T lse, T lse_ex_a, T lse_ex_b, T x_a, T x_b, T log_s_a,
                                      T log_s_b, T w_a, T w_b, const ExtraTerms<T>& ta, const ExtraTerms<T>& tb) {
  if (same) {
    const GradCoef<T> k = target_only_grad<T>(lse, lse_ex_a, x_a, log_s_a, w_a, sum_terms(ta, tb));
    return {k.shift, k.scale, k.smooth, k.target, k.target};
  }
  return mix_grad<T>(lse, lse_ex_a, lse_ex_b, x_a, x_b, log_s_a, log_s_b, w_a, w_b, ta, tb);
}

// ---------------------------------------------------------------------------
// Multi-class BCE: L = -log p_c - sum_{k != c} log(1 - p_k).
// Only the arg-max w can have p_w > 1/2, so for k not in {c, w} the kernel sums
// log1p(-p_k) and a_k = p_k / (1 - p_k) directly (both exact there); w's terms
// come from log(1 - p_w) = lse_{k != w} - lse. Then, with
// R = sum_{k != w} a_k (a_c = -1), the gradient (docs/losses.md, "bce"):
//   j not in {c, w}: g_j = a_j - p_j R - p_j a_w   (p_j a_w = -p_j when w == c)
//   j == w != c:     g_w = p_w (1 - R)
//   j == c != w:     g_c = -1 - p_c R - p_c a_w
//   j == w == c:     g_c = -(1 - p_c) - p_c R
// a_w = p_w / (1 - p_w) overflows once a wrong class leads by ~89 (fp32), so
// p_j a_w is exp(x_j - lse + log a_w), never a_w times p_j.
//
// Mixup's two targets a != b (docs/losses.md, "Two-target mixup"): both parts share lse,
// w and log(1 - p_w); each part has its own R and loss. The kernels' second pass sums
// over k not in {a, b, w}, and each part adds the other target's terms (bce_part).
// ---------------------------------------------------------------------------
template <typename T>
struct BceRow {
  T log1m_pw;  // log(1 - p_w)
  T r;         // R
  T log_aw;    // log a_w = log p_w - log(1 - p_w) when w != c (unused when w == c)
};

// The second pass's sums over k not in {a, b, w}: P = sum p_k, sum log1p(-p_k), sum a_k.
template <typename T>
struct BceSums {
  T p, log1m, odds;
};

// log(1 - p_w) from the pass's sum P = sum_{k not in {c, w}} p_k (w != c):
// 1 - p_w = P + p_c. P is a sum of positive terms, exact to rounding while it
// stays far above the absolute error of its terms: an underflowing exp, or on
// the CPU a term e_k * exp(shift_b - lse) whose factor is subnormal, is off by
// at most e^30 * 2^-149 < 2e-32 (float). Below bce_sum_floor (float: a wrong
// class leading by ~41 nats) a kernel recomputes log(1 - p_w) exactly, as
// lse_{k != w} - lse with the competitors' own max as the shift.
template <typename T>
FL_HD T bce_sum_floor() {
  return sizeof(T) == 4 ? T(1e-18) : T(1e-280);
}

// log(1 - p_w) for a row with targets a and b (a == b: one): exact from lse_ex of a target
// that is w; else from the sum, 1 - p_w = P + p_a (+ p_b). `exact` false: the sum fell below
// bce_sum_floor and the kernel must recompute it (see above).
template <typename T>
struct Log1mPw {
  T value;
  bool exact;
};

template <typename T>
FL_HD Log1mPw<T> bce_log1m_pw(int64_t w, int64_t a, int64_t b, T lse, T lse_ex_a, T lse_ex_b, const BceSums<T>& s,
                              T p_a, T p_b) {
  if (w == a) return {lse_ex_a - lse, true};
  if (w == b) return {lse_ex_b - lse, true};
  const T one_minus_pw = s.p + p_a + (a == b ? T(0) : p_b);
  return one_minus_pw >= bce_sum_floor<T>() ? Log1mPw<T>{std::log(one_minus_pw), true} : Log1mPw<T>{T(0), false};
}

// A row's numbers from R itself (a vocabulary-parallel row: R summed over the ranks).
template <typename T>
FL_HD BceRow<T> bce_row_of_r(bool w_is_c, T lse, T x_w, T log1m_pw, T r) {
  return {log1m_pw, r, w_is_c ? T(0) : (x_w - lse) - log1m_pw};
}

// ... and from the pass's sum_a = sum_{k not in {c, w}} a_k.
template <typename T>
FL_HD BceRow<T> bce_row(bool w_is_c, T lse, T x_w, T log1m_pw, T sum_a) {
  // a_c = -1 joins R unless c is w (excluded with it).
  return bce_row_of_r<T>(w_is_c, lse, x_w, log1m_pw, w_is_c ? sum_a : sum_a - T(1));
}

// Row loss (unweighted): -log p_c - sum_{k != c} log(1 - p_k), with
// sum_log1m = sum_{k not in {c, w}} log1p(-p_k).
template <typename T>
FL_HD T bce_loss(bool w_is_c, T d, T log1m_pw, T sum_log1m) {
  return softplus(d) - (w_is_c ? sum_log1m : sum_log1m + log1m_pw);
}

// One part of a row (target c) whose sums left out the other target o too: o's a_k and
// log1p(-p_k) join them when o is neither c nor w (add_o; p_o <= 1/2 there: exact).
template <typename T>
struct BcePart {
  BceRow<T> row;
  T loss;  // unweighted
};

template <typename T>
FL_HD BcePart<T> bce_part(bool w_is_c, bool add_o, T lse, T lse_ex_c, T x_c, T x_w, T p_o, T log1m_pw,
                          const BceSums<T>& s) {
  const T odds_o = add_o ? p_o / (T(1) - p_o) : T(0);
  const T log1m_o = add_o ? std::log1p(-p_o) : T(0);
  return {bce_row<T>(w_is_c, lse, x_w, log1m_pw, s.odds + odds_o),
          bce_loss<T>(w_is_c, lse_ex_c - x_c, log1m_pw, s.log1m + log1m_o)};
}

// The gradient off the stored entries (j not in {w, a, b}), all parts together:
//   g_j = odds a_j - p p_j - aw (p_j a_w) - per_class w_j
// Each part adds own to odds, own R - extra to p (own (R - 1) when w is its target:
// p_j a_w = -p_j), and own to aw otherwise (log a_w is the same for every such part).
template <typename T>
struct BceGradCoef {
  T odds, p, aw, log_aw, per_class;
};

template <typename T>
FL_HD void add_bce_part(BceGradCoef<T>& k, bool w_is_c, const BceRow<T>& row, const ExtraTerms<T>& t) {
  k.odds += t.own;
  k.p += t.own * (w_is_c ? row.r - T(1) : row.r) - t.extra;
  if (!w_is_c) {
    k.aw += t.own;
    k.log_aw = row.log_aw;
  }
  k.per_class += t.per_class;
}

template <typename T>
FL_HD T bce_grad_rest(const BceGradCoef<T>& k, T x_j, T lse, T w_j) {
  const T p = std::exp(x_j - lse);
  T g = k.odds * (p / (T(1) - p)) - k.p * p;
  if (k.aw != T(0)) g -= k.aw * std::exp(x_j - lse + k.log_aw);
  if (k.per_class != T(0)) g -= k.per_class * w_j;
  return g;
}

// g_w (unscaled).
template <typename T>
FL_HD T bce_grad_argmax(bool w_is_c, T x_w, T lse, T log1m_pw, T r) {
  const T p_w = std::exp(x_w - lse);
  return w_is_c ? -std::exp(log1m_pw) - p_w * r : p_w * (T(1) - r);
}

// g_c for c != w (unscaled).
template <typename T>
FL_HD T bce_grad_target(T x_c, T lse, T r, T log_aw) {
  return T(-1) - std::exp(x_c - lse) * r - std::exp(x_c - lse + log_aw);
}

// One stored entry j (w or a target) of one part (target c, terms t): its own form times
// own, plus extra p_j - per_class w_j. A row's entry is the sum over its parts.
template <typename T>
FL_HD T bce_entry(int64_t j, int64_t w, int64_t c, T x_j, T lse, T w_j, const BceRow<T>& row,
                  const ExtraTerms<T>& t) {
  T own;
  if (j == w) {
    own = bce_grad_argmax<T>(w == c, x_j, lse, row.log1m_pw, row.r);
  } else if (j == c) {
    own = bce_grad_target<T>(x_j, lse, row.r, row.log_aw);
  } else {
    BceGradCoef<T> unit{};
    add_bce_part<T>(unit, w == c, row, ExtraTerms<T>{T(1), T(0), T(0)});
    own = bce_grad_rest<T>(unit, x_j, lse, T(0));
  }
  return with_extra_terms<T>(own, t, x_j, lse, w_j);
}

}  // namespace fusedloss
