// Fused row kernels for all six losses: forward (+ gradient) and backward.
//
// Compiled once per CPU capability by setup.py (-DCPU_CAPABILITY=DEFAULT|AVX2|
// AVX512 with the matching -m flags); ops_cpu.cpp picks one at run time.
//
// Traffic per row of C logits (b bytes each), forward with the gradient:
//   pass 1: online lse_ex over k != c   read C*b (the row's only DRAM read), one exp
//           per element, e_k = exp(x_k - shift_b) kept in the gradient row (float,
//           double) or a per-thread float row (half types), 4 bytes per element
//   pass 2: gradient                    read e_k from cache, write C*b: no exp
// so the fused forward+backward moves what a copy of the logits moves, and the
// loss itself is per-row scalar work (losses.h). bce adds one cached pass for
// its second reduction (R and sum log(1 - p_k) need lse first). Rows past the
// ~1 MiB L2 of a core here meet pass 2's input in L3: still one DRAM read and
// one write. The backward op (from the stats) is one pass with the exp.
//
// Cost: on this AVX-512 machine (Zen 4) a pass is bound by vector instructions,
// ~1 cycle per element for pass 1 (exp_u20 is ~17 of the ~25 per 16 lanes);
// the copy it is compared with is bound by page faults on the fresh output.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "row_lanes.h"
#include "vec_row.h"

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

// What a call computes; see Kernels (kernels.h).
enum class Pass { kForward, kBackward, kBcePartial, kBceGlobalBackward };

// Per-thread row buffers, kept between calls (no allocation per row):
// slot 0: the e_k of the exp pass; slot 1: the per-block shifts; slots 2-4: a
// soft-capped row, its slopes and its gradient (see capped_row); slot 5: the expected
// loss's m_j s_j, pass 2 to pass 3 (see expected_row_t).
template <typename T>
T* thread_buffer(int slot, size_t n) {
  thread_local std::vector<T> buffers[6];
  auto& v = buffers[slot];
  if (v.size() < n) v.resize(n);
  return v.data();
}

template <typename scalar_t>
struct Rows {
  using RV = RowVec<scalar_t>;
  using acc_t = typename RV::acc_t;
  using Vec = typename RV::Vec;
  using Step = typename RV::Step;

  const RowsProblem& pb;
  const acc_t* weight;
  bool stream;  // gradient rows written with streaming stores (see run_rows)

  Rows(const RowsProblem& p, bool stream_grad)
      : pb(p), weight(static_cast<const acc_t*>(p.weight)), stream(stream_grad) {}

  const scalar_t* row(int64_t i) const {
    return static_cast<const scalar_t*>(pb.logits) + i * pb.row_stride;
  }
  scalar_t* grad_row(int64_t i) const {
    return pb.grad ? static_cast<scalar_t*>(pb.grad) + i * pb.classes : nullptr;
  }
  acc_t* stats_row(int64_t i) const { return static_cast<acc_t*>(pb.stats) + i * kStatsCols; }
  acc_t weight_of(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  // dLoss/dloss_i, without the class weight.
  acc_t grad_out(int64_t i) const {
    const auto* rows = static_cast<const acc_t*>(pb.grad_loss_rows);
    return static_cast<acc_t>(pb.grad_scale) * (rows ? rows[i * pb.grad_loss_stride] : acc_t(1));
  }
  // Where the exp pass keeps e_k: a per-thread row of the math type (4 bytes per
  // class for float: 128 KiB at C = 32000, in L2), never the gradient row, so the
  // gradient pass can write its row with streaming stores that skip reading it.
  struct Buffers {
    acc_t* e;       // (classes,): the e_k of the exp pass
    acc_t* shifts;  // a shift per block
  };
  // Looked up once per task, not per row (a thread_local in a shared library is a call).
  Buffers buffers() const {
    return {thread_buffer<acc_t>(0, pb.classes), thread_buffer<acc_t>(1, pb.classes / kBlock<scalar_t> + 2)};
  }

  // Ignored rows: loss 0, gradient 0, stats 0 (never read), and no logit read.
  void ignore_row(int64_t i, bool forward) const {
    if (forward) {
      static_cast<acc_t*>(pb.loss_rows)[i] = acc_t(0);
      std::fill_n(stats_row(i), kStatsCols, acc_t(0));
    }
    if (scalar_t* g = grad_row(i)) std::memset(g, 0, sizeof(scalar_t) * pb.classes);
  }

  // Forward pass 1: lse_ex over k != c, in blocks; with `e`, also stores the
  // e_k and the block shifts (see OnlineLse). With g (and plain stores), the
  // gradient row is prefetched for writing (see add_block).
  template <bool kArgmax, bool kXSum>
  OnlineLse<scalar_t, kArgmax, kXSum> lse_pass(const scalar_t* x, int64_t c, acc_t* e,
                                               acc_t* shifts, const scalar_t* g = nullptr,
                                               int64_t c2 = -1) const {
    OnlineLse<scalar_t, kArgmax, kXSum> acc;
    acc.skip2 = c2;
    int64_t b_idx = 0;
    const scalar_t* g_ahead = stream ? nullptr : g;
    for_each_block<scalar_t>(pb.classes, [&](int64_t b, int64_t end) {
      const acc_t shift = acc.add_block(x, b, end, weight, e, c, g_ahead);
      if (e) shifts[b_idx++] = shift;
    });
    return acc;
  }


  // The gradient pass of the target-only family (and mixup's):
  //   g_j = exp(x_j - shift) * scale - smooth * w_j   for every j,
  // the target entries stored over it afterwards. Forward (e): exp(x_j - shift) =
  // e_j * exp(shift_b - shift) from pass 1's e_j, no exp; the backward op: the exp.
  template <bool kSmooth>
  FUSEDLOSS_ROW_PASS void write_scaled_exp(scalar_t* g, const scalar_t* x, const acc_t* e, const acc_t* shifts,
                                           acc_t shift, acc_t scale_in, acc_t smooth_in) const {
    const int64_t C = pb.classes;
    // vexp (exp_u20) clamps its argument, so a NaN shift (a NaN row, or a log s that
    // is undefined at p_c = 0) would not reach the output: the scale carries it.
    const acc_t scale = std::isnan(shift) ? shift : scale_in;
    const Vec smooth(smooth_in);
    // One step of the gradient: u = exp(x_j - shift) * scale, then the smoothing term.
    auto finish = [&](Step& u, int64_t j, int64_t n) {
      if constexpr (kSmooth) {
        Step w;
        if (weight) w = RV::load_acc(weight + j, n);
        for (int p = 0; p < RV::kParts; ++p) u.v[p] = u.v[p] - (weight ? smooth * w.v[p] : smooth);
      }
      return u;
    };
    if (e) {
      // exp(shift_b - shift) <= ~1: shift_b <= max_{k != c} x_k, and shift >= that max
      // for every variant (s p_j <= 1 / (1 - p_c) p_j <= 1).
      int64_t b_idx = 0;
      // e_c is 0 (g[c] is stored after the pass).
      for_each_block<scalar_t>(C, [&](int64_t b, int64_t end) {
        const Vec f(std::exp(shifts[b_idx++] - shift) * scale);
        RV::write(g, b, end, stream, [&](int64_t j, int64_t n) {
          Step u = RV::load_acc(e + j, n);
          for (int p = 0; p < RV::kParts; ++p) u.v[p] = u.v[p] * f;
          return finish(u, j, n);
        });
      });
    } else {
      // The backward op: the row's only read, with the exp.
      const Vec vshift(shift), vscale(scale);
      RV::write(g, 0, C, stream, [&](int64_t j, int64_t n) {
        RV::prefetch(x + j);
        Step u = RV::load(x + j, n);
        for (int p = 0; p < RV::kParts; ++p) u.v[p] = vexp(u.v[p] - vshift) * vscale;
        return finish(u, j, n);
      });
    }
  }

  // ------------------------------------------------------------------------
  // ce, nllr, crl, lace, focal: one reduction (lse_ex), one gradient pass
  //   g_j = exp(x_j - K) * scale - smooth * w_j,  K = lse - log s  (losses.h)
  // Forward: exp(x_j - K) = e_j * exp(shift_b - K) from pass 1's e_j: no exp.
  // Backward (from stats): the exp itself.
  //
  // Rows go in groups of up to Vec::size() (row_lanes.h): pass 1 of each row, then the
  // rows' scalar terms together, one row per lane, then each row's gradient pass. With
  // the e_k (a forward with the gradient) a group holds at most kGroupElements logits, so
  // its rows, e_k and gradient rows stay in L1 between the passes (DRAM-sized at 4096 x
  // 1000, groups of 16 rows were 1.3x slower than one row at a time; at C > 2048 a group is
  // one row); without them (no gradient, or the backward op) a group is Vec::size() rows.
  // Ignored rows are not in a group.
  // ------------------------------------------------------------------------
  static constexpr int64_t kGroupElements = 2048;
  static constexpr int64_t kGroupMaxClasses = 256;
  static constexpr int kMaxGroup = static_cast<int>(Vec::size());

  int group_size(bool with_e) const {
    if (!with_e) return kMaxGroup;
    return static_cast<int>(std::clamp<int64_t>(kGroupElements / pb.classes, 1, kMaxGroup));
  }
  // Buffers for a group of n rows: row l's e_k at e + l * C, its block shifts at
  // shifts + l * shift_stride().
  int64_t shift_stride() const { return pb.classes / kBlock<scalar_t> + 2; }
  Buffers group_buffers(int n) const {
    return {thread_buffer<acc_t>(0, pb.classes * n), thread_buffer<acc_t>(1, shift_stride() * n)};
  }

  // One row at a time with losses.h's scalar forms (libm): rows of more than kGroupMaxClasses
  // classes, where a group's vector calls no longer pay (a call of Sleef's costs more than
  // libm's for the one or two rows a group then holds) and groups of 16 rows were slower
  // DRAM-sized (4096 x 1000 float32, 1 thread: 2.31 against 1.79 ms).
  template <bool kSmooth>
  FUSEDLOSS_ROW_PASS void target_only(int64_t i, bool forward, const Buffers& buf) const {
    const int64_t C = pb.classes, c = pb.target[i];
    const scalar_t* x = row(i);
    scalar_t* g = grad_row(i);
    const acc_t x_c = static_cast<acc_t>(x[c]);
    const acc_t eps = static_cast<acc_t>(pb.cfg.label_smoothing);
    const acc_t W = static_cast<acc_t>(pb.weight_total);
    const acc_t w_c = weight_of(c);
    acc_t* st = stats_row(i);
    acc_t* e = forward && g ? buf.e : nullptr;
    acc_t* shifts = buf.shifts;
    acc_t lse, lse_ex, weighted_x_sum = 0;
    if (forward) {
      const auto acc = lse_pass<false, kSmooth>(x, c, e, shifts, g);
      lse_ex = acc.lse();
      lse = logaddexp(lse_ex, x_c);
      if constexpr (kSmooth) weighted_x_sum = acc.x_sum() + w_c * x_c;
    } else {
      lse = st[0];
      lse_ex = st[1];
    }
    const auto terms = target_only_terms<acc_t>(pb.cfg.variant, lse_ex - x_c, pb.cfg.alpha,
                                                pb.cfg.beta, pb.cfg.gamma);
    const acc_t z = static_cast<acc_t>(pb.cfg.z_loss);
    if (forward) {
      static_cast<acc_t*>(pb.loss_rows)[i] =
          row_loss<acc_t>(terms.loss, w_c, lse, eps, acc_t(C), W, weighted_x_sum, z);
      st[0] = lse;
      st[1] = lse_ex;
      st[2] = st[3] = acc_t(0);
    }
    if (!g) return;
    const acc_t go = grad_out(i);
    const auto k = target_only_grad<acc_t>(lse, lse_ex, x_c, terms.log_s, w_c,
                                           extra_terms<acc_t>(w_c * go, go, lse, eps, acc_t(C), W, z));
    write_scaled_exp<kSmooth>(g, x, e, buf.shifts, k.shift, k.scale, k.smooth);
    g[c] = static_cast<scalar_t>(k.target);
  }

  template <bool kSmooth>
  void target_only_rows(int64_t begin, int64_t end, bool forward) const {
    const bool with_e = forward && pb.grad;
    const int group = group_size(with_e);
    const Buffers buf = group_buffers(with_e ? group : 1);
    int64_t idx[kMaxGroup];
    int n = 0;
    for (int64_t i = begin; i < end; ++i) {
      if (pb.target[i] == pb.cfg.ignore_index) {
        ignore_row(i, forward);
        continue;
      }
      idx[n++] = i;
      if (n == group) {
        target_only_group<kSmooth>(idx, n, forward, buf);
        n = 0;
      }
    }
    if (n > 0) target_only_group<kSmooth>(idx, n, forward, buf);
  }

  template <bool kSmooth>
  FUSEDLOSS_ROW_PASS void target_only_group(const int64_t* idx, int n, bool forward, const Buffers& buf) const {
    using L = Lanes<acc_t>;
    const int64_t C = pb.classes;
    const auto& cfg = pb.cfg;
    const acc_t eps = static_cast<acc_t>(cfg.label_smoothing);
    const acc_t W = static_cast<acc_t>(pb.weight_total);
    const acc_t z = static_cast<acc_t>(cfg.z_loss);
    const bool grad = pb.grad != nullptr;
    // Lanes past n hold zeros: their numbers are computed and never read.
    alignas(64) acc_t a_lse[kMaxGroup] = {}, a_lse_ex[kMaxGroup] = {}, a_x_c[kMaxGroup] = {},
                      a_w_c[kMaxGroup] = {}, a_xs[kMaxGroup] = {}, a_go[kMaxGroup] = {},
                      a_shift[kMaxGroup] = {}, a_sum[kMaxGroup] = {};
    for (int l = 0; l < n; ++l) {
      const int64_t i = idx[l], c = pb.target[i];
      const scalar_t* x = row(i);
      a_x_c[l] = static_cast<acc_t>(x[c]);
      a_w_c[l] = weight_of(c);
      if (grad) a_go[l] = grad_out(i);
      if (forward) {
        acc_t* e = grad ? buf.e + l * C : nullptr;
        acc_t* shifts = grad ? buf.shifts + l * shift_stride() : buf.shifts;  // written only with e
        const auto acc = lse_pass<false, kSmooth>(x, c, e, shifts, grad_row(i));
        // OnlineLse::lse() below, lane by lane: shift + log(sum), -inf when nothing was added.
        a_shift[l] = acc.shift;
        a_sum[l] = acc.shift == kNegInf<acc_t> ? acc_t(1) : RV::hsum(acc.sum);
        if constexpr (kSmooth) a_xs[l] = acc.x_sum() + a_w_c[l] * a_x_c[l];
      } else {
        const acc_t* st = stats_row(i);
        a_lse[l] = st[0];
        a_lse_ex[l] = st[1];
      }
    }
    const Vec x_c = Vec::loadu(a_x_c), w_c = Vec::loadu(a_w_c);
    Vec lse, lse_ex;
    if (forward) {
      const Vec shift = Vec::loadu(a_shift);
      lse_ex = L::sel(shift == L::ninf(), shift, shift + Vec::loadu(a_sum).log());
    } else {
      lse = Vec::loadu(a_lse);
      lse_ex = Vec::loadu(a_lse_ex);
    }
    const Vec d = lse_ex - x_c;
    const Vec l = L::log1p_exp_neg(d.abs());  // |d| = |lse_ex - x_c|: logaddexp's argument too
    if (forward) lse = L::logaddexp_with(lse_ex, x_c, l);
    const auto terms = L::target_only_terms(cfg.variant, d, l, static_cast<acc_t>(cfg.alpha),
                                            static_cast<acc_t>(cfg.beta), static_cast<acc_t>(cfg.gamma));
    if (forward) {
      const Vec loss = L::row_loss(terms.loss, w_c, lse, eps, acc_t(C), W, Vec::loadu(a_xs), z);
      alignas(64) acc_t a_loss[kMaxGroup];
      lse_ex.store(a_lse_ex);
      loss.store(a_loss);
      lse.store(a_lse);
      for (int l = 0; l < n; ++l) {
        const int64_t i = idx[l];
        static_cast<acc_t*>(pb.loss_rows)[i] = a_loss[l];
        acc_t* st = stats_row(i);
        st[0] = a_lse[l];
        st[1] = a_lse_ex[l];
        st[2] = st[3] = acc_t(0);
      }
    }
    if (!grad) return;
    const Vec go = Vec::loadu(a_go);
    const bool plain = eps == acc_t(0) && z == acc_t(0);
    const auto k = L::target_only_grad(lse, lse_ex, x_c, terms.log_s, w_c,
                                       L::extra_terms(w_c * go, go, lse, eps, acc_t(C), W, z), plain);
    alignas(64) acc_t k_shift[kMaxGroup], k_scale[kMaxGroup], k_smooth[kMaxGroup], k_target[kMaxGroup];
    k.shift.store(k_shift);
    k.scale.store(k_scale);
    k.smooth.store(k_smooth);
    k.target.store(k_target);
    for (int l = 0; l < n; ++l) {
      const int64_t i = idx[l];
      scalar_t* g = grad_row(i);
      const acc_t* e = forward ? buf.e + l * C : nullptr;
      const acc_t* shifts = forward ? buf.shifts + l * shift_stride() : buf.shifts;  // read only with e
      write_scaled_exp<kSmooth>(g, row(i), e, shifts, k_shift[l], k_scale[l], k_smooth[l]);
      g[pb.target[i]] = static_cast<scalar_t>(k_target[l]);
    }
  }

  // ------------------------------------------------------------------------
  // Mixup's two targets: lam L(a) + (1 - lam) L(b) with one read of the row.
  // Pass 1 leaves both targets out: L2 = lse over k not in {a, b}; then
  //   lse_ex_a = logaddexp(L2, x_b), lse_ex_b = logaddexp(L2, x_a)   (a != b)
  // exact as for one target. A part whose target is ignored counts 0 (its target is
  // set to the other's); one target is the case b == a, k_b = 0 (bce runs it so).
  // ------------------------------------------------------------------------
  struct Parts {
    int64_t a, b;
    acc_t k_a, k_b;  // lam and 1 - lam, times 'mean''s 1/denominator of each part
    bool same;       // a == b: one part, the terms of both summed
  };

  Parts one_target(int64_t i) const { return {pb.target[i], pb.target[i], acc_t(1), acc_t(0), true}; }

  Parts two_targets(int64_t i) const {
    Parts t{pb.target[i], pb.target_b[i], acc_t(0), acc_t(0), false};
    const acc_t lam = static_cast<const acc_t*>(pb.lam)[i];
    t.k_a = lam * static_cast<acc_t>(pb.mix_scale_a);
    t.k_b = (acc_t(1) - lam) * static_cast<acc_t>(pb.mix_scale_b);
    if (t.a == pb.cfg.ignore_index) t.a = t.b, t.k_a = acc_t(0);
    if (t.b == pb.cfg.ignore_index) t.b = t.a, t.k_b = acc_t(0);
    t.same = t.a == t.b;
    return t;
  }

  // Pass 1 of a row with targets a and b: the lse over k not in {a, b}, and from it both
  // lse_ex, lse, the smoothing sum and (kArgmax) the row's arg-max w (ties: a target).
  struct MixStats {
    acc_t lse, lse_ex_a, lse_ex_b, weighted_x_sum;
    int64_t w;
  };

  template <bool kArgmax, bool kSmooth>
  MixStats mix_pass(const scalar_t* x, const Parts& t, acc_t x_a, acc_t x_b, acc_t* e, const Buffers& buf,
                    const scalar_t* g) const {
    const auto acc = lse_pass<kArgmax, kSmooth>(x, t.a, e, buf.shifts, g, t.same ? -1 : t.b);
    const acc_t rest = acc.lse();
    MixStats s;
    s.lse_ex_a = t.same ? rest : logaddexp(rest, x_b);
    s.lse_ex_b = t.same ? rest : logaddexp(rest, x_a);
    s.lse = logaddexp(s.lse_ex_a, x_a);
    s.weighted_x_sum = 0;
    if constexpr (kSmooth) {
      s.weighted_x_sum = acc.x_sum() + weight_of(t.a) * x_a + (t.same ? acc_t(0) : weight_of(t.b) * x_b);
    }
    const int64_t lead = x_b > x_a ? t.b : t.a;
    s.w = kArgmax && acc.max > std::max(x_a, x_b) ? acc.argmax : lead;
    return s;
  }

  // The target-only family: both parts' gradients in one pass (losses.h, mix_grad).
  template <bool kSmooth>
  FUSEDLOSS_ROW_PASS void mix_target_only(int64_t i, bool forward, const Buffers& buf) const {
    const int64_t C = pb.classes;
    const Parts t = two_targets(i);
    const int64_t a = t.a, b = t.b;
    const scalar_t* x = row(i);
    scalar_t* g = grad_row(i);
    const acc_t x_a = static_cast<acc_t>(x[a]), x_b = static_cast<acc_t>(x[b]);
    const acc_t w_a = weight_of(a), w_b = weight_of(b);
    const acc_t eps = static_cast<acc_t>(pb.cfg.label_smoothing);
    const acc_t W = static_cast<acc_t>(pb.weight_total);
    const acc_t z = static_cast<acc_t>(pb.cfg.z_loss);
    acc_t* st = stats_row(i);
    acc_t* e = forward && g ? buf.e : nullptr;
    MixStats s{};
    if (forward) {
      s = mix_pass<false, kSmooth>(x, t, x_a, x_b, e, buf, g);
    } else {
      s.lse = st[0];
      s.lse_ex_a = st[1];
      s.lse_ex_b = st[2];
    }
    const auto& cfg = pb.cfg;
    const auto ta = target_only_terms<acc_t>(cfg.variant, s.lse_ex_a - x_a, cfg.alpha, cfg.beta, cfg.gamma);
    const auto tb = target_only_terms<acc_t>(cfg.variant, s.lse_ex_b - x_b, cfg.alpha, cfg.beta, cfg.gamma);
    if (forward) {
      static_cast<acc_t*>(pb.loss_rows)[i] = mix_row_loss<acc_t>(t.k_a, ta.loss, w_a, t.k_b, tb.loss, w_b, s.lse,
                                                                 eps, acc_t(C), W, s.weighted_x_sum, z);
      st[0] = s.lse;
      st[1] = s.lse_ex_a;
      st[2] = s.lse_ex_b;
      st[3] = acc_t(0);
    }
    if (!g) return;
    const acc_t go = grad_out(i);
    const auto ea = part_terms<acc_t>(t.k_a, w_a, go, s.lse, eps, acc_t(C), W, z);
    const auto eb = part_terms<acc_t>(t.k_b, w_b, go, s.lse, eps, acc_t(C), W, z);
    const auto k = target_only_mix_grad<acc_t>(t.same, s.lse, s.lse_ex_a, s.lse_ex_b, x_a, x_b, ta.log_s,
                                               tb.log_s, w_a, w_b, ea, eb);
    write_scaled_exp<kSmooth>(g, x, e, buf.shifts, k.shift, k.scale, k.smooth);
    g[a] = static_cast<scalar_t>(k.target_a);
    g[b] = static_cast<scalar_t>(k.target_b);
  }

  // ------------------------------------------------------------------------
  // bce (one target, or mixup's two: both parts share lse, the arg-max w and
  // log(1 - p_w); each has its own R and loss, losses.h bce_part): lse_ex and w in
  // pass 1; the sums over k not in {a, b, w} (P = sum p_k, sum log1p(-p_k), sum a_k)
  // in pass 2; the gradient of all parts in pass 3. Passes 2 and 3 take
  // p_k = e_k exp(shift_b - lse) from pass 1's e_k in the forward, and
  // exp(x_k - lse) in the backward.
  // ------------------------------------------------------------------------
  struct PSource {
    const scalar_t* x;
    const acc_t* e;  // null: exp from x
    const acc_t* shifts;
    acc_t lse;
    int64_t a, b;  // the targets: p reads as 0 there (e is 0; from x, their lanes are masked)

    // p_j for the n <= kWidth lanes at j of a block with `factor`; 0 in lanes past n.
    Step at(int64_t j, int64_t n, const Vec& factor, const Vec& vlse) const {
      Step p;
      if (e) {
        p = RV::load_acc(e + j, n);  // zero past n
        for (int q = 0; q < RV::kParts; ++q) p.v[q] = p.v[q] * factor;
      } else {
        RV::prefetch(x + j);
        p = RV::pad(RV::load(x + j, n), n, kNegInf<acc_t>);
        if (static_cast<uint64_t>(a - j) < static_cast<uint64_t>(n)) p = RV::set_lane(p, a - j, kNegInf<acc_t>);
        if (static_cast<uint64_t>(b - j) < static_cast<uint64_t>(n)) p = RV::set_lane(p, b - j, kNegInf<acc_t>);
        for (int q = 0; q < RV::kParts; ++q) p.v[q] = vexp(p.v[q] - vlse);
      }
      return p;
    }

    // f(p, j, n) over the blocks of the row; p is 0 at the targets and in lanes past n.
    template <typename F>
    void for_each(int64_t C, F&& f) const {
      int64_t b_idx = 0;
      const Vec vlse(lse);
      for_each_block<scalar_t>(C, [&](int64_t b, int64_t end) {
        const Vec factor(e ? std::exp(shifts[b_idx++] - lse) : acc_t(0));
        for (int64_t j = b; j < end; j += RV::kWidth) {
          const int64_t n = std::min(RV::kWidth, end - j);
          f(at(j, n, factor, vlse), j, n);
        }
      });
    }

    // g[j] = f(p, j, n) over the same blocks (RowVec::write: streaming stores or not).
    template <typename F>
    void write(scalar_t* g, int64_t C, bool stream, F&& f) const {
      int64_t b_idx = 0;
      const Vec vlse(lse);
      for_each_block<scalar_t>(C, [&](int64_t b, int64_t end) {
        const Vec factor(e ? std::exp(shifts[b_idx++] - lse) : acc_t(0));
        RV::write(g, b, end, stream, [&](int64_t j, int64_t n) { return f(at(j, n, factor, vlse), j, n); });
      });
    }
  };

  // a_k = p / (1 - p) and log(1 - p) for the p_k off the arg-max (p <= 1/2).
  // Nearly every p_k of a long row is tiny (they sum to at most 1, so at most
  // 1/kSmall of them reach kSmall). A step whose lanes are all below kSmall takes
  // four terms of the series, p (1 + p + p^2 + p^3) and -p (1 + p/2 + p^2/3 + p^3/4),
  // exact to a relative p^4 (2^-24 for float, 2^-56 for double at these bounds);
  // only the few other steps pay a division and log1p (a Sleef call).
  static constexpr acc_t kSmall = sizeof(acc_t) == 4 ? acc_t(1.0 / 64) : acc_t(1.0 / 16384);

  static bool all_small(const Step& p) {
    constexpr int kAllLanes = (1 << RV::kLanes) - 1;
    for (int q = 0; q < RV::kParts; ++q) {
      // zero_mask: a bit per lane where the comparison is false (p < kSmall, or NaN).
      if ((p.v[q] >= Vec(kSmall)).zero_mask() != kAllLanes) return false;
    }
    return true;
  }

  static Vec odds(const Vec& p, bool small) {  // p / (1 - p)
    const Vec one(acc_t(1));
    if (small) return p * at::vec::fmadd(p, at::vec::fmadd(p, p + one, one), one);
    return p / (one - p);
  }

  static Vec log1m(const Vec& p, bool small) {  // log(1 - p)
    if (small) {
      const Vec series = at::vec::fmadd(
          p, at::vec::fmadd(p, at::vec::fmadd(p, Vec(acc_t(0.25)), Vec(acc_t(1.0 / 3))), Vec(acc_t(0.5))),
          Vec(acc_t(1)));
      return -(p * series);
    }
    return (-p).log1p();
  }

  // log(1 - p), p in [0, 1/2], for pass 2's loss terms. float: a step with a lane at or
  // above kSmall takes -2 atanh(s), s = p / (2 - p) <= 1/3 (1 - p = (1 - s) / (1 + s)), by
  // its series to s^13: truncated at a relative (s^2)^7 / 15 < 2^-24, no cancellation (all
  // terms have the sign of s), ~2 ulps with the rounding of s. Inline: Sleef's log1p is an
  // out-of-line call per vector, the largest symbol of bce's forward at small C (perf), where
  // nearly every step has such a lane. double: log1m's log1p.
  static Vec log1m_half(const Vec& p, bool small) {
    if (small || sizeof(acc_t) != 4) return log1m(p, small);
    const Vec s = p / (Vec(acc_t(2)) - p), u = s * s;
    Vec poly = at::vec::fmadd(u, Vec(acc_t(1.0 / 13)), Vec(acc_t(1.0 / 11)));
    poly = at::vec::fmadd(u, poly, Vec(acc_t(1.0 / 9)));
    poly = at::vec::fmadd(u, poly, Vec(acc_t(1.0 / 7)));
    poly = at::vec::fmadd(u, poly, Vec(acc_t(1.0 / 5)));
    poly = at::vec::fmadd(u, poly, Vec(acc_t(1.0 / 3)));
    poly = at::vec::fmadd(u, poly, Vec(acc_t(1)));
    return Vec(acc_t(-2)) * (s * poly);
  }

  // Pass 2: sums over k not in {a, b, w} (w's lanes are masked to p = 0). kOdds false
  // (a forward without the gradient, whose loss does not read R): no sum of a_k (0).
  template <bool kLossTerms, bool kOdds = true>
  FUSEDLOSS_ROW_PASS BceSums<acc_t> bce_sums(const PSource& src, int64_t w) const {
    Vec sp(acc_t(0)), sl(acc_t(0)), sa(acc_t(0));
    src.for_each(pb.classes, [&](Step p, int64_t j, int64_t n) {
      if (static_cast<uint64_t>(w - j) < static_cast<uint64_t>(n)) p = RV::set_lane(p, w - j, acc_t(0));
      const bool small = all_small(p);
      for (int q = 0; q < RV::kParts; ++q) {
        if constexpr (kOdds) sa = sa + odds(p.v[q], small);
        if constexpr (kLossTerms) {
          sp = sp + p.v[q];
          sl = sl + log1m_half(p.v[q], small);
        }
      }
    });
    return {RV::hsum(sp), RV::hsum(sl), RV::hsum(sa)};
  }

  // log(1 - p_w) = lse_{k != w} - lse when pass 2's P lost its precision (a wrong class
  // leads by ~41+ in fp32): a second lse, over k != w, shifted by its own max. Rare, so a
  // plain extra pass.
  acc_t bce_log1m_pw_exact(const scalar_t* x, int64_t w, acc_t lse) const {
    OnlineLse<scalar_t> acc;
    for_each_block<scalar_t>(pb.classes, [&](int64_t b, int64_t e) { acc.add_block(x, b, e, nullptr, nullptr, w); });
    return acc.lse() - lse;
  }

  template <bool kSmooth>
  void bce(int64_t i, bool forward, const Buffers& buf, const Parts& t) const {
    const int64_t a = t.a, b = t.b;
    const scalar_t* x = row(i);
    scalar_t* g = grad_row(i);
    const acc_t x_a = static_cast<acc_t>(x[a]), x_b = static_cast<acc_t>(x[b]);
    const acc_t w_a = weight_of(a), w_b = weight_of(b);
    acc_t* st = stats_row(i);
    // The forward always keeps the e_k (in a thread buffer without a gradient), so
    // its loss does not change a bit with compute_grad.
    acc_t* e = forward ? buf.e : nullptr;
    const acc_t eps = static_cast<acc_t>(pb.cfg.label_smoothing);
    const acc_t z = static_cast<acc_t>(pb.cfg.z_loss);
    const acc_t W = static_cast<acc_t>(pb.weight_total);
    const acc_t C = static_cast<acc_t>(pb.classes);
    MixStats s{};
    if (forward) {
      s = mix_pass<true, kSmooth>(x, t, x_a, x_b, e, buf, g);
    } else {  // stats: lse, lse_ex_a, log(1 - p_w), w
      s.lse = st[0];
      s.lse_ex_a = st[1];
      s.w = static_cast<int64_t>(st[3]);
    }
    const int64_t w = s.w;
    const acc_t lse = s.lse;
    const acc_t x_w = static_cast<acc_t>(x[w]);
    const acc_t p_a = std::exp(x_a - lse), p_b = t.same ? p_a : std::exp(x_b - lse);
    const PSource src{x, e, buf.shifts, lse, a, b};
    const BceSums<acc_t> sums = !forward ? bce_sums<false>(src, w)
                                : g        ? bce_sums<true>(src, w)
                                           : bce_sums<true, false>(src, w);
    acc_t log1m_pw = st[2];
    if (forward) {
      const Log1mPw<acc_t> l = bce_log1m_pw<acc_t>(w, a, b, lse, s.lse_ex_a, s.lse_ex_b, sums, p_a, p_b);
      log1m_pw = l.exact ? l.value : bce_log1m_pw_exact(x, w, lse);
    }
    // Each part adds the other target's terms when that is neither its own nor w.
    const auto pa = bce_part<acc_t>(w == a, b != a && b != w, lse, s.lse_ex_a, x_a, x_w, p_b, log1m_pw, sums);
    // One target (a == b): the same part twice (its k_b is 0).
    const auto pbp =
        t.same ? pa : bce_part<acc_t>(w == b, a != b && a != w, lse, s.lse_ex_b, x_b, x_w, p_a, log1m_pw, sums);
    if (forward) {
      static_cast<acc_t*>(pb.loss_rows)[i] = mix_row_loss<acc_t>(t.k_a, pa.loss, w_a, t.k_b, pbp.loss, w_b, lse,
                                                                 eps, C, W, s.weighted_x_sum, z);
      st[0] = lse;
      st[1] = s.lse_ex_a;
      st[2] = log1m_pw;
      st[3] = static_cast<acc_t>(w);
    }
    if (!g) return;
    const acc_t go = grad_out(i);
    ExtraTerms<acc_t> ta = part_terms<acc_t>(t.k_a, w_a, go, lse, eps, C, W, z);
    ExtraTerms<acc_t> tb = part_terms<acc_t>(t.k_b, w_b, go, lse, eps, C, W, z);
    if (t.same) ta = sum_terms(ta, tb);
    // As in target_only: a NaN in the row's scalars reaches the output through the
    // coefficients, since vexp clamps a NaN argument.
    if (std::isnan(lse) || std::isnan(pa.row.r) || std::isnan(pa.row.log_aw) || std::isnan(pbp.row.r) ||
        std::isnan(pbp.row.log_aw)) {
      ta.own = tb.own = std::numeric_limits<acc_t>::quiet_NaN();
    }
    BceGradCoef<acc_t> k{};
    add_bce_part<acc_t>(k, w == a, pa.row, ta);
    if (!t.same) add_bce_part<acc_t>(k, w == b, pbp.row, tb);
    write_bce_grad(src, g, k);
    // The arg-max and the targets: each part's own form (losses.h, bce_entry).
    for (const int64_t j : {w, a, b}) {
      const acc_t x_j = static_cast<acc_t>(x[j]), w_j = weight_of(j);
      acc_t v = bce_entry<acc_t>(j, w, a, x_j, lse, w_j, pa.row, ta);
      if (!t.same) v += bce_entry<acc_t>(j, w, b, x_j, lse, w_j, pbp.row, tb);
      g[j] = static_cast<scalar_t>(v);
    }
  }

  // Pass 3 with the row's coefficients (the stored entries are the caller's).
  void write_bce_grad(const PSource& src, scalar_t* g, BceGradCoef<acc_t> k) const {
    // p_j a_w: exp(x_j - lse + log a_w) in the pass when a_w is large; while it is
    // moderate (a subnormal p_j times a_w <= e^20 is below 1e-29), a factor of p_j.
    if (k.aw != acc_t(0) && k.log_aw <= acc_t(20)) {
      k.p += k.aw * std::exp(k.log_aw);
      k.aw = acc_t(0);
    }
    const bool aw_exp = k.aw != acc_t(0), per_class = k.per_class != acc_t(0);
    if (aw_exp) {
      per_class ? bce_grad_pass<true, true>(src, g, k) : bce_grad_pass<true, false>(src, g, k);
    } else {
      per_class ? bce_grad_pass<false, true>(src, g, k) : bce_grad_pass<false, false>(src, g, k);
    }
  }

  // ------------------------------------------------------------------------
  // bce of a vocabulary-parallel row (python/fusedloss/parallel.py) on this rank's slice,
  // given the row's global numbers (stats: lse, R, log(1 - p_w), x_w) and where its target c
  // and arg-max w lie in the slice (slice_idx; -1: on another rank). The forward's passes 2
  // and 3 with those numbers from outside, p_k = exp(x_k - lse) read from x:
  //   kBcePartial: the slice's sums over k not in {c, w} of log(1 - p_k) and a_k, every
  //     p_k <= 1/2 there (pass 2, c's and w's lanes masked);
  //   kBceGlobalBackward: every local g_j, j not in {c, w}, as a_j - p_j R - p_j a_w
  //     (add_bce_part knows w == c from the flag, not from local indices: on a rank holding
  //     neither, both are -1), plus z-loss's 2 z lse own p_j; then the entries at a local w
  //     and c by their own forms (bce_entry). No class weight (the caller folds w_c into the
  //     row's coefficient) and no label smoothing (its global V and W are the caller's).
  // With a soft cap, capped_row runs this on the capped row (stats of the capped logits).
  // ------------------------------------------------------------------------
  void bce_given_global(int64_t i, Pass pass) const {
    const int64_t* idx = pb.slice_idx + 3 * i;
    const int64_t c = idx[0], w = idx[1], kind = idx[2];
    acc_t* sums = pass == Pass::kBcePartial ? static_cast<acc_t*>(pb.bce_sums) + 2 * i : nullptr;
    scalar_t* g = grad_row(i);
    if (kind < 0) {  // ignored row
      if (sums) sums[0] = sums[1] = acc_t(0);
      if (g) std::memset(g, 0, sizeof(scalar_t) * pb.classes);
      return;
    }
    const scalar_t* x = row(i);
    const acc_t* st = stats_row(i);
    const acc_t lse = st[0];
    const PSource src{x, nullptr, nullptr, lse, c, c};  // -1 masks no lane
    if (sums) {
      const BceSums<acc_t> s = bce_sums<true>(src, w);
      sums[0] = s.log1m;
      sums[1] = s.odds;
      return;
    }
    const bool w_is_c = kind == 1;
    const BceRow<acc_t> brow = bce_row_of_r<acc_t>(w_is_c, lse, st[3], st[2], st[1]);
    const acc_t own = grad_out(i);
    // own = w_c go: extra_terms without smoothing gives {own, 2 z lse own, 0}.
    ExtraTerms<acc_t> t = extra_terms<acc_t>(own, acc_t(0), lse, acc_t(0), acc_t(1), acc_t(0),
                                             static_cast<acc_t>(pb.cfg.z_loss));
    // As in bce: vexp clamps a NaN argument, so a NaN row reaches the output through own.
    if (std::isnan(lse) || std::isnan(brow.r) || std::isnan(brow.log_aw)) {
      t.own = std::numeric_limits<acc_t>::quiet_NaN();
    }
    BceGradCoef<acc_t> k{};
    add_bce_part<acc_t>(k, w_is_c, brow, t);
    write_bce_grad(src, g, k);
    for (const int64_t j : {w, c}) {
      if (j < 0) continue;
      g[j] = static_cast<scalar_t>(bce_entry<acc_t>(j, w, c, static_cast<acc_t>(x[j]), lse, acc_t(0), brow, t));
    }
  }

  // Pass 3: g_j = odds a_j - p p_j - aw p_j a_w - per_class w_j (losses.h, BceGradCoef)
  // for every j (w and the targets are overwritten after).
  template <bool kAwExp, bool kPerClass>
  FUSEDLOSS_ROW_PASS void bce_grad_pass(const PSource& src, scalar_t* g, const BceGradCoef<acc_t>& k) const {
    const Vec vodds(k.odds), vp(k.p), vaw(k.aw), vpc(k.per_class), vlse(src.lse), log_aw(k.log_aw);
    src.write(g, pb.classes, stream, [&](Step p, int64_t j, int64_t n) {
      Step t, w;
      if constexpr (kAwExp) t = RV::load(src.x + j, n);
      if (kPerClass && weight) w = RV::load_acc(weight + j, n);
      const bool small = all_small(p);
      for (int q = 0; q < RV::kParts; ++q) {
        Vec gq = vodds * odds(p.v[q], small) - vp * p.v[q];
        if constexpr (kAwExp) gq = gq - vaw * vexp(t.v[q] - vlse + log_aw);
        if constexpr (kPerClass) gq = gq - (weight ? vpc * w.v[q] : vpc);
        p.v[q] = gq;
      }
      return p;
    });
  }

  // ------------------------------------------------------------------------
  // Soft cap (losses.h, soft_capped): the row is capped once into a thread buffer of
  // the math type, with the cap's slopes beside it; the kernels of the math type run on
  // that one row (into a gradient buffer), and the gradient w.r.t. the logits is their
  // gradient times the slopes. Two extra passes over an in-cache row and one exp per
  // element on top of the uncapped loss. Mixup's rows likewise (the row's two targets
  // and lam go with it), and a vocabulary-parallel bce row (its slice_idx and sums).
  // ------------------------------------------------------------------------
  void capped_row(int64_t i, Pass pass) const {
    const bool forward = pass == Pass::kForward;
    const int64_t C = pb.classes;
    acc_t* y = thread_buffer<acc_t>(2, C);
    acc_t* slope = thread_buffer<acc_t>(3, C);
    acc_t* gy = pb.grad ? thread_buffer<acc_t>(4, C) : nullptr;
    const scalar_t* x = row(i);
    const acc_t cap = static_cast<acc_t>(pb.cfg.softcap);
    const Vec vcap(cap), vinv(acc_t(1) / cap), one(acc_t(1)), zero(acc_t(0));
    RV::for_each(x, 0, C, [&](Step s, int64_t j, int64_t n) {
      Step yv = s, sl = s;
      for (int q = 0; q < RV::kParts; ++q) {
        const Vec u = s.v[q] * vinv;
        const Vec e = vexp(Vec(acc_t(-2)) * u.abs());
        const Vec t = (one - e) / (one + e);
        yv.v[q] = vcap * Vec::blendv(t, -t, u < zero);
        sl.v[q] = Vec(acc_t(4)) * e / ((one + e) * (one + e));
        // vexp clamps its argument: a NaN logit must stay NaN in the capped row.
        yv.v[q] = Vec::blendv(yv.v[q], s.v[q], s.v[q] != s.v[q]);
      }
      RV::store_acc(y + j, n, yv);
      RV::store_acc(slope + j, n, sl);
    });
    RowsProblem one_row = pb;
    one_row.dtype = std::is_same_v<acc_t, double> ? c10::ScalarType::Double : c10::ScalarType::Float;
    one_row.logits = y;
    one_row.rows = 1;
    one_row.row_stride = C;
    if (pb.target) one_row.target = pb.target + i;
    if (pb.slice_idx) one_row.slice_idx = pb.slice_idx + 3 * i;
    if (pb.bce_sums) one_row.bce_sums = static_cast<acc_t*>(pb.bce_sums) + 2 * i;
    if (pb.target_b) {
      one_row.target_b = pb.target_b + i;
      one_row.lam = static_cast<const acc_t*>(pb.lam) + i;
    }
    one_row.cfg.softcap = 0;
    one_row.stats = stats_row(i);
    one_row.loss_rows = forward ? static_cast<acc_t*>(pb.loss_rows) + i : nullptr;
    one_row.grad = gy;
    if (pb.grad_loss_rows) {
      one_row.grad_loss_rows = static_cast<const acc_t*>(pb.grad_loss_rows) + i * pb.grad_loss_stride;
    }
    Rows<acc_t>(one_row, false).run(0, 1, pass);
    if (!gy) return;
    using AV = RowVec<acc_t>;
    RV::write(grad_row(i), 0, C, stream, [&](int64_t j, int64_t n) {
      Step out;
      for (int q = 0; q < RV::kParts; ++q) {
        const int64_t off = j + q * RV::kLanes;
        const int64_t nq = std::clamp<int64_t>(n - q * RV::kLanes, 0, RV::kLanes);
        out.v[q] = nq == 0 ? zero : AV::load_acc(gy + off, nq).v[0] * AV::load_acc(slope + off, nq).v[0];
      }
      return out;
    });
  }

  // ------------------------------------------------------------------------
  // Class-probability targets (ce): with y' = (1 - eps) y + eps / C and wy = w y',
  //   L = sum_k wy_k (lse - x_k),   g_j = S p_j - wy_j,   S = sum_k wy_k
  // Pass 1: lse over the row (the e_k kept, as for the other losses) and S over the
  // targets (their only DRAM read). Pass 2: the gradient from the e_k, and the loss
  // from x and y, both now in cache: every term wy_k (lse - x_k) is >= 0 once lse is
  // known, so the sum has no cancellation (S lse - sum wy x would, for large logits).
  // ------------------------------------------------------------------------
  const scalar_t* probs_row(int64_t i) const {
    return static_cast<const scalar_t*>(pb.probs) + i * pb.probs_stride;
  }

  // w_k y'_k for the n lanes at j, 0 in the lanes past n.
  Step smoothed_wy(const scalar_t* y, int64_t j, int64_t n) const {
    const acc_t eps = static_cast<acc_t>(pb.cfg.label_smoothing);
    Step v = RV::load(y + j, n);
    Step w;
    if (weight) w = RV::load_acc(weight + j, n);
    for (int q = 0; q < RV::kParts; ++q) {
      if (eps != acc_t(0)) v.v[q] = at::vec::fmadd(v.v[q], Vec(acc_t(1) - eps), Vec(eps / acc_t(pb.classes)));
      if (weight) v.v[q] = v.v[q] * w.v[q];
    }
    return RV::pad(v, n, acc_t(0));
  }

  // sum_k wy_k (lse - x_k) over the n lanes at j; 0 where wy_k = 0 (a -inf logit with no mass).
  static Vec loss_terms(const Step& wy, const Step& x, const Vec& vlse) {
    Vec sum(acc_t(0));
    for (int q = 0; q < RV::kParts; ++q) {
      const Vec term = wy.v[q] * (vlse - x.v[q]);
      sum = sum + Vec::blendv(term, Vec(acc_t(0)), wy.v[q] == Vec(acc_t(0)));
    }
    return sum;
  }

  FUSEDLOSS_ROW_PASS void soft_ce(int64_t i, bool forward, const Buffers& buf) const {
    const int64_t C = pb.classes;
    const scalar_t* x = row(i);
    const scalar_t* y = probs_row(i);
    scalar_t* g = grad_row(i);
    acc_t* st = stats_row(i);
    acc_t* e = forward && g ? buf.e : nullptr;
    acc_t lse, S;
    if (forward) {
      lse = lse_pass<false, false>(x, -1, e, buf.shifts, g).lse();
      // S = (1 - eps) sum_k w_k y_k + (eps / C) W: the smoothing's part exact, not C sums of eps / C.
      Vec s(acc_t(0));
      for (int64_t j = 0; j < C; j += RV::kWidth) {
        const int64_t n = std::min(RV::kWidth, C - j);
        Step v = RV::pad(RV::load(y + j, n), n, acc_t(0));
        if (weight) {
          const Step w = RV::load_acc(weight + j, n);
          for (int q = 0; q < RV::kParts; ++q) v.v[q] = v.v[q] * w.v[q];
        }
        for (int q = 0; q < RV::kParts; ++q) s = s + v.v[q];
      }
      const acc_t eps = static_cast<acc_t>(pb.cfg.label_smoothing);
      S = RV::hsum(s);
      if (eps != acc_t(0)) S = (acc_t(1) - eps) * S + eps / acc_t(C) * static_cast<acc_t>(pb.weight_total);
      st[0] = lse;
      st[1] = S;
      st[2] = st[3] = acc_t(0);
    } else {
      lse = st[0];
      S = st[1];
    }
    const Vec vlse(lse);
    Vec loss(acc_t(0));
    if (!g) {  // forward without the gradient: the loss pass alone
      for (int64_t j = 0; j < C; j += RV::kWidth) {
        const int64_t n = std::min(RV::kWidth, C - j);
        loss = loss + loss_terms(smoothed_wy(y, j, n), RV::load(x + j, n), vlse);
      }
      static_cast<acc_t*>(pb.loss_rows)[i] = RV::hsum(loss);
      return;
    }
    const acc_t go = grad_out(i);
    const Vec vgo(go);
    if (e) {
      int64_t b_idx = 0;
      for_each_block<scalar_t>(C, [&](int64_t b, int64_t end) {
        // exp(shift_b - lse) <= 1: the block's shift is at most the row's max.
        const Vec f(std::exp(buf.shifts[b_idx++] - lse) * S * go);
        RV::write(g, b, end, stream, [&](int64_t j, int64_t n) {
          const Step wy = smoothed_wy(y, j, n);
          loss = loss + loss_terms(wy, RV::load(x + j, n), vlse);
          Step u = RV::load_acc(e + j, n);
          for (int q = 0; q < RV::kParts; ++q) u.v[q] = u.v[q] * f - wy.v[q] * vgo;
          return u;
        });
      });
      static_cast<acc_t*>(pb.loss_rows)[i] = RV::hsum(loss);
    } else {  // the backward op: one pass with the exp (vexp clamps a NaN: the scale carries it)
      const Vec scale(std::isnan(lse) ? lse : S * go);
      RV::write(g, 0, C, stream, [&](int64_t j, int64_t n) {
        RV::prefetch(x + j);
        Step u = RV::load(x + j, n);
        const Step wy = smoothed_wy(y, j, n);
        for (int q = 0; q < RV::kParts; ++q) u.v[q] = vexp(u.v[q] - vlse) * scale - wy.v[q] * vgo;
        return u;
      });
    }
  }

  // ------------------------------------------------------------------------
  // The expected loss sum_k m_k L(x, k) (docs/losses.md, "Soft targets"), every loss but the
  // soft ce above: class-probability targets, and label smoothing of loss != ce with class
  // indices or mixup's two (the uniform part of the target). The target mass is
  //   m_k = ay w_k y_k + u w_k + sum_t beta_t w_k [k == c_t]
  // (ay = 1 - eps and u = eps / C for probabilities y; for class indices ay = 0, u = eps / C
  // times the parts' coefficients, a spike (1 - eps) k_t at each target). Only the arg-max w can
  // have p_w > 1/2: every k != w is summed in the passes with log(1 - p_k) = log1p(-p_k), w and
  // the spikes are scalars (losses.h), log(1 - p_w) from the pass's P = sum_{k != w} p_k or, below
  // bce_sum_floor, lse_{k != w} - lse (bce's mechanism). Sums of the mass are formed as
  // ay sum w y + u sum w, so nothing sums C nearly equal eps / C values.
  //   pass 1 (forward): lse, w, the e_k
  //   pass 2 (cached): over k != w: sum m h (loss), A_w = sum m s, S_w = sum m, P; bce: R_w = sum a,
  //                    sum (m - S) log(1 - p); sum w y (S = its value plus w's term: the targets'
  //                    only DRAM read); with the gradient, m_j s_j into a thread buffer
  //   pass 3 (cached): g_j = p_j B1 + r_j B2 - m_j s_j (+ S a_j for bce), r_j = p_j / (1 - p_w),
  //                    m_j s_j from pass 2 (each element's h, s and transcendentals computed once);
  //                    w and the spikes stored after by their scalar forms
  // Stats: lse, S, log(1 - p_w), w.
  // ------------------------------------------------------------------------
  struct Mass {
    const scalar_t* y;  // probabilities, or nullptr
    acc_t ay, u;        // coefficients of w y and of w
    int64_t c[2];       // spikes (index, coefficient; -1: none)
    acc_t beta[2];
    acc_t z;            // z-loss coefficient: z sum_t k_t w_{c_t} (class indices)
  };

  struct LaneConsts {
    Vec alpha, beta, gamma, log1a, inv1a;
  };

  LaneConsts lane_consts() const {
    const acc_t alpha = static_cast<acc_t>(pb.cfg.alpha);
    return {Vec(alpha), Vec(static_cast<acc_t>(pb.cfg.beta)), Vec(static_cast<acc_t>(pb.cfg.gamma)),
            Vec(std::log1p(alpha)), Vec(acc_t(1) / (acc_t(1) + alpha))};
  }

  // x * y with x = 0 giving 0 whatever y is (p log p at p = 0, 0 mass times an infinite loss).
  static Vec zero_times(const Vec& x, const Vec& y) {
    return Vec::blendv(x * y, Vec(acc_t(0)), x == Vec(acc_t(0)));
  }

  // A lane's h (the loss of target k; bce: -log p) and s (dh_k/dx_j = s_k (p_j - [j == k])), and
  // bce's log(1 - p) and a = p / (1 - p), for p = p_k <= 1/2 and lp = log p_k = x_k - lse.
  template <int64_t V>
  static void lane_terms(const Vec& p, const Vec& lp, bool small, const LaneConsts& k, Vec& h, Vec& s, Vec& l1m,
                         Vec& a) {
    const Vec one(acc_t(1));
    if constexpr (V == kNLLR || V == kBCE) {
      l1m = log1m(p, small);
      a = odds(p, small);
      h = V == kBCE ? -lp : l1m - lp;
      s = one + a;
    } else if constexpr (V == kCRL) {
      const Vec t = p * k.inv1a;  // p / (1 + alpha) <= p: the same series bounds
      h = k.beta * (k.log1a + log1m(t, small)) - lp;
      s = one + k.beta * odds(t, small);
    } else if constexpr (V == kLACE) {
      const Vec q = one - p;
      h = -(q * lp);
      s = q - zero_times(p, lp);
    } else if constexpr (V == kFocal) {
      const Vec qg = vexp(k.gamma * log1m(p, small));  // (1 - p)^g
      h = -(qg * lp);
      // s = (1 - p)^g + g p (1 - p)^(g - 1) (-log p) = (1 - p)^g (1 - g a log p)
      s = qg * (one - k.gamma * zero_times(odds(p, small), lp));
    } else {  // kCE
      h = -lp;
      s = one;
    }
  }

  // The scalar h and log s of one class j from d_j = log(1 - p_j) - log p_j (losses.h).
  TargetOnlyTerms<acc_t> class_terms(acc_t d) const {
    const int64_t v = pb.cfg.variant == kBCE ? int64_t(kNLLR) : pb.cfg.variant;  // bce's s is nllr's
    return target_only_terms<acc_t>(v, d, static_cast<acc_t>(pb.cfg.alpha), static_cast<acc_t>(pb.cfg.beta),
                                    static_cast<acc_t>(pb.cfg.gamma));
  }

  struct ExpSums {
    acc_t ly = 0, lu = 0, ay = 0, au = 0, sy = 0, ty = 0, tu = 0, t = 0, r = 0, p = 0;
  };

  template <int64_t V>
  void expected_row(int64_t i, bool forward, const Buffers& buf, const Mass& mass) const {
    mass.y ? expected_row_t<V, true>(i, forward, buf, mass) : expected_row_t<V, false>(i, forward, buf, mass);
  }

  // Per vector: every lane below kSmall (or NaN), so odds and log1m may take their series.
  static bool small_lanes(const Vec& p) {
    constexpr int kAllLanes = (1 << RV::kLanes) - 1;
    return (p >= Vec(kSmall)).zero_mask() == kAllLanes;
  }

  // focal's gamma where (1 - p)^gamma is a product (an integer in [0, 4]), else -1.
  int focal_power() const {
    const double g = pb.cfg.gamma;
    return g >= 0 && g <= 4 && g == std::floor(g) ? static_cast<int>(g) : -1;
  }

  // (1 - p)^gamma for p <= 1/2: for an integer gamma in [0, 4] a product of 1 - p (exact in
  // float to its few roundings, no exp), else exp(gamma log(1 - p)).
  static Vec pow1m(const Vec& p, bool small, const LaneConsts& k, int ig) {
    const Vec q = Vec(acc_t(1)) - p;
    switch (ig) {
      case 0: return Vec(acc_t(1));
      case 1: return q;
      case 2: return q * q;
      case 3: return q * q * q;
      case 4: {
        const Vec q2 = q * q;
        return q2 * q2;
      }
      default: return vexp(k.gamma * log1m(p, small));
    }
  }

  // lane_terms, with focal's power as pow1m (ig: focal_power()).
  template <int64_t V>
  static void lane_terms_pow(const Vec& p, const Vec& lp, bool small, const LaneConsts& k, int ig, Vec& h, Vec& s,
                             Vec& l1m, Vec& a) {
    if constexpr (V == kFocal) {
      const Vec qg = pow1m(p, small, k, ig);
      h = -(qg * lp);
      s = qg * (Vec(acc_t(1)) - k.gamma * zero_times(odds(p, small), lp));
    } else {
      lane_terms<V>(p, lp, small, k, h, s, l1m, a);
    }
  }

  // Pass 2 over k != w: sums of h, s, 1, (bce) log(1 - p) weighted by w y (kY: probabilities)
  // and by w (only where the mass has a uniform part, u != 0), and of log(1 - p), a, p; and
  // m_j s_j into `ms_out` (0 at w and where m_j = 0; null: none), so pass 3 computes no h, s
  // (no transcendental) of its own. With `p_out` (the backward op, p from x) also p_j.
  //
  // The targets' first read (from memory) is prefetched ahead as pass 1 does the logits': at
  // ~20 vector instructions a line the loop otherwise stalls on each line of y (it was ~40% of
  // this pass at 4096 x 1000). s is finite for every p <= 1/2 (lane_terms), so m s is a plain
  // product; h is infinite only at a -inf logit, where m h must read 0 when m is 0: !kCareful
  // takes m h as one fused multiply-add and the caller reruns the pass with kCareful (the
  // zero_times blend) when the loss sum came out NaN, which such a lane always makes it.
  // kPlain: probabilities with no weights and no smoothing (m = y; the common case, and timm's
  // targets with their folded smoothing), a loop with no flag tests and no w vector.
  template <int64_t V, bool kY, bool kCareful, bool kPlain = false>
  FUSEDLOSS_ROW_PASS ExpSums expected_sums(const PSource& src, const scalar_t* y, int64_t w, const Mass& mass,
                                           acc_t* ms_out, acc_t* p_out) const {
    const LaneConsts kc = lane_consts();
    const int ig = V == kFocal ? focal_power() : -1;
    const Vec vlse(src.lse), zero(acc_t(0)), vay(mass.ay), vu(mass.u);
    static_assert(kY || !kPlain, "kPlain: probabilities");
    const bool with_u = !kPlain && mass.u != acc_t(0);
    const bool has_weight = !kPlain && weight != nullptr;
    // m_j = w_j y_j (probabilities, no smoothing): m_j s_j is the sum's own term.
    const bool plain = kPlain || (kY && !with_u && mass.ay == acc_t(1));
    // The w_j (0 at w and past n) for the terms that need them.
    const bool need_wv = with_u || has_weight || !plain;
    // m h + acc; with kCareful 0 where m is 0 (an infinite h at a -inf logit).
    const auto add_mh = [](const Vec& m, const Vec& h, const Vec& acc) {
      return kCareful ? acc + zero_times(m, h) : at::vec::fmadd(m, h, acc);
    };
    Vec ly(zero), lu(zero), ay(zero), au(zero), sy(zero), ty(zero), tu(zero), t(zero), r(zero), ps(zero);
    src.for_each(pb.classes, [&](Step p, int64_t j, int64_t n) {
      if constexpr (kY) RV::prefetch(y + j);
      if (p_out) RV::store_acc(p_out + j, n, p);
      const bool has_w = static_cast<uint64_t>(w - j) < static_cast<uint64_t>(n);
      if (has_w) p = RV::set_lane(p, w - j, acc_t(0));
      const Step xs = RV::load(src.x + j, n);
      Step wv;
      if (need_wv) {
        if (has_weight) {
          wv = RV::load_acc(weight + j, n);
        } else {
          for (int q = 0; q < RV::kParts; ++q) wv.v[q] = Vec(acc_t(1));
        }
        wv = RV::pad(wv, n, acc_t(0));
        if (has_w) wv = RV::set_lane(wv, w - j, acc_t(0));
      }
      // y (0 past n: loadu's contract) and, without weights, 0 at w: then w y is y itself.
      Step yv;
      if constexpr (kY) {
        yv = RV::load(y + j, n);
        if (has_w && !has_weight) yv = RV::set_lane(yv, w - j, acc_t(0));
      }
      Step msv;
      for (int q = 0; q < RV::kParts; ++q) {
        Vec h, s, l1m, a, ms;
        const Vec lp = xs.v[q] - vlse;
        lane_terms_pow<V>(p.v[q], lp, small_lanes(p.v[q]), kc, ig, h, s, l1m, a);
        if (with_u) {
          lu = add_mh(wv.v[q], h, lu);
          au = at::vec::fmadd(wv.v[q], s, au);
        }
        if constexpr (kY) {
          const Vec my = has_weight ? wv.v[q] * yv.v[q] : yv.v[q];
          const Vec mys = my * s;
          ly = add_mh(my, h, ly);
          ay = ay + mys;
          sy = sy + my;
          if constexpr (V == kBCE) ty = at::vec::fmadd(my, l1m, ty);
          if (plain) ms = mys;
        }
        if (!plain) {
          Vec m = vu;
          if constexpr (kY) m = at::vec::fmadd(vay, yv.v[q], vu);
          ms = (m * wv.v[q]) * s;
        }
        if constexpr (V == kBCE) {
          if (with_u) tu = at::vec::fmadd(wv.v[q], l1m, tu);
          t = t + l1m;
          r = r + a;
        }
        ps = ps + p.v[q];
        msv.v[q] = ms;
      }
      if (ms_out) RV::store_acc(ms_out + j, n, msv);
    });
    ExpSums e;
    e.ly = RV::hsum(ly), e.lu = RV::hsum(lu), e.ay = RV::hsum(ay), e.au = RV::hsum(au), e.sy = RV::hsum(sy);
    e.ty = RV::hsum(ty), e.tu = RV::hsum(tu), e.t = RV::hsum(t), e.r = RV::hsum(r), e.p = RV::hsum(ps);
    return e;
  }

  // Pass 3 from the cache: g_j = p_j B1 + r_j B2 - m_j s_j scale (+ S a_j for bce; a_j's series
  // or division, no transcendental); b1, b2 and s_go already times the scale. One step.
  template <int64_t V>
  Step expected_grad_step(Step p, const Step& ms, const scalar_t* x, int64_t j, int64_t n, bool ratio,
                          const Vec& vb1, const Vec& vb2, const Vec& vlex, const Vec& vscale, const Vec& vs) const {
    Step xs;
    if (ratio) xs = RV::load(x + j, n);
    for (int q = 0; q < RV::kParts; ++q) {
      Vec gq = p.v[q] * vb1 - ms.v[q] * vscale;
      if (ratio) gq = gq + vexp(xs.v[q] - vlex) * vb2;
      if constexpr (V == kBCE) gq = gq + vs * odds(p.v[q], small_lanes(p.v[q]));
      p.v[q] = gq;
    }
    return p;
  }

  // Pass 3: p_j from pass 1's e_j (src.e, the forward) or pass 2's p_j (p_in, the backward op).
  template <int64_t V>
  FUSEDLOSS_ROW_PASS void expected_grad_cached(const PSource& src, const acc_t* p_in, scalar_t* g, const acc_t* ms,
                                               acc_t b1, acc_t b2, acc_t lse_ex_w, acc_t scale, acc_t s_go) const {
    const bool ratio = b2 != acc_t(0);
    const Vec vb1(b1), vb2(b2), vlex(lse_ex_w), vscale(scale), vs(s_go);
    if (p_in) {
      RV::write(g, 0, pb.classes, stream, [&](int64_t j, int64_t n) {
        return expected_grad_step<V>(RV::load_acc(p_in + j, n), RV::load_acc(ms + j, n), src.x, j, n, ratio, vb1,
                                     vb2, vlex, vscale, vs);
      });
    } else {
      src.write(g, pb.classes, stream, [&](Step p, int64_t j, int64_t n) {
        return expected_grad_step<V>(p, RV::load_acc(ms + j, n), src.x, j, n, ratio, vb1, vb2, vlex, vscale, vs);
      });
    }
  }

  // The row (see the comment above Mass): pass 1 lse, w and the e_k; pass 2 every sum and
  // m_j s_j into a thread buffer; pass 3 the gradient from e_k (p_j) and that buffer. S's
  // sum of w y comes from pass 2 (its sum over k != w, plus w's term): the targets are read
  // there only.
  template <int64_t V, bool kY>
  void expected_row_t(int64_t i, bool forward, const Buffers& buf, const Mass& mass) const {
    const int64_t C = pb.classes;
    const scalar_t* x = row(i);
    const scalar_t* y = mass.y;
    scalar_t* g = grad_row(i);
    acc_t* st = stats_row(i);
    acc_t* e = forward ? buf.e : nullptr;
    const acc_t W = static_cast<acc_t>(pb.weight_total);
    acc_t lse, log1m_w = 0, S = 0;
    int64_t w;
    if (forward) {
      const auto acc = lse_pass<true, false>(x, -1, e, buf.shifts, g);
      lse = acc.lse();
      w = acc.argmax >= 0 ? acc.argmax : 0;
    } else {
      lse = st[0];
      S = st[1];
      log1m_w = st[2];
      w = static_cast<int64_t>(st[3]);
    }
    acc_t* ms = g ? thread_buffer<acc_t>(5, C) : nullptr;
    acc_t* p_buf = g && !forward ? buf.e : nullptr;
    const PSource src{x, e, buf.shifts, lse, -1, -1};
    const bool plain = kY && !weight && mass.u == acc_t(0) && mass.ay == acc_t(1);
    ExpSums sums = plain ? expected_sums<V, kY, false, kY>(src, y, w, mass, ms, p_buf)
                         : expected_sums<V, kY, false>(src, y, w, mass, ms, p_buf);
    // NaN loss terms: a -inf logit with no mass (0 times an infinite h), or a NaN row; the
    // loss again with 0 for m h where m is 0 (see expected_sums).
    if (forward && (std::isnan(sums.ly) || std::isnan(sums.lu))) sums = expected_sums<V, kY, true>(src, y, w, mass, ms, p_buf);
    const acc_t x_w = static_cast<acc_t>(x[w]);
    const acc_t w_w = weight_of(w);
    if (forward) {
      // S = ay sum_k w_k y_k + u W + sum_t beta_t w_{c_t}
      acc_t spikes = 0;
      for (int t = 0; t < 2; ++t) {
        if (mass.c[t] >= 0) spikes += mass.beta[t] * weight_of(mass.c[t]);
      }
      const acc_t wy = kY ? sums.sy + w_w * static_cast<acc_t>(y[w]) : acc_t(0);
      S = mass.ay * wy + mass.u * W + spikes;
      if (C == 1) {
        log1m_w = neg_inf<acc_t>();
      } else if (sums.p >= bce_sum_floor<acc_t>()) {
        log1m_w = std::log(sums.p);
      } else {
        log1m_w = bce_log1m_pw_exact(x, w, lse);
      }
    }
    // w's own numbers, and the mass at w.
    acc_t m_w = (kY ? mass.ay * static_cast<acc_t>(y[w]) : acc_t(0)) + mass.u;
    for (int t = 0; t < 2; ++t) {
      if (mass.c[t] == w) m_w += mass.beta[t];
    }
    m_w *= w_w;
    const acc_t d_w = (lse + log1m_w) - x_w;
    const auto tw = class_terms(d_w);
    // The spikes off w: their h, s (and bce's a, log(1 - p)), as a lane would have them.
    acc_t loss_spikes = 0, a_spikes = 0, s_spikes = 0, t_spikes = 0;
    for (int t = 0; t < 2; ++t) {
      const int64_t c = mass.c[t];
      if (c < 0 || c == w || mass.beta[t] == acc_t(0)) continue;
      const acc_t mc = mass.beta[t] * weight_of(c);
      const acc_t lp = static_cast<acc_t>(x[c]) - lse, pc = std::exp(lp), l1m = std::log1p(-pc);
      const auto tc = class_terms(l1m - lp);
      loss_spikes += mc * (V == kBCE ? -lp : tc.loss);
      a_spikes += mc * std::exp(tc.log_s);
      s_spikes += mc;
      t_spikes += mc * l1m;
    }
    const acc_t A_w = mass.ay * sums.ay + mass.u * sums.au + a_spikes;
    const acc_t S_w = mass.ay * sums.sy + mass.u * (W - w_w) + s_spikes;
    const acc_t z = mass.z;
    if (forward) {
      acc_t loss;
      if constexpr (V == kBCE) {
        // sum_k m_k (-log p_k) + sum_{k != w} (m_k - S) log(1 - p_k) - S_w log(1 - p_w): terms >= 0
        const acc_t ce = mass.ay * sums.ly + mass.u * sums.lu + loss_spikes + (m_w == 0 ? 0 : m_w * softplus(d_w));
        const acc_t rest = mass.ay * sums.ty + mass.u * sums.tu + t_spikes - S * sums.t;
        loss = ce + rest - (S_w == 0 ? acc_t(0) : S_w * log1m_w);
      } else {
        loss = mass.ay * sums.ly + mass.u * sums.lu + loss_spikes + (m_w == 0 ? acc_t(0) : m_w * tw.loss);
      }
      if (z != acc_t(0)) loss += z * lse * lse;
      static_cast<acc_t*>(pb.loss_rows)[i] = loss;
      st[0] = lse;
      st[1] = S;
      st[2] = log1m_w;
      st[3] = static_cast<acc_t>(w);
    }
    if (!g) return;
    const acc_t go = grad_out(i);
    const acc_t zt = z == acc_t(0) ? acc_t(0) : acc_t(2) * z * lse;
    // B1 multiplies p_j, B2 r_j = p_j / (1 - p_w) (both times go below).
    acc_t b1, b2;
    if constexpr (V == kBCE) {
      b1 = A_w - S * sums.r + S + zt;
      b2 = -S_w;
    } else {
      b1 = A_w + zt;
      b2 = m_w == acc_t(0) ? acc_t(0) : m_w * std::exp(tw.log_s + log1m_w);
    }
    // r_j from the e_k while they keep their precision (an e_k is not subnormal where r_j matters
    // while log(1 - p_w) > -60 in float); else its own exp from x.
    const bool ratio = b2 != acc_t(0) && log1m_w < (sizeof(acc_t) == 4 ? acc_t(-60) : acc_t(-600));
    const acc_t lse_ex_w = lse + log1m_w;
    acc_t b1_all = b1;
    if (!ratio && b2 != acc_t(0)) b1_all += b2 * std::exp(-log1m_w);
    acc_t scale = go;
    // vexp clamps a NaN argument: a NaN row reaches the output through the coefficients.
    if (std::isnan(lse) || std::isnan(log1m_w)) scale = std::numeric_limits<acc_t>::quiet_NaN();
    expected_grad_cached<V>(src, p_buf, g, ms, (ratio ? b1 : b1_all) * scale, ratio ? b2 * scale : acc_t(0),
                            lse_ex_w, scale, S * scale);
    // The stored entries: w, then the spikes off w.
    {
      const acc_t p_w = std::exp(x_w - lse);
      acc_t v;
      if constexpr (V == kBCE) {
        v = p_w * (A_w - S * sums.r + zt) + S_w - S * std::exp(log1m_w);
      } else {
        v = p_w * (A_w + zt) - (m_w == acc_t(0) ? acc_t(0) : m_w * std::exp(tw.log_s + log1m_w));
      }
      g[w] = static_cast<scalar_t>(v * scale);
    }
    for (int t = 0; t < 2; ++t) {
      const int64_t c = mass.c[t];
      if (c < 0 || c == w || (t == 1 && c == mass.c[0])) continue;
      const acc_t x_c = static_cast<acc_t>(x[c]);
      const acc_t lp = x_c - lse, pc = std::exp(lp), l1m = std::log1p(-pc);
      const auto tc = class_terms(l1m - lp);
      acc_t m_c = (kY ? mass.ay * static_cast<acc_t>(y[c]) : acc_t(0)) + mass.u;
      for (int k = 0; k < 2; ++k) {
        if (mass.c[k] == c) m_c += mass.beta[k];
      }
      m_c *= weight_of(c);
      const acc_t s_c = std::exp(tc.log_s);
      const acc_t r_c = std::exp(x_c - lse_ex_w);
      acc_t v = pc * b1 + r_c * b2 - (m_c == acc_t(0) ? acc_t(0) : m_c * s_c);
      if constexpr (V == kBCE) v += S * (pc / (acc_t(1) - pc));
      g[c] = static_cast<scalar_t>(v * scale);
    }
  }

  void expected_dispatch(int64_t i, bool forward, const Buffers& buf, const Mass& mass) const {
    switch (pb.cfg.variant) {
      case kBCE: return expected_row<kBCE>(i, forward, buf, mass);
      case kNLLR: return expected_row<kNLLR>(i, forward, buf, mass);
      case kCRL: return expected_row<kCRL>(i, forward, buf, mass);
      case kLACE: return expected_row<kLACE>(i, forward, buf, mass);
      case kFocal: return expected_row<kFocal>(i, forward, buf, mass);
      default: return expected_row<kCE>(i, forward, buf, mass);
    }
  }

  // The target mass of a row: probabilities, or class indices (one target, or mixup's two)
  // with label smoothing.
  Mass row_mass(int64_t i) const {
    const acc_t eps = static_cast<acc_t>(pb.cfg.label_smoothing);
    const acc_t u1 = eps / static_cast<acc_t>(pb.classes);
    const acc_t z = static_cast<acc_t>(pb.cfg.z_loss);
    if (pb.probs) return {probs_row(i), acc_t(1) - eps, u1, {-1, -1}, {0, 0}, acc_t(0)};
    const Parts t = pb.target_b ? two_targets(i) : one_target(i);
    Mass m{nullptr, acc_t(0), u1 * (t.k_a + t.k_b), {t.a, t.b}, {(acc_t(1) - eps) * t.k_a, (acc_t(1) - eps) * t.k_b},
           z * (t.k_a * weight_of(t.a) + t.k_b * weight_of(t.b))};
    if (t.a == t.b) {
      m.beta[0] += m.beta[1];
      m.c[1] = -1;
      m.beta[1] = 0;
    }
    return m;
  }

  void run(int64_t begin, int64_t end, Pass pass) const {
    if (pass == Pass::kBcePartial || pass == Pass::kBceGlobalBackward) {
      for (int64_t i = begin; i < end; ++i) {
        const bool ignored = pb.slice_idx[3 * i + 2] < 0;
        pb.cfg.softcap > 0 && !ignored ? capped_row(i, pass) : bce_given_global(i, pass);
      }
      return;
    }
    const bool forward = pass == Pass::kForward;
    const bool smooth = pb.cfg.label_smoothing > 0;
    // Label smoothing of a loss other than ce is the expected loss under the smoothed target.
    const bool expected = smooth && pb.cfg.variant != kCE;
    const bool target_only_family = !pb.probs && !pb.target_b && !(pb.cfg.softcap > 0) && !expected &&
                                    pb.cfg.variant != kBCE;
    if (target_only_family && pb.classes <= kGroupMaxClasses) {
      return smooth ? target_only_rows<true>(begin, end, forward) : target_only_rows<false>(begin, end, forward);
    }
    const Buffers buf = buffers();
    for (int64_t i = begin; i < end; ++i) {
      if (pb.probs) {
        pb.cfg.variant == kCE ? soft_ce(i, forward, buf) : expected_dispatch(i, forward, buf, row_mass(i));
      } else if (pb.target_b) {
        if (pb.target[i] == pb.cfg.ignore_index && pb.target_b[i] == pb.cfg.ignore_index) {
          ignore_row(i, forward);
        } else if (pb.cfg.softcap > 0) {
          capped_row(i, pass);
        } else if (expected) {
          expected_dispatch(i, forward, buf, row_mass(i));
        } else if (pb.cfg.variant == kBCE) {
          smooth ? bce<true>(i, forward, buf, two_targets(i)) : bce<false>(i, forward, buf, two_targets(i));
        } else {
          smooth ? mix_target_only<true>(i, forward, buf) : mix_target_only<false>(i, forward, buf);
        }
      } else if (pb.target[i] == pb.cfg.ignore_index) {
        ignore_row(i, forward);
      } else if (pb.cfg.softcap > 0) {
        capped_row(i, pass);
      } else if (expected) {
        expected_dispatch(i, forward, buf, row_mass(i));
      } else if (pb.cfg.variant == kBCE) {
        smooth ? bce<true>(i, forward, buf, one_target(i)) : bce<false>(i, forward, buf, one_target(i));
      } else if (smooth) {
        target_only<true>(i, forward, buf);
      } else {
        target_only<false>(i, forward, buf);
      }
    }
  }
};

// Gradients of at least this many bytes are written with streaming
// (non-temporal) stores: a plain store first reads the line it writes (1.5x the
// traffic of the write), and a gradient this large leaves the cache before its
// next reader comes anyway. Smaller ones are written with plain stores and stay
// in cache for the layer that reads them next. FUSEDLOSS_CPU_STREAM_BYTES
// overrides it (0: always stream; a huge value: never), e.g. for a CPU whose
// last-level cache is far from this one's; docs/cpu_kernel.md has the numbers.
constexpr int64_t kStreamGradBytes = int64_t(24) << 20;

int64_t stream_grad_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("FUSEDLOSS_CPU_STREAM_BYTES");
    return env && *env ? std::atoll(env) : kStreamGradBytes;
  }();
  return bytes;
}

template <typename scalar_t>
void run_rows(const RowsProblem& pb, Pass pass) {
  // Rows are independent; a task gets at least 32K elements (ATen's GRAIN_SIZE)
  // so a small problem stays on one thread instead of paying the fork for nothing.
  constexpr int64_t kGrainElements = 32768;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / pb.classes);
  const bool stream = pb.grad && pb.rows * pb.classes * int64_t(sizeof(scalar_t)) >= stream_grad_bytes();
  const Rows<scalar_t> rows(pb, stream);
  at::parallel_for(0, pb.rows, grain, [&](int64_t b, int64_t e) {
    rows.run(b, e, pass);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    // Streaming stores are weakly ordered: drain them before the task ends, so
    // whatever the caller does next with the gradient sees them.
    if (stream) _mm_sfence();
#endif
  });
}

void dispatch(const RowsProblem& pb, Pass pass) {
#if defined(__AVX512BF16__)
  // This object exists for its bfloat16 stores (vec_row.h); every other dtype
  // runs the AVX512 object's kernels.
  if (pb.dtype != c10::ScalarType::BFloat16) {
    const Kernels k = AVX512::kernels();
    switch (pass) {
      case Pass::kForward: return k.forward(pb);
      case Pass::kBackward: return k.backward(pb);
      case Pass::kBcePartial: return k.bce_partial(pb);
      case Pass::kBceGlobalBackward: return k.bce_global_backward(pb);
    }
  }
#endif
  switch (pb.dtype) {
    case c10::ScalarType::Float: return run_rows<float>(pb, pass);
    case c10::ScalarType::Double: return run_rows<double>(pb, pass);
    case c10::ScalarType::BFloat16: return run_rows<c10::BFloat16>(pb, pass);
    case c10::ScalarType::Half: return run_rows<c10::Half>(pb, pass);
    default: TORCH_CHECK(false, "fusedloss: unsupported logits dtype ", pb.dtype);
  }
}

void forward(const RowsProblem& pb) { dispatch(pb, Pass::kForward); }
void backward(const RowsProblem& pb) { dispatch(pb, Pass::kBackward); }
void bce_partial(const RowsProblem& pb) { dispatch(pb, Pass::kBcePartial); }
void bce_global_backward(const RowsProblem& pb) { dispatch(pb, Pass::kBceGlobalBackward); }

#define FUSEDLOSS_STR2(x) #x
#define FUSEDLOSS_STR(x) FUSEDLOSS_STR2(x)

}  // namespace

Kernels kernels() {
  return {&forward, &backward, &bce_partial, &bce_global_backward, FUSEDLOSS_STR(CPU_CAPABILITY)};
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
