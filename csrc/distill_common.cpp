// Argument checks of the distillation op: see distill_common.h.
#include "distill_common.h"

#include <ATen/ATen.h>

#include <cmath>

namespace fusedloss {

namespace {

void check_rows(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be (N, V); got ", x.dim(), " dims");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16; got ", dt);
  TORCH_CHECK(x.size(1) > 0, op, ": ", name, " needs at least one class");
  // Rows of any stride are read (or written) in place; the class dimension must be dense.
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, op, ": ", name,
              " must have unit stride along classes; got strides ", x.strides());
}

}  // namespace

at::Tensor check_distill_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_scale,
                                double temperature, int64_t divergence, double jsd_beta,
                                const std::optional<at::Tensor>& grad, const char* op) {
  check_rows(student, "student", op);
  check_rows(teacher, "teacher", op);
  TORCH_CHECK(teacher.sizes() == student.sizes(), op, ": teacher must have the student's shape ", student.sizes(),
              "; got ", teacher.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), op, ": teacher must have the student's dtype ",
              student.scalar_type(), "; got ", teacher.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), op, ": teacher is on ", teacher.device(),
              " but student is on ", student.device());
  const int64_t n = student.size(0);
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == n, op, ": row_scale must be (", n, ",); got ",
              row_scale.sizes());
  TORCH_CHECK(row_scale.is_floating_point() && row_scale.device() == student.device(), op,
              ": row_scale must be a floating tensor on the student's device");
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), op,
                    ": temperature must be a finite number > 0; got ", temperature);
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 2, op,
                    ": divergence must be 0 (kl), 1 (reverse_kl) or 2 (jsd); got ", divergence);
  TORCH_CHECK_VALUE(divergence != 2 || (jsd_beta > 0 && jsd_beta < 1), op, ": jsd_beta must be in (0, 1); got ",
                    jsd_beta);
  if (grad.has_value()) {
    const at::Tensor& g = *grad;
    TORCH_CHECK(g.sizes() == student.sizes(), op, ": grad must have the student's shape ", student.sizes(),
                "; got ", g.sizes());
    TORCH_CHECK(g.scalar_type() == student.scalar_type() && g.device() == student.device(), op,
                ": grad must have the student's dtype and device (", student.scalar_type(), ", ",
                student.device(), "); got ", g.scalar_type(), ", ", g.device());
    TORCH_CHECK(g.stride(1) == 1 || g.size(1) == 1, op, ": grad must have unit stride along classes; got strides ",
                g.strides());
  }
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return row_scale.to(acc).contiguous();
}

}  // namespace fusedloss
