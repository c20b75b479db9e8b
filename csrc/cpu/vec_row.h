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

  static void store(scalar_t* p, int64_t n, const Step& s) {
    if constexpr (kReduced) {
      const auto raw = at::vec::convert_from_float<scalar_t>(s.v[0], s.v[1]);
      raw.store(p, static_cast<int>(n));
    } else {
      s.v[0].store(p, n);
    }
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
  template <typename F>
  static void for_each(const scalar_t* x, int64_t begin, int64_t end, F&& f) {
    int64_t i = begin;
    for (; i + kWidth <= end; i += kWidth) f(load(x + i, kWidth), i, kWidth);
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

// exp of a vector: at::vec's exp_u20, an inlined degree-5 polynomial on
// [-ln2/2, ln2/2] (approximation error 1.0e-7 relative, a few float ulps after
// rounding) instead of Sleef's 1-ulp exp, which is an out-of-line call per
// vector. The row passes are bound by vector instructions (see kernels.cpp),
// and the exp is most of them. It returns 0 below ln(FLT_MIN) (no subnormals:
// such a term is < 1e-38 of the row's max) and clamps NaN to a finite value,
// which the kernels account for (a NaN row carries its NaN in a scalar).
// For double it is Sleef's exp.
template <typename Vec>
inline Vec vexp(const Vec& v) {
  return v.exp_u20();
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

// f(begin, end) for the blocks of [0, C) without index `skip` (-1: none), in
// the same order every time, so a later pass can pair block b with shift_b.
template <typename scalar_t, typename F>
inline void for_each_block(int64_t C, int64_t skip, F&& f) {
  auto range = [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kBlock<scalar_t>) f(b, std::min(end, b + kBlock<scalar_t>));
  };
  if (skip >= 0) {
    range(0, skip);
    range(skip + 1, C);
  } else {
    range(0, C);
  }
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

  // Adds x[b, e); stores exp(x_k - shift_b) at e_out[k] when e_out is given, and
  // returns shift_b.
  FUSEDLOSS_ROW_PASS acc_t add_block(const scalar_t* x, int64_t b, int64_t e,
                                     const acc_t* weight = nullptr, acc_t* e_out = nullptr) {
    const bool first = shift == kNegInf<acc_t>;
    acc_t block_shift = shift;
    if (first) {  // nothing finite yet: start from the block's first element (0 if not finite)
      const acc_t x0 = static_cast<acc_t>(x[b]);
      block_shift = std::isfinite(x0) ? x0 : acc_t(0);
    }
    Vec vmax(kNegInf<acc_t>);
    Vec acc = exp_pass<true>(x, b, e, weight, e_out, block_shift, vmax);
    const acc_t bmax = RV::hmax(vmax);
    if (bmax == kNegInf<acc_t>) return block_shift;  // only -inf: every e is 0, nothing to add
    // Too far above the shift (or NaN: the test fails), or, on the first block, so
    // far below it that every exp could underflow: again, against the block's max.
    if (!(bmax <= block_shift + kSlack) || (first && bmax < block_shift - kSlack)) {
      block_shift = bmax;
      acc = exp_pass<false>(x, b, e, weight, e_out, block_shift, vmax);
    }
    if (!(bmax <= max)) {  // a new max (or a NaN, which then stays)
      if constexpr (kArgmax) argmax = first_index_of(x, b, e, bmax);
      max = bmax;
    }
    if (block_shift > shift) {  // exp(-inf) = 0 on the first block
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
                                  acc_t* e_out, acc_t shift_value, Vec& vmax) {
    const Vec vshift(shift_value);
    Vec acc(acc_t(0));
    RV::for_each(x, b, e, [&](typename RV::Step s, int64_t i, int64_t n) {
      if constexpr (kFirst && kXSum) {  // before padding: loadu zero-fills the tail
        const auto w = weight ? RV::load_acc(weight + i, n) : typename RV::Step{};
        for (int k = 0; k < RV::kParts; ++k) xsum = xsum + (weight ? s.v[k] * w.v[k] : s.v[k]);
      }
      s = RV::pad(s, n, kNegInf<acc_t>);
      for (int k = 0; k < RV::kParts; ++k) {
        if constexpr (kFirst) vmax = at::vec::maximum(vmax, s.v[k]);
        s.v[k] = vexp(s.v[k] - vshift);
        acc = acc + s.v[k];
      }
      if (e_out) RV::store_acc(e_out + i, n, s);
    });
    return acc;
  }

  // Only when a block raises the max (a handful of times per row on ordinary
  // data, every block on sorted rows), so a scalar scan of one L1-resident block.
  static int64_t first_index_of(const scalar_t* x, int64_t b, int64_t e, acc_t value) {
    for (int64_t i = b; i < e; ++i) {
      if (static_cast<acc_t>(x[i]) == value) return i;
    }
    return b;
  }
};

// Calls f(begin, end) for the (up to three) ranges of [0, n) left when the
// indices a and b are taken out (a == b is one index).
template <typename F>
inline void for_ranges_without(int64_t n, int64_t a, int64_t b, F&& f) {
  const int64_t lo = std::min(a, b), hi = std::max(a, b);
  if (lo > 0) f(int64_t(0), lo);
  if (hi > lo + 1) f(lo + 1, hi);
  if (n > hi + 1) f(hi + 1, n);
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
