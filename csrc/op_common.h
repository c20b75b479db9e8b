// Argument checks and output allocation shared by the CPU and CUDA
// implementations of fusedloss::ext_fwd / ext_bwd (schemas: fusedloss.cpp).
// Metadata only: nothing here reads tensor data, so nothing synchronizes.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "losses.h"

namespace fusedloss {

// Validates the scalar arguments and returns them as the kernels take them.
LossConfig make_config(int64_t variant, int64_t reduction, int64_t ignore_index,
                       double label_smoothing, double alpha, double beta, double gamma,
                       double z_loss, double softcap);

// logits (N, C) with unit class stride (any row stride), target (N,) int64/int32,
// weight (C,) floating or absent, all on logits' device.
void check_inputs(const at::Tensor& logits, const at::Tensor& target,
                  const std::optional<at::Tensor>& weight, const char* op);

// logits alone, as check_inputs checks them.
void check_logits(const at::Tensor& logits, const char* op);

// Mixup's two targets: logits, target_a, target_b as check_inputs, lam (N,) floating on the
// logits' device. Returns lam in the math type, contiguous.
at::Tensor check_mix_inputs(const at::Tensor& logits, const at::Tensor& target_a, const at::Tensor& target_b,
                            const at::Tensor& lam, const std::optional<at::Tensor>& weight, const char* op);

// Class-probability targets: logits as check_inputs, probs (N, C) of the logits' dtype
// and device. Returns probs with unit class stride (a copy only if they had none).
at::Tensor check_soft_inputs(const at::Tensor& logits, const at::Tensor& probs,
                             const std::optional<at::Tensor>& weight, const char* op);

// grad_loss () or (N,) as the reduction's loss, stats (N, kStatsCols).
void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& logits,
                           const at::Tensor& stats, const LossConfig& cfg);

// The math type of the kernels: float64 for float64 logits, float32 otherwise.
at::ScalarType acc_dtype(const at::Tensor& logits);

// weight as a contiguous (C,) tensor of the math type, or an undefined tensor.
at::Tensor weight_in_acc(const std::optional<at::Tensor>& weight, const at::Tensor& logits);

// The per-row loss and stats buffers of the forward, and the (N, C) gradient or
// the empty (0,) tensor the schema returns without one.
struct ForwardOutputs {
  at::Tensor loss_rows, stats, grad;
};
ForwardOutputs allocate_forward(const at::Tensor& logits, bool compute_grad);

}  // namespace fusedloss
