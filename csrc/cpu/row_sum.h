// The reduction of the CPU ops' row losses: in row order and in double, so 'sum'
// and 'mean' give the same bits for any thread count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace fusedloss::cpu {

inline double sum_in_row_order(const at::Tensor& loss_rows) {
  double total = 0;
  if (loss_rows.scalar_type() == at::kDouble) {
    for (const double v : c10::ArrayRef<double>(loss_rows.const_data_ptr<double>(), loss_rows.numel())) total += v;
  } else {
    for (const float v : c10::ArrayRef<float>(loss_rows.const_data_ptr<float>(), loss_rows.numel())) total += v;
  }
  return total;
}

}  // namespace fusedloss::cpu
