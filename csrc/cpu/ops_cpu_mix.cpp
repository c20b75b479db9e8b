// CPU implementations of fusedloss::ext_mix_fwd / ext_mix_bwd: mixup's two targets,
//   lam L(x, target_a) + (1 - lam) L(x, target_b)
// for every loss, each part reduced as the loss alone would be ('mean': its own
// denominator), one read of each row for both targets' statistics and one gradient write
// (kernels.cpp: mix_target_only for ce/nllr/crl/lace/focal, bce for bce, capped_row with a
// soft cap). Stats: (lse, lse_ex_a, lse_ex_b, 0); bce's (lse, lse_ex_a, log(1 - p_w), w).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../op_common.h"
#include "kernels.h"
#include "ops_cpu_common.h"
#include "row_sum.h"

#include <limits>

namespace fusedloss::cpu {
namespace {

struct MixInputs {
  CheckedTargets a, b;
  at::Tensor weight, lam;
  LossConfig cfg;
};

MixInputs prepare_mix(const at::Tensor& logits, const at::Tensor& target_a, const at::Tensor& target_b,
                      const at::Tensor& lam, const std::optional<at::Tensor>& weight, const LossConfig& cfg,
                      const char* op) {
  const at::Tensor lam_acc = check_mix_inputs(logits, target_a, target_b, lam, weight, op);
  check_bce_classes(cfg, logits);
  MixInputs in;
  in.weight = weight_in_acc(weight, logits);
  in.a = check_targets(target_a, in.weight, logits.size(1), cfg.ignore_index);
  in.b = check_targets(target_b, in.weight, logits.size(1), cfg.ignore_index);
  in.lam = lam_acc;
  in.cfg = cfg;
  return in;
}

RowsProblem mix_problem(const at::Tensor& logits, const MixInputs& in) {
  RowsProblem pb = make_problem(logits, in.a.target, in.weight, in.cfg);
  pb.target_b = in.b.target.const_data_ptr<int64_t>();
  pb.lam = in.lam.const_data_ptr();
  const bool mean = in.cfg.reduction == kMean;
  // A part without counted rows: 1/0, used by no row (ext_mix_fwd_cpu makes 'mean' NaN).
  pb.mix_scale_a = mean ? 1.0 / in.a.denominator : 1.0;
  pb.mix_scale_b = mean ? 1.0 / in.b.denominator : 1.0;
  return pb;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_mix_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target_a, const at::Tensor& target_b, const at::Tensor& lam,
    const std::optional<at::Tensor>& weight, int64_t variant, int64_t reduction, int64_t ignore_index,
    double label_smoothing, double alpha, double beta, double gamma, double z_loss, double softcap,
    bool compute_grad) {
  const LossConfig cfg =
      make_config(variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap);
  const MixInputs in = prepare_mix(logits, target_a, target_b, lam, weight, cfg, "fusedloss::ext_mix_fwd");
  ForwardOutputs out = allocate_forward(logits, compute_grad);
  RowsProblem pb = mix_problem(logits, in);
  pb.stats = out.stats.mutable_data_ptr();
  pb.loss_rows = out.loss_rows.mutable_data_ptr();
  pb.grad = compute_grad ? out.grad.mutable_data_ptr() : nullptr;
  kernels_for_this_cpu().forward(pb);
  at::Tensor loss = out.loss_rows;
  // The rows already carry each part's 1/denominator: 'mean' and 'sum' both add them up.
  // A part without counted rows makes 'mean' NaN (0/0), as that part's 'mean' alone would;
  // its rows add 0 (k = 0 where the target is ignored), so the NaN is added here.
  if (reduction != kNone) {
    double total = sum_in_row_order(loss);
    if (reduction == kMean && (in.a.denominator == 0 || in.b.denominator == 0)) {
      total = std::numeric_limits<double>::quiet_NaN();
    }
    loss = at::scalar_tensor(total, loss.options());
  }
  return {loss, out.stats, out.grad};
}

at::Tensor ext_mix_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target_a,
                           const at::Tensor& target_b, const at::Tensor& lam,
                           const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t variant,
                           int64_t reduction, int64_t ignore_index, double label_smoothing, double alpha,
                           double beta, double gamma, double z_loss, double softcap) {
  const LossConfig cfg =
      make_config(variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap);
  const MixInputs in = prepare_mix(logits, target_a, target_b, lam, weight, cfg, "fusedloss::ext_mix_bwd");
  check_backward_inputs(grad_loss, logits, stats, cfg);
  const auto acc = acc_dtype(logits);
  const at::Tensor st = stats.to(acc).contiguous();
  const at::Tensor go = grad_loss.to(acc);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  RowsProblem pb = mix_problem(logits, in);
  pb.stats = const_cast<void*>(st.const_data_ptr());  // read only in backward
  pb.grad = grad.mutable_data_ptr();
  set_grad_loss(pb, go, reduction, 1.0);  // the rows carry each part's 1/denominator
  kernels_for_this_cpu().backward(pb);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("ext_mix_fwd", &ext_mix_fwd_cpu);
  m.impl("ext_mix_bwd", &ext_mix_bwd_cpu);
}

}  // namespace fusedloss::cpu
