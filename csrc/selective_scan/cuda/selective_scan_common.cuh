// What the selective scan's forward and backward kernels share: the block's place in the
// problem, the per-chunk loads of dt and the variable B / C, and vector shared-memory reads.
//
// Block layout (selective_scan.h, SelectiveScanCudaGeometry):
//   threads = 32 lanes x channel_warps x slices; a warp holds 32 / lanes_per_channel channels,
//   channel in block = lane / lanes_per_channel + channels_per_warp * channel_warp; the thread
//   keeps consecutive states of that channel from state0 (its slice, and its half of it when
//   two lanes share the slice).
// The backward's shared memory per chunk of kChunk tokens, token-major with rows padded by one
// so that a warp (32 channels, one token) reads 32 banks and a warp loading one channel's 32
// tokens writes 32: dt[kChunk][channels + 1], dtu = dt * u likewise; B and C [kChunk][padded
// states]. The forward stages its own tiles (selective_scan_fwd_kernel.cuh).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/cuda_math.cuh"
#include "common/math.h"
#include "selective_scan/selective_scan.h"

namespace mamba_ext {
namespace scan_cuda {

constexpr double kLog2e = 1.4426950408889634;

template <typename T> __device__ __forceinline__ T exp2_approx(T x);
// ex2.approx: about 2 ulp, one special-function instruction (A comes pre-scaled by log2 e).
template <> __device__ __forceinline__ float exp2_approx<float>(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
template <> __device__ __forceinline__ double exp2_approx<double>(double x) { return exp2(x); }

// softplus(x) = max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1], and log1p(e) = e P(e), P of
// degree 8 fitted to the relative error (3e-8): no division, so one special-function
// instruction, not two. Evaluated in float32 it is within 5e-7 relative for |x| < 8 (the odd
// series in e / (2 + e) it replaces: 6e-7); beyond, the rounding of x log2 e dominates both.
// Above 20 the log1p term is below x's ulp, as torch's threshold has it.
__device__ __forceinline__ float softplus_fast(float x) {
  const float e = exp2_approx(fabsf(x) * -float(kLog2e));  // flushes below 2^-126 to 0
  float p = 0.0052338247f;
  p = p * e - 0.029509787f;
  p = p * e + 0.078233466f;
  p = p * e - 0.13663903f;
  p = p * e + 0.19106333f;
  p = p * e - 0.24843074f;
  p = p * e + 0.33319110f;
  p = p * e - 0.49999493f;
  p = p * e + 0.99999994f;
  return fmaxf(x, 0.0f) + e * p;
}
__device__ __forceinline__ double softplus_fast(double x) { return softplus(x); }
// Far below 0 the exp overflows to inf and the quotients to 0 (silu: -0).
__device__ __forceinline__ float sigmoid_fast(float x) {
  return __fdividef(1.0f, 1.0f + exp2_approx(x * -float(kLog2e)));
}
__device__ __forceinline__ double sigmoid_fast(double x) { return sigmoid(x); }
__device__ __forceinline__ float silu_fast(float x) {
  return __fdividef(x, 1.0f + exp2_approx(x * -float(kLog2e)));
}
__device__ __forceinline__ double silu_fast(double x) { return silu(x); }

// v[0 .. kStates) = s[0 .. kStates), in 16-byte reads (s is 16-byte aligned).
template <int kStates, typename acc_t>
__device__ __forceinline__ void load_smem_states(acc_t (&v)[kStates], const acc_t* s) {
  using Vec = typename std::conditional<sizeof(acc_t) == 4, float4, double2>::type;
  constexpr int kPerVec = 16 / sizeof(acc_t);
  static_assert(kStates % kPerVec == 0, "kStates must fill 16-byte vectors");
#pragma unroll
  for (int i = 0; i < kStates / kPerVec; ++i) {
    const Vec w = reinterpret_cast<const Vec*>(s)[i];
    const acc_t* e = reinterpret_cast<const acc_t*>(&w);
#pragma unroll
    for (int j = 0; j < kPerVec; ++j) v[i * kPerVec + j] = e[j];
  }
}

// Where the thread and its block sit. Channels are indices into `dim`.
struct BlockPosition {
  int threads, lane, channel_warp, slice;
  int lane_slice;         // which of the lanes sharing a channel's slice (0 when one lane)
  int channels;           // per block
  int channel_stride;     // shared-memory token row: channels + 1
  int channel_in_block;   // of this thread
  int64_t batch, group;
  int64_t channel0;       // first channel of the block
  int64_t group_end;      // one past the group's last channel
  int64_t state0;         // first state of this thread
  int padded_states;      // states of the block's slices: slices * kStates
  int64_t block_state0;   // first state of the block's slices

  __device__ bool channel_valid(int c) const { return channel0 + c < group_end; }
};

// Grid: x = group * channel_blocks_per_group + channel block, y = batch; the slice block is z
// in the backward (the forward's z is the segment).
__device__ __forceinline__ BlockPosition block_position(const SelectiveScanFwdParams& p,
                                                        const SelectiveScanCudaGeometry& g,
                                                        int slice_block) {
  BlockPosition pos;
  pos.threads = g.threads();
  pos.lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  pos.channel_warp = warp % g.channel_warps;
  pos.slice = warp / g.channel_warps;
  pos.channels = g.channels_per_block();
  pos.channel_stride = pos.channels + 1;
  pos.channel_in_block =
      pos.channel_warp * g.channels_per_warp() + pos.lane / g.lanes_per_channel;
  pos.lane_slice = pos.lane % g.lanes_per_channel;
  pos.batch = blockIdx.y;
  pos.group = blockIdx.x / g.channel_blocks_per_group;
  const int64_t dim_per_group = p.dim / p.ngroups;
  pos.channel0 = pos.group * dim_per_group +
                 (blockIdx.x % g.channel_blocks_per_group) * pos.channels;
  pos.group_end = (pos.group + 1) * dim_per_group;
  pos.padded_states = g.slices * g.states_per_thread;
  pos.block_state0 = static_cast<int64_t>(slice_block) * pos.padded_states;
  pos.state0 = pos.block_state0 + pos.slice * g.states_per_thread +
               pos.lane_slice * (g.states_per_thread / g.lanes_per_channel);
  return pos;
}

// Packed batches (selective_scan.h): padding is seq_idx -1 (any other id, negative ones
// included, is a sequence in per-row mode); kNoSequence stands for "no token" before the first
// or after the last (it is not an int32 id).
constexpr int kPadding = -1;
constexpr int64_t kNoSequence = INT64_MIN;

// The sequence of a token, read from global memory.
__device__ __forceinline__ int sequence_of(const SelectiveScanFwdParams& p, int64_t batch,
                                           int64_t token) {
  return p.seq_idx[batch * p.seq_idx_batch_stride + token * p.seq_idx_seqlen_stride];
}

// The block loads and finishes a chunk cooperatively, element e = (channel c, token t) with
// c = e / kChunk, t = e % kChunk: a warp covers 32 tokens of one channel (coalesced when the
// token stride is 1). MAMBA_FOR_CHUNK_ELEMENTS(pos, kChunk, c, t) { ... } loops over this
// thread's elements.
#define MAMBA_FOR_CHUNK_ELEMENTS(pos, kChunk, c, t)                                   \
  for (int e_ = threadIdx.x, c = e_ / (kChunk), t = e_ % (kChunk);                    \
       e_ < (kChunk) * (pos).channels;                                                \
       e_ += (pos).threads, c = e_ / (kChunk), t = e_ % (kChunk))

// An activation (batch, dim, seqlen) of this block's batch.
template <typename input_t> struct Activation {
  const input_t* base;
  int64_t dim_stride, seqlen_stride;
  __device__ Activation(const void* ptr, int64_t batch, int64_t batch_stride, int64_t dim_stride,
                        int64_t seqlen_stride)
      : base(static_cast<const input_t*>(ptr) + batch * batch_stride),
        dim_stride(dim_stride),
        seqlen_stride(seqlen_stride) {}
  __device__ auto operator()(int64_t channel, int64_t token) const {
    return to_acc(base[channel * dim_stride + token * seqlen_stride]);
  }
};

template <typename input_t> struct OutputActivation {
  input_t* base;
  int64_t dim_stride, seqlen_stride;
  __device__ OutputActivation(void* ptr, int64_t batch, int64_t batch_stride, int64_t dim_stride,
                              int64_t seqlen_stride)
      : base(static_cast<input_t*>(ptr) + batch * batch_stride),
        dim_stride(dim_stride),
        seqlen_stride(seqlen_stride) {}
  template <typename acc_t> __device__ void store(int64_t channel, int64_t token, acc_t v) const {
    base[channel * dim_stride + token * seqlen_stride] = from_acc<input_t>(v);
  }
};

// A (dim,) weight, or zero when absent.
template <typename acc_t>
__device__ __forceinline__ acc_t channel_weight(const void* ptr, int64_t stride, int64_t channel) {
  return ptr ? static_cast<const acc_t*>(ptr)[channel * stride] : acc_t(0);
}

// Fills s_dt[t][c] = dt and s_dtu[t][c] = dt * u for the chunk at token0 (dt = delta +
// delta_bias, softplus'd when asked); zeros past seqlen, past the group and for the padding of a
// packed batch, so that those tokens leave the state unchanged (exp(0 * A) = 1, nothing added).
template <int kChunk, typename input_t, typename acc_t>
__device__ __forceinline__ void load_dt_chunk(const SelectiveScanFwdParams& p,
                                              const BlockPosition& pos, int64_t token0,
                                              acc_t* s_dt, acc_t* s_dtu) {
  const Activation<input_t> u(p.u, pos.batch, p.u_batch_stride, p.u_dim_stride,
                              p.u_seqlen_stride);
  const Activation<input_t> delta(p.delta, pos.batch, p.delta_batch_stride, p.delta_dim_stride,
                                  p.delta_seqlen_stride);
  MAMBA_FOR_CHUNK_ELEMENTS(pos, kChunk, c, t) {
    const int64_t channel = pos.channel0 + c, token = token0 + t;
    acc_t dt = 0, dtu = 0;
    if (pos.channel_valid(c) && token < p.seqlen &&
        (p.seq_idx == nullptr || sequence_of(p, pos.batch, token) != kPadding)) {
      dt = delta(channel, token) +
           channel_weight<acc_t>(p.delta_bias, p.delta_bias_stride, channel);
      if (p.delta_softplus) dt = softplus(dt);
      dtu = dt * u(channel, token);
    }
    s_dt[t * pos.channel_stride + c] = dt;
    s_dtu[t * pos.channel_stride + c] = dtu;
  }
}

// Fills s[t][state] with the chunk's variable B or C (batch, group, dstate, seqlen) for the
// block's states; zeros past dstate and seqlen.
template <int kChunk, typename input_t, typename acc_t>
__device__ __forceinline__ void load_state_input_chunk(
    acc_t* s, const void* ptr, int64_t batch_stride, int64_t group_stride, int64_t dstate_stride,
    int64_t seqlen_stride, const SelectiveScanFwdParams& p, const BlockPosition& pos,
    int64_t token0) {
  const input_t* base =
      static_cast<const input_t*>(ptr) + pos.batch * batch_stride + pos.group * group_stride;
  for (int e = threadIdx.x; e < pos.padded_states * kChunk; e += pos.threads) {
    const int state = e / kChunk, t = e % kChunk;
    const int64_t n = pos.block_state0 + state, token = token0 + t;
    s[t * pos.padded_states + state] =
        (n < p.dstate && token < p.seqlen) ? to_acc(base[n * dstate_stride + token * seqlen_stride])
                                           : acc_t(0);
  }
}

template <int kChunk, typename input_t, typename acc_t>
__device__ __forceinline__ void load_variable_BC_chunk(const SelectiveScanFwdParams& p,
                                                       const BlockPosition& pos, int64_t token0,
                                                       acc_t* s_B, acc_t* s_C) {
  if (p.is_variable_B)
    load_state_input_chunk<kChunk, input_t>(s_B, p.B, p.B_batch_stride, p.B_group_stride,
                                            p.B_dstate_stride, p.B_seqlen_stride, p, pos, token0);
  if (p.is_variable_C)
    load_state_input_chunk<kChunk, input_t>(s_C, p.C, p.C_batch_stride, p.C_group_stride,
                                            p.C_dstate_stride, p.C_seqlen_stride, p, pos, token0);
}

// This thread's states of a (dim, dstate) weight (A, a constant B or C) or of a (batch, dim,
// dstate) state: zeros past dstate and for channels past the group.
template <int kStates, typename acc_t>
__device__ __forceinline__ void load_thread_states(acc_t (&v)[kStates], const void* ptr,
                                                   int64_t offset, int64_t dstate_stride,
                                                   const SelectiveScanFwdParams& p,
                                                   const BlockPosition& pos) {
  const bool valid = ptr != nullptr && pos.channel_valid(pos.channel_in_block);
  const acc_t* base = static_cast<const acc_t*>(ptr);
#pragma unroll
  for (int i = 0; i < kStates; ++i) {
    const int64_t n = pos.state0 + i;
    v[i] = (valid && n < p.dstate) ? base[offset + n * dstate_stride] : acc_t(0);
  }
}

template <int kStates, typename acc_t>
__device__ __forceinline__ void store_thread_states(const acc_t (&v)[kStates], void* ptr,
                                                    int64_t offset, int64_t dstate_stride,
                                                    const SelectiveScanFwdParams& p,
                                                    const BlockPosition& pos) {
  if (ptr == nullptr || !pos.channel_valid(pos.channel_in_block)) return;
  acc_t* base = static_cast<acc_t*>(ptr);
#pragma unroll
  for (int i = 0; i < kStates; ++i) {
    const int64_t n = pos.state0 + i;
    if (n < p.dstate) base[offset + n * dstate_stride] = v[i];
  }
}

// The state sequence `id` starts from at `token`: initial_state[id] in per-sequence mode,
// initial_state[batch] at token 0 in per-row mode, else 0 (always 0 for padding).
template <int kStates, typename acc_t>
__device__ __forceinline__ void load_start_state(acc_t (&h)[kStates],
                                                 const SelectiveScanFwdParams& p,
                                                 const BlockPosition& pos, int id, int64_t token) {
  const bool per_sequence = p.num_sequences > 0;
  const bool from_initial = id != kPadding && (per_sequence || token == 0);
  const int64_t row = per_sequence ? id : pos.batch;
  const int64_t channel = pos.channel0 + pos.channel_in_block;
  load_thread_states(h, from_initial ? p.initial_state : nullptr,
                     row * p.initial_state_batch_stride + channel * p.initial_state_dim_stride,
                     p.initial_state_dstate_stride, p, pos);
}

// Checkpoint `index` (the state before token index * selective_scan_cuda_checkpoint_tokens())
// in the checkpoints, (batch, dim, ncheckpoints, dstate).
__device__ __forceinline__ int64_t checkpoint_offset(const SelectiveScanFwdParams& p,
                                                     const BlockPosition& pos,
                                                     int64_t ncheckpoints, int64_t index) {
  const int64_t channel = pos.channel0 + pos.channel_in_block;
  return ((pos.batch * p.dim + channel) * ncheckpoints + index) * p.dstate;
}

}  // namespace scan_cuda
}  // namespace mamba_ext
