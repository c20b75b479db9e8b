// Vector building blocks over one row of logits: loads in the math type, the
// online log-sum-exp, masked sums. Included only by kernels.cpp, which setup.py
// compiles once per CPU capability (DEFAULT, AVX2, AVX512) with that
// capability's flags; everything here lives in a namespace named after the
// capability so the copies never meet at link time (as ATen's vec headers do).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#endif

// On a row pass: inline everything it calls. Without it GCC -O3 keeps
// Vectorized<float>::exp_u20 and the load/pad helpers out of line (calls through
// the PLT, every vector spilled around each call): 3x slower loops.
#if defined(__GNUC__)
#define FUSEDLOSS_ROW_PASS __attribute__((flatten))
#else
#define FUSEDLOSS_ROW_PASS
#endif

namespace fusedloss::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// A row of scalar_t seen as steps of kWidth elements in the math type acc_t
// (float for float/half/bfloat16, double for double). A half step is two float
// vectors: the half types are widened on load and narrowed on store, never
// computed in.
template <typename scalar_t>
struct RowVec {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kParts = kReduced ? 2 : 1;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kWidth = kLanes * kParts;
  static_assert(Vectorized<scalar_t>::size() == kWidth, "a step is one Vectorized<scalar_t>");

  struct Step {
    Vec v[kParts];
  };

  // Loads n <= kWidth elements; lanes past n are 0 (loadu's contract).
  static Step load(const scalar_t* p, int64_t n) {
    Step s;
    if constexpr (kReduced) {
      const auto raw = n == kWidth ? Vectorized<scalar_t>::loadu(p)
                                   : Vectorized<scalar_t>::loadu(p, static_cast<int>(n));
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(raw);
      s.v[0] = lo;
      s.v[1] = hi;
    } else {
      s.v[0] = n == kWidth ? Vec::loadu(p) : Vec::loadu(p, n);
    }
    return s;
  }

  // Loads n <= kWidth elements of an acc_t array (the class weights).
  static Step load_acc(const acc_t* p, int64_t n) {
    Step s;
    for (int k = 0; k < kParts; ++k) {
      const int64_t nk = std::clamp<int64_t>(n - k * kLanes, 0, kLanes);
      s.v[k] = nk == kLanes ? Vec::loadu(p + k * kLanes) : Vec::loadu(p + k * kLanes, nk);
    }
    return s;
  }

  static void store_acc(acc_t* p, int64_t n, const Step& s) {
    for (int k = 0; k < kParts; ++k) {
      const int64_t nk = std::clamp<int64_t>(n - k * kLanes, 0, kLanes);
      if (nk > 0) s.v[k].store(p + k * kLanes, nk);
    }
  }

  // The two float vectors of a reduced step, rounded to scalar_t (to nearest even).
  // bfloat16 with AVX512_BF16: one vcvtne2ps2bf16 for the 32 lanes, where ATen's
  // integer rounding takes ~16 instructions; the same result except that float
  // subnormals (< 1.2e-38) become zero and a NaN keeps its payload.
  static Vectorized<scalar_t> narrow(const Step& s) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return Vectorized<scalar_t>((__m512i)_mm512_cvtne2ps_pbh(__m512(s.v[1]), __m512(s.v[0])));
    }
#endif
    return at::vec::convert_from_float<scalar_t>(s.v[0], s.v[1]);
  }

  static void store(scalar_t* p, int64_t n, const Step& s) {
    if constexpr (kReduced) {
      narrow(s).store(p, static_cast<int>(n));
    } else {
      s.v[0].store(p, n);
    }
  }

  // A full step (kWidth elements, 64 bytes on AVX-512 for every dtype) stored
  // with a non-temporal store at a 64-byte aligned p: the line goes to memory
  // without being read first (a plain store reads every line it writes: 1.5x
  // the traffic of the write). Where the capability has no such store of a
  // whole line, a plain store.
  static void store_stream(scalar_t* p, const Step& s) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kReduced) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), __m512i(narrow(s)));
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(p, __m512(s.v[0]));
    } else {
      _mm512_stream_pd(p, __m512d(s.v[0]));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    // 32 bytes a step for float/double, two halves for the reduced types.
    if constexpr (kReduced) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(narrow(s)));
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, __m256(s.v[0]));
    } else {
      _mm256_stream_pd(p, __m256d(s.v[0]));
    }
#else
    store(p, kWidth, s);
#endif
  }

  // Writes f(j, n) (a Step) to g[j, j + n) for the steps of [b, e). With `stream`,
  // the steps that cover whole aligned vectors go out as non-temporal stores and
  // the unaligned head and the tail as plain ones; a cache line is thus written
  // either only by streaming stores or only by plain ones.
  template <typename F>
  static void write(scalar_t* g, int64_t b, int64_t e, bool stream, F&& f) {
    int64_t j = b;
    if (stream && e - b >= 2 * kWidth) {
      constexpr uintptr_t kAlign = kWidth * sizeof(scalar_t);
      const uintptr_t addr = reinterpret_cast<uintptr_t>(g + b);
      if (addr % sizeof(scalar_t) == 0) {
        const int64_t head = static_cast<int64_t>(((kAlign - addr % kAlign) % kAlign) / sizeof(scalar_t));
        if (head > 0) {
          store(g + j, head, f(j, head));
          j += head;
        }
        for (; j + kWidth <= e; j += kWidth) store_stream(g + j, f(j, kWidth));
      }
    }
    for (; j < e; j += kWidth) {
      const int64_t n = std::min(kWidth, e - j);
      store(g + j, n, f(j, n));
    }
  }

  // Asks for the cache line kPrefetchBytes ahead of p. A pass that does ~20
  // vector instructions per 64-byte line (the exp) fills the out-of-order window
  // long before enough loads are in flight to cover memory latency; without
  // this, a single thread read a DRAM-resident row at ~half the rate a copy does.
  static constexpr int64_t kPrefetchBytes = 4096;
  static void prefetch(const scalar_t* p) {
#if defined(__GNUC__)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, 0, 3);
#endif
  }

  // Lane `lane` (< kWidth) replaced by `value`.
  static Step set_lane(Step s, int64_t lane, acc_t value) {
    const int k = static_cast<int>(lane / kLanes);
    const Vec hit = Vec::arange(acc_t(0), acc_t(1)) == Vec(static_cast<acc_t>(lane % kLanes));
    s.v[k] = Vec::blendv(s.v[k], Vec(value), hit);
    return s;
  }

  // Lanes at and past n replaced by `fill` (-inf for the max and exp-sums).
  static Step pad(Step s, int64_t n, acc_t fill) {
    if (n == kWidth) return s;
    for (int k = 0; k < kParts; ++k) {
      s.v[k] = Vec::set(Vec(fill), s.v[k], std::clamp<int64_t>(n - k * kLanes, 0, kLanes));
    }
    return s;
  }

  // f(step, offset, count) over [begin, end), in steps of kWidth and one short tail.
  // kPrefetch: the pass is a row's first read (from memory): prefetch ahead.
  template <bool kPrefetch = false, typename F>
  static void for_each(const scalar_t* x, int64_t begin, int64_t end, F&& f) {
    int64_t i = begin;
    for (; i + kWidth <= end; i += kWidth) {
      if constexpr (kPrefetch) {
        // One prefetch per 64-byte line.
        static_assert(kWidth * sizeof(scalar_t) >= 32, "one prefetch per step covers the line");
        prefetch(x + i);
      }
      f(load(x + i, kWidth), i, kWidth);
    }
    if (i < end) f(load(x + i, end - i), i, end - i);
  }

  static acc_t hmax(const Vec& v) {
    return at::vec::vec_reduce_all<acc_t>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
  }
  static acc_t hsum(const Vec& v) {
    return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v);
  }
};

// exp of a vector, and the running max of a row's first read.
//
// float on AVX-512: vexp_avx512 below, 13 vector instructions (ATen's exp_u20
// is 19), and a plain vmaxps (at::vec::maximum adds a NaN test: 3). Its
// polynomial is exp_u20's (degree 5 on [-ln2/2, ln2/2]); the argument is
// reduced with ln 2 in two parts and the result scaled by vscalefps: relative
// error at most 1.65e-7 against double over every float in [-87, 30] (2.2e9
// values; exp_u20: 3.8e-7 over (-86, 30)). It returns 0 below ln(FLT_MIN)
// (no subnormals: such a term is < 1e-38 of the row's max), inf above
// ln(FLT_MAX), and NaN for NaN: a NaN logit reaches its row's sum and so every
// statistic of the row, which is why the max may ignore NaN here.
//
// Elsewhere (AVX2, DEFAULT): at::vec's exp_u20, an inlined degree-5 polynomial
// (approximation error 1.0e-7 relative, a few float ulps after rounding)
// instead of Sleef's 1-ulp exp, which is an out-of-line call per vector. It
// clamps NaN to a finite value, so there the max is at::vec::maximum, which
// keeps a NaN, and the kernels carry a NaN row's NaN in a scalar.
// For double, Sleef's exp and at::vec::maximum.
#if defined(CPU_CAPABILITY_AVX512)
// The lanes vexp_avx512 keeps: at or above ln(FLT_MIN), and NaN lanes (unordered); the rest are 0.
inline __mmask16 vexp_keep_avx512(__m512 x) {
  return _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654475f), _CMP_NLT_UQ);  // ln(FLT_MIN)
}

// The core of vexp_avx512: p 2^n for v = n ln2 + r, lanes outside `keep` 0 (the zero-masked
// vscalefps). Exact range reduction for |v| <= 128 ln 2; callers pass v clamped to
// [ln(FLT_MIN), ln(FLT_MAX)] (vexp_avx512), or v unclamped where every lane they keep lies
// in that range (kernels_distill.cpp's vexp_row: 11 instructions with the mask's compare).
inline __m512 vexp_avx512_core(__m512 v, __mmask16 keep) {
  // v = n ln2 + r, |r| <= ln2 / 2: n rounded to nearest, ln 2 in two parts
  // (ln2_hi has 16 significant bits, so n ln2_hi is exact for |n| <= 128).
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  // exp_u20's coefficients (ATen vec512_float.h), Horner.
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.166676521f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.499991506f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.999999701f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(keep, p, n);  // p 2^n, exact
}

inline __m512 vexp_avx512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654475f);  // ln(FLT_MIN)
  const __m512 hi = _mm512_set1_ps(88.72283905f);   // ln(FLT_MAX)
  const __mmask16 keep = vexp_keep_avx512(x);
  // Operand order: vminps/vmaxps return the second operand when one is NaN.
  return vexp_avx512_core(_mm512_max_ps(lo, _mm512_min_ps(hi, x)), keep);
}
#endif

template <typename Vec>
inline Vec vexp(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) return Vec(vexp_avx512(v));
#endif
  return v.exp_u20();
}

// max(m, v) for the running max of a first read (see vexp: whether NaN is kept).
template <typename Vec>
inline Vec vmax_first_read(const Vec& m, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) return Vec(_mm512_max_ps(v, m));  // NaN v: m
#endif
  return at::vec::maximum(m, v);
}

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// ---------------------------------------------------------------------------
// Online log-sum-exp over a row, the target left out (so the sum is lse_ex
// exactly, never lse minus p_c).
//
// One pass, one exp per element, streamed in blocks of kBlock elements. A block
// is exponentiated against the running shift (the first block: against its first
// element), not against its own max, so the max and the exps come from a single
// read: e^(x - shift) stays finite and exact for any x up to kSlack above the
// shift. Only a block that breaks that bound (a row's first block whose first
// element was far below the max, a jump of kSlack nats, a NaN) is exponentiated
// again, from L1, against its own max. The shift only moves up; the running sum
// (a vector of lane sums) is rescaled when it does.
//
// With e_out, the exp pass also stores e_k = exp(x_k - shift_b) (shift_b:
// returned by add_block): the gradient pass then needs no exp of its own, only
// e_k * exp(shift_b - K) for the row's constant K.
//
// kArgmax also records the first index of the maximum (bce's arg-max w);
// kXSum accumulates sum_k w_k x_k (label smoothing), w_k = 1 without weights.
// ---------------------------------------------------------------------------

// 8 KiB blocks: a quarter of a 32 KiB L1d, so a block survives a second read
// beside the prefetcher's lines; the per-block bookkeeping (a horizontal max,
// ~20 cycles) is noise next to the block's 2048 (fp32) exps.
template <typename scalar_t>
constexpr int64_t kBlock = 8192 / sizeof(scalar_t);

// f(begin, end) for the blocks of [0, C), in the same order every time, so a
// later pass can pair block b with shift_b. The target is not cut out of the
// blocks (that made two short ranges of every row, each with its own partial
// steps and bookkeeping: at C = 1000 a row's overhead was half its exps); the
// passes mask its lane instead (OnlineLse's `skip`).
template <typename scalar_t, typename F>
inline void for_each_block(int64_t C, F&& f) {
  for (int64_t b = 0; b < C; b += kBlock<scalar_t>) f(b, std::min(C, b + kBlock<scalar_t>));
}

template <typename scalar_t, bool kArgmax = false, bool kXSum = false>
struct OnlineLse {
  using RV = RowVec<scalar_t>;
  using acc_t = typename RV::acc_t;
  using Vec = typename RV::Vec;
  static_assert(kBlock<scalar_t> % RV::kWidth == 0, "blocks are whole steps");

  // e^30 per element, 2048 (fp32) or 1024 (fp64) elements a block: lane sums
  // stay below 1e17, far from overflow; e_k keeps full relative precision.
  static constexpr acc_t kSlack = 30;

  acc_t shift = kNegInf<acc_t>;  // every finite value added is <= shift + kSlack
  Vec sum = Vec(acc_t(0));       // sum_k exp(x_k - shift), lane by lane
  acc_t max = kNegInf<acc_t>;    // the largest value added (NaN if one was NaN)
  int64_t argmax = -1;
  Vec xsum = Vec(acc_t(0));
  // A second index left out like `skip` (mixup's second target), or -1.
  int64_t skip2 = -1;

  // Adds x[b, e) without x[skip] (skip outside [b, e): none); stores
  // exp(x_k - shift_b) at e_out[k] when e_out is given (0 at skip), and returns
  // shift_b.
  //
  // With `g_ahead`, the first read also asks for the lines of g_ahead[b, e) for
  // writing (prefetchw), so the gradient pass that later stores there finds them
  // in cache, owned: their reads for ownership overlap the exps instead of
  // stalling the stores.
  FUSEDLOSS_ROW_PASS acc_t add_block(const scalar_t* x, int64_t b, int64_t e,
                                     const acc_t* weight = nullptr, acc_t* e_out = nullptr,
                                     int64_t skip = -1, const scalar_t* g_ahead = nullptr) {
    const bool first = shift == kNegInf<acc_t>;
    acc_t block_shift = shift;
    if (first) {  // nothing finite yet: start from the block's first element (0 if not finite)
      const acc_t x0 = static_cast<acc_t>(x[b == skip && b + 1 < e ? b + 1 : b]);
      block_shift = std::isfinite(x0) ? x0 : acc_t(0);
    }
    Vec vmax(kNegInf<acc_t>);
    Vec acc = exp_pass<true>(x, b, e, weight, e_out, block_shift, vmax, skip, g_ahead);
    const acc_t bmax = RV::hmax(vmax);
    if (bmax == kNegInf<acc_t>) return block_shift;  // only -inf: every e is 0, nothing to add
    // Too far above the shift (or NaN: the test fails), or, on the first block, so
    // far below it that every exp could underflow: again, against the block's max.
    if (!(bmax <= block_shift + kSlack) || (first && bmax < block_shift - kSlack)) {
      block_shift = bmax;
      acc = exp_pass<false>(x, b, e, weight, e_out, block_shift, vmax, skip);
    }
    if (!(bmax <= max)) {  // a new max (or a NaN, which then stays)
      if constexpr (kArgmax) argmax = first_index_of(x, b, e, bmax);
      max = bmax;
    }
    if (first) {
      sum = acc;
      shift = block_shift;
    } else if (block_shift > shift) {
      sum = sum * Vec(std::exp(shift - block_shift)) + acc;
      shift = block_shift;
    } else if (block_shift == shift) {
      sum = sum + acc;
    } else {  // below the shift, or NaN (which poisons the sum for good)
      sum = sum + acc * Vec(std::exp(block_shift - shift));
    }
    return block_shift;
  }

  // log sum exp over everything added; -inf when nothing (or only -inf) was.
  acc_t lse() const {
    if (shift == kNegInf<acc_t>) return shift;
    return shift + std::log(RV::hsum(sum));
  }
  acc_t x_sum() const { return RV::hsum(xsum); }

 private:
  // sum_k exp(x_k - shift) over the block, lane by lane; the first read (kFirst)
  // also takes the max and the smoothing sum.
  template <bool kFirst>
  FUSEDLOSS_ROW_PASS Vec exp_pass(const scalar_t* x, int64_t b, int64_t e, const acc_t* weight,
                                  acc_t* e_out, acc_t shift_value, Vec& vmax, int64_t skip,
                                  const scalar_t* g_ahead = nullptr) {
    const Vec vshift(shift_value);
    Vec acc(acc_t(0));
    RV::template for_each<kFirst>(x, b, e, [&](typename RV::Step s, int64_t i, int64_t n) {
      // One step in a block holds the skipped index (unsigned compare: skip < 0 never does).
      const bool has_skip = static_cast<uint64_t>(skip - i) < static_cast<uint64_t>(n);
      const bool has_skip2 = static_cast<uint64_t>(skip2 - i) < static_cast<uint64_t>(n);
#if defined(__GNUC__)
      if (kFirst && g_ahead) __builtin_prefetch(g_ahead + i, 1, 3);
#endif
      if constexpr (kFirst && kXSum) {  // before padding: loadu zero-fills the tail
        const auto w = weight ? RV::load_acc(weight + i, n) : typename RV::Step{};
        auto sx = has_skip ? RV::set_lane(s, skip - i, acc_t(0)) : s;
        if (has_skip2) sx = RV::set_lane(sx, skip2 - i, acc_t(0));
        for (int k = 0; k < RV::kParts; ++k) xsum = xsum + (weight ? sx.v[k] * w.v[k] : sx.v[k]);
      }
      s = RV::pad(s, n, kNegInf<acc_t>);
      if (has_skip) s = RV::set_lane(s, skip - i, kNegInf<acc_t>);
      if (has_skip2) s = RV::set_lane(s, skip2 - i, kNegInf<acc_t>);
      for (int k = 0; k < RV::kParts; ++k) {
        if constexpr (kFirst) vmax = vmax_first_read(vmax, s.v[k]);
        s.v[k] = vexp(s.v[k] - vshift);
        acc = acc + s.v[k];
      }
      if (e_out) RV::store_acc(e_out + i, n, s);
    });
    return acc;
  }

  // Only when a block raises the max: a handful of times per row on ordinary data,
  // but that includes every row's first block, so at C = 1000 once per row. A
  // vector scan of the L1-resident block (a scalar one was 30% of bce's time there).
  static int64_t first_index_of(const scalar_t* x, int64_t b, int64_t e, acc_t value) {
    const Vec target(value);
    int64_t i = b;
    for (; i + RV::kWidth <= e; i += RV::kWidth) {
      const auto s = RV::load(x + i, RV::kWidth);
      for (int k = 0; k < RV::kParts; ++k) {
        // zero_mask: a bit per lane where (x != value) is false, i.e. x == value.
        const int hit = (s.v[k] != target).zero_mask();
        if (hit) return i + k * RV::kLanes + __builtin_ctz(static_cast<unsigned>(hit));
      }
    }
    for (; i < e; ++i) {
      if (static_cast<acc_t>(x[i]) == value) return i;
    }
    return b;
  }
};

}  // namespace fusedloss::cpu::CPU_CAPABILITY
