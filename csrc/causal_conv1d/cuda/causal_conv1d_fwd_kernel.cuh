// CUDA forward of the causal depthwise conv1d: the contiguous and the channel-last kernel, and
// the launch. The traits and the loaders they share with the backward are in
// causal_conv1d_common.cuh. Contiguous x: a warp sweeps a tile of a row step by step
// (ContiguousTileTraits), a vector a lane, the whole tile copied into shared memory (cp.async) as
// it starts, as the backward does. Channel-last x: a lane slides a window over a run of tokens
// of its 16 bytes of channels, the tokens coming through a ring in shared memory (cp.async,
// ChannelsInnerFwdTraits). Each kernel has a vectorized variant (aligned unit-stride rows:
// 16-byte loads and stores) and an elementwise one for any strides and alignment. Which taps are
// on comes as bit masks: the width's alone (the same for every token, so the compiler hoists
// them) or, with seq_idx, per token.
#pragma once

#include "causal_conv1d/cuda/causal_conv1d_common.cuh"

namespace mamba_ext {
namespace causal_conv1d_cuda {

// out of one token from its window x (taps 0..kHalo, the token last) and the taps that are on.
template <bool kSilu, typename acc_t>
__device__ __forceinline__ acc_t out_of_token(const Taps<acc_t>& taps, const acc_t (&x)[kMaxWidth],
                                              unsigned on, bool padding) {
  return zero_unless(!padding, activate<kSilu>(taps.conv(x, on)));
}

template <typename input_t, bool kVectorized, bool kSilu, bool kMasked>
__device__ __forceinline__ void fwd_contiguous(const CausalConv1dFwdParams& params) {
  using Traits = ContiguousTileTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  constexpr int kNElts = Traits::kNElts;
  __shared__ StagedTile<Traits> x_tiles[Traits::kNWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  StagedTile<Traits>& x_tile = x_tiles[warp];
  const WarpTile<Traits> place(params, warp);
  if (!place.exists) return;  // the whole warp: no block-wide sync follows
  // Tokens are numbered from the tile's start in 32-bit ints from here on.
  const int tile_len = int(min(params.seqlen - place.t0, int64_t(Traits::kTileTokens)));
  const int n_steps = int(ceil_div(tile_len, Traits::kStepTokens));
  // A vectorized row has stride 1: said outright (see the backward).
  const int64_t x_stride = kVectorized ? 1 : params.x_seqlen_stride;
  const int64_t out_stride = kVectorized ? 1 : params.out_seqlen_stride;
  // The tile's first tokens: a valid address (the tile has tokens), 16-byte aligned if vectorized.
  const input_t* x = static_cast<const input_t*>(params.x) + place.b * params.x_batch_stride +
                     place.d * params.x_dim_stride + place.t0 * x_stride;
  input_t* out = static_cast<input_t*>(params.out) + place.b * params.out_batch_stride +
                 place.d * params.out_dim_stride + place.t0 * out_stride;
  // The whole tile in flight, before the per-tile loads below, so that those wait alongside.
  start_tile<Traits>(tile_len, n_steps, lane, [&](int s, int t, int n_valid) {
    x_tile.template fill<kVectorized>(s, lane, x, t, x_stride, n_valid);
  });
  Taps<acc_t> taps;
  taps.load(params, place.d);
  LeftHalos<Traits> halos(params, place.b, place.d, place.t0);
  // Before the steps, while the tile is in flight, so that the place need not stay live.
  if (params.final_states != nullptr && place.tile == place.ntiles - 1 && lane == 0)
    write_final_states<input_t>(params, place.b, place.d);
#pragma unroll 1
  for (int s = 0; s < n_steps; ++s) {
    wait_for_step<Traits>();
    const int t = s * Traits::kStepTokens + lane * kNElts;
    alignas(16) input_t xv[kNElts];
    x_tile.read(s, lane, xv);
    acc_t xw[kHalo + kNElts];  // tokens [t - kHalo, t + kNElts)
    halos.window(lane, xv, xw);
    TokenMasks masks{};
    if constexpr (kMasked) masks = token_masks<kNElts>(params, taps, place.b, place.t0 + t);
    acc_t o[kNElts];
#pragma unroll
    for (int e = 0; e < kNElts; ++e) {
      const acc_t xe[kMaxWidth] = {xw[e], xw[e + 1], xw[e + 2], xw[e + 3]};
      o[e] = kMasked ? out_of_token<kSilu>(taps, xe, bits_of(masks.reads, e),
                                           masks.padding >> e & 1u)
                     : out_of_token<kSilu>(taps, xe, taps.width_bits, false);
    }
    store_tile_vector<kVectorized>(out, out_stride, t, count_in(tile_len - t, kNElts), o);
  }
}

// Blocks a multiprocessor runs at once for 16-bit and 32-bit types: the most that leave each
// variant unspilled (ptxas, sm_90a): 10 (48 registers, 40 warps) for vectorized rows without
// seq_idx, the case that matters, 8 (64) otherwise. A warp starts with its whole tile, 4 KB, in
// flight (16 KB of shared memory a block, 160 KB at 10), where the register-prefetch kernel kept
// 64 bytes a thread (64 KB a multiprocessor at 8 blocks), loaded, then computed, then stored.
template <typename input_t, bool kVectorized, bool kMasked>
constexpr int fwd_contiguous_min_blocks() {
  if (sizeof(input_t) > 4) return 1;
  return kVectorized && !kMasked ? 10 : 8;
}

// A kernel per activation and masking (kernel_for).
template <typename input_t, bool kVectorized, bool kSilu, bool kMasked>
__global__ void __launch_bounds__(ContiguousTileTraits<input_t>::kNThreads,
                                  fwd_contiguous_min_blocks<input_t, kVectorized, kMasked>())
    causal_conv1d_fwd_contiguous_kernel(const CausalConv1dFwdParams params) {
  fwd_contiguous<input_t, kVectorized, kSilu, kMasked>(params);
}

template <typename input_t, bool kVectorized, bool kSilu, bool kMasked>
__device__ __forceinline__ void fwd_channels_inner(const CausalConv1dFwdParams& params) {
  using Traits = ChannelsInnerFwdTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  using Ring = StagedVectors<input_t, Traits::kNElts, Traits::kStages>;
  constexpr int kNElts = Traits::kNElts, kStages = Traits::kStages;
  __shared__ Ring x_rings[Traits::kNWarps];
  // With seq_idx, that of the ring's tokens, a copy a lane (so that a lane reads its own).
  __shared__ int seq_rings[Traits::kNWarps][kMasked ? kStages : 1][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t nruns = ceil_div(params.seqlen, Traits::kRunTokens);
  const WarpTask task = WarpTask::of<Traits::kNWarps>(
      warp, params.batch, nruns, ceil_div(params.dim, Traits::kWarpChannels));
  const int64_t b = task.i0, run = task.i1;
  const int64_t c0 = task.i2 * Traits::kWarpChannels + lane * kNElts;
  if (!task.exists || c0 >= params.dim) return;  // a lane on its own: no warp-wide operations
  const int nch = count_in(params.dim - c0, kNElts);
  const int64_t run_t0 = run * Traits::kRunTokens;
  const int n_tokens = int(min(params.seqlen - run_t0, int64_t(Traits::kRunTokens)));
  // A vectorized row has stride 1 over channels: said outright (see the contiguous backward).
  const int64_t x_dim_stride = kVectorized ? 1 : params.x_dim_stride;
  const int64_t out_dim_stride = kVectorized ? 1 : params.out_dim_stride;
  // Token j of the run at x[j * x_seqlen_stride]: a valid address for j < n_tokens.
  const input_t* x = static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
                     run_t0 * params.x_seqlen_stride + c0 * x_dim_stride;
  input_t* out = static_cast<input_t*>(params.out) + b * params.out_batch_stride +
                 run_t0 * params.out_seqlen_stride + c0 * out_dim_stride;
  const int* seq = params.seq_idx + (kMasked ? b * params.seq_idx_batch_stride +
                                                   run_t0 * params.seq_idx_seqlen_stride
                                             : 0);
  Ring& ring = x_rings[warp];
  // Starts the copy of token j of the run (none past the run) into its slot, the tokens taken in
  // order; a commit group a token, so that the count to wait for is a constant.
  const input_t* x_next = x;  // token j's
  const int* seq_next = seq;
  const auto fill = [&](int j) {
    if (j < n_tokens) {
      const int slot = unsigned(j) % kStages;
      ring.template fill<kVectorized>(slot, lane, x_next, 0, x_dim_stride, nch);
      if constexpr (kMasked) cp_async_4(&seq_rings[warp][slot][lane], seq_next, 4);
      x_next += params.x_seqlen_stride;
      if constexpr (kMasked) seq_next += params.seq_idx_seqlen_stride;
    }
    cp_async_commit();
  };
#pragma unroll
  for (int j = 0; j < kStages; ++j) fill(j);

  Taps<acc_t> taps[kNElts];
#pragma unroll
  for (int i = 0; i < kNElts; ++i) taps[i].load(params, c0 + (i < nch ? i : 0));
  // The window: the kHalo tokens before the next in acc_t (each converted once), and with
  // seq_idx their sequences.
  acc_t window[kHalo][kNElts];     // (tokens, channels)
  int window_seq[kMaxWidth] = {};  // the last one the next token's
#pragma unroll
  for (int j = 0; j < kHalo; ++j) {
    load_x_token<kVectorized, kNElts, input_t>(params, b, c0, nch, run_t0 - kHalo + j,
                                               window[j]);
    if constexpr (kMasked) window_seq[j] = seq_at(params, b, run_t0 - kHalo + j);
  }
  // Before the tokens, while they are in flight, so that the place need not stay live.
  if (params.final_states != nullptr && run == nruns - 1) {
    for (int i = 0; i < nch; ++i) write_final_states<input_t>(params, b, c0 + i);
  }
  // Unrolled by the window's length, so that its shifts are renamings, not moves.
#pragma unroll kHalo
  for (int j = 0; j < n_tokens; ++j) {
    // Before token j, kStages + j groups are committed: token j's is in once no more than the
    // kStages - 1 after it are pending. (The wait also keeps the compiler from moving the last
    // token's reads of its slot after the copy into it below.)
    cp_async_wait_group<kStages - 1>();
    // The slot of token j - 1, read and used, takes token j - 1 + kStages.
    fill(j > 0 ? j - 1 + kStages : n_tokens);
    const int slot = unsigned(j) % kStages;
    alignas(16) input_t xv[kNElts];
    ring.read(slot, lane, xv);
    unsigned reads = taps[0].width_bits;
    bool padding = false;
    if constexpr (kMasked) {
      window_seq[kHalo] = seq_rings[warp][slot][lane];
      padding = window_seq[kHalo] < 0;
      reads = padding ? 0u : taps[0].in_sequence(window_seq, window_seq[kHalo]);
    }
    acc_t o[kNElts];
#pragma unroll
    for (int i = 0; i < kNElts; ++i) {
      const acc_t x_i[kMaxWidth] = {window[0][i], window[1][i], window[2][i], to_acc(xv[i])};
      o[i] = out_of_token<kSilu>(taps[i], x_i, reads, padding);
    }
    store_tile_vector<kVectorized>(out, out_dim_stride, 0, nch, o);
    out += params.out_seqlen_stride;
#pragma unroll
    for (int i = 0; i < kNElts; ++i) {
      window[0][i] = window[1][i];
      window[1][i] = window[2][i];
      window[2][i] = to_acc(xv[i]);
    }
#pragma unroll
    for (int k = 0; k < kHalo; ++k) window_seq[k] = window_seq[k + 1];
  }
}

// Blocks a multiprocessor runs at once: 4 for 16-bit types (8 channels a lane: their taps and
// window take ~124 registers, ptxas sm_90a; at 5 blocks, 96, they spill), 5 for fp32 (~88-96).
// The bytes in flight do not depend on it: at 4, 16 warps keep 7 tokens of 512 bytes each in
// flight, 56 KB a multiprocessor, where the register-prefetch kernel kept at most 32 KB.
template <typename input_t> constexpr int fwd_channels_inner_min_blocks() {
  if (sizeof(input_t) > 4) return 1;
  return sizeof(input_t) == 2 ? 4 : 5;
}

// A kernel per activation and masking (kernel_for): in one kernel, with_flags' branches, the
// variants spill.
template <typename input_t, bool kVectorized, bool kSilu, bool kMasked>
__global__ void __launch_bounds__(ChannelsInnerFwdTraits<input_t>::kNThreads,
                                  fwd_channels_inner_min_blocks<input_t>())
    causal_conv1d_fwd_channels_inner_kernel(const CausalConv1dFwdParams params) {
  fwd_channels_inner<input_t, kVectorized, kSilu, kMasked>(params);
}

// Whether x and out are vectors of N tokens (contiguous) or N channels (channel-last).
template <typename input_t, int N>
bool fwd_vectorizable(const CausalConv1dFwdParams& params, bool channels_inner) {
  return rows_vectorizable<input_t, N>(channels_inner, params.x, params.x_batch_stride,
                                       params.x_dim_stride, params.x_seqlen_stride) &&
         rows_vectorizable<input_t, N>(channels_inner, params.out, params.out_batch_stride,
                                       params.out_dim_stride, params.out_seqlen_stride);
}

}  // namespace causal_conv1d_cuda

template <typename input_t>
cudaError_t causal_conv1d_fwd_cuda(const CausalConv1dFwdParams& params, cudaStream_t stream) {
  using namespace causal_conv1d_cuda;
  if (params.batch == 0 || params.dim == 0) return cudaSuccess;
  if (causal_conv1d_cuda_channels_inner(params)) {
    using Traits = ChannelsInnerFwdTraits<input_t>;
    const auto kernel = kernel_for(
        fwd_vectorizable<input_t, Traits::kNElts>(params, true), params,
        [](auto vectorized, auto silu, auto masked) {
          return causal_conv1d_fwd_channels_inner_kernel<
              input_t, decltype(vectorized)::value, decltype(silu)::value,
              decltype(masked)::value>;
        });
    return launch_blocks_max_shared(Traits::grid_blocks(params), Traits::kNThreads, stream,
                                    kernel, params);
  }
  using Traits = ContiguousTileTraits<input_t>;
  const auto kernel = kernel_for(
      fwd_vectorizable<input_t, Traits::kNElts>(params, false), params,
      [](auto vectorized, auto silu, auto masked) {
        return causal_conv1d_fwd_contiguous_kernel<input_t, decltype(vectorized)::value,
                                                   decltype(silu)::value, decltype(masked)::value>;
      });
  return launch_blocks_max_shared(Traits::grid_blocks(params), Traits::kNThreads, stream,
                                  kernel, params);
}

}  // namespace mamba_ext
