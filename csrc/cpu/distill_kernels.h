// The interface between the CPU distillation op (ops_cpu_distill.cpp, compiled once) and its
// row kernels (kernels_distill.cpp, compiled once per CPU capability, as kernels.cpp is).
// Plain pointers and sizes only. The op's contract: python/fusedloss/distill/ops.py.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedloss::cpu {

// python/fusedloss/distill/ops.py DIVERGENCES (append, never renumber).
enum DistillDivergence : int64_t { kDistillKL = 0, kDistillReverseKL = 1, kDistillJSD = 2 };

// One call's rows. "acc" is the math type: float, or double for double logits.
struct DistillProblem {
  c10::ScalarType dtype;     // of student, teacher and grad
  const void* student;       // (rows, classes), unit class stride, student_stride between rows
  const void* teacher;       // (rows, classes), unit class stride, teacher_stride between rows
  int64_t rows, classes, student_stride, teacher_stride;
  const void* row_scale;     // (rows,) acc, contiguous
  double temperature;        // T > 0
  int64_t divergence;        // DistillDivergence
  double jsd_beta;           // in (0, 1), jsd only
  void* grad;                // (rows, classes) dtype, unit class stride, grad_stride between rows; or nullptr
  int64_t grad_stride;
  bool accumulate;           // grad += (true) or grad = (false) row_scale * dD/dstudent
  void* out;                 // (rows,) acc: D of every row
};

using DistillFn = void (*)(const DistillProblem&);

// One definition per capability object (setup.py defines FUSEDLOSS_CPU_<cap> for the ones built).
namespace DEFAULT { DistillFn distill_kernel(); }
namespace AVX2 { DistillFn distill_kernel(); }
namespace AVX512 { DistillFn distill_kernel(); }
namespace AVX512_BF16 { DistillFn distill_kernel(); }

}  // namespace fusedloss::cpu
