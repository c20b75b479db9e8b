// Warp-shuffle + shared-memory reductions for one row per block: an online
// log-sum-exp state (with the first index of the max, bce's arg-max) and plain
// sums of a few values at once (one round of barriers for all of them).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../losses.h"

namespace fusedloss::cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;  // kernels launch at most this many threads per block
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

// sum_k exp(x_k - max) over the elements added, and the first index of the max.
template <typename T>
struct LseState {
  T max;
  T sum;
  int64_t arg;

  __device__ static LseState empty() { return {neg_inf<T>(), T(0), INT64_MAX}; }

  // One element. A new max rescales the sum (exp(-inf) = 0 on the first); a NaN
  // falls to the last branch and poisons the sum, so the row's lse is NaN; -inf
  // adds nothing and would make (-inf) - (-inf) while max is still -inf.
  __device__ void add(T x, int64_t j) {
    if (x > max) {
      sum = sum * std::exp(max - x) + T(1);
      max = x;
      arg = j;
    } else if (x != neg_inf<T>()) {
      sum += std::exp(x - max);
    }
  }

  // Merge another state (the larger max wins; ties: the smaller index).
  // Field by field: selecting between references to two states would take their
  // addresses and put both in local memory.
  __device__ void merge(const LseState& o) {
    const bool other_leads = o.max > max || (o.max == max && o.arg < arg);
    const T hi_max = other_leads ? o.max : max, lo_max = other_leads ? max : o.max;
    const T hi_sum = other_leads ? o.sum : sum, lo_sum = other_leads ? sum : o.sum;
    const T lo_part = lo_max == neg_inf<T>() ? T(0) : lo_sum * std::exp(lo_max - hi_max);
    arg = other_leads ? o.arg : arg;
    max = hi_max;
    sum = hi_sum + lo_part;
  }

  __device__ T lse() const { return max == neg_inf<T>() ? max : max + std::log(sum); }
};

template <typename T>
__device__ __forceinline__ LseState<T> warp_merge(LseState<T> s) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    LseState<T> o;
    o.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
    o.arg = __shfl_xor_sync(0xffffffffu, s.arg, offset);
    s.merge(o);
  }
  return s;
}

// The whole block's state, returned to every thread. Starts with a barrier so the
// shared slots of a previous call (or row) are free.
template <typename T>
__device__ LseState<T> block_merge(LseState<T> s) {
  __shared__ T s_max[kMaxWarps], s_sum[kMaxWarps];
  __shared__ int64_t s_arg[kMaxWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  s = warp_merge(s);
  __syncthreads();
  if (lane == 0) {
    s_max[warp] = s.max;
    s_sum[warp] = s.sum;
    s_arg[warp] = s.arg;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < warps ? LseState<T>{s_max[lane], s_sum[lane], s_arg[lane]} : LseState<T>::empty();
    s = warp_merge(s);
    if (lane == 0) {
      s_max[0] = s.max;
      s_sum[0] = s.sum;
      s_arg[0] = s.arg;
    }
  }
  __syncthreads();
  return {s_max[0], s_sum[0], s_arg[0]};
}

// Sums of K values over the block, returned to every thread.
template <typename T, int K>
__device__ void block_sum(T (&v)[K]) {
  __shared__ T slots[K][kMaxWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
    }
  }
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) slots[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      T t = lane < warps ? slots[k][lane] : T(0);
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        t += __shfl_xor_sync(0xffffffffu, t, offset);
      }
      if (lane == 0) slots[k][0] = t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = slots[k][0];
}

}  // namespace fusedloss::cuda
