// Forward of the selective scan on CUDA: one pass over the sequence, fusing dt (bias,
// softplus), the decay exp, the scan, the C contraction, D, the z gate and the sequence resets
// of a packed batch.
//
// Two neighbouring lanes own one channel and 16 of its states (a state slice, 8 states a lane;
// dstate > 16 takes several slices, in different warps of the block). They walk the tokens in
// order; per (token, state) one exp2 (A comes pre-scaled by log2 e) and four FMA-pipe
// instructions. Per token the pair computes dt (softplus) and the output (D, gate) once: each
// lane every other token, handed over by a shuffle, as is the C contraction's other half.
//
// Tokens go by chunks of kChunk. Per chunk the block stages in shared memory:
//   u, delta, z tiles   [channels][kChunk] in the input type, double-buffered: the next chunk's
//                       tiles arrive by cp.async while this one is computed. The output
//                       overwrites u in place and leaves in 16-byte coalesced stores;
//   seq_idx             [kChunk] int32, with the tiles;
//   variable B and C    [kChunk][states] in acc_type (a thread reads its 8 states of a token
//                       as 2 broadcast 16-byte reads), converted from raw [states][kChunk]
//                       tiles that arrive by cp.async, or read directly from global memory
//                       when the raw tiles would not fit (dstate > 128 in 32-bit types);
//                       a constant B or C sits there as [channels][states + 16 bytes] for the
//                       whole kernel (registers would spill);
//   y partials          [slices][kChunk][channels] when there are several state slices.
// Few channels (batch x dim): the sequence is cut into segments run in two passes
// (selective_scan.h, segment_len).
#pragma once

#include "common/cuda_async_copy.cuh"
#include "selective_scan/cuda/selective_scan_common.cuh"

namespace mamba_ext {
namespace scan_cuda {

constexpr int kFwdStates = 8;  // states a thread keeps: half of a 16-state slice

// Which streams move by 16-byte vectors (token stride 1, 16-byte aligned rows); the others go
// element by element, synchronously.
struct FwdVectorized {
  bool u, delta, z, out, B, C;
};

// A tile row of kChunk tokens: their bytes and 16 more, an odd multiple of 16 bytes, so that 8
// lanes reading 16 bytes of 8 rows hit distinct banks.
template <typename input_t, int kChunk> struct TileRow {
  static_assert(kChunk * sizeof(input_t) % 32 == 0, "a tile row must be an odd multiple of 16 B");
  static constexpr int kPitch = kChunk * sizeof(input_t) + 16;
  static constexpr int kPitchElements = kPitch / sizeof(input_t);
};

// The shared memory of a block, in bytes from its start.
template <typename input_t> struct FwdTiles {
  using acc_t = acc_type<input_t>;
  static constexpr int kChunk = selective_scan_cuda_chunk(sizeof(acc_t) == 8);
  static constexpr int kPitch = TileRow<input_t, kChunk>::kPitch;
  static constexpr int kPitchElements = TileRow<input_t, kChunk>::kPitchElements;
  int channels, states, slices;
  bool async_BC;

  __host__ __device__ int tile_bytes() const { return channels * kPitch; }
  __host__ __device__ int stage_bytes() const { return 3 * tile_bytes() + kChunk * 4; }
  __host__ __device__ int stage(int s) const { return s * stage_bytes(); }
  __host__ __device__ int raw_BC() const { return 2 * stage_bytes(); }
  __host__ __device__ int BC_acc() const {
    return raw_BC() + (async_BC ? 2 * states * kPitch : 0);
  }
  // Row stride of a constant B or C: 16 bytes of padding, as kPitch.
  __host__ __device__ int const_stride() const { return states + 16 / sizeof(acc_t); }
  __host__ __device__ int BC_elements() const {
    return kChunk * states > channels * const_stride() ? kChunk * states
                                                       : channels * const_stride();
  }
  __host__ __device__ int y_partials() const {
    return BC_acc() + 2 * BC_elements() * static_cast<int>(sizeof(acc_t));
  }
  __host__ __device__ int total() const {
    return y_partials() +
           (slices > 1 ? slices * kChunk * channels * static_cast<int>(sizeof(acc_t)) : 0);
  }
};

template <typename T> struct Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T> __device__ __forceinline__ Vec16<T> load_vec16(const T* smem) {
  Vec16<T> r;
  *reinterpret_cast<uint4*>(r.v) = *reinterpret_cast<const uint4*>(smem);
  return r;
}

// Element i of a vector in acc_t. A bfloat16 pair is one word: the element is its low half
// shifted up or its high half masked, one instruction.
template <typename T>
__device__ __forceinline__ acc_type<T> vector_element(const Vec16<T>& vec, int i) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const uint32_t word = reinterpret_cast<const uint32_t*>(vec.v)[i / 2];
    return __uint_as_float(i % 2 ? word & 0xffff0000u : word << 16);
  } else {
    return to_acc(vec.v[i]);
  }
}

// Element j + odd of a vector (j even) in acc_t: a lane pair's two lanes take the two elements
// of a pair. For bfloat16 one byte permutation of the pair's word (the selector chosen once).
template <typename T>
__device__ __forceinline__ acc_type<T> pair_element(const Vec16<T>& vec, int j, bool odd) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const uint32_t word = reinterpret_cast<const uint32_t*>(vec.v)[j / 2];
    return __uint_as_float(__byte_perm(word, 0, odd ? 0x3244 : 0x1044));
  } else {
    return to_acc(odd ? vec.v[j + 1] : vec.v[j]);
  }
}

// Rows [0, rows) x tokens [token0, token0 + kChunk) of a (row, token) matrix at `base` into
// tile[rows][kPitchElements]; zeros for rows >= valid_rows and tokens >= seqlen. Vectorised:
// asynchronous 16-byte copies; otherwise element by element. kWholeChunks: a path without bounds
// for chunks in bounds (the forward's; in the backward, at its register limit, it adds spills).
template <int kChunk, bool kWholeChunks = false, typename input_t>
__device__ __forceinline__ void load_tile(input_t* tile, const input_t* base, int64_t row_stride,
                                          int64_t token_stride, int rows, int valid_rows,
                                          int64_t token0, int64_t seqlen, bool vectorized) {
  constexpr int kPitch = TileRow<input_t, kChunk>::kPitchElements;
  constexpr int kPerVec = Vec16<input_t>::kSize, kVecs = kChunk / kPerVec;
  if (vectorized) {
    // A thread's copies share one vector of tokens (blocks are whole warps, kVecs divides 32):
    // its bounds and address once, then steps of rows.
    const int v = threadIdx.x % kVecs, row_step = blockDim.x / kVecs;
    const int64_t token = token0 + v * kPerVec;
    int r = threadIdx.x / kVecs;
    const input_t* src = base + r * row_stride + token;
    if (kWholeChunks && token0 + kChunk <= seqlen && rows <= valid_rows) {
      // The whole chunk of every row (all chunks but a segment's last): no bounds a copy.
      input_t* dst = tile + r * kPitch + v * kPerVec;
      for (; r < rows; r += row_step, src += row_step * row_stride, dst += row_step * kPitch)
        cp_async_16(dst, src);
      return;
    }
    const int64_t left = seqlen - token;
    const int vec_bytes =
        left <= 0 ? 0 : static_cast<int>(left < kPerVec ? left : kPerVec) * sizeof(input_t);
    for (; r < rows; r += row_step, src += row_step * row_stride) {
      const int bytes = r < valid_rows ? vec_bytes : 0;
      cp_async_16(tile + r * kPitch + v * kPerVec, bytes ? src : base, bytes);
    }
  } else {
    for (int e = threadIdx.x; e < rows * kChunk; e += blockDim.x) {
      const int r = e / kChunk, t = e % kChunk;
      const int64_t token = token0 + t;
      tile[r * kPitch + t] = (r < valid_rows && token < seqlen)
                                 ? base[r * row_stride + token * token_stride]
                                 : input_t{};
    }
  }
}

// The reverse of load_tile: rows [0, rows) x tokens [token0, min(token0 + kChunk, seqlen)) of
// tile[rows][kPitchElements] to the (row, token) matrix at `base`, by coalesced 16-byte stores
// when vectorised.
template <int kChunk, typename input_t>
__device__ __forceinline__ void store_tile(const input_t* tile, input_t* base, int64_t row_stride,
                                           int64_t token_stride, int rows, int64_t token0,
                                           int64_t seqlen, bool vectorized) {
  constexpr int kPitch = TileRow<input_t, kChunk>::kPitchElements;
  constexpr int kPerVec = Vec16<input_t>::kSize, kVecs = kChunk / kPerVec;
  if (vectorized) {
    const int v = threadIdx.x % kVecs, row_step = blockDim.x / kVecs;  // as load_tile
    const int64_t token = token0 + v * kPerVec, left = seqlen - token;
    int r = threadIdx.x / kVecs;
    input_t* dst = base + r * row_stride + token;
    for (; r < rows; r += row_step, dst += row_step * row_stride) {
      const input_t* src = tile + r * kPitch + v * kPerVec;
      if (left >= kPerVec) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
        for (int j = 0; j < left; ++j) dst[j] = src[j];
      }
    }
  } else {
    for (int e = threadIdx.x; e < rows * kChunk; e += blockDim.x) {
      const int r = e / kChunk, t = e % kChunk;
      if (token0 + t < seqlen)
        base[r * row_stride + (token0 + t) * token_stride] = tile[r * kPitch + t];
    }
  }
}

// Variable B and C of a chunk in shared memory as acc_t [token][state] (a thread reads its 8
// states of a token as 2 broadcast 16-byte reads): raw [state][token] tiles arrive by cp.async
// (`async`) and are converted, or are read from global memory when they would not fit. A
// constant B or C sits in the same place as [channel][const_stride] for the whole kernel.
// Shared by the forward and the backward kernels.
template <typename input_t, int kChunk> struct StateInputStage {
  using acc_t = acc_type<input_t>;
  static constexpr int kPitch = TileRow<input_t, kChunk>::kPitchElements;
  input_t *raw_B, *raw_C;
  acc_t *s_B, *s_C;
  const input_t *B_rows, *C_rows;  // the block's batch, group and first state
  int states, valid_states, const_stride;
  bool async;

  __device__ StateInputStage(unsigned char* raw, unsigned char* staged, int BC_elements,
                             const SelectiveScanFwdParams& p, const BlockPosition& pos,
                             int const_stride_, bool async_)
      : raw_B(reinterpret_cast<input_t*>(raw)),
        raw_C(reinterpret_cast<input_t*>(raw) + pos.padded_states * kPitch),
        s_B(reinterpret_cast<acc_t*>(staged)),
        s_C(reinterpret_cast<acc_t*>(staged) + BC_elements),
        B_rows(static_cast<const input_t*>(p.B) + pos.batch * p.B_batch_stride +
               pos.group * p.B_group_stride + pos.block_state0 * p.B_dstate_stride),
        C_rows(static_cast<const input_t*>(p.C) + pos.batch * p.C_batch_stride +
               pos.group * p.C_group_stride + pos.block_state0 * p.C_dstate_stride),
        states(pos.padded_states),
        valid_states(static_cast<int>(p.dstate - pos.block_state0 < pos.padded_states
                                          ? p.dstate - pos.block_state0
                                          : pos.padded_states)),
        const_stride(const_stride_),
        async(async_) {}

  // The raw tiles of the chunk at token0 (async only; the caller commits).
  template <bool kWholeChunks = false>
  __device__ void issue(const SelectiveScanFwdParams& p, int64_t token0, int64_t token_end,
                        bool vec_B, bool vec_C) const {
    if (!async) return;
    if (p.is_variable_B)
      load_tile<kChunk, kWholeChunks>(raw_B, B_rows, p.B_dstate_stride, p.B_seqlen_stride, states,
                                      valid_states, token0, token_end, vec_B);
    if (p.is_variable_C)
      load_tile<kChunk, kWholeChunks>(raw_C, C_rows, p.C_dstate_stride, p.C_seqlen_stride, states,
                                      valid_states, token0, token_end, vec_C);
  }

  // s_B[t][n], s_C[t][n] of the chunk at token0, once its raw tiles are in.
  __device__ void stage(const SelectiveScanFwdParams& p, int64_t token0,
                        int64_t token_end) const {
    if (async) {
      // Two tokens of one state a step: lane % 16 picks the state in its group of 16 (states
      // is a multiple of 16, blocks are whole warps), the half-warp the (group, token pair).
      struct alignas(2 * sizeof(input_t)) Pair {
        input_t v[2];
      };
      constexpr int kPairs = kChunk / 2;
      const int n_in_group = threadIdx.x % 16;
      for (int q = threadIdx.x / 16; q < states / 16 * kPairs; q += blockDim.x / 16) {
        const int n = q / kPairs * 16 + n_in_group, t = q % kPairs * 2;
        if (p.is_variable_B) {
          const Pair b = *reinterpret_cast<const Pair*>(raw_B + n * kPitch + t);
          s_B[t * states + n] = to_acc(b.v[0]);
          s_B[(t + 1) * states + n] = to_acc(b.v[1]);
        }
        if (p.is_variable_C) {
          const Pair c = *reinterpret_cast<const Pair*>(raw_C + n * kPitch + t);
          s_C[t * states + n] = to_acc(c.v[0]);
          s_C[(t + 1) * states + n] = to_acc(c.v[1]);
        }
      }
      return;
    }
    // e = t * states + n, stepped without a division a step.
    const int step_t = blockDim.x / states, step_n = blockDim.x % states;
    int n = threadIdx.x % states, t = threadIdx.x / states;
    for (int e = threadIdx.x; e < states * kChunk;
         e += blockDim.x, t += step_t + (n + step_n >= states),
             n += n + step_n >= states ? step_n - states : step_n) {
      const bool valid = n < valid_states && token0 + t < token_end;
      if (p.is_variable_B)
        s_B[e] = valid ? to_acc(B_rows[n * p.B_dstate_stride + (token0 + t) * p.B_seqlen_stride])
                       : acc_t(0);
      if (p.is_variable_C)
        s_C[e] = valid ? to_acc(C_rows[n * p.C_dstate_stride + (token0 + t) * p.C_seqlen_stride])
                       : acc_t(0);
    }
  }

  // A constant B or C: s[channel][state], once.
  __device__ void stage_constants(const SelectiveScanFwdParams& p, const BlockPosition& pos,
                                  int channels, int valid_channels) const {
    for (int which = 0; which < 2; ++which) {
      if (which == 0 ? p.is_variable_B : p.is_variable_C) continue;
      acc_t* s = which == 0 ? s_B : s_C;
      const acc_t* w = static_cast<const acc_t*>(which == 0 ? p.B : p.C);
      const int64_t dim_stride = which == 0 ? p.B_dim_stride : p.C_dim_stride;
      const int64_t dstate_stride = which == 0 ? p.B_dstate_stride : p.C_dstate_stride;
      for (int e = threadIdx.x; e < channels * states; e += blockDim.x) {
        const int ce = e / states, n = e % states;
        s[ce * const_stride + n] = ce < valid_channels && n < valid_states
                                       ? w[(pos.channel0 + ce) * dim_stride +
                                           (pos.block_state0 + n) * dstate_stride]
                                       : acc_t(0);
      }
    }
  }

  // This thread's states of B (C) at token t: base[t * token_stride].
  __device__ const acc_t* B_base(const SelectiveScanFwdParams& p, int c, int state_offset) const {
    return p.is_variable_B ? s_B + state_offset : s_B + c * const_stride + state_offset;
  }
  __device__ const acc_t* C_base(const SelectiveScanFwdParams& p, int c, int state_offset) const {
    return p.is_variable_C ? s_C + state_offset : s_C + c * const_stride + state_offset;
  }
};

// At most 128 registers: 4 blocks of 128 threads an SM at dstate <= 16, 16 warps of 512 at 256.
// kPacked: seq_idx given; the sequence checks stay out of the token loop of plain batches.
// kCheckpoints: the checkpoint stores (the training forward, or the backward's checkpoint pass
// without output), in an instance of their own: in the plain forward's token loop they cost 7%.
template <typename input_t, bool kPacked, bool kCheckpoints>
__global__ void __launch_bounds__(512, 1)
    selective_scan_fwd_kernel(const SelectiveScanFwdParams p, const SelectiveScanCudaGeometry g,
                              const FwdTiles<input_t> tiles, const FwdVectorized vec) {
  using acc_t = acc_type<input_t>;
  using Tiles = FwdTiles<input_t>;
  constexpr int kChunk = Tiles::kChunk, kPitch = Tiles::kPitchElements;
  constexpr int kPerVec = Vec16<input_t>::kSize, kVecs = kChunk / kPerVec;
  extern __shared__ __align__(16) unsigned char smem[];

  const BlockPosition pos = block_position(p, g, 0);
  const int c = pos.channel_in_block, channels = pos.channels, states = pos.padded_states;
  const int64_t channel = pos.channel0 + c;
  const int valid_channels = static_cast<int>(
      pos.group_end - pos.channel0 < channels ? pos.group_end - pos.channel0 : channels);
  const bool has_out = p.out != nullptr, per_sequence = p.num_sequences > 0;
  // The block's tokens: its segment of the sequence (all of it without length parallelism).
  const int64_t segment = blockIdx.z, token_begin = segment * p.segment_len;
  const int64_t token_end = p.segment_len == 0 || token_begin + p.segment_len > p.seqlen
                                ? p.seqlen
                                : token_begin + p.segment_len;

  // The block's rows of each stream.
  const input_t* u_rows = static_cast<const input_t*>(p.u) + pos.batch * p.u_batch_stride +
                          pos.channel0 * p.u_dim_stride;
  const input_t* delta_rows = static_cast<const input_t*>(p.delta) +
                              pos.batch * p.delta_batch_stride + pos.channel0 * p.delta_dim_stride;
  const input_t* z_rows = p.z == nullptr ? nullptr
                                         : static_cast<const input_t*>(p.z) +
                                               pos.batch * p.z_batch_stride +
                                               pos.channel0 * p.z_dim_stride;
  const int32_t* seq_row =
      p.seq_idx == nullptr ? nullptr : p.seq_idx + pos.batch * p.seq_idx_batch_stride;

  const StateInputStage<input_t, kChunk> BC(smem + tiles.raw_BC(), smem + tiles.BC_acc(),
                                    tiles.BC_elements(), p, pos, tiles.const_stride(),
                                    tiles.async_BC);
  acc_t* s_y = reinterpret_cast<acc_t*>(smem + tiles.y_partials());  // [slices][kChunk][channels]

  // The next chunk's copies into stage `s` (and the raw B / C tiles).
  auto issue_loads = [&](int64_t chunk_index, int s) {
    const int64_t token0 = chunk_index * kChunk;
    unsigned char* stage = smem + tiles.stage(s);
    input_t* tile = reinterpret_cast<input_t*>(stage);
    load_tile<kChunk, true>(tile, u_rows, p.u_dim_stride, p.u_seqlen_stride, channels,
                            valid_channels, token0, token_end, vec.u);
    tile += channels * kPitch;
    load_tile<kChunk, true>(tile, delta_rows, p.delta_dim_stride, p.delta_seqlen_stride, channels,
                            valid_channels, token0, token_end, vec.delta);
    tile += channels * kPitch;
    if (z_rows != nullptr)
      load_tile<kChunk, true>(tile, z_rows, p.z_dim_stride, p.z_seqlen_stride, channels,
                              valid_channels, token0, token_end, vec.z);
    if (seq_row != nullptr) {
      int32_t* s_seq = reinterpret_cast<int32_t*>(stage + 3 * tiles.tile_bytes());
      for (int t = threadIdx.x; t < kChunk; t += blockDim.x) {
        const bool valid = token0 + t < token_end;
        cp_async_4(s_seq + t, valid ? seq_row + (token0 + t) * p.seq_idx_seqlen_stride : seq_row,
                   valid ? 4 : 0);
      }
    }
    BC.template issue<true>(p, token0, token_end, vec.B, vec.C);
    cp_async_commit();
  };

  BC.stage_constants(p, pos, channels, valid_channels);
  const int state_offset = static_cast<int>(pos.state0 - pos.block_state0);
  const acc_t* B_base = BC.B_base(p, c, state_offset);
  const acc_t* C_base = BC.C_base(p, c, state_offset);
  const int B_token_stride = p.is_variable_B ? states : 0;
  const int C_token_stride = p.is_variable_C ? states : 0;

  acc_t A2[kFwdStates], h[kFwdStates];
  load_thread_states(A2, p.A, channel * p.A_dim_stride, p.A_dstate_stride, p, pos);
#pragma unroll
  for (int i = 0; i < kFwdStates; ++i) A2[i] *= acc_t(kLog2e);
  const bool channel_valid = c < valid_channels;
  const acc_t D = channel_valid ? channel_weight<acc_t>(p.D, p.D_stride, channel) : acc_t(0);
  const acc_t bias =
      channel_valid ? channel_weight<acc_t>(p.delta_bias, p.delta_bias_stride, channel) : acc_t(0);
  // Per-row states start from initial_state[batch]; per-sequence ones at their first token;
  // later segments from zero (pass 1) or their true start state (pass 2).
  const int64_t segment_row = (pos.batch * p.segments + segment) * p.dim + channel;
  if (segment == 0) {
    load_start_state(h, p, pos, per_sequence ? -1 : 0, 0);
  } else {
    load_thread_states(h, p.segment_pass == 2 ? p.segment_states : nullptr,
                       segment_row * p.dstate, 1, p, pos);
  }
  auto store_state = [&](void* ptr, int64_t row) {
    store_thread_states(h, ptr, row * p.last_state_batch_stride + channel * p.last_state_dim_stride,
                        p.last_state_dstate_stride, p, pos);
  };
  // The sequence of the previous token.
  int64_t prev_id =
      kPacked && segment > 0 ? sequence_of(p, pos.batch, token_begin - 1) : kNoSequence;
  // Pass 1: the sum of dt since the segment's last sequence start, and whether there was one.
  acc_t dt_sum = 0;
  bool restarted = false;

  // Checkpoint rows of the whole sequence: the state before every kCheckpoint-th token.
  constexpr int kCheckpoint = selective_scan_cuda_checkpoint_tokens();
  static_assert(kChunk % kCheckpoint == 0 && kCheckpoint % kPerVec == 0,
                "checkpoints fall on vector starts of every chunk");
  const int64_t checkpoint_row =
      checkpoint_offset(p, pos, (p.seqlen + kCheckpoint - 1) / kCheckpoint, 0);
  const int64_t chunk_begin = token_begin / kChunk, chunk_end = g.chunks(token_end);
  if (chunk_begin < chunk_end) issue_loads(chunk_begin, chunk_begin & 1);
  for (int64_t chunk_index = chunk_begin; chunk_index < chunk_end; ++chunk_index) {
    const int64_t token0 = chunk_index * kChunk;
    unsigned char* stage = smem + tiles.stage(chunk_index & 1);
    input_t* tile_u = reinterpret_cast<input_t*>(stage);
    const input_t* tile_delta = tile_u + channels * kPitch;
    const input_t* tile_z = tile_delta + channels * kPitch;
    const int32_t* s_seq = reinterpret_cast<const int32_t*>(stage + 3 * tiles.tile_bytes());
    cp_async_wait_all();
    __syncthreads();  // this chunk's tiles are in; every thread is done with the last chunk
    BC.stage(p, token0, token_end);
    __syncthreads();
    if (chunk_index + 1 < chunk_end) issue_loads(chunk_index + 1, (chunk_index + 1) & 1);

    input_t* row_u = tile_u + c * kPitch;
    const input_t* row_delta = row_u + channels * kPitch;
    const input_t* row_z = row_delta + channels * kPitch;
    const int chunk_tokens =
        static_cast<int>(token_end - token0 < kChunk ? token_end - token0 : kChunk);
    // This thread's B and C of the chunk's next token.
    const acc_t* B_t = B_base;
    const acc_t* C_t = C_base;
    // A lane pair shares each channel (8 states each) and takes the tokens by pairs: each lane
    // computes dt of its token of the pair (odd: the second) and finishes its output; a shuffle
    // hands over the other dt and the other half of its C contraction.
    const bool odd = pos.lane_slice != 0;
    // One vector of tokens. kOut: the output (has_out); kMasked: a vector with tokens past the
    // segment's end (dt 0 leaves the state as it is) or with sequence checks (kPacked).
    auto vector_step = [&](int v, auto out_tag, auto masked_tag) {
      constexpr bool kOut = decltype(out_tag)::value, kMasked = decltype(masked_tag)::value;
      const Vec16<input_t> u_v = load_vec16(row_u + v * kPerVec);
      const Vec16<input_t> delta_v = load_vec16(row_delta + v * kPerVec);
      Vec16<input_t> z_v;
      if (kOut && z_rows != nullptr) z_v = load_vec16(row_z + v * kPerVec);
      acc_t y_mine[kPerVec / 2];  // the output of this lane's token of each pair, before D
      bool live_mine[kPerVec / 2];
#pragma unroll
      for (int j = 0; j < kPerVec; j += 2) {
        acc_t mine = pair_element(delta_v, j, odd) + bias;
        if (p.delta_softplus) mine = softplus_fast(mine);
        if (kMasked && !kPacked) mine = v * kPerVec + j + odd < chunk_tokens ? mine : acc_t(0);
        if (!kPacked) dt_sum += mine;  // this lane's tokens; the pair's sum at the end
        const acc_t other = __shfl_xor_sync(0xffffffffu, mine, 1);
        const acc_t dt_pair[2] = {odd ? other : mine, odd ? mine : other};
        acc_t y[2];
        bool live[2] = {true, true};
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int t = v * kPerVec + j + k;
          acc_t dt = dt_pair[k];
          if (kPacked) {
            live[k] = t < chunk_tokens;
            if (live[k]) {
              const int id = s_seq[t];
              if (id != prev_id) {  // a sequence starts (the same for the whole block)
                if (per_sequence && prev_id >= 0)  // not padding
                  store_state(p.last_state, prev_id);
                load_start_state(h, p, pos, id, token0 + t);
                prev_id = id;
                dt_sum = 0;
                restarted = true;
              }
              live[k] = id != kPadding;
            }
            dt = live[k] ? dt : acc_t(0);
            dt_sum += dt;
          }
          const acc_t dtu = dt * vector_element(u_v, j + k);
          acc_t B[kFwdStates];
          load_smem_states(B, B_t);
          B_t += B_token_stride;
          if (kOut) {
            acc_t C[kFwdStates];
            load_smem_states(C, C_t);
            C_t += C_token_stride;
            // Two partial sums: one chain of dependent FMAs a token would stall the warp.
            acc_t y_part[2] = {0, 0};
#pragma unroll
            for (int i = 0; i < kFwdStates; ++i) {
              h[i] = exp2_approx(dt * A2[i]) * h[i] + dtu * B[i];
              y_part[i % 2] += h[i] * C[i];
            }
            y[k] = y_part[0] + y_part[1];
          } else {
#pragma unroll
            for (int i = 0; i < kFwdStates; ++i)
              h[i] = exp2_approx(dt * A2[i]) * h[i] + dtu * B[i];
          }
        }
        if (kOut) {
          const acc_t y_other = __shfl_xor_sync(0xffffffffu, odd ? y[0] : y[1], 1);
          y_mine[j / 2] = (odd ? y[1] : y[0]) + y_other;
          live_mine[j / 2] = odd ? live[1] : live[0];
        }
      }
      if (!kOut) return;
      if (g.slices == 1) {
        // In place of u, which both lanes have read (before the shuffles).
#pragma unroll
        for (int j = 0; j < kPerVec; j += 2) {
          acc_t out = y_mine[j / 2] + D * pair_element(u_v, j, odd);
          if (z_rows != nullptr) out *= silu_fast(pair_element(z_v, j, odd));
          if (kPacked) out = live_mine[j / 2] ? out : acc_t(0);
          row_u[v * kPerVec + j + odd] = from_acc<input_t>(out);
        }
      } else {
#pragma unroll
        for (int j = 0; j < kPerVec; j += 2)
          s_y[(pos.slice * kChunk + v * kPerVec + j + odd) * channels + c] = y_mine[j / 2];
      }
    };
    // The vectors of whole tokens, then the rest of the chunk (the segment's end), masked.
    const int full_vectors = kPacked ? 0 : chunk_tokens / kPerVec;
    auto vector_steps = [&](auto out_tag) {
      int v = 0;
      auto checkpoint = [&] {
        if (kCheckpoints && v * kPerVec % kCheckpoint == 0 && token0 + v * kPerVec < token_end)
          store_thread_states(h, p.checkpoints,
                              checkpoint_row + (token0 + v * kPerVec) / kCheckpoint * p.dstate,
                              1, p, pos);
      };
#pragma unroll 1
      for (; v < full_vectors; ++v) {
        checkpoint();
        vector_step(v, out_tag, std::false_type{});
      }
#pragma unroll 1
      for (; v < kVecs; ++v) {
        checkpoint();
        vector_step(v, out_tag, std::true_type{});
      }
    };
    if (has_out)
      vector_steps(std::true_type{});
    else
      vector_steps(std::false_type{});
    if (!has_out) continue;

    if (g.slices > 1) {
      // Add the slices' partials, then D, the gate and the padding (one element a thread).
      __syncthreads();
      for (int e = threadIdx.x; e < channels * kChunk; e += blockDim.x) {
        const int ce = e % channels, t = e / channels;
        acc_t y = 0;
        for (int slice = 0; slice < g.slices; ++slice)
          y += s_y[(slice * kChunk + t) * channels + ce];
        const acc_t u = to_acc(tile_u[ce * kPitch + t]);
        y += (ce < valid_channels ? channel_weight<acc_t>(p.D, p.D_stride, pos.channel0 + ce)
                                  : acc_t(0)) *
             u;
        if (z_rows != nullptr) y *= silu_fast(to_acc(tile_z[ce * kPitch + t]));
        if (seq_row != nullptr && token0 + t < token_end && s_seq[t] == kPadding) y = 0;
        tile_u[ce * kPitch + t] = from_acc<input_t>(y);
      }
    }
    __syncthreads();
    store_tile<kChunk>(tile_u, static_cast<input_t*>(p.out) + pos.batch * p.out_batch_stride +
                           pos.channel0 * p.out_dim_stride,
               p.out_dim_stride, p.out_seqlen_stride, valid_channels, token0, token_end, vec.out);
  }
  if (p.segment_pass == 1) {
    if (!kPacked) dt_sum += __shfl_xor_sync(0xffffffffu, dt_sum, 1);  // each lane has its tokens'
    store_thread_states(h, p.segment_states, segment_row * p.dstate, 1, p, pos);
    if (pos.slice == 0 && pos.lane_slice == 0 && channel_valid)
      static_cast<acc_t*>(p.segment_dt)[segment_row] =
          restarted ? acc_t(NAN) : dt_sum;  // NAN: the segment's start does not reach its end
    return;
  }
  if (segment + 1 < p.segments) return;  // the sequence goes on in the next segment
  if (!per_sequence)
    store_state(p.last_state, pos.batch);
  else if (prev_id >= 0)
    store_state(p.last_state, prev_id);
}

// Length parallelism: from pass 1's segment end states (segment 0 from the true start, later
// ones from zero) and dt sums, each segment's true start state, in place. A thread per (batch,
// channel, state): start(s + 1) = exp(A dt_sum(s)) start(s) + end(s), or end(s) where a
// sequence started in segment s.
template <typename acc_t>
__global__ void __launch_bounds__(256)
    selective_scan_combine_segments_kernel(const SelectiveScanFwdParams p) {
  const int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (index >= p.batch * p.dim * p.dstate) return;
  const int64_t n = index % p.dstate, channel = index / p.dstate % p.dim,
                batch = index / (p.dstate * p.dim);
  const acc_t A = static_cast<const acc_t*>(p.A)[channel * p.A_dim_stride + n * p.A_dstate_stride];
  acc_t* states = static_cast<acc_t*>(p.segment_states);
  const acc_t* dt_sums = static_cast<const acc_t*>(p.segment_dt);
  const int64_t row0 = batch * p.segments * p.dim + channel;
  acc_t h = states[row0 * p.dstate + n];  // segment 0's end
  for (int64_t s = 1; s < p.segments; ++s) {
    const int64_t row = row0 + s * p.dim;
    const acc_t end = states[row * p.dstate + n];
    states[row * p.dstate + n] = h;
    if (s + 1 == p.segments) break;  // the last segment's end is not needed (nor computed)
    const acc_t dt_sum = dt_sums[row];
    h = isnan(dt_sum) ? end : exp(A * dt_sum) * h + end;
  }
}

inline bool vector_aligned(const void* ptr, std::initializer_list<int64_t> outer_strides,
                           int64_t token_stride, int per_vec) {
  if (ptr == nullptr || token_stride != 1 || reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
    return false;
  for (int64_t s : outer_strides)
    if (s % per_vec != 0) return false;
  return true;
}

// A (batch, dim, seqlen) activation moves by 16-byte copies.
template <typename input_t>
inline bool activation_vectorized(const void* ptr, int64_t batch_stride, int64_t dim_stride,
                                  int64_t seqlen_stride) {
  return vector_aligned(ptr, {batch_stride, dim_stride}, seqlen_stride, Vec16<input_t>::kSize);
}

// Whether a variable B and C move by 16-byte copies.
template <typename input_t>
inline void state_inputs_vectorized(const SelectiveScanFwdParams& p, bool& B, bool& C) {
  constexpr int kPerVec = Vec16<input_t>::kSize;
  B = p.is_variable_B && vector_aligned(p.B, {p.B_batch_stride, p.B_group_stride,
                                              p.B_dstate_stride},
                                        p.B_seqlen_stride, kPerVec);
  C = p.is_variable_C && vector_aligned(p.C, {p.C_batch_stride, p.C_group_stride,
                                              p.C_dstate_stride},
                                        p.C_seqlen_stride, kPerVec);
}

template <typename input_t>
cudaError_t launch_selective_scan_fwd(const SelectiveScanFwdParams& p,
                                      const SelectiveScanCudaGeometry& g, int64_t segments,
                                      cudaStream_t stream) {
  FwdTiles<input_t> tiles{g.channels_per_block(), g.slices * g.states_per_thread, g.slices, true};
  if (!(p.is_variable_B || p.is_variable_C) || tiles.total() > 200 * 1024) tiles.async_BC = false;
  FwdVectorized vec{};
  vec.u = activation_vectorized<input_t>(p.u, p.u_batch_stride, p.u_dim_stride,
                                         p.u_seqlen_stride);
  vec.delta = activation_vectorized<input_t>(p.delta, p.delta_batch_stride, p.delta_dim_stride,
                                             p.delta_seqlen_stride);
  vec.z = activation_vectorized<input_t>(p.z, p.z_batch_stride, p.z_dim_stride,
                                         p.z_seqlen_stride);
  vec.out = activation_vectorized<input_t>(p.out, p.out_batch_stride, p.out_dim_stride,
                                           p.out_seqlen_stride);
  state_inputs_vectorized<input_t>(p, vec.B, vec.C);
  const size_t smem = tiles.total();
  const bool checkpoints = p.checkpoints != nullptr;
  auto kernel = p.seq_idx ? (checkpoints ? &selective_scan_fwd_kernel<input_t, true, true>
                                         : &selective_scan_fwd_kernel<input_t, true, false>)
                          : (checkpoints ? &selective_scan_fwd_kernel<input_t, false, true>
                                         : &selective_scan_fwd_kernel<input_t, false, false>);
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error != cudaSuccess) return error;
  const dim3 grid(g.channel_blocks_per_group * p.ngroups, p.batch, segments);
  kernel<<<grid, g.threads(), smem, stream>>>(p, g, tiles, vec);
  return cudaGetLastError();
}

// The forward with its geometry; the backward's checkpoint pass calls it too (out == null).
template <typename input_t>
cudaError_t run_selective_scan_fwd(const SelectiveScanFwdParams& p, cudaStream_t stream) {
  using acc_t = acc_type<input_t>;
  const SelectiveScanCudaGeometry g = selective_scan_fwd_cuda_geometry(p, sizeof(acc_t) == 8);
  if (p.segments <= 1) return launch_selective_scan_fwd<input_t>(p, g, 1, stream);
  SelectiveScanFwdParams pass = p;
  pass.segment_pass = 1;
  pass.out = pass.last_state = pass.checkpoints = nullptr;
  cudaError_t error = launch_selective_scan_fwd<input_t>(pass, g, p.segments - 1, stream);
  if (error != cudaSuccess) return error;
  const int64_t threads = p.batch * p.dim * p.dstate;
  selective_scan_combine_segments_kernel<acc_t><<<(threads + 255) / 256, 256, 0, stream>>>(p);
  if ((error = cudaGetLastError()) != cudaSuccess) return error;
  pass = p;
  pass.segment_pass = 2;
  return launch_selective_scan_fwd<input_t>(pass, g, p.segments, stream);
}

}  // namespace scan_cuda

template <typename input_t>
cudaError_t selective_scan_fwd_cuda(const SelectiveScanFwdParams& params, cudaStream_t stream) {
  return scan_cuda::run_selective_scan_fwd<input_t>(params, stream);
}

}  // namespace mamba_ext
