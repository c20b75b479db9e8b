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
#include "ops_cpu_common.h"
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
  set_grad_loss(pb, go, reduction, reduction == kMean ? checked.denominator : 1.0);
  kernels_for_this_cpu().backward(pb);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("ext_fwd", &ext_fwd_cpu);
  m.impl("ext_bwd", &ext_bwd_cpu);
}

}  // namespace fusedloss::cpu
