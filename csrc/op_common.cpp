#include "op_common.h"

#include <ATen/ATen.h>

#include <cmath>

namespace fusedloss {

LossConfig make_config(int64_t variant, int64_t reduction, int64_t ignore_index,
                       double label_smoothing, double alpha, double beta, double gamma,
                       double z_loss, double softcap) {
  TORCH_CHECK(variant >= 0 && variant < kNumVariants, "fusedloss: unknown variant id ", variant,
              " (0..", kNumVariants - 1, ", see fusedloss.variants.Variant)");
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, "fusedloss: unknown reduction id ",
              reduction, " (0 none, 1 mean, 2 sum)");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "fusedloss: label_smoothing must be in [0, 1]; got ", label_smoothing);
  // The functional checks these too, with Python's exceptions; here for direct op calls
  // and the functional's eager fast path, which leaves the checks to the op.
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0.0, "fusedloss: alpha must be finite and >= 0; got ", alpha);
  TORCH_CHECK(std::isfinite(beta) && beta >= 0.0, "fusedloss: beta must be finite and >= 0; got ", beta);
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0.0, "fusedloss: gamma must be finite and >= 0; got ", gamma);
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, "fusedloss: z_loss must be finite and >= 0; got ",
              z_loss);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0,
              "fusedloss: softcap must be finite and > 0 (0 for no cap); got ", softcap);
  return {variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap};
}

namespace {

// logits (N, C) with unit class stride (any row stride), weight (C,) floating or absent.
void check_logits_and_weight(const at::Tensor& logits, const std::optional<at::Tensor>& weight,
                             const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be (N, C); got ", logits.dim(), " dims");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              op, ": logits must be float32, float64, bfloat16 or float16; got ", dt);
  const int64_t c = logits.size(1);
  TORCH_CHECK(c > 0, op, ": logits need at least one class");
  // Rows of any stride are read in place; the class dimension must be dense.
  TORCH_CHECK(logits.stride(1) == 1 || c == 1, op,
              ": logits must have unit stride along classes; got strides ", logits.strides());
  if (weight.has_value()) {
    const auto& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == c, op, ": weight must be (", c, ",); got ",
                w.sizes());
    TORCH_CHECK(w.is_floating_point(), op, ": weight must be floating; got ", w.scalar_type());
    TORCH_CHECK(w.device() == logits.device(), op, ": weight is on ", w.device(),
                " but logits are on ", logits.device());
  }
}

}  // namespace

void check_logits(const at::Tensor& logits, const char* op) { check_logits_and_weight(logits, std::nullopt, op); }

void check_inputs(const at::Tensor& logits, const at::Tensor& target,
                  const std::optional<at::Tensor>& weight, const char* op) {
  check_logits_and_weight(logits, weight, op);
  const int64_t n = logits.size(0);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n, op, ": target must be (", n,
              ",); got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must be int64 or int32; got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(),
              " but logits are on ", logits.device());
}

at::Tensor check_mix_inputs(const at::Tensor& logits, const at::Tensor& target_a, const at::Tensor& target_b,
                            const at::Tensor& lam, const std::optional<at::Tensor>& weight, const char* op) {
  check_inputs(logits, target_a, weight, op);
  check_inputs(logits, target_b, weight, op);
  TORCH_CHECK(lam.dim() == 1 && lam.size(0) == logits.size(0), op, ": lam must be (", logits.size(0),
              ",); got ", lam.sizes());
  TORCH_CHECK(lam.is_floating_point() && lam.device() == logits.device(), op,
              ": lam must be a floating tensor on the logits' device");
  return lam.to(acc_dtype(logits)).contiguous();
}

at::Tensor check_soft_inputs(const at::Tensor& logits, const at::Tensor& probs,
                             const std::optional<at::Tensor>& weight, const char* op) {
  check_logits_and_weight(logits, weight, op);
  TORCH_CHECK(probs.sizes() == logits.sizes(), op, ": probs must have the logits' shape ", logits.sizes(),
              "; got ", probs.sizes());
  TORCH_CHECK(probs.scalar_type() == logits.scalar_type(), op, ": probs must have the logits' dtype ",
              logits.scalar_type(), "; got ", probs.scalar_type());
  TORCH_CHECK(probs.device() == logits.device(), op, ": probs are on ", probs.device(),
              " but logits are on ", logits.device());
  return probs.size(1) > 1 && probs.stride(1) != 1 ? probs.contiguous() : probs;
}

void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& logits,
                           const at::Tensor& stats, const LossConfig& cfg) {
  const int64_t n = logits.size(0);
  if (cfg.reduction == kNone) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == n,
                "fusedloss::ext_bwd: grad_loss must be (", n, ",) for reduction none; got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.dim() == 0, "fusedloss::ext_bwd: grad_loss must be a scalar for ",
                "reduction mean/sum; got ", grad_loss.sizes());
  }
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == kStatsCols,
              "fusedloss::ext_bwd: stats must be (", n, ", ", kStatsCols, "); got ",
              stats.sizes());
  TORCH_CHECK(grad_loss.device() == logits.device() && stats.device() == logits.device(),
              "fusedloss::ext_bwd: grad_loss and stats must be on the logits' device");
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor weight_in_acc(const std::optional<at::Tensor>& weight, const at::Tensor& logits) {
  if (!weight.has_value()) return {};
  return weight->to(acc_dtype(logits)).contiguous();
}

ForwardOutputs allocate_forward(const at::Tensor& logits, bool compute_grad) {
  const int64_t n = logits.size(0);
  const auto acc = logits.options().dtype(acc_dtype(logits));
  return {at::empty({n}, acc), at::empty({n, kStatsCols}, acc),
          compute_grad ? at::empty(logits.sizes(), logits.options())  // contiguous
                       : at::empty({0}, logits.options())};
}

}  // namespace fusedloss
