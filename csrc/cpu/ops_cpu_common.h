// Argument handling shared by the CPU ops: see ops_cpu_common.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include "../losses.h"
#include "kernels.h"

namespace fusedloss::cpu {

// Targets as int64, each checked before any logit is read with it (CPU: always;
// reading host memory costs no synchronization), and what 'mean' divides by: the
// number of non-ignored rows, or the sum of their weights.
struct CheckedTargets {
  at::Tensor target;
  double denominator;
};
CheckedTargets check_targets(const at::Tensor& target, const at::Tensor& weight_acc, int64_t C,
                             int64_t ignore_index);

// The problem of a call on (N, C) logits: no targets, weight, outputs or grad_output yet.
RowsProblem logits_problem(const at::Tensor& logits, const LossConfig& cfg);

// The problem of a call on (N, C) logits with checked targets; outputs and grad_output
// are the caller's to fill in.
RowsProblem make_problem(const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& weight_acc, const LossConfig& cfg);

// The backward's grad_loss (already in the math type): per row for 'none' (any stride, 0
// for an expanded scalar), else one scalar over `denominator` ('mean''s, or 1).
void set_grad_loss(RowsProblem& pb, const at::Tensor& grad_loss_acc, int64_t reduction, double denominator);

// bce keeps its arg-max in a float32 stats column: at most 2^24 classes.
void check_bce_classes(const LossConfig& cfg, const at::Tensor& logits);

}  // namespace fusedloss::cpu
