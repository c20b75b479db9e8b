// CUDA implementations of fusedloss::ext_fwd / ext_bwd (and the soft-target and mixup
// pairs, ext_soft_* / ext_mix_*): checks on metadata, the
// 'mean' denominator and label smoothing's weight total as device scalars (no
// host synchronization), one block per row (row_kernels.cuh) on the current
// stream, then the reduction of the row losses on the device.
//
// Targets: a value outside [0, C) (and not ignore_index) is clamped before any
// read and its row's loss and gradient are NaN. FUSEDLOSS_STRICT=1 instead
// checks every target on the host first (one synchronization) and raises
// IndexError, as the CPU op always does.
#include <ATen/ATen.h>
// c10's stream header, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS and
// cuSPARSE headers, which a minimal toolkit (nvcc + cudart) does not ship.
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../op_common.h"
#include "row_kernels.cuh"

namespace fusedloss::cuda {
namespace {

bool strict_mode() {
  const char* v = std::getenv("FUSEDLOSS_STRICT");
  return v && *v && std::strcmp(v, "0") != 0 && std::strcmp(v, "false") != 0 &&
         std::strcmp(v, "False") != 0;
}

void check_targets_synchronously(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const at::Tensor bad = target.ne(ignore_index).logical_and(target.lt(0).logical_or(target.ge(C)));
  if (bad.any().item<bool>()) {
    const int64_t value = target.masked_select(bad)[0].item<int64_t>();
    TORCH_CHECK_INDEX(false, "fusedloss: target ", value, " is out of bounds for C=", C,
                      " classes: expected 0 <= target < ", C, " or target == ignore_index (",
                      ignore_index, ")");
  }
}

// What 'mean' divides by, on the device: the count of non-ignored rows, or the sum
// of their weights (a bad target counts with weight[0]; its row is NaN anyway).
at::Tensor mean_denominator(const at::Tensor& target, const at::Tensor& weight_acc,
                            int64_t ignore_index, at::ScalarType acc) {
  const at::Tensor keep = target.ne(ignore_index);
  if (!weight_acc.defined()) return keep.sum(acc);
  const at::Tensor safe = at::where(keep, target, at::zeros_like(target)).clamp(0, weight_acc.size(0) - 1);
  return at::where(keep, weight_acc.index_select(0, safe), at::zeros({}, weight_acc.options())).sum();
}

template <typename scalar_t, int kKind>
void launch_kind(const RowsArgs& a, bool vec, bool forward, int threads, int64_t blocks) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    rows_kernel<scalar_t, true, kKind><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a, forward);
  } else {
    rows_kernel<scalar_t, false, kKind><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a, forward);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_typed(const RowsArgs& a, bool vec, bool forward, int threads, int64_t blocks) {
  if (a.probs) {
    if (a.cfg.variant == kCE) return launch_kind<scalar_t, kSoftRows>(a, vec, forward, threads, blocks);
    return launch_kind<scalar_t, kSoftLossRows>(a, vec, forward, threads, blocks);
  }
  // Label smoothing of a loss other than ce: the expected loss under the smoothed target.
  const bool expected = a.cfg.label_smoothing > 0 && a.cfg.variant != kCE;
  if (expected) {
    if (a.target_b) return launch_kind<scalar_t, kMixExpectedRows>(a, vec, forward, threads, blocks);
    return launch_kind<scalar_t, kExpectedRows>(a, vec, forward, threads, blocks);
  }
  if (a.target_b) {
    if (a.cfg.variant == kBCE) return launch_kind<scalar_t, kMixBceRows>(a, vec, forward, threads, blocks);
    return launch_kind<scalar_t, kMixTargetOnlyRows>(a, vec, forward, threads, blocks);
  }
  if (a.cfg.variant == kBCE) return launch_kind<scalar_t, kBceRows>(a, vec, forward, threads, blocks);
  launch_kind<scalar_t, kTargetOnlyRows>(a, vec, forward, threads, blocks);
}

void launch(const RowsArgs& a, const at::Tensor& logits, bool forward) {
  if (a.rows == 0) return;
  const int64_t C = a.classes;
  const int64_t elem = logits.element_size(), pack = 16 / elem;
  // 128-bit packs need every row start (logits and gradient) 16-byte aligned.
  const bool vec = reinterpret_cast<uintptr_t>(a.logits) % 16 == 0 && (a.row_stride * elem) % 16 == 0 &&
                   C % pack == 0 && (!a.grad || reinterpret_cast<uintptr_t>(a.grad) % 16 == 0);
  // (The probabilities are read element by element: no alignment needed.)
  // About four packs per thread per pass, in whole warps, at most kMaxThreads.
  int threads = kWarpSize;
  while (threads < kMaxThreads && threads * pack * 4 < C) threads *= 2;
  const int64_t blocks = std::min<int64_t>(a.rows, int64_t(1) << 30);
  switch (logits.scalar_type()) {
    case at::kFloat:
      return launch_typed<float>(a, vec, forward, threads, blocks);
    case at::kDouble:
      return launch_typed<double>(a, vec, forward, threads, blocks);
    case at::kBFloat16:
      return launch_typed<c10::BFloat16>(a, vec, forward, threads, blocks);
    case at::kHalf:
      return launch_typed<c10::Half>(a, vec, forward, threads, blocks);
    default:
      TORCH_CHECK(false, "fusedloss: unsupported logits dtype ", logits.scalar_type());
  }
}

// The forward of a call: the outputs, the kernels over a's rows (a gets the output pointers).
ForwardOutputs run_forward(RowsArgs a, const at::Tensor& logits, bool compute_grad) {
  ForwardOutputs out = allocate_forward(logits, compute_grad);
  a.stats = out.stats.mutable_data_ptr();
  a.loss_rows = out.loss_rows.mutable_data_ptr();
  a.grad = compute_grad ? out.grad.mutable_data_ptr() : nullptr;
  launch(a, logits, /*forward=*/true);
  return out;
}

// The backward op of a call: the gradient from the forward's stats and grad_loss.
at::Tensor run_backward(RowsArgs a, const at::Tensor& logits, const at::Tensor& stats, const at::Tensor& grad_loss) {
  const auto acc = acc_dtype(logits);
  const at::Tensor st = stats.to(acc).contiguous();
  const at::Tensor go = grad_loss.to(acc);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  a.stats = const_cast<void*>(st.const_data_ptr());  // read only in backward
  a.grad = grad.mutable_data_ptr();
  a.grad_loss = go.const_data_ptr();
  a.grad_loss_stride = go.dim() == 0 ? 0 : go.stride(0);
  launch(a, logits, /*forward=*/false);
  return grad;
}

// Device tensors a call keeps alive while its kernel runs.
struct Prepared {
  at::Tensor target, weight, weight_total, denominator;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, const LossConfig& cfg) {
  const auto acc = acc_dtype(logits);
  const int64_t C = logits.size(1);
  Prepared p;
  p.target = target.to(at::kLong).contiguous();
  if (strict_mode()) check_targets_synchronously(p.target, C, cfg.ignore_index);
  p.weight = weight_in_acc(weight, logits);
  if (cfg.label_smoothing > 0 && p.weight.defined()) p.weight_total = p.weight.sum();
  if (cfg.reduction == kMean) p.denominator = mean_denominator(p.target, p.weight, cfg.ignore_index, acc);
  return p;
}

RowsArgs make_args(const at::Tensor& logits, const Prepared& p, const LossConfig& cfg) {
  RowsArgs a{};
  a.logits = logits.const_data_ptr();
  a.rows = logits.size(0);
  a.classes = logits.size(1);
  a.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  a.target = p.target.const_data_ptr<int64_t>();
  a.weight = p.weight.defined() ? p.weight.const_data_ptr() : nullptr;
  a.weight_total = p.weight_total.defined() ? p.weight_total.const_data_ptr() : nullptr;
  a.denominator = p.denominator.defined() ? p.denominator.const_data_ptr() : nullptr;
  a.cfg = cfg;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t variant, int64_t reduction, int64_t ignore_index, double label_smoothing, double alpha,
    double beta, double gamma, double z_loss, double softcap, bool compute_grad) {
  check_inputs(logits, target, weight, "fusedloss::ext_fwd");
  const LossConfig cfg = make_config(variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss,
                  softcap);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, target, weight, cfg);
  const ForwardOutputs out = run_forward(make_args(logits, p, cfg), logits, compute_grad);
  at::Tensor loss = out.loss_rows;
  if (reduction == kSum) loss = loss.sum();
  if (reduction == kMean) loss = loss.sum() / p.denominator;  // 0/0 = NaN with no rows, as PyTorch
  return {loss, out.stats, out.grad};
}

at::Tensor ext_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t variant,
                        int64_t reduction, int64_t ignore_index, double label_smoothing, double alpha,
                        double beta,
                       double gamma, double z_loss, double softcap) {
  check_inputs(logits, target, weight, "fusedloss::ext_bwd");
  const LossConfig cfg = make_config(variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss,
                  softcap);
  check_backward_inputs(grad_loss, logits, stats, cfg);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, target, weight, cfg);
  return run_backward(make_args(logits, p, cfg), logits, stats, grad_loss);
}

// Mixup's two targets, lam L(x, target_a) + (1 - lam) L(x, target_b), every loss, each part
// reduced as the loss alone would be: the same row kernels with RowsArgs::target_b (one
// read of the row for both targets' statistics, one gradient write). 'mean''s two
// denominators stay device scalars; the rows carry each part's 1/denominator, so 'mean' and
// 'sum' both add them up. Stats as the CPU op's: (lse, lse_ex_a, lse_ex_b, 0), bce's
// (lse, lse_ex_a, log(1 - p_w), w).
struct MixPrepared {
  Prepared a, b;
  at::Tensor lam;
};

MixPrepared prepare_mix(const at::Tensor& logits, const at::Tensor& target_a, const at::Tensor& target_b,
                        const at::Tensor& lam, const std::optional<at::Tensor>& weight, const LossConfig& cfg,
                        const char* op) {
  const at::Tensor lam_acc = check_mix_inputs(logits, target_a, target_b, lam, weight, op);
  return {prepare(logits, target_a, weight, cfg), prepare(logits, target_b, weight, cfg), lam_acc};
}

RowsArgs mix_args(const at::Tensor& logits, const MixPrepared& p, const LossConfig& cfg) {
  RowsArgs a = make_args(logits, p.a, cfg);
  a.denominator = nullptr;  // in each part's k instead
  a.target_b = p.b.target.const_data_ptr<int64_t>();
  a.lam = p.lam.const_data_ptr();
  a.mix_denominator_a = p.a.denominator.defined() ? p.a.denominator.const_data_ptr() : nullptr;
  a.mix_denominator_b = p.b.denominator.defined() ? p.b.denominator.const_data_ptr() : nullptr;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_mix_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target_a, const at::Tensor& target_b, const at::Tensor& lam,
    const std::optional<at::Tensor>& weight, int64_t variant, int64_t reduction, int64_t ignore_index,
    double label_smoothing, double alpha, double beta, double gamma, double z_loss, double softcap,
    bool compute_grad) {
  const LossConfig cfg =
      make_config(variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap);
  const c10::cuda::CUDAGuard guard(logits.device());
  const MixPrepared p = prepare_mix(logits, target_a, target_b, lam, weight, cfg, "fusedloss::ext_mix_fwd");
  const ForwardOutputs out = run_forward(mix_args(logits, p, cfg), logits, compute_grad);
  at::Tensor loss = out.loss_rows;
  if (reduction != kNone) loss = loss.sum();
  if (reduction == kMean) {
    // A part without counted rows makes 'mean' NaN (0/0), as that part's 'mean' alone would;
    // its rows add 0 (k = 0 where the target is ignored), so the NaN is added here.
    const at::Tensor empty_part = p.a.denominator.eq(0).logical_or(p.b.denominator.eq(0));
    loss = at::where(empty_part, at::full({}, NAN, loss.options()), loss);
  }
  return {loss, out.stats, out.grad};
}

at::Tensor ext_mix_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target_a,
                            const at::Tensor& target_b, const at::Tensor& lam,
                            const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t variant,
                            int64_t reduction, int64_t ignore_index, double label_smoothing, double alpha,
                            double beta, double gamma, double z_loss, double softcap) {
  const LossConfig cfg =
      make_config(variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap);
  const c10::cuda::CUDAGuard guard(logits.device());
  const MixPrepared p = prepare_mix(logits, target_a, target_b, lam, weight, cfg, "fusedloss::ext_mix_bwd");
  check_backward_inputs(grad_loss, logits, stats, cfg);
  return run_backward(mix_args(logits, p, cfg), logits, stats, grad_loss);
}

// Class-probability targets (ce): PyTorch's 'mean' divides by the number of rows N, a
// device scalar here like the class-index mean's denominator.
RowsArgs soft_args(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& weight_acc,
                   const at::Tensor& weight_total, const at::Tensor& rows_count, const LossConfig& cfg) {
  RowsArgs a{};
  a.logits = logits.const_data_ptr();
  a.rows = logits.size(0);
  a.classes = logits.size(1);
  a.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  a.probs = probs.const_data_ptr();
  a.probs_stride = probs.size(0) > 1 ? probs.stride(0) : probs.size(1);
  a.weight = weight_acc.defined() ? weight_acc.const_data_ptr() : nullptr;
  a.weight_total = weight_total.defined() ? weight_total.const_data_ptr() : nullptr;
  a.denominator = cfg.reduction == kMean ? rows_count.const_data_ptr() : nullptr;
  a.cfg = cfg;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_forward_cuda(const at::Tensor& logits, const at::Tensor& probs,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const LossConfig& cfg, bool compute_grad,
                                                                 const char* op) {
  const at::Tensor y = check_soft_inputs(logits, probs, weight, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_dtype(logits);
  const at::Tensor w = weight_in_acc(weight, logits);
  const at::Tensor wt = w.defined() ? w.sum() : at::Tensor();
  const at::Tensor n = at::full({}, static_cast<double>(logits.size(0)), logits.options().dtype(acc));
  const ForwardOutputs out = run_forward(soft_args(logits, y, w, wt, n, cfg), logits, compute_grad);
  at::Tensor loss = out.loss_rows;
  if (cfg.reduction == kSum) loss = loss.sum();
  if (cfg.reduction == kMean) loss = loss.sum() / n;
  return {loss, out.stats, out.grad};
}

at::Tensor soft_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& probs,
                              const std::optional<at::Tensor>& weight, const at::Tensor& stats, const LossConfig& cfg,
                              const char* op) {
  const at::Tensor y = check_soft_inputs(logits, probs, weight, op);
  check_backward_inputs(grad_loss, logits, stats, cfg);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_dtype(logits);
  const at::Tensor w = weight_in_acc(weight, logits);
  const at::Tensor wt = w.defined() ? w.sum() : at::Tensor();
  const at::Tensor n = at::full({}, static_cast<double>(logits.size(0)), logits.options().dtype(acc));
  return run_backward(soft_args(logits, y, w, wt, n, cfg), logits, stats, grad_loss);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_soft_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& probs, const std::optional<at::Tensor>& weight,
    int64_t reduction, double label_smoothing, bool compute_grad) {
  return soft_forward_cuda(logits, probs, weight, make_config(kCE, reduction, -100, label_smoothing, 0.0, 0.0, 0.0, 0.0, 0.0),
                           compute_grad, "fusedloss::ext_soft_fwd");
}

at::Tensor ext_soft_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& probs,
                             const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t reduction,
                             double label_smoothing) {
  return soft_backward_cuda(grad_loss, logits, probs, weight, stats,
                            make_config(kCE, reduction, -100, label_smoothing, 0.0, 0.0, 0.0, 0.0, 0.0),
                            "fusedloss::ext_soft_bwd");
}

// Class-probability targets, every loss (the expected loss; row_kernels.cuh expected_row).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ext_soft_loss_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& probs, const std::optional<at::Tensor>& weight, int64_t variant,
    int64_t reduction, double label_smoothing, double alpha, double beta, double gamma, bool compute_grad) {
  return soft_forward_cuda(logits, probs, weight,
                           make_config(variant, reduction, -100, label_smoothing, alpha, beta, gamma, 0.0, 0.0),
                           compute_grad, "fusedloss::ext_soft_loss_fwd");
}

at::Tensor ext_soft_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& probs,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& stats, int64_t variant,
                                  int64_t reduction, double label_smoothing, double alpha, double beta,
                                  double gamma) {
  return soft_backward_cuda(grad_loss, logits, probs, weight, stats,
                            make_config(variant, reduction, -100, label_smoothing, alpha, beta, gamma, 0.0, 0.0),
                            "fusedloss::ext_soft_loss_bwd");
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("ext_fwd", &ext_fwd_cuda);
  m.impl("ext_bwd", &ext_bwd_cuda);
  m.impl("ext_soft_fwd", &ext_soft_fwd_cuda);
  m.impl("ext_soft_bwd", &ext_soft_bwd_cuda);
  m.impl("ext_soft_loss_fwd", &ext_soft_loss_fwd_cuda);
  m.impl("ext_soft_loss_bwd", &ext_soft_loss_bwd_cuda);
  m.impl("ext_mix_fwd", &ext_mix_fwd_cuda);
  m.impl("ext_mix_bwd", &ext_mix_bwd_cuda);
}

}  // namespace fusedloss::cuda
