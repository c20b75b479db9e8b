// Fused row kernels of the distillation op (fusedloss::ext_distill; contract:
// python/fusedloss/distill/ops.py). Compiled once per CPU capability by setup.py, as
// kernels.cpp is (same flags, same vec_row.h machinery); ops_cpu_distill.cpp picks one.
//
// With z = x / T, P = softmax(z_t) (teacher), Q = softmax(z_s) (student), per row:
//   pass 1 (the rows' only DRAM read): in blocks of kBlock classes, each row's online max and
//     sum exp(z - shift) (vec_row.h's scheme: exps against the running shift, a block redone
//     from L1 only when its max jumps kSlack above it), e = exp(z - shift_b) kept in a
//     per-thread row, and for kl / reverse kl the divergence as one more online sum in the
//     same pass:  KL(P || Q) = sum_j P_j (z_t_j - z_s_j) - lse_t + lse_s, the sum accumulated
//     as sum_j e_t_j (x_t_j - x_s_j) / T with the same rescaling as sum_j e_t_j (0 where
//     e_t_j = 0); reverse kl the same with the rows' roles swapped. Both rows' blocks are read in
//     one loop (pair_pass: each step's teacher and student vectors loaded and widened once,
//     z - shift formed as one fused multiply-add x (1/T) - shift); a block one row must redo is
//     redone for that row alone. On AVX-512 float math a side whose max nothing else needs (the
//     teacher's, and the student's in kl) is not tracked: its block's exp sum tells when the
//     block must be redone (kMaxFree).
//   reverse kl, pass 2 (cached, with grad only): sum Q d / sum Q, d_j = c_j - c_m, c = z_s - z_t,
//     about the student's arg-max m (tracked in pass 1);
//   jsd, pass 2 (cached): P_j, Q_j from the kept e, M_j = b P_j + (1 - b) Q_j, u_j = log Q_j -
//     log M_j (log Q_j = (z_s_j - shift) - log sum, in log space), the divergence's two sums, and
//     sum Q (u - u_m) / sum Q; u_j kept in place of e_t.
//   gradient pass (cached rows, one write of the gradient row):
//     kl:          T rs (Q_j - P_j)                               from the kept e, no exp
//     reverse kl:  T rs Q_j (d_j - sum Q d / sum Q)
//     jsd:         T (1 - b) rs Q_j ((u_j - u_m) - sum Q (u - u_m) / sum Q)
//   The means about the pivot m (rather than c_j - E_Q[c]) keep the gradient's relative precision
//   at a dominant class (a student leading by 30 or 100), where E_Q[c] ~ c_m and the true
//   difference is ~exp(-lead); dividing by the computed sum Q makes a constant c give 0 exactly.
//   0 log 0 terms are 0: every term is masked where its probability is 0 (a -inf logit).
// A row with row_scale 0 writes zeros (accumulate=False) or leaves its gradient row alone.
#include "distill_kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "vec_row.h"

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

// exp(v) for the row passes, valid for v <= kSlack (30): every exp a kept block sum holds
// (a first read's block whose max lies further above its shift is redone against that max,
// and its first-read exps are thrown away). On AVX-512 float: vec_row.h's vexp_avx512 without
// its clamp of v to [ln(FLT_MIN), ln(FLT_MAX)] (its core, vexp_avx512_core, on v itself under
// its mask, vexp_keep_avx512): the same bits for every lane it keeps (v >=
// ln(FLT_MIN), and NaN), 0 for the rest (the zero-masked vscalefps); eleven instructions where
// vexp_avx512 has thirteen. A lane above ln(FLT_MAX) (only in a block then redone) may come
// out inf or NaN. Elsewhere: vexp.
template <typename Vec>
inline Vec vexp_row(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    const __m512 x = v;
    return Vec(vexp_avx512_core(x, vexp_keep_avx512(x)));
  }
#endif
  return vexp(v);
}

// cross + e d where e = vexp_row(v) is not 0, cross where it is (a 0 probability's 0 log 0
// term, even where d is inf or NaN). On AVX-512 float: one fused multiply-add under vexp_row's
// own mask (e is 0 exactly where v < ln(FLT_MIN): the compare is the exp's, which the compiler
// shares), where a product, Vec::blendv of a compared vector and an add cost six.
template <typename Vec>
inline Vec cross_add(const Vec& cross, const Vec& e, const Vec& d, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    return Vec(_mm512_mask3_fmadd_ps(e, d, cross, vexp_keep_avx512(v)));
  }
#endif
  using T = typename Vec::value_type;
  return cross + Vec::blendv(e * d, Vec(T(0)), e == Vec(T(0)));
}

// Per-thread rows kept between calls: slots 0, 1 the student's and the teacher's e (the
// teacher's then jsd's u), slots 2, 3 their block shifts, slot 4 the student's block sums (kl).
template <typename T>
T* distill_buffer(int slot, size_t n) {
  thread_local std::vector<T> buffers[5];
  auto& v = buffers[slot];
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Gradients of at least this many bytes go out with streaming stores: kernels.cpp's rule and
// its override, FUSEDLOSS_CPU_STREAM_BYTES (docs/cpu_kernel.md).
int64_t stream_grad_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("FUSEDLOSS_CPU_STREAM_BYTES");
    return env && *env ? std::atoll(env) : int64_t(24) << 20;
  }();
  return bytes;
}

template <typename scalar_t>
struct DistillRows {
  using RV = RowVec<scalar_t>;
  using acc_t = typename RV::acc_t;
  using Vec = typename RV::Vec;
  using Step = typename RV::Step;
  // As OnlineLse's: a block's exps against a shift at most kSlack below its elements.
  static constexpr acc_t kSlack = 30;
  // Whether a side's first read may go without its running max (AVX-512 float math, where
  // vexp_row keeps NaN): its block is then judged by its exp sum instead. Every e is at most
  // the block's sum, so a sum <= e^kSlack means every z lies at most kSlack above the shift
  // (the max's test); a larger sum (an element above it, inf, NaN: vexp_row gives inf or NaN
  // for those lanes) has the block redone against its max, found then by a scan from L1. A
  // large sum from many elements just below the bound is redone too, needlessly but exactly.
  // Elsewhere exp_u20 clamps NaN, which only the max then carries: both sides keep it.
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kMaxFree = std::is_same_v<acc_t, float>;
#else
  static constexpr bool kMaxFree = false;
#endif

  const DistillProblem& pb;
  bool stream;
  acc_t temperature, inv_t, beta, sum_bound;

  DistillRows(const DistillProblem& p, bool stream_grad)
      : pb(p),
        stream(stream_grad),
        temperature(static_cast<acc_t>(p.temperature)),
        inv_t(static_cast<acc_t>(1.0 / p.temperature)),
        beta(static_cast<acc_t>(p.jsd_beta)),
        sum_bound(std::exp(kSlack)) {}

  // z - shift = x / T - shift for every pass that forms e = exp(z - shift): one fused
  // multiply-add (x inv_t - shift rounded once), nshift = -shift.
  static Vec z_minus(const Vec& x, const Vec& vinv, const Vec& nshift) { return at::vec::fmadd(x, vinv, nshift); }

  // One row's online statistics at temperature T: lane sums of exp(z - shift) and of
  // exp(z - shift) (x - x_other) (the cross sum in logit units, 0 where the exp is 0; times
  // 1/T at the end).
  struct Side {
    acc_t shift = kNegInf<acc_t>;
    acc_t max = kNegInf<acc_t>;
    int64_t argmax = 0;  // the first index of max (tracked on request)
    Vec sum = Vec(acc_t(0));
    Vec cross = Vec(acc_t(0));
    // lse = shift + log_sum, kept in two parts: z - lse is formed as (z - shift) - log_sum, so
    // the probabilities sum to 1 within a few ulps even where |lse| is large (shift + log_sum
    // rounded to one float is off by up to |lse| ulps, which every exp(z - lse) would inherit).
    acc_t log_sum() const { return std::log(RV::hsum(sum)); }
    acc_t lse() const { return shift == kNegInf<acc_t> ? shift : shift + log_sum(); }
  };
  struct Sums {
    Vec sum, cross;
  };
  struct Buffers {
    acc_t *e_s, *e_t, *shift_s, *shift_t, *sum_s;
  };
  Buffers buffers() const {
    const size_t blocks = static_cast<size_t>(pb.classes / kBlock<scalar_t> + 2);
    return {distill_buffer<acc_t>(0, pb.classes), distill_buffer<acc_t>(1, pb.classes),
            distill_buffer<acc_t>(2, blocks), distill_buffer<acc_t>(3, blocks), distill_buffer<acc_t>(4, blocks)};
  }

  // x[b, e) against `shift` (in z units), from L1 (a block redone, one row): the lane sums of
  // e = exp(z - shift), and with kCross of e (x - y) (0 where e = 0); e stored at e_out[b, e)
  // when given.
  template <bool kCross>
  FUSEDLOSS_ROW_PASS Sums block_pass(const scalar_t* x, const scalar_t* y, int64_t b, int64_t e, acc_t shift,
                                     acc_t* e_out) const {
    const Vec nshift(-shift), vinv(inv_t);
    Vec acc(acc_t(0)), cross(acc_t(0));
    RV::for_each(x, b, e, [&](Step s, int64_t i, int64_t n) {
      Step o;
      if constexpr (kCross) o = RV::load(y + i, n);
      s = RV::pad(s, n, kNegInf<acc_t>);
      for (int k = 0; k < RV::kParts; ++k) {
        const Vec v = z_minus(s.v[k], vinv, nshift), ex = vexp_row(v);
        acc = acc + ex;
        if constexpr (kCross) cross = cross_add(cross, ex, s.v[k] - o.v[k], v);
        s.v[k] = ex;
      }
      if (e_out) RV::store_acc(e_out + i, n, s);
    });
    return {acc, cross};
  }

  // A full step of x (kWidth elements) in the math type: RV::load's values. bfloat16 on
  // AVX-512: each half widened straight from memory (vpmovzxwd with a memory operand, a shift),
  // without ATen's 64-byte load and 256-bit extract.
  static Step load_step(const scalar_t* x) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      Step r;
      for (int k = 0; k < RV::kParts; ++k) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k * RV::kLanes));
        r.v[k] = Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
      return r;
    }
#endif
    return RV::load(x, RV::kWidth);
  }

  // Both rows' first read of [b, e) (from memory: prefetched ahead), each against its own
  // shift: with kMaxT / kMaxS the lane maxima of x_t / x_s (logit units; the max of z is the
  // max of x times 1/T, rounding being monotonic), the lane sums of e_t = exp(z_t - shift_t) and
  // e_s = exp(z_s - shift_s), e_t and e_s stored when et_out / es_out are given, and the cross
  // sums: kCrossT (kl) sum e_t (x_t - x_s), kCrossS (reverse kl) sum e_s (x_s - x_t), each 0
  // where its e is 0. g_ahead's lines are asked for writing.
  template <bool kCrossT, bool kCrossS, bool kMaxT, bool kMaxS>
  FUSEDLOSS_ROW_PASS void pair_pass(const scalar_t* t, const scalar_t* s, int64_t b, int64_t e, acc_t shift_t,
                                    acc_t shift_s, Vec& vmax_t, Vec& vmax_s, Sums& rt, Sums& rs, acc_t* et_out,
                                    acc_t* es_out, const scalar_t* g_ahead) const {
    const Vec nsh_t(-shift_t), nsh_s(-shift_s), vinv(inv_t);
    Vec acc_t_(acc_t(0)), acc_s(acc_t(0)), cross_t(acc_t(0)), cross_s(acc_t(0));
    auto step = [&](Step xt, Step xs, int64_t i, int64_t n) {
      xt = RV::pad(xt, n, kNegInf<acc_t>);
      xs = RV::pad(xs, n, kNegInf<acc_t>);
      for (int k = 0; k < RV::kParts; ++k) {
        if constexpr (kMaxT) vmax_t = vmax_first_read(vmax_t, xt.v[k]);
        if constexpr (kMaxS) vmax_s = vmax_first_read(vmax_s, xs.v[k]);
        const Vec vt = z_minus(xt.v[k], vinv, nsh_t), vs = z_minus(xs.v[k], vinv, nsh_s);
        const Vec et = vexp_row(vt), es = vexp_row(vs);
        acc_t_ = acc_t_ + et;
        acc_s = acc_s + es;
        if constexpr (kCrossT) cross_t = cross_add(cross_t, et, xt.v[k] - xs.v[k], vt);
        if constexpr (kCrossS) cross_s = cross_add(cross_s, es, xs.v[k] - xt.v[k], vs);
        xt.v[k] = et;
        xs.v[k] = es;
      }
      if (et_out) RV::store_acc(et_out + i, n, xt);
      if (es_out) RV::store_acc(es_out + i, n, xs);
    };
    int64_t i = b;
    for (; i + RV::kWidth <= e; i += RV::kWidth) {
      // One prefetch per 64-byte line of each row (a step is 64 bytes on AVX-512, 32 on AVX2).
      RV::prefetch(t + i);
      RV::prefetch(s + i);
#if defined(__GNUC__)
      if (g_ahead) __builtin_prefetch(g_ahead + i, 1, 3);
#endif
      step(load_step(t + i), load_step(s + i), i, RV::kWidth);
    }
    if (i < e) step(RV::load(t + i, e - i), RV::load(s + i, e - i), i, e - i);
    rt = {acc_t_, cross_t};
    rs = {acc_s, cross_s};
  }

  // The shift a side's block is first read against: the running shift, or on the side's first
  // block (nothing finite yet) its first element (0 if not finite).
  acc_t first_shift(const Side& sd, const scalar_t* x, int64_t b) const {
    if (sd.shift != kNegInf<acc_t>) return sd.shift;
    const acc_t z0 = static_cast<acc_t>(x[b]) * inv_t;
    return std::isfinite(z0) ? z0 : acc_t(0);
  }

  // The largest z of x[b, e) (NaN lanes as vmax_first_read treats them), from L1: a block
  // whose first read took no max and must be redone.
  acc_t block_max(const scalar_t* x, int64_t b, int64_t e) const {
    Vec vm(kNegInf<acc_t>);
    RV::for_each(x, b, e, [&](Step s, int64_t, int64_t n) {
      s = RV::pad(s, n, kNegInf<acc_t>);
      for (int k = 0; k < RV::kParts; ++k) vm = vmax_first_read(vm, s.v[k]);
    });
    return RV::hmax(vm) * inv_t;
  }

  // Adds a block read by pair_pass against block_shift (its sums r, and its lane maxima of x
  // when vmax is given) to the side's statistics (OnlineLse::add_block's scheme: the block
  // redone against its max when that max lies more than kSlack above the shift, or on the
  // side's first block as far below it; without vmax, when its sum says so: kMaxFree); returns
  // the block's shift. The running max (and argmax) is kept only with vmax. With block_sum: the
  // sum of the block's e (against the returned shift) stored there.
  template <bool kCross>
  acc_t add_block(Side& sd, const scalar_t* x, const scalar_t* y, int64_t b, int64_t e, acc_t block_shift, Sums r,
                  const Vec* vmax, acc_t* e_out, bool track_argmax = false, acc_t* block_sum = nullptr) const {
    const bool first = sd.shift == kNegInf<acc_t>;
    acc_t bmax = kNegInf<acc_t>;
    bool redo;
    if (block_sum) *block_sum = acc_t(0);
    if (vmax) {
      bmax = RV::hmax(*vmax) * inv_t;
      if (bmax == kNegInf<acc_t>) return block_shift;  // only -inf: every e is 0
      redo = !(bmax <= block_shift + kSlack) || (first && bmax < block_shift - kSlack);
    } else {
      // A first block against its own first element (finite) holds an e of ~1: a sum below
      // 1/2 means a first element that was not finite (shift 0), the max maybe far below.
      const acc_t hs = RV::hsum(r.sum);
      redo = !(hs <= sum_bound) || (first && !(hs >= acc_t(0.5)));
      if (redo) {
        bmax = block_max(x, b, e);
        if (bmax == kNegInf<acc_t>) return block_shift;
      }
    }
    if (redo) {
      block_shift = bmax;
      r = block_pass<kCross>(x, y, b, e, block_shift, e_out);
    }
    if (block_sum) *block_sum = RV::hsum(r.sum);
    if (vmax && !(bmax <= sd.max)) {  // a new max (or NaN)
      sd.max = bmax;
      if (track_argmax) sd.argmax = first_index_of(x, b, e, bmax);
    }
    if (first) {
      sd.sum = r.sum;
      sd.cross = r.cross;
      sd.shift = block_shift;
    } else if (block_shift > sd.shift) {
      const Vec f(std::exp(sd.shift - block_shift));
      sd.sum = sd.sum * f + r.sum;
      sd.cross = sd.cross * f + r.cross;
      sd.shift = block_shift;
    } else if (block_shift == sd.shift) {
      sd.sum = sd.sum + r.sum;
      sd.cross = sd.cross + r.cross;
    } else {  // below the shift, or NaN (which poisons the sums for good)
      const Vec f(std::exp(block_shift - sd.shift));
      sd.sum = sd.sum + r.sum * f;
      sd.cross = sd.cross + r.cross * f;
    }
    return block_shift;
  }

  // The first j in [b, e) with x_j / T == value (the same product the vector pass formed);
  // only when a block raises the row's max (the student's, for the reverse kl / jsd pivot):
  // every row's first block, then a handful of times. A vector scan of the block just read
  // (OnlineLse::first_index_of's, on the products); b when none (a NaN max).
  int64_t first_index_of(const scalar_t* x, int64_t b, int64_t e, acc_t value) const {
    const Vec target(value), vinv(inv_t);
    int64_t j = b;
    for (; j + RV::kWidth <= e; j += RV::kWidth) {
      const Step s = load_step(x + j);
      for (int k = 0; k < RV::kParts; ++k) {
        // zero_mask: a bit per lane where (z != value) is false, i.e. z == value.
        const int hit = (s.v[k] * vinv != target).zero_mask();
        if (hit) return j + k * RV::kLanes + __builtin_ctz(static_cast<unsigned>(hit));
      }
    }
    for (; j < e; ++j) {
      if (static_cast<acc_t>(x[j]) * inv_t == value) return j;
    }
    return b;
  }

  // Adds `add` (the step about to be stored) to the gradient row's current values when accumulating.
  Step accumulated(Step u, const scalar_t* g, int64_t j, int64_t n) const {
    if (pb.accumulate) {
      const Step old = RV::load(g + j, n);
      for (int k = 0; k < RV::kParts; ++k) u.v[k] = u.v[k] + old.v[k];
    }
    return u;
  }

  FUSEDLOSS_ROW_PASS void row(int64_t i, const Buffers& buf) const {
    const int64_t C = pb.classes;
    const scalar_t* s = static_cast<const scalar_t*>(pb.student) + i * pb.student_stride;
    const scalar_t* t = static_cast<const scalar_t*>(pb.teacher) + i * pb.teacher_stride;
    const acc_t rs = static_cast<const acc_t*>(pb.row_scale)[i];
    scalar_t* g = pb.grad ? static_cast<scalar_t*>(pb.grad) + i * pb.grad_stride : nullptr;
    const bool kl = pb.divergence == kDistillKL, rkl = pb.divergence == kDistillReverseKL;
    const bool jsd = !kl && !rkl;
    const bool write = g && rs != acc_t(0);
    if (g && !write && !pb.accumulate) std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * C);
    acc_t* e_s = write || jsd ? buf.e_s : nullptr;
    acc_t* e_t = (write && kl) || jsd ? buf.e_t : nullptr;
    const scalar_t* g_ahead = write && !stream ? g : nullptr;

    // Pass 1: both rows' block in one loop (pair_pass), then each row's bookkeeping.
    Side st, ss;
    // The student's arg-max m is the pivot of the reverse kl / jsd gradients (below).
    const bool pivot = write && !kl;
    int64_t b_idx = 0;
    // The teacher's max is needed only for its blocks' shifts, the student's also for the pivot
    // (reverse kl, jsd): with kMaxFree, the sums stand in for the first (kMax* false, vmax null).
    constexpr bool kMax = !kMaxFree;
    const Vec* no_max = nullptr;
    for_each_block<scalar_t>(C, [&](int64_t b, int64_t e) {
      const acc_t sh_t = first_shift(st, t, b), sh_s = first_shift(ss, s, b);
      Vec vmax_t(kNegInf<acc_t>), vmax_s(kNegInf<acc_t>);
      const Vec* mt = kMax ? &vmax_t : no_max;
      Sums rt, rs_;
      if (kl) {
        pair_pass<true, false, kMax, kMax>(t, s, b, e, sh_t, sh_s, vmax_t, vmax_s, rt, rs_, e_t, e_s, g_ahead);
        buf.shift_t[b_idx] = add_block<true>(st, t, s, b, e, sh_t, rt, mt, e_t);
        buf.shift_s[b_idx] = add_block<false>(ss, s, t, b, e, sh_s, rs_, kMax ? &vmax_s : no_max, e_s, false,
                                              write ? &buf.sum_s[b_idx] : nullptr);
      } else if (rkl) {
        pair_pass<false, true, kMax, true>(t, s, b, e, sh_t, sh_s, vmax_t, vmax_s, rt, rs_, e_t, e_s, g_ahead);
        buf.shift_t[b_idx] = add_block<false>(st, t, s, b, e, sh_t, rt, mt, e_t);
        buf.shift_s[b_idx] = add_block<true>(ss, s, t, b, e, sh_s, rs_, &vmax_s, e_s, pivot);
      } else {
        pair_pass<false, false, kMax, true>(t, s, b, e, sh_t, sh_s, vmax_t, vmax_s, rt, rs_, e_t, e_s, g_ahead);
        buf.shift_t[b_idx] = add_block<false>(st, t, s, b, e, sh_t, rt, mt, e_t);
        buf.shift_s[b_idx] = add_block<false>(ss, s, t, b, e, sh_s, rs_, &vmax_s, e_s, pivot);
      }
      ++b_idx;
    });
    const acc_t ls_s = ss.log_sum(), ls_t = st.log_sum();
    // lse_t - lse_s, for the divergences' constants.
    const acc_t dlse = (st.shift - ss.shift) + (ls_t - ls_s);
    const acc_t t2 = temperature * temperature;
    auto* out = static_cast<acc_t*>(pb.out);
    const Vec zero(acc_t(0)), vinv(inv_t);
    // exp(z - lse) of the kept e of block b_idx: e * this.
    auto factor_s = [&](int64_t bi) { return std::exp((buf.shift_s[bi] - ss.shift) - ls_s); };
    auto factor_t = [&](int64_t bi) { return std::exp((buf.shift_t[bi] - st.shift) - ls_t); };
    const int64_t m = ss.argmax;
    const int64_t m_block = m / kBlock<scalar_t>;

    if (kl) {
      out[i] = t2 * (inv_t * RV::hsum(st.cross) / RV::hsum(st.sum) - dlse);
      if (!write) return;
      const acc_t c = temperature * rs;
      // At a class m holding over half of the student's mass (Q_m > 1/2), Q_m - P_m is a
      // difference of two numbers near 1 when the teacher is confident on m too (both lead by
      // 30 or 100: the true gradient ~e^-lead, the plain difference rounding noise). There it is
      // (1 - P_m) - (1 - Q_m) = -sum_{k != m} (Q_k - P_k): minus the sum of the row's other
      // entries, as the reference op forms it (distill/ops.py). m is found from pass 1's block
      // sums (a block holding over half of the mass, then its largest e): no work per element
      // in a row without such a class. In one with it, e at m is zeroed for the pass (its
      // entry written 0, or left as it was), which sums the other entries; m is written after.
      int64_t dom = -1;
      acc_t old_m = acc_t(0);
      for (int64_t bi = 0, b = 0; b < C; ++bi, b += kBlock<scalar_t>) {
        const acc_t f = factor_s(bi);
        if (!(buf.sum_s[bi] * f > acc_t(0.5))) continue;
        const int64_t e = std::min(C, b + kBlock<scalar_t>);
        int64_t j = b;
        for (int64_t k = b + 1; k < e; ++k) j = e_s[k] > e_s[j] ? k : j;
        if (e_s[j] * f > acc_t(0.5)) dom = j;
        break;
      }
      if (dom >= 0) {
        e_s[dom] = e_t[dom] = acc_t(0);
        if (pb.accumulate) old_m = static_cast<acc_t>(g[dom]);
      }
      Vec others(acc_t(0));
      b_idx = 0;
      for_each_block<scalar_t>(C, [&](int64_t b, int64_t e) {  // T rs (Q - P)
        const Vec fs(c * factor_s(b_idx)), ft(c * factor_t(b_idx));
        ++b_idx;
        if (dom >= 0) {
          RV::write(g, b, e, stream, [&](int64_t j, int64_t n) {
            const Step q = RV::load_acc(e_s + j, n), pp = RV::load_acc(e_t + j, n);
            Step u;
            for (int k = 0; k < RV::kParts; ++k) {
              u.v[k] = q.v[k] * fs - pp.v[k] * ft;
              others = others + u.v[k];  // lanes past n: 0
            }
            return accumulated(u, g, j, n);
          });
          return;
        }
        RV::write(g, b, e, stream, [&](int64_t j, int64_t n) {
          const Step q = RV::load_acc(e_s + j, n), pp = RV::load_acc(e_t + j, n);
          Step u;
          for (int k = 0; k < RV::kParts; ++k) u.v[k] = q.v[k] * fs - pp.v[k] * ft;
          return accumulated(u, g, j, n);
        });
      });
      if (dom >= 0) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
        if (stream) _mm_sfence();  // the row's streaming stores ordered before this plain one
#endif
        g[dom] = static_cast<scalar_t>(old_m - RV::hsum(others));
      }
      return;
    }

    if (rkl) {
      out[i] = t2 * (inv_t * RV::hsum(ss.cross) / RV::hsum(ss.sum) + dlse);
      if (!write) return;
      // g_j = T rs Q_j (c_j - E_Q[c]), c = z_s - z_t (the lse's cancel: sum Q = 1), formed about
      // the pivot m: d_j = (z_s_j - z_s_m) - (z_t_j - z_t_m), E_Q[d] = sum Q d / sum Q, so the
      // gradient at a dominant class m (where E_Q[c] ~ c_m) keeps its relative precision.
      const Vec zs_m(static_cast<acc_t>(s[m]) * inv_t), zt_m(static_cast<acc_t>(t[m]) * inv_t);
      auto d_of = [&](const Step& xs, const Step& xt, int k) {
        return (xs.v[k] * vinv - zs_m) - (xt.v[k] * vinv - zt_m);
      };
      Vec qd(acc_t(0)), qs(acc_t(0));
      b_idx = 0;
      for_each_block<scalar_t>(C, [&](int64_t b, int64_t e) {
        const Vec fs(factor_s(b_idx++));
        RV::for_each(s, b, e, [&](Step xs, int64_t j, int64_t n) {
          const Step q = RV::load_acc(e_s + j, n), xt = RV::load(t + j, n);
          for (int k = 0; k < RV::kParts; ++k) {
            const Vec qk = q.v[k] * fs;
            qd = qd + Vec::blendv(qk * d_of(xs, xt, k), zero, qk == zero);
            qs = qs + qk;
          }
        });
      });
      const Vec mean_d(RV::hsum(qd) / RV::hsum(qs)), vc(temperature * rs);
      b_idx = 0;
      for_each_block<scalar_t>(C, [&](int64_t b, int64_t e) {
        const Vec fs(factor_s(b_idx++));
        RV::write(g, b, e, stream, [&](int64_t j, int64_t n) {
          const Step q = RV::load_acc(e_s + j, n), xs = RV::load(s + j, n), xt = RV::load(t + j, n);
          Step u;
          for (int k = 0; k < RV::kParts; ++k) {
            const Vec qk = q.v[k] * fs;
            u.v[k] = Vec::blendv(vc * qk * (d_of(xs, xt, k) - mean_d), zero, qk == zero);
          }
          return accumulated(u, g, j, n);
        });
      });
      return;
    }

    // jsd, pass 2 (cached): P_j, Q_j, log M_j = log(b P_j + (1 - b) Q_j), u_j = log Q_j - log M_j;
    // sum P (log P - log M) and sum Q u (the divergence), and about the pivot m (as reverse kl's)
    // sum Q (u - u_m) / sum Q for the gradient. A class where M underflows to 0 (P and Q both
    // below ~1e-38) adds nothing. u kept in e_t (u_m where M = 0) for the gradient pass.
    const Vec vb(beta), vb1(acc_t(1) - beta), nsh_s(-ss.shift), nsh_t(-st.shift), vls_s(ls_s), vls_t(ls_t);
    struct Terms {
      Vec q, m, u, lp_minus_lm, p;
    };
    auto terms = [&](const Vec& es, const Vec& et, const Vec& fs, const Vec& ft, const Vec& xs, const Vec& xt) {
      Terms r;
      r.q = es * fs;
      r.p = et * ft;
      r.m = vb * r.p + vb1 * r.q;
      const Vec lm = r.m.log();
      r.u = (z_minus(xs, vinv, nsh_s) - vls_s) - lm;
      r.lp_minus_lm = (z_minus(xt, vinv, nsh_t) - vls_t) - lm;
      return r;
    };
    // u_m by the same vector arithmetic as the pass (so u_m - u_m is 0 exactly at m).
    Vec u_m(acc_t(0));
    if (write) {
      u_m = terms(Vec(e_s[m]), Vec(e_t[m]), Vec(factor_s(m_block)), Vec(factor_t(m_block)),
                  Vec(static_cast<acc_t>(s[m])), Vec(static_cast<acc_t>(t[m]))).u;
    }
    Vec dp(acc_t(0)), squ(acc_t(0)), qdu(acc_t(0)), qs(acc_t(0));
    b_idx = 0;
    for_each_block<scalar_t>(C, [&](int64_t b, int64_t e) {
      const Vec fs(factor_s(b_idx)), ft(factor_t(b_idx));
      ++b_idx;
      RV::for_each(s, b, e, [&](Step xs, int64_t j, int64_t n) {
        const Step q = RV::load_acc(e_s + j, n), pp = RV::load_acc(e_t + j, n), xt = RV::load(t + j, n);
        Step u;
        for (int k = 0; k < RV::kParts; ++k) {
          const Terms r = terms(q.v[k], pp.v[k], fs, ft, xs.v[k], xt.v[k]);
          // Padded lanes (past n) load 0 e: masked like any zero probability.
          const Vec m0 = r.m == zero;
          dp = dp + Vec::blendv(Vec::blendv(r.p * r.lp_minus_lm, zero, r.p == zero), zero, m0);
          const Vec qz = r.q == zero;
          squ = squ + Vec::blendv(Vec::blendv(r.q * r.u, zero, qz), zero, m0);
          u.v[k] = Vec::blendv(r.u, u_m, m0);
          qdu = qdu + Vec::blendv(r.q * (u.v[k] - u_m), zero, qz);
          qs = qs + r.q;
        }
        if (write) RV::store_acc(e_t + j, n, u);
      });
    });
    out[i] = t2 * (beta * RV::hsum(dp) + (acc_t(1) - beta) * RV::hsum(squ));
    if (!write) return;
    // g_j = T (1 - b) rs Q_j ((u_j - u_m) - sum Q (u - u_m) / sum Q).
    const Vec vc(temperature * (acc_t(1) - beta) * rs), mean_du(RV::hsum(qdu) / RV::hsum(qs));
    b_idx = 0;
    for_each_block<scalar_t>(C, [&](int64_t b, int64_t e) {
      const Vec fs(factor_s(b_idx++));
      RV::write(g, b, e, stream, [&](int64_t j, int64_t n) {
        const Step q = RV::load_acc(e_s + j, n), uu = RV::load_acc(e_t + j, n);
        Step u;
        for (int k = 0; k < RV::kParts; ++k) {
          const Vec qk = q.v[k] * fs;
          u.v[k] = Vec::blendv(vc * qk * ((uu.v[k] - u_m) - mean_du), zero, qk == zero);
        }
        return accumulated(u, g, j, n);
      });
    });
  }
};

template <typename scalar_t>
void run_rows(const DistillProblem& pb) {
  // As kernels.cpp: a task gets at least 32K elements of each row pair.
  constexpr int64_t kGrainElements = 32768;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / pb.classes);
  const bool stream = pb.grad && pb.grad_stride == pb.classes &&
                      pb.rows * pb.classes * int64_t(sizeof(scalar_t)) >= stream_grad_bytes();
  const DistillRows<scalar_t> rows(pb, stream);
  at::parallel_for(0, pb.rows, grain, [&](int64_t b, int64_t e) {
    const auto buf = rows.buffers();
    for (int64_t i = b; i < e; ++i) rows.row(i, buf);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (stream) _mm_sfence();  // streaming stores drained before the task ends
#endif
  });
}

void distill(const DistillProblem& pb) {
#if defined(__AVX512BF16__)
  // This object exists for its bfloat16 stores; every other dtype runs the AVX512 object.
  if (pb.dtype != c10::ScalarType::BFloat16) return AVX512::distill_kernel()(pb);
#endif
  switch (pb.dtype) {
    case c10::ScalarType::Float: return run_rows<float>(pb);
    case c10::ScalarType::Double: return run_rows<double>(pb);
    case c10::ScalarType::BFloat16: return run_rows<c10::BFloat16>(pb);
    case c10::ScalarType::Half: return run_rows<c10::Half>(pb);
    default: TORCH_CHECK(false, "fusedloss: unsupported logits dtype ", pb.dtype);
  }
}

}  // namespace

DistillFn distill_kernel() { return &distill; }

}  // namespace fusedloss::cpu::CPU_CAPABILITY
