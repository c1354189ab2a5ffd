// CUDA kernel of selective_state_update: one decode step, in place on the state.
//
// A state row (batch, head, headdim) of dstate entries is split over `lanes` consecutive lanes
// of a warp (a power of two, up to 32), each owning kChunks chunks of kElts consecutive entries,
// interleaved so that a warp's loads of one chunk are contiguous; the row's <state, C> is reduced
// over those lanes by shuffles. The state is the traffic (read and written once): all of a lane's
// chunks are loaded before any is used, so that several 16-byte loads are in flight per thread.
// B and C rows are shared by every row of a (batch, group) and come from L1.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_math.cuh"
#include "common/math.h"
#include "state_update/state_update.h"

namespace mamba_ext {
namespace state_update_cuda {

constexpr int kThreads = 128;
constexpr int kElts = 4;       // state entries per lane and chunk: 16 bytes of a float32 state
constexpr int kMaxLanes = 32;  // a row never spans more than a warp
constexpr int kChunks = 4;     // chunks per lane: 64 bytes of float32 state in flight per thread
static_assert(kThreads % kMaxLanes == 0, "a block holds whole warps");
static_assert(kMaxLanes * kChunks * kElts >= kSelectiveStateUpdateMaxDstate,
              "a warp must cover the largest dstate");

template <typename T> struct alignas(sizeof(T) * kElts) Vec {
  T v[kElts];
};

// Lanes per row: the fewest that cover dstate with kChunks chunks each.
inline int lanes_for(int64_t dstate) {
  int lanes = 1;
  while (lanes < kMaxLanes && lanes * kChunks * kElts < dstate) lanes *= 2;
  return lanes;
}

// kVecState: the state row is contiguous, 16-byte aligned and dstate % kElts == 0, so each
// chunk is one vector load and store.
template <typename input_t, typename state_t, bool kVecState>
__global__ void __launch_bounds__(kThreads)
    selective_state_update_kernel(const SelectiveStateUpdateParams p, const int lanes) {
  using acc_t = decltype(to_acc(input_t{}));
  const int lane = threadIdx.x % lanes;
  // The shuffles of a row stay among its own lanes.
  const int warp_lane = threadIdx.x % 32;
  const unsigned row_mask =
      lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u) << (warp_lane / lanes * lanes);
  const int64_t rows = p.batch * p.nheads * p.headdim;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  if (row >= rows) return;  // whole rows leave together: their lanes are contiguous
  const int64_t i = row % p.headdim;
  const int64_t h = row / p.headdim % p.nheads;
  const int64_t b = row / (p.headdim * p.nheads);
  const int64_t g = h / (p.nheads / p.ngroups);

  auto* out = static_cast<input_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
              i * p.out_headdim_stride;
  const int64_t state_b = p.state_batch_indices ? p.state_batch_indices[b] : b;
  if (state_b < 0 || state_b >= p.state_batch) {  // a padding slot: no state to update
    if (lane == 0) *out = from_acc<input_t>(acc_t(0));
    return;
  }

  acc_t dt = p.dt_is_float
                 ? acc_t(static_cast<const float*>(p.dt)[b * p.dt_batch_stride +
                                                         h * p.dt_head_stride +
                                                         i * p.dt_headdim_stride])
                 : to_acc(static_cast<const input_t*>(p.dt)[b * p.dt_batch_stride +
                                                            h * p.dt_head_stride +
                                                            i * p.dt_headdim_stride]);
  if (p.dt_bias) {
    dt += static_cast<const acc_t*>(p.dt_bias)[h * p.dt_bias_head_stride +
                                               i * p.dt_bias_headdim_stride];
  }
  if (p.dt_softplus) dt = softplus(dt);
  const acc_t x = to_acc(static_cast<const input_t*>(
      p.x)[b * p.x_batch_stride + h * p.x_head_stride + i * p.x_headdim_stride]);
  const acc_t dt_x = dt * x;

  state_t* state = static_cast<state_t*>(p.state) + state_b * p.state_batch_stride +
                   h * p.state_head_stride + i * p.state_headdim_stride;  // (dstate,)
  const acc_t* A = static_cast<const acc_t*>(p.A) + h * p.A_head_stride +
                   i * p.A_headdim_stride;  // (dstate,)
  const input_t* B = static_cast<const input_t*>(p.B) + b * p.B_batch_stride +
                     g * p.B_group_stride;  // (dstate,)
  const input_t* C = static_cast<const input_t*>(p.C) + b * p.C_batch_stride +
                     g * p.C_group_stride;  // (dstate,)

  // Entry n0(chunk) + e of the row, for the lane's chunks; chunks past dstate are off.
  const auto chunk_start = [&](int chunk) {
    return (static_cast<int64_t>(chunk) * lanes + lane) * kElts;
  };
  Vec<state_t> s[kChunks];
#pragma unroll
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    const int64_t n0 = chunk_start(chunk);
    if constexpr (kVecState) {
      if (n0 < p.dstate) s[chunk] = *reinterpret_cast<const Vec<state_t>*>(state + n0);
    } else {
#pragma unroll
      for (int e = 0; e < kElts; ++e) {
        if (n0 + e < p.dstate) s[chunk].v[e] = state[(n0 + e) * p.state_dstate_stride];
      }
    }
  }
  acc_t y = 0;
#pragma unroll
  for (int chunk = 0; chunk < kChunks; ++chunk) {
#pragma unroll
    for (int e = 0; e < kElts; ++e) {
      const int64_t n = chunk_start(chunk) + e;
      if (n >= p.dstate) continue;
      const acc_t decay = exp_fast(A[n * p.A_dstate_stride] * dt);
      const acc_t updated =
          to_acc(s[chunk].v[e]) * decay + to_acc(B[n * p.B_dstate_stride]) * dt_x;
      s[chunk].v[e] = from_acc<state_t>(updated);
      y += updated * to_acc(C[n * p.C_dstate_stride]);
    }
  }
#pragma unroll
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    const int64_t n0 = chunk_start(chunk);
    if constexpr (kVecState) {
      if (n0 < p.dstate) *reinterpret_cast<Vec<state_t>*>(state + n0) = s[chunk];
    } else {
#pragma unroll
      for (int e = 0; e < kElts; ++e) {
        if (n0 + e < p.dstate) state[(n0 + e) * p.state_dstate_stride] = s[chunk].v[e];
      }
    }
  }
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    y += __shfl_xor_sync(row_mask, y, offset, lanes);
  }
  if (lane != 0) return;
  if (p.D) {
    y += static_cast<const acc_t*>(p.D)[h * p.D_head_stride + i * p.D_headdim_stride] * x;
  }
  if (p.z) {
    y *= silu(to_acc(static_cast<const input_t*>(
        p.z)[b * p.z_batch_stride + h * p.z_head_stride + i * p.z_headdim_stride]));
  }
  *out = from_acc<input_t>(y);
}

}  // namespace state_update_cuda

template <typename input_t, typename state_t>
cudaError_t selective_state_update_cuda(const SelectiveStateUpdateParams& p,
                                        cudaStream_t stream) {
  using namespace state_update_cuda;
  const int64_t rows = p.batch * p.nheads * p.headdim;
  if (rows == 0) return cudaSuccess;
  const int lanes = lanes_for(p.dstate);
  const int64_t blocks = (rows + kThreads / lanes - 1) / (kThreads / lanes);
  const bool vec_state = p.state_dstate_stride == 1 && p.dstate % kElts == 0 &&
                         reinterpret_cast<uintptr_t>(p.state) % sizeof(Vec<state_t>) == 0 &&
                         p.state_batch_stride % kElts == 0 && p.state_head_stride % kElts == 0 &&
                         p.state_headdim_stride % kElts == 0;
  if (vec_state) {
    selective_state_update_kernel<input_t, state_t, true>
        <<<blocks, kThreads, 0, stream>>>(p, lanes);
  } else {
    selective_state_update_kernel<input_t, state_t, false>
        <<<blocks, kThreads, 0, stream>>>(p, lanes);
  }
  return cudaGetLastError();
}

}  // namespace mamba_ext
