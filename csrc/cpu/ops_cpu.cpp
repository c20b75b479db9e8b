// CPU implementations of fusedloss::ext_fwd / ext_bwd: argument checks, the
// target check, the 'mean' denominator, then the row kernels of this machine's
// best CPU capability (kernels.cpp), then the reduction of the row losses.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../op_common.h"
#include "kernels.h"
#include "row_sum.h"

namespace fusedloss::cpu {

const Kernels& kernels_for_this_cpu() {
  static const Kernels chosen = [] {
    // at::get_cpu_capability() is what ATen's own kernels run with: cpuinfo's
    // answer, lowered by ATEN_CPU_CAPABILITY (so tests can force DEFAULT).
    const std::string cap = at::get_cpu_capability();
#if defined(FUSEDLOSS_CPU_AVX512_BF16) && defined(FUSEDLOSS_CPU_AVX512) && defined(__GNUC__)
    const char* bf16 = std::getenv("FUSEDLOSS_CPU_AVX512_BF16");
    if (cap == "AVX512" && __builtin_cpu_supports("avx512bf16") && !(bf16 && std::string(bf16) == "0")) {
      return AVX512_BF16::kernels();
    }
#endif
#ifdef FUSEDLOSS_CPU_AVX512
    if (cap == "AVX512") return AVX512::kernels();
#endif
#ifdef FUSEDLOSS_CPU_AVX2
    if (cap == "AVX512" || cap == "AVX2") return AVX2::kernels();
#endif
    return DEFAULT::kernels();
  }();
  return chosen;
}

namespace {

// Targets as int64, each checked before any logit is read with it (CPU: always;
// reading host memory costs no synchronization). Also returns what 'mean'
// divides by: the number of non-ignored rows, or the sum of their weights.
struct CheckedTargets {
  at::Tensor target;
  double denominator;
};

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

double total_weight(const at::Tensor& weight_acc, int64_t C) {
  return weight_acc.defined() ? weight_acc.sum(at::kDouble).item<double>() : double(C);
}

RowsProblem make_problem(const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& weight_acc, const LossConfig& cfg) {
  RowsProblem pb{};
  pb.dtype = logits.scalar_type();
  pb.logits = logits.const_data_ptr();
  pb.rows = logits.size(0);
  pb.classes = logits.size(1);
  pb.row_stride = logits.stride(0);
  pb.target = target.const_data_ptr<int64_t>();
  pb.weight = weight_acc.defined() ? weight_acc.const_data_ptr() : nullptr;
  pb.weight_total = cfg.label_smoothing > 0 ? total_weight(weight_acc, pb.classes) : 0.0;
  pb.cfg = cfg;
  pb.grad_scale = 1.0;
  return pb;
}

void check_bce_classes(const LossConfig& cfg, const at::Tensor& logits) {
  // bce keeps its arg-max in a stats column of the math type: exact below 2^24 in float32.
  TORCH_CHECK(cfg.variant != kBCE || logits.scalar_type() == at::kDouble ||
                  logits.size(1) <= (int64_t(1) << 24),
              "fusedloss: bce on the CPU supports at most 2^24 classes in float32 stats; got ",
              logits.size(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t variant, int64_t reduction, int64_t ignore_index, double label_smoothing,
    double alpha, double beta, double gamma, double z_loss, double softcap, bool compute_grad) {
  check_inputs(logits, target, weight, "fusedloss::ext_fwd");
  const LossConfig cfg =
      make_config(variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss,
                  softcap);
  check_bce_classes(cfg, logits);
  const at::Tensor w = weight_in_acc(weight, logits);
  const CheckedTargets checked = check_targets(target, w, logits.size(1), ignore_index);
  ForwardOutputs out = allocate_forward(logits, compute_grad);

  RowsProblem pb = make_problem(logits, checked.target, w, cfg);
  pb.stats = out.stats.mutable_data_ptr();
  pb.loss_rows = out.loss_rows.mutable_data_ptr();
  pb.grad = compute_grad ? out.grad.mutable_data_ptr() : nullptr;
  // The fused gradient is for grad_output = 1: 'mean' scales every row by 1/denominator.
  pb.grad_scale = reduction == kMean ? 1.0 / checked.denominator : 1.0;
  kernels_for_this_cpu().forward(pb);

  at::Tensor loss = out.loss_rows;
  if (reduction != kNone) {
    double total = sum_in_row_order(loss);
    // 0/0 = NaN for 'mean' over no rows, as PyTorch.
    if (reduction == kMean) total /= checked.denominator;
    loss = at::scalar_tensor(total, loss.options());
  }
  return {loss, out.stats, out.grad};
}

at::Tensor ext_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                       const at::Tensor& target, const std::optional<at::Tensor>& weight,
                       const at::Tensor& stats, int64_t variant, int64_t reduction,
                       int64_t ignore_index, double label_smoothing, double alpha, double beta,
                       double gamma, double z_loss, double softcap) {
  check_inputs(logits, target, weight, "fusedloss::ext_bwd");
  const LossConfig cfg =
      make_config(variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss,
                  softcap);
  check_backward_inputs(grad_loss, logits, stats, cfg);
  check_bce_classes(cfg, logits);
  const auto acc = acc_dtype(logits);
  const at::Tensor w = weight_in_acc(weight, logits);
  const CheckedTargets checked = check_targets(target, w, logits.size(1), ignore_index);
  const at::Tensor st = stats.to(acc).contiguous();
  const at::Tensor go = grad_loss.to(acc);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());

  RowsProblem pb = make_problem(logits, checked.target, w, cfg);
  pb.stats = const_cast<void*>(st.const_data_ptr());  // read only in backward
  pb.grad = grad.mutable_data_ptr();
  if (reduction == kNone) {
    pb.grad_loss_rows = go.const_data_ptr();
    pb.grad_loss_stride = go.stride(0);  // 0 for an expanded scalar
  } else {
    pb.grad_scale = go.item<double>() / (reduction == kMean ? checked.denominator : 1.0);
  }
  kernels_for_this_cpu().backward(pb);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("ext_fwd", &ext_fwd_cpu);
  m.impl("ext_bwd", &ext_bwd_cpu);
}

}  // namespace fusedloss::cpu
