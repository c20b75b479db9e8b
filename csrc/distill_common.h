// Argument checks of the distillation op (fusedloss::ext_distill, DISTILL_SCHEMA in
// python/fusedloss/distill/ops.py), shared by its CPU and CUDA implementations.
// Metadata only: nothing here reads tensor data, so nothing synchronizes.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedloss {

// student, teacher (N, V) of one floating dtype (float32, float64, bfloat16, float16) and
// device, unit class stride (any row stride); row_scale (N,) floating; temperature > 0 and
// finite; divergence in DIVERGENCES; jsd_beta in (0, 1) for jsd; grad (N, V) of the logits'
// dtype and device with unit class stride, or absent. Returns row_scale in the math type
// (float32, float64 for float64 logits), contiguous.
at::Tensor check_distill_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_scale,
                                double temperature, int64_t divergence, double jsd_beta,
                                const std::optional<at::Tensor>& grad, const char* op);

}  // namespace fusedloss
