// CPU implementation of fusedloss::ext_distill (DISTILL_SCHEMA, contract:
// python/fusedloss/distill/ops.py): the divergence of the student's softmax from the
// teacher's at temperature T per row, and row_scale times its gradient w.r.t. the student
// written into (or added to) `grad`, fused: one read of each logits row, one write of the
// gradient row (kernels_distill.cpp, compiled per CPU capability).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>

#include "../distill_common.h"
#include "distill_kernels.h"
#include "kernels.h"

namespace fusedloss::cpu {
namespace {

// The row kernels of the capability object ext_fwd runs (kernels_for_this_cpu's choice).
DistillFn distill_for_this_cpu() {
  static const DistillFn chosen = [] {
    [[maybe_unused]] const char* cap = kernels_for_this_cpu().capability;
#ifdef FUSEDLOSS_CPU_AVX512_BF16
    if (std::strcmp(cap, "AVX512_BF16") == 0) return AVX512_BF16::distill_kernel();
#endif
#ifdef FUSEDLOSS_CPU_AVX512
    if (std::strcmp(cap, "AVX512") == 0) return AVX512::distill_kernel();
#endif
#ifdef FUSEDLOSS_CPU_AVX2
    if (std::strcmp(cap, "AVX2") == 0) return AVX2::distill_kernel();
#endif
    return DEFAULT::distill_kernel();
  }();
  return chosen;
}

at::Tensor ext_distill_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_scale,
                           double temperature, int64_t divergence, double jsd_beta,
                           const std::optional<at::Tensor>& grad, bool accumulate) {
  const at::Tensor rs = check_distill_inputs(student, teacher, row_scale, temperature, divergence, jsd_beta, grad,
                                             "fusedloss::ext_distill");
  TORCH_CHECK(student.device().is_cpu(), "fusedloss::ext_distill: the CPU kernel got a tensor on ", student.device());
  const int64_t n = student.size(0), v = student.size(1);
  at::Tensor out = at::empty({n}, student.options().dtype(rs.scalar_type()));
  if (n == 0) return out;
  DistillProblem pb{};
  pb.dtype = student.scalar_type();
  pb.student = student.const_data_ptr();
  pb.teacher = teacher.const_data_ptr();
  pb.rows = n;
  pb.classes = v;
  pb.student_stride = student.stride(0);
  pb.teacher_stride = teacher.stride(0);
  pb.row_scale = rs.const_data_ptr();
  pb.temperature = temperature;
  pb.divergence = divergence;
  pb.jsd_beta = jsd_beta;
  pb.grad = grad.has_value() ? grad->mutable_data_ptr() : nullptr;
  pb.grad_stride = grad.has_value() ? grad->stride(0) : 0;
  pb.accumulate = accumulate;
  pb.out = out.mutable_data_ptr();
  distill_for_this_cpu()(pb);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { m.impl("ext_distill", &ext_distill_cpu); }

}  // namespace fusedloss::cpu
