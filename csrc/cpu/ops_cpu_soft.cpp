// CPU implementations of the class-probability ops:
//   fusedloss::ext_soft_fwd / ext_soft_bwd: cross-entropy (F.cross_entropy's semantics: label
//     smoothing of the targets, class weights, 'mean' over the rows; kernels.cpp soft_ce);
//   fusedloss::ext_soft_loss_fwd / ext_soft_loss_bwd: every loss, the expected loss
//     sum_k w_k q'_k L(x, k) (docs/losses.md, "Soft targets"; kernels.cpp expected_row).
// Both on the same row kernels as the class-index losses.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../op_common.h"
#include "kernels.h"
#include "ops_cpu_common.h"
#include "row_sum.h"

namespace fusedloss::cpu {
namespace {

RowsProblem soft_problem(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& weight_acc,
                         const LossConfig& cfg) {
  RowsProblem pb{};
  pb.dtype = logits.scalar_type();
  pb.logits = logits.const_data_ptr();
  pb.rows = logits.size(0);
  pb.classes = logits.size(1);
  pb.row_stride = logits.stride(0);
  pb.probs = probs.const_data_ptr();
  pb.probs_stride = probs.stride(0);
  pb.weight = weight_acc.defined() ? weight_acc.const_data_ptr() : nullptr;
  // W of the smoothed mass (eps / C) W, summed in double once.
  pb.weight_total = weight_acc.defined() ? weight_acc.sum(at::kDouble).item<double>() : double(pb.classes);
  pb.cfg = cfg;
  pb.grad_scale = 1.0;
  return pb;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_forward(const at::Tensor& logits, const at::Tensor& probs,
                                                            const std::optional<at::Tensor>& weight,
                                                            const LossConfig& cfg, bool compute_grad,
                                                            const char* op) {
  const at::Tensor y = check_soft_inputs(logits, probs, weight, op);
  check_bce_classes(cfg, logits);
  const at::Tensor w = weight_in_acc(weight, logits);
  ForwardOutputs out = allocate_forward(logits, compute_grad);
  RowsProblem pb = soft_problem(logits, y, w, cfg);
  pb.stats = out.stats.mutable_data_ptr();
  pb.loss_rows = out.loss_rows.mutable_data_ptr();
  pb.grad = compute_grad ? out.grad.mutable_data_ptr() : nullptr;
  // PyTorch's 'mean' of probability targets divides by the number of rows, not by weights.
  const int64_t n = logits.size(0);
  pb.grad_scale = cfg.reduction == kMean ? 1.0 / static_cast<double>(n) : 1.0;
  kernels_for_this_cpu().forward(pb);
  at::Tensor loss = out.loss_rows;
  if (cfg.reduction != kNone) {
    double total = sum_in_row_order(loss);  // 0/0 = NaN for 'mean' over no rows, as PyTorch
    if (cfg.reduction == kMean) total /= static_cast<double>(n);
    loss = at::scalar_tensor(total, loss.options());
  }
  return {loss, out.stats, out.grad};
}

at::Tensor soft_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& probs,
                         const std::optional<at::Tensor>& weight, const at::Tensor& stats, const LossConfig& cfg,
                         const char* op) {
  const at::Tensor y = check_soft_inputs(logits, probs, weight, op);
  check_backward_inputs(grad_loss, logits, stats, cfg);
  const auto acc = acc_dtype(logits);
  const at::Tensor w = weight_in_acc(weight, logits);
  const at::Tensor st = stats.to(acc).contiguous();
  const at::Tensor go = grad_loss.to(acc);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  RowsProblem pb = soft_problem(logits, y, w, cfg);
  pb.stats = const_cast<void*>(st.const_data_ptr());  // read only in backward
  pb.grad = grad.mutable_data_ptr();
  set_grad_loss(pb, go, cfg.reduction, cfg.reduction == kMean ? static_cast<double>(logits.size(0)) : 1.0);
  kernels_for_this_cpu().backward(pb);
  return grad;
}

LossConfig soft_config(int64_t variant, int64_t reduction, double label_smoothing, double alpha, double beta,
                       double gamma) {
  return make_config(variant, reduction, -100, label_smoothing, alpha, beta, gamma, 0.0, 0.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_soft_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& probs, const std::optional<at::Tensor>& weight,
    int64_t reduction, double label_smoothing, bool compute_grad) {
  return soft_forward(logits, probs, weight, soft_config(kCE, reduction, label_smoothing, 0.0, 0.0, 0.0),
                      compute_grad, "fusedloss::ext_soft_fwd");
}

at::Tensor ext_soft_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& probs,
                            const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t reduction,
                            double label_smoothing) {
  return soft_backward(grad_loss, logits, probs, weight, stats,
                       soft_config(kCE, reduction, label_smoothing, 0.0, 0.0, 0.0), "fusedloss::ext_soft_bwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_soft_loss_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& probs, const std::optional<at::Tensor>& weight, int64_t variant,
    int64_t reduction, double label_smoothing, double alpha, double beta, double gamma, bool compute_grad) {
  return soft_forward(logits, probs, weight, soft_config(variant, reduction, label_smoothing, alpha, beta, gamma),
                      compute_grad, "fusedloss::ext_soft_loss_fwd");
}

at::Tensor ext_soft_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& probs,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t variant,
                                 int64_t reduction, double label_smoothing, double alpha, double beta, double gamma) {
  return soft_backward(grad_loss, logits, probs, weight, stats,
                       soft_config(variant, reduction, label_smoothing, alpha, beta, gamma),
                       "fusedloss::ext_soft_loss_bwd");
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("ext_soft_fwd", &ext_soft_fwd_cpu);
  m.impl("ext_soft_bwd", &ext_soft_bwd_cpu);
  m.impl("ext_soft_loss_fwd", &ext_soft_loss_fwd_cpu);
  m.impl("ext_soft_loss_bwd", &ext_soft_loss_bwd_cpu);
}

}  // namespace fusedloss::cpu
