// The interface between the CPU op (ops_cpu.cpp, compiled once) and the row
// kernels (kernels.cpp, compiled once per CPU capability). Plain pointers and
// sizes only, so the capability objects need no at::Tensor code of their own.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

#include "../losses.h"

namespace fusedloss::cpu {

// One call's rows. "acc" below is the math type: float, or double for double logits.
struct RowsProblem {
  c10::ScalarType dtype;  // of logits and grad
  const void* logits;     // (rows, classes), unit class stride
  int64_t rows, classes, row_stride;
  const int64_t* target;  // (rows,), every value checked: in [0, classes) or ignore_index
  // Class-probability targets (ce only) instead of `target`: (rows, classes) of dtype with
  // unit class stride; stats are then (lse, sum_k w_k y'_k, 0, 0) with y' the smoothed targets.
  const void* probs;
  int64_t probs_stride;
  // Mixup's second target (rows,) and lam (rows,) acc, or nullptr: the row loss is then
  // lam L(target) * mix_scale_a + (1 - lam) L(target_b) * mix_scale_b (the scales: 'mean''s
  // 1 / denominator of each part, else 1), stats (lse, lse_ex_a, lse_ex_b, 0); for bce
  // (lse, lse_ex_a, log(1 - p_w), w), the one-target layout with target a.
  const int64_t* target_b;
  const void* lam;
  double mix_scale_a, mix_scale_b;
  const void* weight;     // (classes,) acc, or nullptr
  double weight_total;    // sum of the weights, or classes (label smoothing's W)
  LossConfig cfg;

  void* stats;      // (rows, kStatsCols) acc: written by forward, read by backward
  void* loss_rows;  // forward: (rows,) acc, weighted row losses (0 for ignored rows)
  void* grad;       // (rows, classes) dtype, contiguous; nullptr: forward without gradient

  // bce given a vocabulary-parallel row's global numbers (ops_cpu_bce_parallel.cpp), or nullptr:
  // (rows, 3) int64 per row: the local target c, the local global arg-max w (-1: on another
  // rank), and 1 where w == c globally, 0 where not, -1 for an ignored row (zeros, no logit read).
  // stats (rows, kStatsCols) acc: the global lse, R, log(1 - p_w), x_w (the partial op reads lse).
  const int64_t* slice_idx;
  void* bce_sums;  // bce_partial's output: (rows, 2) acc

  // The gradient written is dLoss/dx for dLoss/dloss_i =
  //   grad_scale * (grad_loss_rows ? grad_loss_rows[i * grad_loss_stride] : 1)
  // (grad_scale folds in 'mean''s 1/denominator and a scalar grad_loss).
  double grad_scale;
  const void* grad_loss_rows;  // acc, or nullptr
  int64_t grad_loss_stride;
};

using RowsFn = void (*)(const RowsProblem&);

struct Kernels {
  RowsFn forward;   // loss_rows, stats, and grad when non-null
  RowsFn backward;  // grad from stats
  // bce given global numbers (slice_idx): the slice's sums over k not in {c, w} of log(1 - p_k)
  // and a_k into bce_sums; the slice's gradient from the global lse, R, log(1 - p_w), x_w into
  // grad, for dLoss/dloss_i as above (the row's own coefficient, class weight included).
  RowsFn bce_partial;
  RowsFn bce_global_backward;
  const char* capability;
};

// One definition per capability object; setup.py defines FUSEDLOSS_CPU_AVX2 /
// FUSEDLOSS_CPU_AVX512 for the ones it built.
namespace DEFAULT { Kernels kernels(); }
namespace AVX2 { Kernels kernels(); }
namespace AVX512 { Kernels kernels(); }
// AVX512 plus AVX512_BF16's conversions, for bfloat16 logits (other dtypes: AVX512's).
namespace AVX512_BF16 { Kernels kernels(); }

// The best kernels this machine runs, chosen once from at::get_cpu_capability()
// (which honours ATEN_CPU_CAPABILITY=default|avx2|avx512, as ATen's own kernels do);
// AVX512_BF16 where ATen says AVX512 and the CPU has AVX512_BF16, unless
// FUSEDLOSS_CPU_AVX512_BF16=0.
const Kernels& kernels_for_this_cpu();

}  // namespace fusedloss::cpu
