// Backward of the selective scan on CUDA, in the forward's layout: a lane pair owns a channel's
// slice of 16 states (8 a lane); up to kScanBwdMaxSlices slices sit in separate warps of a block,
// more in separate blocks (grid z).
//
// 1. The forward kernel runs again with out == null and writes the state before every chunk
//    (checkpoints, acc_type (batch, dim, nchunks, dstate)).
// 2. selective_scan_bwd_kernel walks the chunks from last to first; a chunk's tiles (u, delta,
//    z, dout, seq_idx, the block's checkpoint rows, variable B / C) arrive by cp.async while the
//    chunk after it is computed. Pass A replays the chunk from its checkpoint and keeps the state
//    before every kBwdSub-th token in shared memory. Pass B takes the sub-chunks last first: it
//    replays kBwdSub tokens keeping their states in registers, then runs the adjoint over them:
//      dh_t   = dh_{t+1} a_{t+1} + gy_t C_t          gy = dout * silu(z)      a_t = exp(dt_t A)
//      r      = dh_t (h_t - dt_t u_t B_t) = dh_t a_t h_{t-1}
//      dA    += dt_t r      ddt_t = sum_n A r + u_t sum_n dh_t B_t      du_t = dt_t sum_n dh_t B_t
//      dB_t  += dh_t dt_t u_t (summed over channels)   dC_t += gy_t h_t (likewise)
//    Sums over a channel's states: a shuffle in the lane pair; with one slice the pair then
//    finishes du, ddelta and dz of the sub-chunk's tokens in the tiles, with several the slices'
//    partials go through shared memory and are added per element at the chunk's end (or, with
//    several slice blocks, handed to a finishing kernel); the tiles are stored coalesced. Sums
//    over channels (variable dB, dC): every token a warp transposes its lanes' values through
//    shared memory and a lane adds one (B or C, state) over the warp's 16 channels; at the
//    chunk's end the block adds its channel warps in order into scratch (atomics into one slot,
//    or one slot per channel block when deterministic).
// 3. Small kernels add the scratch's slots in a fixed order and write dB, dC, dA, dD,
//    ddelta_bias in their dtypes and layouts.
#pragma once

#include "selective_scan/cuda/selective_scan_bwd_sums.cuh"
#include "selective_scan/cuda/selective_scan_fwd_kernel.cuh"

namespace mamba_ext {
namespace scan_cuda {

constexpr int kBwdStates = kFwdStates;  // states a lane keeps
constexpr int kBwdSub = 4;              // tokens whose states a lane keeps in registers
static_assert(kBwdStates == 8, "sub-chunk states are kept as two 4-state vectors");

// The shared memory of a backward block, in bytes from its start.
template <typename input_t> struct BwdTiles {
  using acc_t = acc_type<input_t>;
  static constexpr int kChunk = selective_scan_cuda_checkpoint_tokens();
  static constexpr int kPitch = TileRow<input_t, kChunk>::kPitch;
  static constexpr int kSubs = kChunk / kBwdSub;
  static constexpr int kAcc = sizeof(acc_t);
  // A lane's transpose row: {dB, dC} x 8 states of one token, as 4 vectors of 4 whose places
  // are swizzled by the lane, so that stores and sums hit distinct banks.
  static constexpr int kRow = 2 * kBwdStates;
  static constexpr int kLaneSumStride = 33;  // [warp][token][32 keys + 1]: conflict-free reads
  int channels, states, slices, threads;
  bool async_BC, constant_BC;

  __host__ __device__ int tile_bytes() const { return channels * kPitch; }
  __host__ __device__ int checkpoint_elements() const { return threads * kBwdStates; }
  // u, delta, z, dout tiles, seq_idx, the threads' checkpoint states.
  __host__ __device__ int stage_bytes() const {
    return 4 * tile_bytes() + kChunk * 4 + checkpoint_elements() * kAcc;
  }
  __host__ __device__ int stage(int s) const { return s * stage_bytes(); }
  __host__ __device__ int raw_BC() const { return 2 * stage_bytes(); }
  __host__ __device__ int BC_acc() const { return raw_BC() + (async_BC ? 2 * states * kPitch : 0); }
  __host__ __device__ int const_stride() const { return states + 16 / kAcc; }
  // Elements of the staged B (and of C): [kChunk][states] variable, [channels][const_stride]
  // constant.
  __host__ __device__ int BC_elements() const {
    const int constant = constant_BC ? channels * const_stride() : 0;
    return kChunk * states > constant ? kChunk * states : constant;
  }
  // [kSubs][2 halves][threads] 16-byte vectors of states (conflict-free per lane).
  __host__ __device__ int starts() const { return BC_acc() + 2 * BC_elements() * kAcc; }
  __host__ __device__ int transpose() const {
    return starts() + kSubs * checkpoint_elements() * kAcc;
  }
  // [warps][32][kChunk]: a lane's channel sums of its (B or C, state) per token of the chunk.
  __host__ __device__ int lane_sums() const { return transpose() + threads * kRow * kAcc; }
  // [threads][2][8]: a constant B's and C's gradients of the thread's states.
  __host__ __device__ int constant_grads() const {
    return lane_sums() + threads / 32 * kChunk * kLaneSumStride * kAcc;
  }
  // [3][slices][kChunk][channels]: y, sum A r, sum dh B of each slice (one slice finishes its
  // tokens in the lane pair and needs none).
  __host__ __device__ int partials() const {
    return constant_grads() + (constant_BC ? threads * 2 * kBwdStates * kAcc : 0);
  }
  // [threads][2]: dD and ddelta_bias of the thread's finished elements.
  __host__ __device__ int channel_sums() const {
    return partials() + (slices > 1 ? 3 * slices * kChunk * channels * kAcc : 0);
  }
  __host__ __device__ int total() const { return channel_sums() + threads * 2 * kAcc; }
};

// Which streams move by 16-byte vectors (as FwdVectorized).
struct BwdVectorized {
  bool u, delta, z, dout, du, ddelta, dz, B, C;
};

// Four states, 16-byte aligned (two 16-byte accesses in double).
template <typename acc_t> struct alignas(16) Acc4 {
  acc_t v[4];
};

// v[0 .. 4) to 16-byte aligned shared memory by vector stores; PTX because the compiler splits
// the C++ ones (of an Acc4 or a float4) into 8-byte pairs.
__device__ __forceinline__ void store_smem4(float* s, const float* v) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(shared_address(s)), "f"(v[0]),
               "f"(v[1]), "f"(v[2]), "f"(v[3])
               : "memory");
}
__device__ __forceinline__ void store_smem4(double* s, const double* v) {
  asm volatile("st.shared.v2.f64 [%0], {%1, %2};" ::"r"(shared_address(s)), "d"(v[0]), "d"(v[1])
               : "memory");
  asm volatile("st.shared.v2.f64 [%0], {%1, %2};" ::"r"(shared_address(s + 2)), "d"(v[2]),
               "d"(v[3])
               : "memory");
}

template <typename acc_t>
__device__ __forceinline__ void cp_async_acc(acc_t* smem, const acc_t* gmem, bool valid) {
  if constexpr (sizeof(acc_t) == 4) {
    cp_async_4(smem, gmem, valid ? 4 : 0);
  } else {
    cp_async_8(smem, gmem, valid ? 8 : 0);
  }
}

// At most 168 registers: 3 blocks an SM of up to 128 threads.
template <typename input_t, bool kGeneral>
__global__ void __launch_bounds__(128, 3)
    selective_scan_bwd_kernel(const SelectiveScanBwdParams p, const SelectiveScanCudaGeometry g,
                              const BwdTiles<input_t> tiles, const BwdVectorized vec) {
  using acc_t = acc_type<input_t>;
  using Tiles = BwdTiles<input_t>;
  constexpr int kChunk = Tiles::kChunk, kPitch = TileRow<input_t, kChunk>::kPitchElements;
  constexpr int kSubs = Tiles::kSubs, kRow = Tiles::kRow, kSumStride = Tiles::kLaneSumStride;
  using State4 = Acc4<acc_t>;
  extern __shared__ __align__(16) unsigned char smem[];

  // Grid z: the slice block, or the reverse pass's segment (pass 1 runs segments 1, 2, ...).
  const bool segmented = p.reverse_segments > 1, light = p.reverse_pass == 1;
  const BlockPosition pos = block_position(p, g, segmented ? 0 : blockIdx.z);
  const int64_t segment = segmented ? blockIdx.z + (light ? 1 : 0) : 0;
  const int c = pos.channel_in_block, channels = pos.channels;
  const int64_t channel = pos.channel0 + c;
  const int valid_channels = static_cast<int>(
      pos.group_end - pos.channel0 < channels ? pos.group_end - pos.channel0 : channels);
  const bool channel_valid = c < valid_channels;
  const bool per_sequence = p.num_sequences > 0, odd = pos.lane_slice != 0;
  const bool finish_here = g.slice_blocks == 1, has_z = p.z != nullptr;
  // The plain instance (kGeneral false) serves the common case alone, no seq_idx and both B and C
  // variable, so that its token loop carries no (predicated) code for the others.
  const bool packed = kGeneral && p.seq_idx != nullptr;
  const bool variable_B = !kGeneral || p.is_variable_B, variable_C = !kGeneral || p.is_variable_C;
  const bool variable_BC = variable_B || variable_C;
  const int warp = threadIdx.x / 32;

  auto rows = [&](const void* ptr, int64_t batch_stride, int64_t dim_stride) {
    return static_cast<const input_t*>(ptr) + pos.batch * batch_stride + pos.channel0 * dim_stride;
  };
  const input_t* u_rows = rows(p.u, p.u_batch_stride, p.u_dim_stride);
  const input_t* delta_rows = rows(p.delta, p.delta_batch_stride, p.delta_dim_stride);
  const input_t* z_rows = has_z ? rows(p.z, p.z_batch_stride, p.z_dim_stride) : nullptr;
  const input_t* dout_rows = rows(p.dout, p.dout_batch_stride, p.dout_dim_stride);
  const int32_t* seq_row =
      p.seq_idx == nullptr ? nullptr : p.seq_idx + pos.batch * p.seq_idx_batch_stride;
  const int64_t nchunks = g.chunks(p.seqlen);
  // This thread's states in the checkpoint rows (batch, dim, nchunks, dstate).
  const acc_t* checkpoint_row = static_cast<const acc_t*>(p.checkpoints) +
                                (pos.batch * p.dim + channel) * nchunks * p.dstate + pos.state0;

  const StateInputStage<input_t, kChunk> BC(smem + tiles.raw_BC(), smem + tiles.BC_acc(),
                                    tiles.BC_elements(), p, pos, tiles.const_stride(),
                                    tiles.async_BC);
  State4* s_starts = reinterpret_cast<State4*>(smem + tiles.starts());  // [kSubs][2][threads]
  // The dB / dC transpose: lane L stores its vector k (of 4 states) at place k ^ ((L / 2) % 4) of
  // row L; lane (which = B or C, n = 8 h + i) sums state n of rows 2 c' + h, c' < 16.
  // In bytes from the transpose's start, so that each place is an XOR (the places' bits are
  // clear in the row and warp offsets) of one lane-invariant value.
  unsigned char* s_transpose = smem + tiles.transpose();
  const int row_swizzle = 4 * ((pos.lane / 2) % 4);
  const int sum_place = 16 * ((pos.lane % 16) / kBwdStates) +
                        4 * ((pos.lane / 16) * 2 + (pos.lane % kBwdStates) / 4) + pos.lane % 4;
  const int store_bytes = ((warp * 32 + pos.lane) * kRow + row_swizzle) * Tiles::kAcc;
  const int sum_bytes = (warp * 32 * kRow + sum_place) * Tiles::kAcc;
  acc_t* s_lane_sums = reinterpret_cast<acc_t*>(smem + tiles.lane_sums());  // [warps][kChunk][33]
  acc_t* s_own_lane_sums = s_lane_sums + warp * kChunk * kSumStride + pos.lane;  // [token * 33]
  acc_t* s_const = reinterpret_cast<acc_t*>(smem + tiles.constant_grads()) +
                   threadIdx.x * 2 * kBwdStates;
  acc_t* s_part = reinterpret_cast<acc_t*>(smem + tiles.partials());  // [3][slices][kChunk][ch]
  acc_t* s_channel = reinterpret_cast<acc_t*>(smem + tiles.channel_sums());

  // The tiles of chunk `chunk_index` into stage `s`.
  auto issue_loads = [&](int64_t chunk_index, int s) {
    const int64_t token0 = chunk_index * kChunk;
    unsigned char* stage = smem + tiles.stage(s);
    input_t* tile = reinterpret_cast<input_t*>(stage);
    const input_t* sources[4] = {u_rows, delta_rows, z_rows, dout_rows};
    const int64_t dim_strides[4] = {p.u_dim_stride, p.delta_dim_stride, p.z_dim_stride,
                                    p.dout_dim_stride};
    const int64_t seqlen_strides[4] = {p.u_seqlen_stride, p.delta_seqlen_stride,
                                       p.z_seqlen_stride, p.dout_seqlen_stride};
    const bool vectorized[4] = {vec.u, vec.delta, vec.z, vec.dout};
    for (int which = 0; which < 4; ++which, tile += channels * kPitch)
      if (sources[which] != nullptr)
        load_tile<kChunk>(tile, sources[which], dim_strides[which], seqlen_strides[which], channels,
                  valid_channels, token0, p.seqlen, vectorized[which]);
    if (seq_row != nullptr) {
      int32_t* s_seq = reinterpret_cast<int32_t*>(stage + 4 * tiles.tile_bytes());
      for (int t = threadIdx.x; t < kChunk; t += blockDim.x) {
        const bool valid = token0 + t < p.seqlen;
        cp_async_4(s_seq + t, valid ? seq_row + (token0 + t) * p.seq_idx_seqlen_stride : seq_row,
                   valid ? 4 : 0);
      }
    }
    acc_t* s_checkpoint = reinterpret_cast<acc_t*>(stage + 4 * tiles.tile_bytes() + kChunk * 4) +
                          threadIdx.x * kBwdStates;
#pragma unroll
    for (int i = 0; i < kBwdStates; ++i) {
      const bool valid = channel_valid && pos.state0 + i < p.dstate;
      cp_async_acc(s_checkpoint + i,
                   valid ? checkpoint_row + chunk_index * p.dstate + i
                         : static_cast<const acc_t*>(p.checkpoints),
                   valid);
    }
    BC.issue(p, token0, p.seqlen, vec.B, vec.C);
    cp_async_commit();
  };

  BC.stage_constants(p, pos, channels, valid_channels);
  const int state_offset = static_cast<int>(pos.state0 - pos.block_state0);
  const acc_t* B_base = BC.B_base(p, c, state_offset);
  const acc_t* C_base = BC.C_base(p, c, state_offset);
  const int B_token_stride = variable_B ? pos.padded_states : 0;
  const int C_token_stride = variable_C ? pos.padded_states : 0;

  acc_t A2[kBwdStates], dh[kBwdStates], dA[kBwdStates];
  load_thread_states(A2, p.A, channel * p.A_dim_stride, p.A_dstate_stride, p, pos);
#pragma unroll
  for (int i = 0; i < kBwdStates; ++i) {
    A2[i] *= acc_t(kLog2e);
    dA[i] = 0;
  }
  if (!variable_B || !variable_C) {
    for (int i = 0; i < 2 * kBwdStates; ++i) s_const[i] = 0;
  }
  const acc_t bias =
      channel_valid ? channel_weight<acc_t>(p.delta_bias, p.delta_bias_stride, channel) : acc_t(0);
  // Packed batches, walking backwards: at the last token of a sequence, dh holds the gradient of
  // the start state of the sequence after it (written to dinitial_state[id] in per-sequence
  // mode) and restarts from that sequence's dlast_state (per-sequence mode; per-row mode: at the
  // row's end only).
  // Pass 1 starts every segment from 0; pass 2 a segment before the last from the dh its end
  // receives (the combine kernel adds dlast_state's share).
  const int64_t segment_row = (segment * p.batch + pos.batch) * p.dim + channel;
  const bool last_segment = segment + 1 == p.reverse_segments;
  if (last_segment && !light)
    load_thread_states(dh, per_sequence ? nullptr : p.dlast_state,
                       pos.batch * p.dlast_state_batch_stride + channel * p.dlast_state_dim_stride,
                       p.dlast_state_dstate_stride, p, pos);
  else
    load_thread_states(dh, light ? nullptr : p.segment_dh, (segment_row + p.dim * p.batch) *
                       p.dstate, 1, p, pos);
  int64_t next_seq = kNoSequence;  // the sequence of the token after (set below by segment)
  auto store_dinitial = [&](int64_t row) {
    store_thread_states(dh, p.dinitial_state,
                        row * p.dinitial_state_batch_stride + channel * p.dinitial_state_dim_stride,
                        p.dinitial_state_dstate_stride, p, pos);
  };
  auto end_sequence = [&](int id) {
    // Not padding, not none; pass 1 writes nothing.
    if (per_sequence && next_seq >= 0 && !light) store_dinitial(next_seq);
    const bool from_dlast = id != kPadding && (per_sequence || next_seq == kNoSequence);
    load_thread_states(dh, from_dlast ? p.dlast_state : nullptr,
                       (per_sequence ? id : pos.batch) * p.dlast_state_batch_stride +
                           channel * p.dlast_state_dim_stride,
                       p.dlast_state_dstate_stride, p, pos);
  };
  // The elements this thread finishes, in a fixed order for its dD and ddelta_bias sums: with
  // one slice, tokens odd, odd + 2, ... of its own channel; with several, channel
  // threadIdx.x % channels, every (blockDim.x / channels)-th token. Slot `sum_slot` of the
  // channel's blockDim.x / channels.
  const int finish_channel = threadIdx.x % channels, finish_stride = blockDim.x / channels;
  const int sum_channel = g.slices == 1 ? c : finish_channel;
  const int sum_slot = g.slices == 1 ? (odd ? 1 : 0) : static_cast<int>(threadIdx.x) / channels;
  const acc_t D_own = channel_valid ? channel_weight<acc_t>(p.D, p.D_stride, channel) : acc_t(0);
  acc_t dD_sum = 0, ddelta_bias_sum = 0;

  // Pass 1: the segment's decay, the product of its tokens' exp(dt A) (the very factors the
  // recurrence applies: exp(A sum dt) would differ by the rounding of the sum).
  acc_t decay[kBwdStates];
#pragma unroll
  for (int i = 0; i < kBwdStates; ++i) decay[i] = 1;
  const int64_t segment_chunks = segmented ? p.reverse_segment_len / kChunk : nchunks;
  const int64_t chunk_lo = segment * segment_chunks;
  const int64_t chunk_hi = chunk_lo + segment_chunks < nchunks ? chunk_lo + segment_chunks : nchunks;
  // A segment before the last continues the sequence of the token after it (pass 1 too: its
  // dh from 0 stands for the part the combine adds).
  if (packed && !last_segment) next_seq = sequence_of(p, pos.batch, chunk_hi * kChunk);
  if (chunk_lo < chunk_hi) issue_loads(chunk_hi - 1, (chunk_hi - 1) & 1);
  for (int64_t chunk_index = chunk_hi - 1; chunk_index >= chunk_lo; --chunk_index) {
    const int64_t token0 = chunk_index * kChunk;
    unsigned char* stage = smem + tiles.stage(chunk_index & 1);
    input_t* tile_u = reinterpret_cast<input_t*>(stage);
    input_t* tile_delta = tile_u + channels * kPitch;
    input_t* tile_z = tile_delta + channels * kPitch;
    const input_t* tile_dout = tile_z + channels * kPitch;
    const int32_t* s_seq = reinterpret_cast<const int32_t*>(stage + 4 * tiles.tile_bytes());
    // The thread's checkpoint states; once pass A has read them, its tokens' dt for pass B.
    acc_t* s_thread_slots =
        reinterpret_cast<acc_t*>(stage + 4 * tiles.tile_bytes() + kChunk * 4) +
        threadIdx.x * kBwdStates;
    const acc_t* s_pair_slots = s_thread_slots - (odd ? kBwdStates : 0);  // the even lane's
    cp_async_wait_all();
    __syncthreads();  // this chunk's tiles are in; every thread is done with the last chunk
    BC.stage(p, token0, p.seqlen);
    __syncthreads();
    if (chunk_index > chunk_lo) issue_loads(chunk_index - 1, (chunk_index - 1) & 1);
    const int chunk_tokens =
        static_cast<int>(p.seqlen - token0 < kChunk ? p.seqlen - token0 : kChunk);
    const int64_t seq_before =
        packed && token0 > 0 ? sequence_of(p, pos.batch, token0 - 1) : kNoSequence;
    const input_t* row_u = tile_u + c * kPitch;
    // Whether a sequence starts at chunk token t (the same for the block).
    auto starts_at = [&](int t) {
      return packed && t < chunk_tokens &&
             s_seq[t] != (t > 0 ? int64_t(s_seq[t - 1]) : seq_before);
    };
    auto live_at = [&](int t) {
      return t < chunk_tokens && (!packed || s_seq[t] != kPadding);
    };

    // The inputs of element (ce, t) from the tiles (what goes unused is compiled out).
    auto inputs_at = [&](int ce, int t, acc_t bias_ce) {
      const int index = ce * kPitch + t;
      return token_inputs(acc_t(to_acc(tile_u[index])), acc_t(to_acc(tile_delta[index])) + bias_ce,
                          has_z ? acc_t(to_acc(tile_z[index])) : acc_t(0),
                          acc_t(to_acc(tile_dout[index])), has_z, p.delta_softplus);
    };
    // du, ddelta, dz of element (ce, t) into the tiles (padding: 0, as its output was), and the
    // thread's dD and ddelta_bias sums.
    auto finish_token = [&](int ce, int t, acc_t D, const TokenInputs<acc_t>& in, acc_t y,
                            acc_t P1, acc_t P2) {
      const int index = ce * kPitch + t;
      if (packed && s_seq[t] == kPadding) {
        tile_u[index] = tile_delta[index] = tile_z[index] = from_acc<input_t>(acc_t(0));
        return;
      }
      const TokenGrads<acc_t> grads = token_grads(in, has_z, D, p.delta_softplus, y, P1, P2);
      tile_u[index] = from_acc<input_t>(grads.du);
      tile_delta[index] = from_acc<input_t>(grads.ddelta);
      if (has_z) tile_z[index] = from_acc<input_t>(grads.dz);
      dD_sum += grads.dD;
      ddelta_bias_sum += grads.ddelta_bias;
    };

    if (light) {
      // Segment pass 1: dh alone, last token first (both lanes of a pair compute dt and gy).
      // A sequence end restarts dh as pass 2 will, and cuts the segment's decay to 0: what
      // comes before it no longer depends on the dh the segment's end receives.
      for (int t = chunk_tokens - 1; t >= 0; --t) {
        if (packed && s_seq[t] != next_seq) {
          end_sequence(s_seq[t]);
          next_seq = s_seq[t];
#pragma unroll
          for (int i = 0; i < kBwdStates; ++i) decay[i] = 0;
        }
        // Computed, then masked (a branch around them costs more).
        const bool live = live_at(t);
        const TokenInputs<acc_t> in = inputs_at(c, t, bias);
        const acc_t dt = live ? in.dt : acc_t(0), gy = live ? in.gy : acc_t(0);
        acc_t C[kBwdStates];
        load_smem_states(C, C_base + t * C_token_stride);
#pragma unroll
        for (int i = 0; i < kBwdStates; ++i) {
          const acc_t a = exp2_approx(dt * A2[i]);
          dh[i] = (dh[i] + gy * C[i]) * a;
          decay[i] *= a;
        }
      }
      continue;
    }

    // Pass A: replay the chunk from its checkpoint, keeping the state before each sub-chunk,
    // and each token's dt (0 where not live) for pass B: a lane of the pair computes the dt of
    // tokens 2 k + odd, keeps it in its slot k, and a shuffle hands it to the other lane.
    {
      acc_t h[kBwdStates];
#pragma unroll
      for (int i = 0; i < kBwdStates; ++i) h[i] = s_thread_slots[i];
#pragma unroll 1
      for (int t0 = 0; t0 < kChunk; t0 += kBwdSub) {
        State4* start = s_starts + (t0 / kBwdSub) * 2 * blockDim.x + threadIdx.x;
        start[0] = State4{{h[0], h[1], h[2], h[3]}};
        start[blockDim.x] = State4{{h[4], h[5], h[6], h[7]}};
        acc_t dt_s[kBwdSub];
#pragma unroll
        for (int j = 0; j < kBwdSub; j += 2) {
          const int t = t0 + j + (odd ? 1 : 0);
          const acc_t dt = inputs_at(c, t, bias).dt, mine = live_at(t) ? dt : acc_t(0);
          s_thread_slots[(t0 + j) / 2] = mine;
          const acc_t other = __shfl_xor_sync(0xffffffffu, mine, 1);
          dt_s[j] = odd ? other : mine;
          dt_s[j + 1] = odd ? mine : other;
        }
#pragma unroll
        for (int j = 0; j < kBwdSub; ++j) {
          const int t = t0 + j;
          if (starts_at(t)) load_start_state(h, p, pos, s_seq[t], token0 + t);
          const acc_t dt = dt_s[j];
          const acc_t dtu = dt * to_acc(row_u[t]);
          acc_t B[kBwdStates];
          load_smem_states(B, B_base + t * B_token_stride);
#pragma unroll
          for (int i = 0; i < kBwdStates; ++i) h[i] = exp2_approx(dt * A2[i]) * h[i] + dtu * B[i];
        }
      }
    }

    __syncwarp();  // the pair's dt slots are written

    // Pass B: the sub-chunks, last first.
#pragma unroll 1
    for (int sub = kSubs - 1; sub >= 0; --sub) {
      const int t0 = sub * kBwdSub;
      // gy_own, sums_own: of the lane's tokens t0 + 2 q + odd.
      acc_t dt_s[kBwdSub], dtu_s[kBwdSub], gy_s[kBwdSub];
      acc_t gy_own[kBwdSub / 2], z_sigmoid_own[kBwdSub / 2];
      {
        // Pass A's dt: slots t0 / 2 and t0 / 2 + 1 of the pair's even and odd lane.
        const acc_t* even_slots = s_pair_slots + t0 / 2;
        using Pair = typename std::conditional<sizeof(acc_t) == 4, float2, double2>::type;
        const Pair even = *reinterpret_cast<const Pair*>(even_slots);
        const Pair odd_lane = *reinterpret_cast<const Pair*>(even_slots + kBwdStates);
        dt_s[0] = even.x;
        dt_s[1] = odd_lane.x;
        dt_s[2] = even.y;
        dt_s[3] = odd_lane.y;
      }
#pragma unroll
      for (int j = 0; j < kBwdSub; j += 2) {
        // gy = dout silu(z): each lane of the pair computes one, a shuffle hands it over. Tokens
        // past the sequence's end load as 0 and give 0; padding needs the mask.
        const int t = t0 + j + (odd ? 1 : 0);
        const TokenInputs<acc_t> in = inputs_at(c, t, bias);
        const acc_t mine = packed && !live_at(t) ? acc_t(0) : in.gy;
        gy_own[j / 2] = in.gy;
        z_sigmoid_own[j / 2] = in.z_sigmoid;
        const acc_t other = __shfl_xor_sync(0xffffffffu, mine, 1);
        gy_s[j] = odd ? other : mine;
        gy_s[j + 1] = odd ? mine : other;
      }
#pragma unroll
      for (int j = 0; j < kBwdSub; ++j) dtu_s[j] = dt_s[j] * to_acc(row_u[t0 + j]);
      // Replay the sub-chunk keeping every state.
      acc_t hist[kBwdSub][kBwdStates];
      const State4* start = s_starts + sub * 2 * blockDim.x + threadIdx.x;
      // The state before token t0 + j (a sequence's start state where one starts there): the
      // sub-chunk's start (read again when needed, rather than held) or the replay's state.
      auto state_before = [&](int j, acc_t (&before)[kBwdStates]) {
        if (j == 0) {
          const State4 low = start[0], high = start[blockDim.x];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            before[i] = low.v[i];
            before[4 + i] = high.v[i];
          }
        } else {
#pragma unroll
          for (int i = 0; i < kBwdStates; ++i) before[i] = hist[j - 1][i];
        }
        if (starts_at(t0 + j)) load_start_state(before, p, pos, s_seq[t0 + j], token0 + t0 + j);
      };
#pragma unroll
      for (int j = 0; j < kBwdSub; ++j) {
        acc_t B[kBwdStates], before[kBwdStates];
        load_smem_states(B, B_base + (t0 + j) * B_token_stride);
        state_before(j, before);
#pragma unroll
        for (int i = 0; i < kBwdStates; ++i)
          hist[j][i] = exp2_approx(dt_s[j] * A2[i]) * before[i] + dtu_s[j] * B[i];
      }
      // The adjoint over the sub-chunk, last token first. The channel sums y, P1, P2 of a token
      // pair: each lane keeps its halves of the odd token's, and one shuffle a sum leaves each
      // lane its own token's.
      acc_t sums_own[kBwdSub / 2][3], odd_token_halves[3];
#pragma unroll
      for (int j = kBwdSub - 1; j >= 0; --j) {
        const int t = t0 + j;
        if (packed && t < chunk_tokens && s_seq[t] != next_seq) {
          // Token t ends its sequence: dh held the gradient of the next one's start state.
          end_sequence(s_seq[t]);
          next_seq = s_seq[t];
        }
        acc_t B[kBwdStates], C[kBwdStates], dB[kBwdStates], dC[kBwdStates];
        acc_t before[kBwdStates];
        load_smem_states(B, B_base + t * B_token_stride);
        load_smem_states(C, C_base + t * C_token_stride);
        state_before(j, before);
        acc_t y = 0, P1 = 0, P2 = 0;
#pragma unroll
        for (int i = 0; i < kBwdStates; ++i) {
          y += C[i] * hist[j][i];
          dh[i] += gy_s[j] * C[i];
          P2 += dh[i] * B[i];
          dB[i] = dh[i] * dtu_s[j];
          dC[i] = gy_s[j] * hist[j][i];
          // dh_t a_t: the earlier token's dh, and r = dh_t a_t h_{t-1}.
          dh[i] *= exp2_approx(dt_s[j] * A2[i]);
          const acc_t r = dh[i] * before[i];
          dA[i] += dt_s[j] * r;
          P1 += A2[i] * r;
        }
        const acc_t halves[3] = {y, P1, P2};
#pragma unroll
        for (int which = 0; which < 3; ++which) {
          if (j % 2 == 1) {
            odd_token_halves[which] = halves[which];
          } else {
            const acc_t mine = odd ? odd_token_halves[which] : halves[which];
            const acc_t other = odd ? halves[which] : odd_token_halves[which];
            sums_own[j / 2][which] = mine + __shfl_xor_sync(0xffffffffu, other, 1);
          }
        }
        if (!variable_B || !variable_C) {
#pragma unroll
          for (int i = 0; i < kBwdStates; ++i) {
            if (!variable_B) s_const[i] += dB[i];
            if (!variable_C) s_const[kBwdStates + i] += dC[i];
          }
        }
        if (variable_BC) {
          // The warp's sums over its 16 channels: lane (B or C = lane / 16, state lane % 16).
#pragma unroll
          for (int k = 0; k < 4; ++k)
            store_smem4(reinterpret_cast<acc_t*>(s_transpose +
                                                 (store_bytes ^ (4 * k * Tiles::kAcc))),
                        k < 2 ? dB + 4 * k : dC + 4 * (k - 2));
          __syncwarp();
          // Two chains of 8 adds rather than one of 16 (a full tree spills).
          acc_t sum[2] = {0, 0};
#pragma unroll
          for (int cw = 0; cw < 16; ++cw)
            sum[cw % 2] += *reinterpret_cast<const acc_t*>(
                s_transpose + (sum_bytes ^ (4 * (cw % 4) * Tiles::kAcc)) +
                cw * 2 * kRow * Tiles::kAcc);
          s_own_lane_sums[t * kSumStride] = sum[0] + sum[1];
          __syncwarp();
        }
      }
#pragma unroll
      for (int q = 0; q < kBwdSub / 2; ++q) {
        const int t = t0 + 2 * q + (odd ? 1 : 0);
        sums_own[q][1] *= acc_t(1.0 / kLog2e);
        if (g.slices == 1) {
          // Finish the lane's tokens of the channel in the tiles.
          if (t >= chunk_tokens || !channel_valid) continue;
          // The tiles' inputs, with what the scan derived of them (the same values) kept.
          TokenInputs<acc_t> in = inputs_at(c, t, bias);
          in.dt = odd ? dt_s[2 * q + 1] : dt_s[2 * q];
          in.gy = gy_own[q];
          in.z_sigmoid = z_sigmoid_own[q];
          finish_token(c, t, D_own, in, sums_own[q][0], sums_own[q][1], sums_own[q][2]);
        } else {
          acc_t* part = s_part + (pos.slice * kChunk + t) * channels + c;
          const int which_stride = g.slices * kChunk * channels;
#pragma unroll
          for (int which = 0; which < 3; ++which) part[which * which_stride] = sums_own[q][which];
        }
      }
    }
    __syncthreads();

    // Several slices: the per-element sum of their partials, then du, ddelta, dz into the
    // tiles, or the sums to the finishing kernel.
    for (int t = threadIdx.x / channels; g.slices > 1 && t < chunk_tokens; t += finish_stride) {
      const int ce = finish_channel;
      if (ce >= valid_channels) continue;
      const int which_stride = g.slices * kChunk * channels;
      acc_t sums[3] = {0, 0, 0};
      for (int slice = 0; slice < g.slices; ++slice)
        for (int which = 0; which < 3; ++which)
          sums[which] += s_part[which * which_stride + (slice * kChunk + t) * channels + ce];
      if (!finish_here) {
        acc_t* partials = static_cast<acc_t*>(p.slice_partials) +
                          ((blockIdx.z * 3 * p.batch + pos.batch) * p.dim + pos.channel0 + ce) *
                              p.seqlen +
                          token0 + t;
        const int64_t which_stride_global = p.batch * p.dim * p.seqlen;
        for (int which = 0; which < 3; ++which) partials[which * which_stride_global] = sums[which];
        continue;
      }
      const int64_t ch = pos.channel0 + ce;
      finish_token(ce, t, channel_weight<acc_t>(p.D, p.D_stride, ch),
                   inputs_at(ce, t, channel_weight<acc_t>(p.delta_bias, p.delta_bias_stride, ch)),
                   sums[0], sums[1], sums[2]);
    }
    // The chunk's channel sums of dB and dC: the block's channel warps in order.
    for (int e = threadIdx.x; e < g.slices * 32 * kChunk; e += blockDim.x) {
      const int t = e % kChunk, key = (e / kChunk) % 32, slice = e / (32 * kChunk);
      const int which = key / 16;
      const int64_t n = pos.block_state0 + slice * 16 + key % 16;
      if (!(which == 0 ? variable_B : variable_C) || n >= p.dstate || t >= chunk_tokens)
        continue;
      acc_t sum = 0;
      for (int cw = 0; cw < g.channel_warps; ++cw)
        sum += s_lane_sums[((slice * g.channel_warps + cw) * kChunk + t) * kSumStride + key];
      const int64_t slot = p.deterministic ? blockIdx.x % g.channel_blocks_per_group : 0;
      acc_t* BC_partials = static_cast<acc_t*>(p.BC_partials) +
                           ((slot * p.batch + pos.batch) * p.ngroups + pos.group) * 2 * p.dstate *
                               p.seqlen;
      write_slot(BC_partials + (which * p.dstate + n) * p.seqlen + token0 + t, sum,
                 p.deterministic);
    }
    __syncthreads();
    if (finish_here) {
      auto out_rows = [&](void* ptr, int64_t batch_stride, int64_t dim_stride) {
        return static_cast<input_t*>(ptr) + pos.batch * batch_stride + pos.channel0 * dim_stride;
      };
      store_tile<kChunk>(tile_u, out_rows(p.du, p.du_batch_stride, p.du_dim_stride), p.du_dim_stride,
                 p.du_seqlen_stride, valid_channels, token0, p.seqlen, vec.du);
      store_tile<kChunk>(tile_delta, out_rows(p.ddelta, p.ddelta_batch_stride, p.ddelta_dim_stride),
                 p.ddelta_dim_stride, p.ddelta_seqlen_stride, valid_channels, token0, p.seqlen,
                 vec.ddelta);
      if (has_z)
        store_tile<kChunk>(tile_z, out_rows(p.dz, p.dz_batch_stride, p.dz_dim_stride), p.dz_dim_stride,
                   p.dz_seqlen_stride, valid_channels, token0, p.seqlen, vec.dz);
    }
  }

  if (light) {
    // dh at the segment's start from dh = 0 at its end, and the segment's decay.
    store_thread_states(dh, p.segment_dh, segment_row * p.dstate, 1, p, pos);
    store_thread_states(decay, p.segment_decay, segment_row * p.dstate, 1, p, pos);
    return;
  }
  // dh is now the gradient of the state before the segment's first token: the row's first
  // sequence's initial state in segment 0 (a later segment's first sequence either goes on in
  // the segment before, or starts there and the segment before writes it at its boundary).
  if (segment == 0 && !per_sequence)
    store_dinitial(pos.batch);
  else if (segment == 0 && next_seq >= 0)
    store_dinitial(next_seq);
  const int64_t weight_slot = p.deterministic ? pos.batch * p.reverse_segments + segment : 0;
  if (channel_valid) {
    acc_t* weights =
        static_cast<acc_t*>(p.weight_partials) + (weight_slot * p.dim + channel) * 3 * p.dstate;
#pragma unroll
    for (int i = 0; i < kBwdStates; ++i) {
      const int64_t n = pos.state0 + i;
      if (n >= p.dstate) continue;
      write_slot(weights + n, dA[i], p.deterministic);
      if (!variable_B) write_slot(weights + p.dstate + n, s_const[i], p.deterministic);
      if (!variable_C)
        write_slot(weights + 2 * p.dstate + n, s_const[kBwdStates + i], p.deterministic);
    }
  }
  if (finish_here) {
    // dD and ddelta_bias: the threads of a channel in order.
    s_channel[(sum_slot * channels + sum_channel) * 2] = dD_sum;
    s_channel[(sum_slot * channels + sum_channel) * 2 + 1] = ddelta_bias_sum;
    __syncthreads();
    if (threadIdx.x < valid_channels) {
      acc_t sums[2] = {0, 0};
      for (int k = 0; k < finish_stride; ++k)
        for (int which = 0; which < 2; ++which)
          sums[which] += s_channel[(threadIdx.x + k * channels) * 2 + which];
      acc_t* dst = static_cast<acc_t*>(p.channel_partials) +
                   (weight_slot * p.dim + pos.channel0 + threadIdx.x) * 2;
      write_slot(dst, sums[0], p.deterministic);
      write_slot(dst + 1, sums[1], p.deterministic);
    }
  }
}

template <typename input_t>
cudaError_t run_selective_scan_bwd(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  using acc_t = acc_type<input_t>;
  // 1. Checkpoints, unless the forward wrote them.
  cudaError_t error = cudaSuccess;
  if (!p.checkpoints_ready) {
    SelectiveScanFwdParams fwd = p;
    fwd.out = nullptr;
    fwd.last_state = nullptr;
    error = run_selective_scan_fwd<input_t>(fwd, stream);
    if (error != cudaSuccess) return error;
  }

  // 2. The reverse pass.
  const SelectiveScanCudaGeometry g = selective_scan_bwd_cuda_geometry(p, sizeof(acc_t) == 8);
  BwdTiles<input_t> tiles{g.channels_per_block(), g.slices * g.states_per_thread, g.slices,
                          g.threads(),          true, !(p.is_variable_B && p.is_variable_C)};
  if (!(p.is_variable_B || p.is_variable_C) || tiles.total() > 200 * 1024) tiles.async_BC = false;
  BwdVectorized vec{};
  vec.u = activation_vectorized<input_t>(p.u, p.u_batch_stride, p.u_dim_stride,
                                         p.u_seqlen_stride);
  vec.delta = activation_vectorized<input_t>(p.delta, p.delta_batch_stride, p.delta_dim_stride,
                                             p.delta_seqlen_stride);
  vec.z = activation_vectorized<input_t>(p.z, p.z_batch_stride, p.z_dim_stride,
                                         p.z_seqlen_stride);
  vec.dout = activation_vectorized<input_t>(p.dout, p.dout_batch_stride, p.dout_dim_stride,
                                            p.dout_seqlen_stride);
  vec.du = activation_vectorized<input_t>(p.du, p.du_batch_stride, p.du_dim_stride,
                                          p.du_seqlen_stride);
  vec.ddelta = activation_vectorized<input_t>(p.ddelta, p.ddelta_batch_stride, p.ddelta_dim_stride,
                                              p.ddelta_seqlen_stride);
  vec.dz = activation_vectorized<input_t>(p.dz, p.dz_batch_stride, p.dz_dim_stride,
                                          p.dz_seqlen_stride);
  state_inputs_vectorized<input_t>(p, vec.B, vec.C);
  const size_t smem = tiles.total();
  const bool general = p.seq_idx != nullptr || !(p.is_variable_B && p.is_variable_C);
  auto kernel = general ? &selective_scan_bwd_kernel<input_t, true>
                        : &selective_scan_bwd_kernel<input_t, false>;
  error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error != cudaSuccess) return error;
  const int64_t grid_x = g.channel_blocks_per_group * p.ngroups;
  if (p.reverse_segments > 1) {
    SelectiveScanBwdParams pass = p;
    pass.reverse_pass = 1;
    kernel<<<dim3(grid_x, p.batch, p.reverse_segments - 1), g.threads(), smem, stream>>>(
        pass, g, tiles, vec);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
    const int64_t threads = p.batch * p.dim * p.dstate;
    selective_scan_bwd_combine_segments_kernel<acc_t>
        <<<(threads + 255) / 256, 256, 0, stream>>>(p);
    if ((error = cudaGetLastError()) != cudaSuccess) return error;
    pass.reverse_pass = 2;
    kernel<<<dim3(grid_x, p.batch, p.reverse_segments), g.threads(), smem, stream>>>(pass, g,
                                                                                   tiles, vec);
  } else {
    kernel<<<dim3(grid_x, p.batch, g.slice_blocks), g.threads(), smem, stream>>>(p, g, tiles,
                                                                                vec);
  }
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
  const int64_t BC_slot_stride = p.batch * p.ngroups * 2 * n * l;
  const int64_t weight_slot_stride = p.dim * 3 * n;
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
