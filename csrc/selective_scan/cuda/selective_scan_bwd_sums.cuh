// The backward's sums (selective_scan_bwd_kernel.cuh): per-token gradients from the sums over a
// channel's states, the finishing kernel for slices spread over several blocks, and the
// fixed-order addition of scratch slots.
#pragma once

#include "selective_scan/cuda/selective_scan_common.cuh"

namespace mamba_ext {
namespace scan_cuda {

// A token's inputs and what the scan derives from them: dt_raw = delta + delta_bias, dt
// (softplus(dt_raw) or dt_raw), z_sigmoid = sigmoid(z) and gy = dout silu(z) (without z: 1 and
// dout). The nonlinearities are the scan's fast ones (exact in double).
template <typename acc_t> struct TokenInputs {
  acc_t u, dt_raw, dt, z, z_sigmoid, dout, gy;
};
template <typename acc_t>
__device__ __forceinline__ TokenInputs<acc_t> token_inputs(acc_t u, acc_t dt_raw, acc_t z,
                                                           acc_t dout, bool has_z,
                                                           bool delta_softplus) {
  TokenInputs<acc_t> in{u, dt_raw, delta_softplus ? softplus_fast(dt_raw) : dt_raw, z, 1, dout,
                        dout};
  if (has_z) {
    in.z_sigmoid = sigmoid_fast(z);
    in.gy = dout * (z * in.z_sigmoid);  // silu_fast(z) is z times the same reciprocal
  }
  return in;
}

// The gradients of one token's activations from its inputs and the sums over its channel's
// states: y = sum_n h C, P1 = sum_n A r, P2 = sum_n dh B.
template <typename acc_t> struct TokenGrads {
  acc_t du, ddelta, dz, dD, ddelta_bias;
};
template <typename acc_t>
__device__ __forceinline__ TokenGrads<acc_t> token_grads(const TokenInputs<acc_t>& in, bool has_z,
                                                         acc_t D, bool delta_softplus, acc_t y,
                                                         acc_t P1, acc_t P2) {
  TokenGrads<acc_t> g;
  g.dz = 0;
  if (has_z) {
    // d/dz silu(z) = s (1 + z (1 - s))
    const acc_t s = in.z_sigmoid;
    g.dz = in.dout * (y + D * in.u) * s * (acc_t(1) + in.z * (acc_t(1) - s));
  }
  const acc_t ddt = P1 + in.u * P2;
  g.ddelta = delta_softplus ? ddt * sigmoid_fast(in.dt_raw) : ddt;
  g.du = in.dt * P2 + D * in.gy;
  g.dD = in.gy * in.u;
  g.ddelta_bias = g.ddelta;
  return g;
}

// The sum over aligned groups of kWidth lanes (a power of two up to 32), in every lane.
template <int kWidth, typename acc_t> __device__ __forceinline__ acc_t lane_group_sum(acc_t v) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Writes v to one slot of a sum: the slot's own place (deterministic) or added atomically
// into the single slot (fast).
template <typename acc_t>
__device__ __forceinline__ void write_slot(acc_t* dst, acc_t v, bool deterministic) {
  if (deterministic) {
    *dst = v;
  } else {
    atomicAdd(dst, v);
  }
}

// The reverse pass's segments (selective_scan.h): from pass 1's dh at each segment's start
// (from 0 at its end) and its decay, the dh each segment ends with, into the next segment's row
// of segment_dh. A thread per (batch, channel, state): end(s - 1) = start(s) + decay(s) end(s),
// end(last) = dlast_state (packed batches: the last segment's pass 1 restarts at its first
// token, so its decay is 0 and its start holds dlast_state's share).
template <typename acc_t>
__global__ void __launch_bounds__(256)
    selective_scan_bwd_combine_segments_kernel(const SelectiveScanBwdParams p) {
  const int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (index >= p.batch * p.dim * p.dstate) return;
  const int64_t n = index % p.dstate, channel = index / p.dstate % p.dim,
                batch = index / (p.dstate * p.dim);
  acc_t* dh = static_cast<acc_t*>(p.segment_dh);
  const acc_t* decay = static_cast<const acc_t*>(p.segment_decay);
  acc_t end = p.dlast_state == nullptr || p.seq_idx != nullptr
                  ? acc_t(0)
                  : static_cast<const acc_t*>(p.dlast_state)[batch * p.dlast_state_batch_stride +
                                                             channel * p.dlast_state_dim_stride +
                                                             n * p.dlast_state_dstate_stride];
  for (int64_t s = p.reverse_segments - 1; s >= 1; --s) {
    const int64_t at = ((s * p.batch + batch) * p.dim + channel) * p.dstate + n;
    end = dh[at] + decay[at] * end;
    dh[at] = end;
  }
}

// When the state slices spanned several blocks: adds their sums and finishes du, ddelta, dz,
// and the channel's dD and ddelta_bias. One block per (channel, batch).
template <typename input_t>
__global__ void __launch_bounds__(256)
    selective_scan_bwd_finish_kernel(const SelectiveScanBwdParams p, int slice_blocks) {
  using acc_t = acc_type<input_t>;
  const int64_t channel = blockIdx.x, batch = blockIdx.y;
  const int64_t which_stride = p.batch * p.dim * p.seqlen;
  const acc_t* partials =
      static_cast<const acc_t*>(p.slice_partials) + (batch * p.dim + channel) * p.seqlen;
  const Activation<input_t> u(p.u, batch, p.u_batch_stride, p.u_dim_stride, p.u_seqlen_stride);
  const Activation<input_t> delta(p.delta, batch, p.delta_batch_stride, p.delta_dim_stride,
                                  p.delta_seqlen_stride);
  const Activation<input_t> z(p.z, batch, p.z_batch_stride, p.z_dim_stride, p.z_seqlen_stride);
  const Activation<input_t> dout(p.dout, batch, p.dout_batch_stride, p.dout_dim_stride,
                                 p.dout_seqlen_stride);
  const OutputActivation<input_t> du(p.du, batch, p.du_batch_stride, p.du_dim_stride,
                                     p.du_seqlen_stride);
  const OutputActivation<input_t> ddelta(p.ddelta, batch, p.ddelta_batch_stride,
                                         p.ddelta_dim_stride, p.ddelta_seqlen_stride);
  const OutputActivation<input_t> dz(p.dz, batch, p.dz_batch_stride, p.dz_dim_stride,
                                     p.dz_seqlen_stride);
  const acc_t D = channel_weight<acc_t>(p.D, p.D_stride, channel);
  const acc_t bias = channel_weight<acc_t>(p.delta_bias, p.delta_bias_stride, channel);
  acc_t dD = 0, ddelta_bias = 0;
  for (int64_t token = threadIdx.x; token < p.seqlen; token += blockDim.x) {
    if (p.seq_idx != nullptr && sequence_of(p, batch, token) == kPadding) {
      du.store(channel, token, acc_t(0));
      ddelta.store(channel, token, acc_t(0));
      if (p.dz != nullptr) dz.store(channel, token, acc_t(0));
      continue;
    }
    acc_t sums[3] = {0, 0, 0};
    for (int block = 0; block < slice_blocks; ++block)
      for (int which = 0; which < 3; ++which)
        sums[which] += partials[(block * 3 + which) * which_stride + token];
    const bool has_z = p.z != nullptr;
    const TokenGrads<acc_t> grads = token_grads(
        token_inputs(acc_t(u(channel, token)), acc_t(delta(channel, token)) + bias,
                     has_z ? acc_t(z(channel, token)) : acc_t(0), acc_t(dout(channel, token)),
                     has_z, p.delta_softplus),
        has_z, D, p.delta_softplus, sums[0], sums[1], sums[2]);
    du.store(channel, token, grads.du);
    ddelta.store(channel, token, grads.ddelta);
    if (has_z) dz.store(channel, token, grads.dz);
    dD += grads.dD;
    ddelta_bias += grads.ddelta_bias;
  }
  __shared__ acc_t s_sums[2][8];
  dD = lane_group_sum<32>(dD);
  ddelta_bias = lane_group_sum<32>(ddelta_bias);
  if (threadIdx.x % 32 == 0) {
    s_sums[0][threadIdx.x / 32] = dD;
    s_sums[1][threadIdx.x / 32] = ddelta_bias;
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    acc_t sum = 0;
    for (int warp = 0; warp < blockDim.x / 32; ++warp) sum += s_sums[threadIdx.x][warp];
    const int64_t slot = p.deterministic ? batch : 0;
    write_slot(static_cast<acc_t*>(p.channel_partials) + (slot * p.dim + channel) * 2 +
                   threadIdx.x,
               sum, p.deterministic);
  }
}

// dst[i0, i1, i2, i3] = sum over slots of src[slot, i0, i1, i2, i3] (strides in elements), in
// slot order: the one reduction behind dA, dB, dC, dD and ddelta_bias.
struct SlotSum {
  const void* src;
  int64_t slots, slot_stride;
  int64_t sizes[4], src_strides[4];
  void* dst;
  int64_t dst_strides[4];
};

template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(256) sum_slots_kernel(const SlotSum s) {
  const int64_t count = s.sizes[0] * s.sizes[1] * s.sizes[2] * s.sizes[3];
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < count;
       index += int64_t(gridDim.x) * blockDim.x) {
    int64_t rest = index, src_offset = 0, dst_offset = 0;
#pragma unroll
    for (int d = 3; d >= 0; --d) {
      const int64_t i = rest % s.sizes[d];
      rest /= s.sizes[d];
      src_offset += i * s.src_strides[d];
      dst_offset += i * s.dst_strides[d];
    }
    const acc_t* src = static_cast<const acc_t*>(s.src) + src_offset;
    acc_t sum = 0;
    for (int64_t slot = 0; slot < s.slots; ++slot) sum += src[slot * s.slot_stride];
    static_cast<out_t*>(s.dst)[dst_offset] = from_acc<out_t>(sum);
  }
}

template <typename acc_t, typename out_t>
cudaError_t launch_sum_slots(const SlotSum& s, cudaStream_t stream) {
  const int64_t count = s.sizes[0] * s.sizes[1] * s.sizes[2] * s.sizes[3];
  if (count == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((count + 255) / 256, 65536);
  sum_slots_kernel<acc_t, out_t><<<blocks, 256, 0, stream>>>(s);
  return cudaGetLastError();
}

}  // namespace scan_cuda
}  // namespace mamba_ext
