// CPU implementations of the two bce ops of a vocabulary-parallel row (python/fusedloss/parallel.py,
// docs/parallel.md "bce"): the rank's slice of the logits, given the row's global numbers.
//   ext_bce_partial(logits, stats, slice_idx, softcap) -> (N, 2): per row, over the slice's classes k
//     not in {c, w}: sum log(1 - p_k) and sum a_k, a_k = p_k / (1 - p_k), p_k = exp(x_k - stats[:, 0]).
//   ext_bce_global_bwd(grad_rows, logits, stats, slice_idx, z_loss, softcap) -> (N, C): the slice's
//     gradient.
// stats (N, 4) of the math type: the global lse, R = sum_{k != w} a_k (a_c = -1), log(1 - p_w), x_w
// (the partial op reads lse only); slice_idx (N, 3) int64: local c, local w (-1: on another rank),
// and 1 where w == c globally, 0 where not, -1 on an ignored row (zeros). grad_rows (N,): the row's
// own coefficient (1 - eps) w_c dLoss/dloss_i (class weight folded in: the kernel reads none);
// z_loss such that z-loss adds 2 z_loss lse grad_rows p_j. softcap (0: none): x_k read as
// softcap tanh(x_k / softcap), the stats being those of the capped logits, and the gradient w.r.t.
// the raw logits. No label smoothing: the caller adds its term with the global class count and
// weight total.
// The row kernels are kernels.cpp's bce_given_global.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../op_common.h"
#include "kernels.h"
#include "ops_cpu_common.h"

namespace fusedloss::cpu {
namespace {

// The common arguments, checked; stats in the math type, contiguous.
struct SliceInputs {
  at::Tensor stats, slice_idx;
};

SliceInputs check_slice_inputs(const at::Tensor& logits, const at::Tensor& stats, const at::Tensor& slice_idx,
                               const char* op) {
  check_logits(logits, op);
  const int64_t n = logits.size(0), C = logits.size(1);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == kStatsCols && stats.is_floating_point(),
              op, ": stats must be floating (", n, ", ", kStatsCols, "); got ", stats.scalar_type(), " ",
              stats.sizes());
  TORCH_CHECK(slice_idx.dim() == 2 && slice_idx.size(0) == n && slice_idx.size(1) == 3 &&
                  slice_idx.scalar_type() == at::kLong,
              op, ": slice_idx must be int64 (", n, ", 3); got ", slice_idx.scalar_type(), " ", slice_idx.sizes());
  TORCH_CHECK(stats.device() == logits.device() && slice_idx.device() == logits.device(), op,
              ": stats and slice_idx must be on the logits' device");
  SliceInputs in{stats.to(acc_dtype(logits)).contiguous(), slice_idx.contiguous()};
  // Every index is read before any logit is read with it (host memory: no synchronization).
  const int64_t* idx = in.slice_idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = idx[3 * i], w = idx[3 * i + 1], kind = idx[3 * i + 2];
    TORCH_CHECK_INDEX(c >= -1 && c < C && w >= -1 && w < C && kind >= -1 && kind <= 1, op, ": slice_idx row ", i,
                      " = (", c, ", ", w, ", ", kind, ") out of range for ", C, " classes");
    // w == c globally: both on this rank at one index, or both elsewhere (-1).
    TORCH_CHECK(kind != 1 || c == w, op, ": slice_idx row ", i, " says w == c but has c = ", c, ", w = ", w);
    TORCH_CHECK(kind != 0 || c != w || c == -1, op, ": slice_idx row ", i, " says w != c but has c = w = ", c);
  }
  return in;
}

RowsProblem slice_problem(const at::Tensor& logits, const SliceInputs& in, double z_loss, double softcap) {
  RowsProblem pb = logits_problem(logits, make_config(kBCE, kNone, -1, 0.0, 0.0, 0.0, 0.0, z_loss, softcap));
  pb.stats = const_cast<void*>(in.stats.const_data_ptr());  // read only
  pb.slice_idx = in.slice_idx.const_data_ptr<int64_t>();
  return pb;
}

at::Tensor ext_bce_partial_cpu(const at::Tensor& logits, const at::Tensor& stats, const at::Tensor& slice_idx,
                               double softcap) {
  const SliceInputs in = check_slice_inputs(logits, stats, slice_idx, "fusedloss::ext_bce_partial");
  at::Tensor sums = at::empty({logits.size(0), 2}, logits.options().dtype(acc_dtype(logits)));
  RowsProblem pb = slice_problem(logits, in, 0.0, softcap);
  pb.bce_sums = sums.mutable_data_ptr();
  kernels_for_this_cpu().bce_partial(pb);
  return sums;
}

at::Tensor ext_bce_global_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& stats,
                                  const at::Tensor& slice_idx, double z_loss, double softcap) {
  const char* op = "fusedloss::ext_bce_global_bwd";
  const SliceInputs in = check_slice_inputs(logits, stats, slice_idx, op);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == logits.size(0) && grad_rows.is_floating_point() &&
                  grad_rows.device() == logits.device(),
              op, ": grad_rows must be floating (", logits.size(0), ",) on the logits' device; got ",
              grad_rows.scalar_type(), " ", grad_rows.sizes());
  const at::Tensor go = grad_rows.to(acc_dtype(logits));
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  RowsProblem pb = slice_problem(logits, in, z_loss, softcap);  // make_config checks both
  pb.grad = grad.mutable_data_ptr();
  set_grad_loss(pb, go, kNone, 1.0);
  kernels_for_this_cpu().bce_global_backward(pb);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("ext_bce_partial", &ext_bce_partial_cpu);
  m.impl("ext_bce_global_bwd", &ext_bce_global_bwd_cpu);
}

}  // namespace fusedloss::cpu
