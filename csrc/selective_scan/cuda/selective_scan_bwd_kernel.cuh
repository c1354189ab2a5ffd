// Backward of the selective scan on CUDA.
//
// 1. The forward kernel runs again with out == null and writes the state before every chunk
//    (checkpoints, acc_type (batch, dim, nchunks, dstate)).
// 2. selective_scan_bwd_kernel walks the chunks from last to first. Per chunk it replays the
//    forward from the checkpoint, keeping the state before each sub-chunk of kSub tokens; per
//    sub-chunk (last first) it replays kSub tokens keeping every state in registers, then runs
//    the adjoint recurrence backwards over them:
//      dh_t   = dh_{t+1} a_{t+1} + gy_t C_t          gy = dout * silu(z)      a_t = exp(dt_t A)
//      r      = dh_t (h_t - dt_t u_t B_t) = dh_t a_t h_{t-1}
//      dA    += dt_t r      ddt_t = sum_n A r + u_t sum_n dh_t B_t      du_t = dt_t sum_n dh_t B_t
//      dB_t  += dh_t dt_t u_t (summed over channels)   dC_t += gy_t h_t (likewise)
//    Sums over a channel's states (ddt, du) go through shared memory by state slice; sums over
//    channels (variable dB, dC) through a per-warp transpose in shared memory, then over the
//    block's channel warps, then over blocks into scratch (selective_scan.h).
// 3. Small kernels add the scratch's slots in a fixed order and write dB, dC, dA, dD,
//    ddelta_bias in their dtypes and layouts (and, when the state slices spanned several blocks,
//    finish du, ddelta and dz).
#pragma once

#include "selective_scan/cuda/selective_scan_fwd_kernel.cuh"

namespace mamba_ext {
namespace scan_cuda {

constexpr int kBwdSub = 8;      // tokens whose states a thread keeps in registers
constexpr int kBwdRound = 4;    // tokens per channel-sum round: 4 tokens x 4 states x {dB, dC}
constexpr int kRedStride = 36;  // = 32 values, one per lane; rows padded, 16-byte aligned
static_assert(kBwdRound * kScanBwdStatesPerThread * 2 == 32, "one value per lane a round");

template <int kChunk, typename acc_t>
__host__ __device__ inline int64_t bwd_smem_elements(const SelectiveScanCudaGeometry& g) {
  const int64_t rows = kChunk * (g.channels_per_block() + 1);
  const int64_t replay = g.slices * rows;  // y partials of each slice
  const int64_t reverse = 2 * g.slices * kBwdSub * (g.channels_per_block() + 1) +
                          g.threads() * kRedStride + 2 * g.slices * g.channel_warps * 32;
  return 6 * rows + (replay > reverse ? replay : reverse) +
         2 * kChunk * g.slices * g.states_per_thread + g.channels_per_block() * 2 + kChunk;
}

// du, ddelta and dz of one token from the sums over its channel's states, y_states =
// sum_n h C, P1 = sum_n A r, P2 = sum_n dh B; adds the token's dD and ddelta_bias terms.
template <typename input_t, typename acc_t>
__device__ __forceinline__ void finish_token(const SelectiveScanBwdParams& p, int64_t batch,
                                             int64_t channel, int64_t token, acc_t y_states,
                                             acc_t P1, acc_t P2, acc_t& dD_sum,
                                             acc_t& ddelta_bias_sum) {
  const Activation<input_t> u(p.u, batch, p.u_batch_stride, p.u_dim_stride, p.u_seqlen_stride);
  const Activation<input_t> delta(p.delta, batch, p.delta_batch_stride, p.delta_dim_stride,
                                  p.delta_seqlen_stride);
  const Activation<input_t> dout(p.dout, batch, p.dout_batch_stride, p.dout_dim_stride,
                                 p.dout_seqlen_stride);
  if (p.seq_idx != nullptr && sequence_of(p, batch, token) == kPadding) {
    // Padding of a packed batch: its output was 0.
    OutputActivation<input_t>(p.du, batch, p.du_batch_stride, p.du_dim_stride,
                              p.du_seqlen_stride)
        .store(channel, token, acc_t(0));
    OutputActivation<input_t>(p.ddelta, batch, p.ddelta_batch_stride, p.ddelta_dim_stride,
                              p.ddelta_seqlen_stride)
        .store(channel, token, acc_t(0));
    if (p.dz != nullptr)
      OutputActivation<input_t>(p.dz, batch, p.dz_batch_stride, p.dz_dim_stride,
                                p.dz_seqlen_stride)
          .store(channel, token, acc_t(0));
    return;
  }
  const acc_t u_t = u(channel, token), g_out = dout(channel, token);
  const acc_t D = channel_weight<acc_t>(p.D, p.D_stride, channel);
  const acc_t dt_raw =
      delta(channel, token) + channel_weight<acc_t>(p.delta_bias, p.delta_bias_stride, channel);
  const acc_t dt = p.delta_softplus ? softplus(dt_raw) : dt_raw;
  acc_t gy = g_out;
  if (p.z != nullptr) {
    const Activation<input_t> z(p.z, batch, p.z_batch_stride, p.z_dim_stride, p.z_seqlen_stride);
    const acc_t z_t = z(channel, token);
    gy = g_out * silu(z_t);
    const acc_t dz = g_out * (y_states + D * u_t) * silu_grad(z_t);
    OutputActivation<input_t>(p.dz, batch, p.dz_batch_stride, p.dz_dim_stride,
                              p.dz_seqlen_stride)
        .store(channel, token, dz);
  }
  const acc_t ddt = P1 + u_t * P2;
  const acc_t ddelta = p.delta_softplus ? ddt * sigmoid(dt_raw) : ddt;
  OutputActivation<input_t>(p.du, batch, p.du_batch_stride, p.du_dim_stride, p.du_seqlen_stride)
      .store(channel, token, dt * P2 + D * gy);
  OutputActivation<input_t>(p.ddelta, batch, p.ddelta_batch_stride, p.ddelta_dim_stride,
                            p.ddelta_seqlen_stride)
      .store(channel, token, ddelta);
  dD_sum += gy * u_t;
  ddelta_bias_sum += ddelta;
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

// kPacked: seq_idx given; the sequence checks stay out of the loops of plain batches.
template <typename input_t, bool kPacked>
__global__ void __launch_bounds__(256)
    selective_scan_bwd_kernel(const SelectiveScanBwdParams p, const SelectiveScanCudaGeometry g) {
  using acc_t = acc_type<input_t>;
  constexpr int kStates = kScanBwdStatesPerThread;
  constexpr int kChunk = selective_scan_cuda_chunk(sizeof(acc_t) == 8);
  constexpr int kSubs = kChunk / kBwdSub;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  const BlockPosition pos = block_position(p, g, blockIdx.z);
  const int cs = pos.channel_stride, c = pos.channel_in_block;
  const int rows = kChunk * cs;
  acc_t* s_dt = reinterpret_cast<acc_t*>(smem_bytes);  // [kChunk][cs] each
  acc_t* s_dtu = s_dt + rows;
  acc_t* s_gy = s_dtu + rows;
  acc_t* s_ysum = s_gy + rows;                          // sums over the block's slices
  acc_t* s_P1 = s_ysum + rows;
  acc_t* s_P2 = s_P1 + rows;
  acc_t* s_union = s_P2 + rows;
  acc_t* s_ypart = s_union;                             // replay: [slices][kChunk][cs]
  acc_t* s_Ppart = s_union;                             // reverse: [2][slices][kBwdSub][cs]
  acc_t* s_red = s_Ppart + 2 * g.slices * kBwdSub * cs;  // [threads][kRedStride]
  acc_t* s_bc = s_red + pos.threads * kRedStride;       // [rounds][slices][channel_warps][32]
  const int64_t replay = g.slices * rows;
  const int64_t reverse = (s_bc + 2 * g.slices * g.channel_warps * 32) - s_union;
  acc_t* s_B = s_union + (replay > reverse ? replay : reverse);  // [kChunk][padded_states]
  acc_t* s_C = s_B + kChunk * pos.padded_states;
  acc_t* s_dD = s_C + kChunk * pos.padded_states;       // [channels]: dD, then ddelta_bias
  acc_t* s_ddelta_bias = s_dD + pos.channels;
  int* s_seq = reinterpret_cast<int*>(s_ddelta_bias + pos.channels);  // [kChunk]

  const int64_t channel = pos.channel0 + c;
  const int state_offset = pos.slice * kStates;
  const bool finish_here = g.slice_blocks == 1;
  acc_t A2[kStates], B_const[kStates], C_const[kStates], dh[kStates];
  acc_t dA[kStates] = {}, dB_const[kStates] = {}, dC_const[kStates] = {};
  load_thread_states(A2, p.A, channel * p.A_dim_stride, p.A_dstate_stride, p, pos);
#pragma unroll
  for (int i = 0; i < kStates; ++i) A2[i] *= acc_t(kLog2e);
  if (!p.is_variable_B)
    load_thread_states(B_const, p.B, channel * p.B_dim_stride, p.B_dstate_stride, p, pos);
  if (!p.is_variable_C)
    load_thread_states(C_const, p.C, channel * p.C_dim_stride, p.C_dstate_stride, p, pos);
  load_thread_states(dh, p.dlast_state,
                     pos.batch * p.dlast_state_batch_stride + channel * p.dlast_state_dim_stride,
                     p.dlast_state_dstate_stride, p, pos);
  for (int i = threadIdx.x; i < pos.channels; i += pos.threads) s_dD[i] = s_ddelta_bias[i] = 0;
  // Packed batches, walking backwards: at the last token of a sequence, dh holds the gradient
  // of the start state of the sequence after it (written to dinitial_state[id] in per-sequence
  // mode) and restarts from that sequence's dlast_state (per-sequence mode; per-row mode: at the
  // row's end only).
  const bool per_sequence = p.num_sequences > 0;
  int64_t next_seq = kNoSequence;  // the sequence of the token after
  auto store_dinitial = [&](int64_t row) {
    store_thread_states(dh, p.dinitial_state,
                        row * p.dinitial_state_batch_stride +
                            channel * p.dinitial_state_dim_stride,
                        p.dinitial_state_dstate_stride, p, pos);
  };
  auto end_sequence = [&](int id) {
    if (per_sequence && next_seq >= 0) store_dinitial(next_seq);  // not padding, not none
    const bool from_dlast = id != kPadding && (per_sequence || next_seq == kNoSequence);
    load_thread_states(dh, from_dlast ? p.dlast_state : nullptr,
                       (per_sequence ? id : pos.batch) * p.dlast_state_batch_stride +
                           channel * p.dlast_state_dim_stride,
                       p.dlast_state_dstate_stride, p, pos);
  };

  const int64_t nchunks = g.chunks(p.seqlen);
  const Activation<input_t> dout(p.dout, pos.batch, p.dout_batch_stride, p.dout_dim_stride,
                                 p.dout_seqlen_stride);
  const Activation<input_t> z(p.z, pos.batch, p.z_batch_stride, p.z_dim_stride,
                              p.z_seqlen_stride);
  const bool variable_BC = p.is_variable_B || p.is_variable_C;
  const int64_t BC_slot = p.deterministic ? blockIdx.x % g.channel_blocks_per_group : 0;
  acc_t* BC_partials = static_cast<acc_t*>(p.BC_partials) +
                       ((BC_slot * p.batch + pos.batch) * p.ngroups + pos.group) * 2 *
                           p.dstate * p.seqlen;

  for (int64_t chunk_index = nchunks - 1; chunk_index >= 0; --chunk_index) {
    const int64_t token0 = chunk_index * kChunk;
    // Load the chunk: dt, dt u, gy = dout silu(z), variable B and C.
    load_dt_chunk<kChunk, input_t>(p, pos, token0, s_dt, s_dtu);
    MAMBA_FOR_CHUNK_ELEMENTS(pos, kChunk, ce, t) {
      const int64_t ch = pos.channel0 + ce, token = token0 + t;
      acc_t gy = 0;
      if (pos.channel_valid(ce) && token < p.seqlen &&
          (p.seq_idx == nullptr || sequence_of(p, pos.batch, token) != kPadding)) {
        gy = dout(ch, token);
        if (p.z != nullptr) gy *= silu(acc_t(z(ch, token)));
      }
      s_gy[t * cs + ce] = gy;
    }
    load_variable_BC_chunk<kChunk, input_t>(p, pos, token0, s_B, s_C);
    if (p.seq_idx != nullptr) {
      for (int t = threadIdx.x; t < kChunk; t += pos.threads)
        s_seq[t] = token0 + t < p.seqlen ? sequence_of(p, pos.batch, token0 + t) : kPadding;
    }
    // The sequence of the token before the chunk (none before the first).
    const int64_t seq_before =
        p.seq_idx != nullptr && token0 > 0 ? sequence_of(p, pos.batch, token0 - 1) : kNoSequence;
    // Whether a sequence starts at chunk token t (the same for the block).
    auto starts_at = [&](int t) {
      return kPacked && token0 + t < p.seqlen &&
             s_seq[t] != (t > 0 ? int64_t(s_seq[t - 1]) : seq_before);
    };
    __syncthreads();

    // Replay the chunk from its checkpoint, keeping the state before each sub-chunk, and the
    // y partials that dz needs.
    acc_t h_sub[kSubs][kStates];
    {
      acc_t h[kStates];
      load_thread_states(h, p.checkpoints, checkpoint_offset(p, pos, nchunks, chunk_index), 1,
                         p, pos);
#pragma unroll
      for (int sub = 0; sub < kSubs; ++sub) {
#pragma unroll
        for (int i = 0; i < kStates; ++i) h_sub[sub][i] = h[i];
#pragma unroll 2
        for (int t = sub * kBwdSub; t < (sub + 1) * kBwdSub; ++t) {
          if (starts_at(t)) load_start_state(h, p, pos, s_seq[t], token0 + t);
          const acc_t dt = s_dt[t * cs + c], dtu = s_dtu[t * cs + c];
          acc_t B[kStates], C[kStates];
          if (p.is_variable_B) load_smem_states(B, s_B + t * pos.padded_states + state_offset);
          if (p.is_variable_C) load_smem_states(C, s_C + t * pos.padded_states + state_offset);
          acc_t y = 0;
#pragma unroll
          for (int i = 0; i < kStates; ++i) {
            h[i] = exp2_approx(dt * A2[i]) * h[i] + dtu * (p.is_variable_B ? B[i] : B_const[i]);
            y += h[i] * (p.is_variable_C ? C[i] : C_const[i]);
          }
          if (p.z != nullptr) s_ypart[(pos.slice * kChunk + t) * cs + c] = y;
        }
      }
    }
    __syncthreads();
    if (p.z != nullptr) {
      MAMBA_FOR_CHUNK_ELEMENTS(pos, kChunk, ce, t) {
        acc_t y = 0;
        for (int slice = 0; slice < g.slices; ++slice) y += s_ypart[(slice * kChunk + t) * cs + ce];
        s_ysum[t * cs + ce] = y;
      }
    }
    __syncthreads();

#pragma unroll
    for (int sub = kSubs - 1; sub >= 0; --sub) {
      // Replay the sub-chunk keeping every state.
      acc_t hist[kBwdSub][kStates];
#pragma unroll
      for (int j = 0; j < kBwdSub; ++j) {
        const int t = sub * kBwdSub + j;
        const acc_t dt = s_dt[t * cs + c], dtu = s_dtu[t * cs + c];
        acc_t B[kStates], start[kStates];
        if (p.is_variable_B) load_smem_states(B, s_B + t * pos.padded_states + state_offset);
        const bool starts = starts_at(t);
        if (starts) load_start_state(start, p, pos, s_seq[t], token0 + t);
#pragma unroll
        for (int i = 0; i < kStates; ++i) {
          const acc_t before = starts ? start[i] : j == 0 ? h_sub[sub][i] : hist[j - 1][i];
          hist[j][i] =
              exp2_approx(dt * A2[i]) * before + dtu * (p.is_variable_B ? B[i] : B_const[i]);
        }
      }
      // The adjoint recurrence over the sub-chunk, last token first.
      acc_t round_sums[kBwdSub / kBwdRound];
#pragma unroll
      for (int j = kBwdSub - 1; j >= 0; --j) {
        const int t = sub * kBwdSub + j;
        if (kPacked && token0 + t < p.seqlen && s_seq[t] != next_seq) {
          // Token t ends its sequence: dh held the gradient of the next one's start state.
          end_sequence(s_seq[t]);
          next_seq = s_seq[t];
        }
        const acc_t dt = s_dt[t * cs + c], dtu = s_dtu[t * cs + c], gy = s_gy[t * cs + c];
        acc_t B[kStates], C[kStates], dB[kStates], dC[kStates];
        if (p.is_variable_B) load_smem_states(B, s_B + t * pos.padded_states + state_offset);
        if (p.is_variable_C) load_smem_states(C, s_C + t * pos.padded_states + state_offset);
        acc_t P1 = 0, P2 = 0;
#pragma unroll
        for (int i = 0; i < kStates; ++i) {
          const acc_t B_i = p.is_variable_B ? B[i] : B_const[i];
          const acc_t C_i = p.is_variable_C ? C[i] : C_const[i];
          dh[i] += gy * C_i;
          const acc_t r = dh[i] * (hist[j][i] - dtu * B_i);
          dA[i] += dt * r;
          P1 += A2[i] * r;
          P2 += dh[i] * B_i;
          dB[i] = dh[i] * dtu;
          dC[i] = gy * hist[j][i];
          dB_const[i] += dB[i];
          dC_const[i] += dC[i];
          dh[i] *= exp2_approx(dt * A2[i]);
        }
        // A2 is A log2 e: P1 wants A.
        s_Ppart[((0 * g.slices + pos.slice) * kBwdSub + j) * cs + c] = P1 * acc_t(1.0 / kLog2e);
        s_Ppart[((1 * g.slices + pos.slice) * kBwdSub + j) * cs + c] = P2;
        if (variable_BC) {
          // Round value (which, token in round, state): which * 16 + (j % 4) * 4 + state.
          acc_t* row = s_red + threadIdx.x * kRedStride + (j % kBwdRound) * kStates;
#pragma unroll
          for (int i = 0; i < kStates; ++i) {
            row[i] = dB[i];
            row[16 + i] = dC[i];
          }
          if (j % kBwdRound == 0) {
            __syncwarp();
            const acc_t* column = s_red + (threadIdx.x - pos.lane) * kRedStride + pos.lane;
            acc_t sum = 0;
#pragma unroll 8
            for (int lane = 0; lane < 32; ++lane) sum += column[lane * kRedStride];
            round_sums[j / kBwdRound] = sum;
            __syncwarp();
          }
        }
      }
      if (variable_BC) {
#pragma unroll
        for (int round = 0; round < kBwdSub / kBwdRound; ++round)
          s_bc[((round * g.slices + pos.slice) * g.channel_warps + pos.channel_warp) * 32 +
               pos.lane] = round_sums[round];
      }
      __syncthreads();
      // Sums over the block's slices (P1, P2) and channel warps (dB, dC).
      for (int e = threadIdx.x; e < kBwdSub * pos.channels; e += pos.threads) {
        const int ce = e / kBwdSub, j = e % kBwdSub, t = sub * kBwdSub + j;
        acc_t P1 = 0, P2 = 0;
        for (int slice = 0; slice < g.slices; ++slice) {
          P1 += s_Ppart[((0 * g.slices + slice) * kBwdSub + j) * cs + ce];
          P2 += s_Ppart[((1 * g.slices + slice) * kBwdSub + j) * cs + ce];
        }
        s_P1[t * cs + ce] = P1;
        s_P2[t * cs + ce] = P2;
      }
      if (variable_BC) {
        for (int e = threadIdx.x; e < (kBwdSub / kBwdRound) * g.slices * 32; e += pos.threads) {
          const int value = e % 32, slice = (e / 32) % g.slices, round = e / (32 * g.slices);
          const int which = value / 16, state = value % kStates;
          const int64_t n = pos.block_state0 + slice * kStates + state;
          const int64_t token =
              token0 + sub * kBwdSub + round * kBwdRound + (value / kStates) % kBwdRound;
          const bool wanted = which == 0 ? p.is_variable_B : p.is_variable_C;
          if (!wanted || n >= p.dstate || token >= p.seqlen) continue;
          acc_t sum = 0;
          for (int cw = 0; cw < g.channel_warps; ++cw)
            sum += s_bc[((round * g.slices + slice) * g.channel_warps + cw) * 32 + value];
          write_slot(BC_partials + (which * p.dstate + n) * p.seqlen + token, sum,
                     p.deterministic);
        }
      }
      __syncthreads();
    }

    // Finish the chunk's du, ddelta, dz, or hand the slice sums to the finishing kernel.
    MAMBA_FOR_CHUNK_ELEMENTS(pos, kChunk, ce, t) {
      const int64_t ch = pos.channel0 + ce, token = token0 + t;
      const bool valid = pos.channel_valid(ce) && token < p.seqlen;
      if (finish_here) {
        acc_t dD = 0, ddelta_bias = 0;
        if (valid)
          finish_token<input_t>(p, pos.batch, ch, token, s_ysum[t * cs + ce], s_P1[t * cs + ce],
                                s_P2[t * cs + ce], dD, ddelta_bias);
        // kChunk consecutive lanes hold one channel's tokens.
        dD = lane_group_sum<kChunk>(dD);
        ddelta_bias = lane_group_sum<kChunk>(ddelta_bias);
        if (t == 0) {
          s_dD[ce] += dD;
          s_ddelta_bias[ce] += ddelta_bias;
        }
      } else if (valid) {
        acc_t* partials = static_cast<acc_t*>(p.slice_partials) +
                          ((blockIdx.z * 3 * p.batch + pos.batch) * p.dim + ch) * p.seqlen + token;
        const int64_t which_stride = p.batch * p.dim * p.seqlen;
        partials[0] = s_ysum[t * cs + ce];
        partials[which_stride] = s_P1[t * cs + ce];
        partials[2 * which_stride] = s_P2[t * cs + ce];
      }
    }
    __syncthreads();
  }

  // dh is now the gradient of the state before token 0.
  if (!per_sequence)
    store_dinitial(pos.batch);
  else if (next_seq >= 0)
    store_dinitial(next_seq);
  if (pos.channel_valid(c)) {
    const int64_t weight_slot = p.deterministic ? pos.batch : 0;
    acc_t* weights = static_cast<acc_t*>(p.weight_partials) +
                     (weight_slot * p.dim + channel) * 3 * p.dstate;
#pragma unroll
    for (int i = 0; i < kStates; ++i) {
      const int64_t n = pos.state0 + i;
      if (n >= p.dstate) continue;
      write_slot(weights + n, dA[i], p.deterministic);
      if (!p.is_variable_B) write_slot(weights + p.dstate + n, dB_const[i], p.deterministic);
      if (!p.is_variable_C) write_slot(weights + 2 * p.dstate + n, dC_const[i], p.deterministic);
    }
  }
  if (finish_here) {
    const int64_t weight_slot = p.deterministic ? pos.batch : 0;
    for (int ce = threadIdx.x; ce < pos.channels; ce += pos.threads) {
      if (!pos.channel_valid(ce)) continue;
      acc_t* channels = static_cast<acc_t*>(p.channel_partials) +
                        (weight_slot * p.dim + pos.channel0 + ce) * 2;
      write_slot(channels, s_dD[ce], p.deterministic);
      write_slot(channels + 1, s_ddelta_bias[ce], p.deterministic);
    }
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
  acc_t dD = 0, ddelta_bias = 0;
  for (int64_t token = threadIdx.x; token < p.seqlen; token += blockDim.x) {
    acc_t sums[3] = {0, 0, 0};
    for (int block = 0; block < slice_blocks; ++block)
      for (int which = 0; which < 3; ++which)
        sums[which] += partials[(block * 3 + which) * which_stride + token];
    finish_token<input_t>(p, batch, channel, token, sums[0], sums[1], sums[2], dD, ddelta_bias);
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

template <typename input_t>
cudaError_t run_selective_scan_bwd(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  using acc_t = acc_type<input_t>;
  constexpr int kChunk = selective_scan_cuda_chunk(sizeof(acc_t) == 8);
  // 1. Checkpoints.
  SelectiveScanFwdParams fwd = p;
  fwd.out = nullptr;
  fwd.last_state = nullptr;
  cudaError_t error = run_selective_scan_fwd<input_t>(fwd, stream);
  if (error != cudaSuccess) return error;

  // 2. The reverse pass.
  const SelectiveScanCudaGeometry g = selective_scan_bwd_cuda_geometry(p, sizeof(acc_t) == 8);
  const size_t smem = bwd_smem_elements<kChunk, acc_t>(g) * sizeof(acc_t);
  auto kernel = p.seq_idx ? &selective_scan_bwd_kernel<input_t, true>
                          : &selective_scan_bwd_kernel<input_t, false>;
  error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error != cudaSuccess) return error;
  const dim3 grid(g.channel_blocks_per_group * p.ngroups, p.batch, g.slice_blocks);
  kernel<<<grid, g.threads(), smem, stream>>>(p, g);
  if ((error = cudaGetLastError()) != cudaSuccess) return error;
  if (g.slice_blocks > 1) {
    selective_scan_bwd_finish_kernel<input_t>
        <<<dim3(p.dim, p.batch), 256, 0, stream>>>(p, g.slice_blocks);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
  }

  // 3. Add the slots and write the gradients.
  const int64_t n = p.dstate, l = p.seqlen;
  const acc_t* BC = static_cast<const acc_t*>(p.BC_partials);
  const acc_t* weights = static_cast<const acc_t*>(p.weight_partials);
  const acc_t* channels = static_cast<const acc_t*>(p.channel_partials);
  const int64_t BC_slot_stride = p.batch * p.ngroups * 2 * n * l, weight_slot_stride = p.dim * 3 * n;
  for (int which = 0; which < 2; ++which) {
    const bool is_B = which == 0;
    if (is_B ? p.is_variable_B : p.is_variable_C) {
      error = launch_sum_slots<acc_t, input_t>(
          SlotSum{BC + which * n * l, p.BC_slots, BC_slot_stride,
                  {p.batch, p.ngroups, n, l}, {p.ngroups * 2 * n * l, 2 * n * l, l, 1},
                  is_B ? p.dB : p.dC,
                  {is_B ? p.dB_batch_stride : p.dC_batch_stride,
                   is_B ? p.dB_group_stride : p.dC_group_stride,
                   is_B ? p.dB_dstate_stride : p.dC_dstate_stride,
                   is_B ? p.dB_seqlen_stride : p.dC_seqlen_stride}},
          stream);
    } else {
      error = launch_sum_slots<acc_t, acc_t>(
          SlotSum{weights + (1 + which) * n, p.weight_slots, weight_slot_stride,
                  {1, 1, p.dim, n}, {0, 0, 3 * n, 1}, is_B ? p.dB : p.dC,
                  {0, 0, is_B ? p.dB_dim_stride : p.dC_dim_stride,
                   is_B ? p.dB_dstate_stride : p.dC_dstate_stride}},
          stream);
    }
    if (error != cudaSuccess) return error;
  }
  error = launch_sum_slots<acc_t, acc_t>(
      SlotSum{weights, p.weight_slots, weight_slot_stride, {1, 1, p.dim, n}, {0, 0, 3 * n, 1},
              p.dA, {0, 0, p.dA_dim_stride, p.dA_dstate_stride}},
      stream);
  if (error != cudaSuccess) return error;
  void* channel_grads[2] = {p.dD, p.ddelta_bias};
  const int64_t channel_strides[2] = {p.dD_stride, p.ddelta_bias_stride};
  for (int which = 0; which < 2; ++which) {
    if (channel_grads[which] == nullptr) continue;
    error = launch_sum_slots<acc_t, acc_t>(
        SlotSum{channels + which, p.weight_slots, p.dim * 2, {1, 1, 1, p.dim}, {0, 0, 0, 2},
                channel_grads[which], {0, 0, 0, channel_strides[which]}},
        stream);
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

}  // namespace scan_cuda

template <typename input_t>
cudaError_t selective_scan_bwd_cuda(const SelectiveScanBwdParams& params, cudaStream_t stream) {
  return scan_cuda::run_selective_scan_bwd<input_t>(params, stream);
}

}  // namespace mamba_ext
