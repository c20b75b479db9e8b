// CUDA implementation of fusedloss::ext_distill (DISTILL_SCHEMA, contract:
// python/fusedloss/distill/ops.py): one block per row, on the current stream, no host
// synchronization.
//
// With z = x / T, P = softmax(z_t), Q = softmax(z_s), per row:
//   pass 1: lse_s and lse_t (reduce.cuh's online LseState, one read of each row);
//   pass 2: the divergence's sums in log space (log P_j = z_t_j - lse_t, log Q_j = z_s_j - lse_s,
//           log M_j = logaddexp(log b + log P_j, log(1 - b) + log Q_j)), each term 0 where its
//           probability is 0;
//   pass 3 (only with grad): row_scale times the gradient, written (or added) once:
//     kl T (Q - P); reverse kl T Q (c - E_Q[c]), c = z_s - z_t; jsd T (1 - b) Q (u - E_Q[u]),
//     u = log Q - log M; the means formed about the student's arg-max m (sum Q (c - c_m) / sum Q),
//     so the gradient at a dominant class keeps its relative precision; kl's entry at m, where
//     Q_m > 1/2, as -sum_{k != m} (Q_k - P_k) (pass 2's sum): Q_m - P_m of two numbers near 1 when
//     the teacher is confident on m too is rounding noise (the reference op's form, distill/ops.py).
//     A row with row_scale 0 writes zeros (accumulate=False) or nothing.
// Passes 2 and 3 re-read the rows (from L2 for the rows in flight).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../distill_common.h"
#include "../losses.h"
#include "reduce.cuh"

namespace fusedloss::cuda {
namespace {

constexpr int64_t kKL = 0, kReverseKL = 1;  // distill.ops.DIVERGENCES; anything else: jsd

struct DistillArgs {
  const void* student;
  const void* teacher;
  int64_t rows, classes, student_stride, teacher_stride;
  const void* row_scale;  // (rows,) acc, contiguous
  double temperature, jsd_beta;
  void* grad;             // (rows, classes) unit class stride, grad_stride between rows; or nullptr
  int64_t grad_stride;
  bool accumulate;
  void* out;              // (rows,) acc
};

template <typename scalar_t, int64_t kDiv>
__global__ void __launch_bounds__(kMaxThreads, 1) distill_kernel(const DistillArgs a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.classes;
  const acc_t temp = static_cast<acc_t>(a.temperature);
  const acc_t inv_t = static_cast<acc_t>(1.0 / a.temperature);
  const acc_t beta = static_cast<acc_t>(a.jsd_beta);
  const acc_t log_b = std::log(beta), log_b1 = std::log1p(-beta);
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    const scalar_t* s = static_cast<const scalar_t*>(a.student) + i * a.student_stride;
    const scalar_t* t = static_cast<const scalar_t*>(a.teacher) + i * a.teacher_stride;

    LseState<acc_t> ls = LseState<acc_t>::empty(), lt = LseState<acc_t>::empty();
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      ls.add(static_cast<acc_t>(s[j]) * inv_t, j);
      lt.add(static_cast<acc_t>(t[j]) * inv_t, j);
    }
    ls = block_merge(ls);
    lt = block_merge(lt);
    // lse = max + log(sum), kept in two parts: log Q_j = (z_j - max) - log(sum), so the Q_j sum to
    // 1 within a few ulps however large |lse| is.
    const acc_t max_s = ls.max, lsum_s = std::log(ls.sum), max_t = lt.max, lsum_t = std::log(lt.sum);
    // The student's arg-max m: the pivot of the reverse kl / jsd gradients (cpu/kernels_distill.cpp).
    const int64_t m = ls.arg < C ? ls.arg : 0;
    const acc_t zs_m = static_cast<acc_t>(s[m]) * inv_t, zt_m = static_cast<acc_t>(t[m]) * inv_t;
    auto log_q = [&](acc_t z) { return (z - max_s) - lsum_s; };
    auto log_p = [&](acc_t z) { return (z - max_t) - lsum_t; };
    const acc_t u_m = log_q(zs_m) - logaddexp(log_b + log_p(zt_m), log_b1 + log_q(zs_m));

    // kl: v[0] = sum P (log P - log Q), v[1] = sum_{k != m} (Q_k - P_k); reverse kl: v[0] = sum Q (log Q - log P), v[1] = sum Q d,
    // d = (z_s - z_s_m) - (z_t - z_t_m), v[2] = sum Q; jsd: v[0] = sum P (log P - log M),
    // v[1] = sum Q u, v[2] = sum Q (u - u_m), v[3] = sum Q.
    acc_t v[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const acc_t zs = static_cast<acc_t>(s[j]) * inv_t, zt = static_cast<acc_t>(t[j]) * inv_t;
      const acc_t lq = log_q(zs), lp = log_p(zt);
      const acc_t p = std::exp(lp), q = std::exp(lq);
      if constexpr (kDiv == kKL) {
        if (p > acc_t(0)) v[0] += p * (lp - lq);
        if (j != m) v[1] += q - p;
      } else if constexpr (kDiv == kReverseKL) {
        if (q > acc_t(0)) {
          v[0] += q * (lq - lp);
          v[1] += q * ((zs - zs_m) - (zt - zt_m));
          v[2] += q;
        }
      } else {
        const acc_t lm = logaddexp(log_b + lp, log_b1 + lq);
        if (p > acc_t(0)) v[0] += p * (lp - lm);
        if (q > acc_t(0)) {
          v[1] += q * (lq - lm);
          v[2] += q * ((lq - lm) - u_m);
          v[3] += q;
        }
      }
    }
    block_sum<acc_t, 4>(v);
    const acc_t div = kDiv == kKL || kDiv == kReverseKL ? v[0] : beta * v[0] + (acc_t(1) - beta) * v[1];
    if (threadIdx.x == 0) static_cast<acc_t*>(a.out)[i] = temp * temp * div;

    if (a.grad == nullptr) continue;
    scalar_t* g = static_cast<scalar_t*>(a.grad) + i * a.grad_stride;
    const acc_t rs = static_cast<const acc_t*>(a.row_scale)[i];
    if (rs == acc_t(0)) {
      if (!a.accumulate) {
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) g[j] = static_cast<scalar_t>(acc_t(0));
      }
      continue;
    }
    const acc_t c = (kDiv == kKL || kDiv == kReverseKL ? temp : temp * (acc_t(1) - beta)) * rs;
    // The mean about the pivot: sum Q d / sum Q (reverse kl), sum Q (u - u_m) / sum Q (jsd).
    const acc_t mean = kDiv == kReverseKL ? v[1] / v[2] : kDiv == kKL ? acc_t(0) : v[2] / v[3];
    // kl: whether m holds over half of the student's mass (log Q_m > -log 2).
    const bool dominant = kDiv == kKL && log_q(zs_m) > -acc_t(0.69314718055994531);
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const acc_t zs = static_cast<acc_t>(s[j]) * inv_t, zt = static_cast<acc_t>(t[j]) * inv_t;
      const acc_t lq = log_q(zs), lp = log_p(zt);
      const acc_t q = std::exp(lq);
      acc_t d;
      if constexpr (kDiv == kKL) {
        d = dominant && j == m ? -c * v[1] : c * (q - std::exp(lp));
      } else if constexpr (kDiv == kReverseKL) {
        d = q > acc_t(0) ? c * q * (((zs - zs_m) - (zt - zt_m)) - mean) : acc_t(0);
      } else {
        const acc_t lm = logaddexp(log_b + lp, log_b1 + lq);
        d = q > acc_t(0) ? c * q * (((lq - lm) - u_m) - mean) : acc_t(0);
      }
      if (a.accumulate) d += static_cast<acc_t>(g[j]);
      g[j] = static_cast<scalar_t>(d);
    }
  }
}

template <typename scalar_t>
void launch_typed(const DistillArgs& a, int64_t divergence, int threads, int64_t blocks) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto grid = static_cast<unsigned>(blocks);
  if (divergence == kKL) {
    distill_kernel<scalar_t, kKL><<<grid, threads, 0, stream>>>(a);
  } else if (divergence == kReverseKL) {
    distill_kernel<scalar_t, kReverseKL><<<grid, threads, 0, stream>>>(a);
  } else {
    distill_kernel<scalar_t, 2><<<grid, threads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ext_distill_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_scale,
                            double temperature, int64_t divergence, double jsd_beta,
                            const std::optional<at::Tensor>& grad, bool accumulate) {
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor rs = check_distill_inputs(student, teacher, row_scale, temperature, divergence, jsd_beta, grad,
                                             "fusedloss::ext_distill");
  const int64_t n = student.size(0), C = student.size(1);
  at::Tensor out = at::empty({n}, student.options().dtype(rs.scalar_type()));
  if (n == 0) return out;
  DistillArgs a{};
  a.student = student.const_data_ptr();
  a.teacher = teacher.const_data_ptr();
  a.rows = n;
  a.classes = C;
  a.student_stride = student.stride(0);
  a.teacher_stride = teacher.stride(0);
  a.row_scale = rs.const_data_ptr();
  a.temperature = temperature;
  a.jsd_beta = jsd_beta;
  a.grad = grad.has_value() ? grad->mutable_data_ptr() : nullptr;
  a.grad_stride = grad.has_value() ? grad->stride(0) : 0;
  a.accumulate = accumulate;
  a.out = out.mutable_data_ptr();
  // About four elements per thread per pass, in whole warps, at most kMaxThreads.
  int threads = kWarpSize;
  while (threads < kMaxThreads && threads * 4 < C) threads *= 2;
  const int64_t blocks = std::min<int64_t>(n, int64_t(1) << 30);
  switch (student.scalar_type()) {
    case at::kFloat: launch_typed<float>(a, divergence, threads, blocks); break;
    case at::kDouble: launch_typed<double>(a, divergence, threads, blocks); break;
    case at::kBFloat16: launch_typed<c10::BFloat16>(a, divergence, threads, blocks); break;
    case at::kHalf: launch_typed<c10::Half>(a, divergence, threads, blocks); break;
    default: TORCH_CHECK(false, "fusedloss::ext_distill: unsupported dtype ", student.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { m.impl("ext_distill", &ext_distill_cuda); }

}  // namespace fusedloss::cuda
