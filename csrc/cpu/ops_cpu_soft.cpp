// CPU implementations of fusedloss::ext_soft_fwd / ext_soft_bwd: cross-entropy with
// class-probability targets (F.cross_entropy's semantics: label smoothing of the
// targets, class weights, 'mean' over the rows), on the same row kernels as the
// class-index losses (kernels.cpp, soft_ce).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../op_common.h"
#include "kernels.h"
#include "ops_cpu_common.h"
#include "row_sum.h"

namespace fusedloss::cpu {
namespace {

RowsProblem soft_problem(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& weight_acc,
                         int64_t reduction, double label_smoothing) {
  RowsProblem pb{};
  pb.dtype = logits.scalar_type();
  pb.logits = logits.const_data_ptr();
  pb.rows = logits.size(0);
  pb.classes = logits.size(1);
  pb.row_stride = logits.stride(0);
  pb.probs = probs.const_data_ptr();
  pb.probs_stride = probs.stride(0);
  pb.weight = weight_acc.defined() ? weight_acc.const_data_ptr() : nullptr;
  pb.cfg = make_config(kCE, reduction, -100, label_smoothing, 0.0, 0.0, 0.0, 0.0, 0.0);
  pb.grad_scale = 1.0;
  return pb;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_soft_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& probs, const std::optional<at::Tensor>& weight,
    int64_t reduction, double label_smoothing, bool compute_grad) {
  const at::Tensor y = check_soft_inputs(logits, probs, weight, "fusedloss::ext_soft_fwd");
  const at::Tensor w = weight_in_acc(weight, logits);
  ForwardOutputs out = allocate_forward(logits, compute_grad);
  RowsProblem pb = soft_problem(logits, y, w, reduction, label_smoothing);
  pb.stats = out.stats.mutable_data_ptr();
  pb.loss_rows = out.loss_rows.mutable_data_ptr();
  pb.grad = compute_grad ? out.grad.mutable_data_ptr() : nullptr;
  // PyTorch's 'mean' of probability targets divides by the number of rows, not by weights.
  const int64_t n = logits.size(0);
  pb.grad_scale = reduction == kMean ? 1.0 / static_cast<double>(n) : 1.0;
  kernels_for_this_cpu().forward(pb);
  at::Tensor loss = out.loss_rows;
  if (reduction != kNone) {
    double total = sum_in_row_order(loss);  // 0/0 = NaN for 'mean' over no rows, as PyTorch
    if (reduction == kMean) total /= static_cast<double>(n);
    loss = at::scalar_tensor(total, loss.options());
  }
  return {loss, out.stats, out.grad};
}

at::Tensor ext_soft_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& probs,
                            const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t reduction,
                            double label_smoothing) {
  const at::Tensor y = check_soft_inputs(logits, probs, weight, "fusedloss::ext_soft_bwd");
  const LossConfig cfg = make_config(kCE, reduction, -100, label_smoothing, 0.0, 0.0, 0.0, 0.0, 0.0);
  check_backward_inputs(grad_loss, logits, stats, cfg);
  const auto acc = acc_dtype(logits);
  const at::Tensor w = weight_in_acc(weight, logits);
  const at::Tensor st = stats.to(acc).contiguous();
  const at::Tensor go = grad_loss.to(acc);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  RowsProblem pb = soft_problem(logits, y, w, reduction, label_smoothing);
  pb.stats = const_cast<void*>(st.const_data_ptr());  // read only in backward
  pb.grad = grad.mutable_data_ptr();
  set_grad_loss(pb, go, reduction, reduction == kMean ? static_cast<double>(logits.size(0)) : 1.0);
  kernels_for_this_cpu().backward(pb);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("ext_soft_fwd", &ext_soft_fwd_cpu);
  m.impl("ext_soft_bwd", &ext_soft_bwd_cpu);
}

}  // namespace fusedloss::cpu
