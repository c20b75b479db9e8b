// The per-row scalar math of losses.h for the target-only family (ce, nllr, crl, lace,
// focal), one row per vector lane: kernels.cpp runs a group of rows' first passes, then
// this once for the whole group, then their gradient passes.
//
// Why: at small C a row's passes are a few vector steps, and its scalar terms (lse's log,
// logaddexp, softplus, focal's powers: 5 to 13 calls of libm's expf/logf/log1pf, ~10 ns
// each) cost as much as the passes. Here they are one vectorized call per function for
// up to Vec::size() rows (Sleef's 1-ulp exp, log, log1p on AVX2/AVX-512; libm's, lane by
// lane, on DEFAULT).
//
// Each function mirrors its losses.h namesake formula for formula, with the same stable
// forms and the same special cases (infinities, NaN, 0 * inf = 0), a branch becoming a
// select. Lanes are independent: a row's numbers do not depend on the rows beside it, so
// they do not change with the grouping (thread count, ignored rows, row range).
// softplus(d), softplus(-d) and the forward's lse = logaddexp(lse_ex, x_c) share one
// log1p(exp(-|d|)), d = lse_ex - x_c, which the scalar forms compute three times.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../losses.h"

namespace fusedloss::cpu::CPU_CAPABILITY {

template <typename T>
struct Lanes {
  using Vec = at::vec::Vectorized<T>;

  static Vec inf() { return Vec(std::numeric_limits<T>::infinity()); }
  static Vec ninf() { return Vec(-std::numeric_limits<T>::infinity()); }
  // mask ? a : b (a mask lane: all bits set, as the comparisons return).
  static Vec sel(const Vec& mask, const Vec& a, const Vec& b) { return Vec::blendv(b, a, mask); }

  // logaddexp(a, b) given l = log1p(exp(-|a - b|)).
  static Vec logaddexp_with(const Vec& a, const Vec& b, const Vec& l) {
    const Vec m = sel(a > b, a, b);
    return sel(m.abs() == inf(), m, m + l);
  }
  static Vec log1p_exp_neg(const Vec& t) { return (-t).exp().log1p(); }  // log1p(exp(-t))

  static Vec logaddexp(const Vec& a, const Vec& b) { return logaddexp_with(a, b, log1p_exp_neg((a - b).abs())); }

  // softplus(d) and softplus(-d) (= logaddexp(+-d, 0)): both from log1p(exp(-|d|)).
  struct Softplus2 {
    Vec pos, neg;
  };
  static Softplus2 softplus2(const Vec& d, const Vec& l) {  // l = log1p(exp(-|d|))
    const Vec zero(T(0));
    return {logaddexp_with(d, zero, l), logaddexp_with(-d, zero, l)};
  }

  // log(softplus(t)) given softplus(t) (losses.h, log_softplus).
  static Vec log_softplus(const Vec& t, const Vec& sp) { return sel(t < Vec(T(-30)), t, sp.log()); }

  // k * t with 0 * t = 0 (losses.h, scaled), k the same in every lane.
  static Vec scaled(T k, const Vec& t) { return k == T(0) ? Vec(T(0)) : Vec(k) * t; }

  struct Terms {
    Vec loss, log_s;
  };

  // losses.h, target_only_terms, given l = log1p(exp(-|d|)): with d = lse_ex - x_c, the
  // forward's lse = logaddexp(lse_ex, x_c) takes the same l.
  static Terms target_only_terms(int64_t variant, const Vec& d, const Vec& l, T alpha, T beta, T gamma) {
    const Softplus2 sp = softplus2(d, l);
    switch (variant) {
      case kCE:
        return {sp.pos, Vec(T(0))};
      case kNLLR:
        return {d, sp.neg};
      case kCRL: {
        const Vec log_p = -sp.pos, log_q = -sp.neg;
        const Vec log_alpha_q = logaddexp(Vec(log_or_neg_inf(alpha)), log_q);
        if (beta == T(0)) return {scaled(beta, log_alpha_q) + sp.pos, Vec(T(0))};
        const Vec arg = Vec(log_or_neg_inf(beta)) + log_p - log_alpha_q;
        const Vec zero(T(0));
        return {scaled(beta, log_alpha_q) + sp.pos, logaddexp(arg, zero)};
      }
      default: {  // kLACE (gamma = 1) and kFocal
        const T g = variant == kLACE ? T(1) : gamma;
        const Vec log_p = -sp.pos, log_q = -sp.neg;
        const Vec q_g = scaled(g, log_q);
        Vec second = ninf();
        if (g != T(0)) {
          const Vec s = Vec(log_or_neg_inf(g)) + log_p + scaled(g - T(1), log_q) + log_softplus(d, sp.pos);
          second = sel(d == ninf(), ninf(), s);
        }
        return {q_g.exp() * sp.pos, logaddexp(q_g, second)};
      }
    }
  }

  // losses.h, row_loss.
  static Vec row_loss(const Vec& h, const Vec& w_c, const Vec& lse, T eps, T num_classes, T weight_total,
                      const Vec& weighted_x_sum, T z) {
    Vec own = eps == T(0) ? h : Vec(T(1) - eps) * h;
    if (z != T(0)) own = own + Vec(z) * lse * lse;
    Vec loss = sel(w_c == Vec(T(0)), Vec(T(0)), own * w_c);
    if (eps != T(0)) loss = loss + Vec(eps / num_classes) * (Vec(weight_total) * lse - weighted_x_sum);
    return loss;
  }

  struct Extra {
    Vec own, extra, per_class;
  };

  // losses.h, extra_terms.
  static Extra extra_terms(const Vec& rs, const Vec& go, const Vec& lse, T eps, T num_classes, T weight_total,
                           T z) {
    const Vec per_class = Vec(eps / num_classes) * go;
    const Vec z_term = z == T(0) ? Vec(T(0)) : Vec(T(2) * z) * lse * rs;
    return {Vec(T(1) - eps) * rs, per_class * Vec(weight_total) + z_term, per_class};
  }

  struct Coef {
    Vec shift, scale, smooth, target;
  };

  // losses.h, target_only_grad; `plain`: extra and per_class are 0 in every lane (no
  // smoothing, no z-loss), the first branch there.
  static Coef target_only_grad(const Vec& lse, const Vec& lse_ex, const Vec& x_c, const Vec& log_s,
                               const Vec& w_c, const Extra& t, bool plain) {
    const Vec zero(T(0));
    const Vec log1m_pc = lse_ex - lse;
    const Vec own_target = -((log_s + log1m_pc).exp()) * t.own;
    const Coef simple{lse - log_s, t.own, zero, own_target};
    if (plain) return simple;
    const Vec m = sel(log_s > zero, log_s, zero);
    const Coef full{lse - m, t.own * (log_s - m).exp() + t.extra * (-m).exp(), t.per_class,
                    own_target + t.extra * (x_c - lse).exp() - t.per_class * w_c};
    const Vec is_simple = (t.extra == zero) & (t.per_class == zero);
    return {sel(is_simple, simple.shift, full.shift), sel(is_simple, simple.scale, full.scale),
            sel(is_simple, simple.smooth, full.smooth), sel(is_simple, simple.target, full.target)};
  }
};

}  // namespace fusedloss::cpu::CPU_CAPABILITY
