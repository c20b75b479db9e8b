// Argument handling shared by the CPU ops (ops_cpu.cpp, ops_cpu_mix.cpp): the target
// check with the 'mean' denominator, and the RowsProblem of a call.
#include "ops_cpu_common.h"

#include <ATen/ATen.h>

namespace fusedloss::cpu {

CheckedTargets check_targets(const at::Tensor& target, const at::Tensor& weight_acc, int64_t C,
                             int64_t ignore_index) {
  at::Tensor t = target.to(at::kLong).contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  double denominator = 0;
  auto add_weight = [&](int64_t c) {
    if (!weight_acc.defined()) {
      denominator += 1;
    } else if (weight_acc.scalar_type() == at::kDouble) {
      denominator += weight_acc.const_data_ptr<double>()[c];
    } else {
      denominator += weight_acc.const_data_ptr<float>()[c];
    }
  };
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    const int64_t c = tp[i];
    if (c == ignore_index) continue;
    TORCH_CHECK_INDEX(c >= 0 && c < C, "fusedloss: target ", c, " (row ", i,
                      ") is out of bounds for C=", C, " classes: expected 0 <= target < ", C,
                      " or target == ignore_index (", ignore_index, ")");
    add_weight(c);
  }
  return {t, denominator};
}

namespace {

double total_weight(const at::Tensor& weight_acc, int64_t C) {
  return weight_acc.defined() ? weight_acc.sum(at::kDouble).item<double>() : double(C);
}

}  // namespace

RowsProblem logits_problem(const at::Tensor& logits, const LossConfig& cfg) {
  RowsProblem pb{};
  pb.dtype = logits.scalar_type();
  pb.logits = logits.const_data_ptr();
  pb.rows = logits.size(0);
  pb.classes = logits.size(1);
  pb.row_stride = logits.stride(0);
  pb.cfg = cfg;
  pb.grad_scale = 1.0;
  return pb;
}

RowsProblem make_problem(const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& weight_acc, const LossConfig& cfg) {
  RowsProblem pb = logits_problem(logits, cfg);
  pb.target = target.const_data_ptr<int64_t>();
  pb.weight = weight_acc.defined() ? weight_acc.const_data_ptr() : nullptr;
  pb.weight_total = cfg.label_smoothing > 0 ? total_weight(weight_acc, pb.classes) : 0.0;
  return pb;
}

void set_grad_loss(RowsProblem& pb, const at::Tensor& grad_loss_acc, int64_t reduction, double denominator) {
  if (reduction == kNone) {
    pb.grad_loss_rows = grad_loss_acc.const_data_ptr();
    pb.grad_loss_stride = grad_loss_acc.stride(0);  // 0 for an expanded scalar
  } else {
    pb.grad_scale = grad_loss_acc.item<double>() / denominator;
  }
}

void check_bce_classes(const LossConfig& cfg, const at::Tensor& logits) {
  // bce keeps its arg-max in a stats column of the math type: exact below 2^24 in float32.
  TORCH_CHECK(cfg.variant != kBCE || logits.scalar_type() == at::kDouble ||
                  logits.size(1) <= (int64_t(1) << 24),
              "fusedloss: bce on the CPU supports at most 2^24 classes in float32 stats; got ",
              logits.size(1));
}

}  // namespace fusedloss::cpu
