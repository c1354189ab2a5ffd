// CUDA forward of the causal depthwise conv1d: the contiguous and the channel-last kernel, and
// the launch. The traits and the loaders they share with the backward are in
// causal_conv1d_common.cuh. Contiguous x: a warp sweeps a tile of a row step by step
// (ContiguousTileTraits), a vector a lane, the whole tile copied into shared memory (cp.async) as
// it starts, as the backward does. Channel-last x: a thread slides a window over a run of tokens
// of its channels, prefetching the next step of tokens in registers (ChannelsInnerTraits). Each
// kernel has a vectorized variant (aligned unit-stride rows: wide loads and stores) and an
// elementwise one for any strides and alignment. Which taps are on comes as bit masks: the
// width's alone (the same for every token, so the compiler hoists them) or, with seq_idx, per
// token.
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
  using Traits = ChannelsInnerTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  constexpr int kNElts = Traits::kNElts, kStep = Traits::kStepTokens;
  // 32-bit division: the grid has fewer than 2^31 blocks.
  const unsigned channel_blocks = ceil_div(params.dim, Traits::kBlockChannels);
  const unsigned nruns = ceil_div(params.seqlen, Traits::kRunTokens);
  const int64_t c0 =
      int64_t(blockIdx.x % channel_blocks) * Traits::kBlockChannels + threadIdx.x * kNElts;
  const int64_t run = blockIdx.x / channel_blocks % nruns;
  const int64_t b = blockIdx.x / channel_blocks / nruns;
  if (c0 >= params.dim) return;
  const int nch = count_in(params.dim - c0, kNElts);

  Taps<acc_t> taps[kNElts];
#pragma unroll
  for (int i = 0; i < kNElts; ++i) taps[i].load(params, c0 + (i < nch ? i : 0));
  const int64_t run_t0 = run * Traits::kRunTokens;
  const int64_t run_end = min(run_t0 + Traits::kRunTokens, params.seqlen);
  const input_t* x = static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
                     c0 * params.x_dim_stride;
  input_t* out = static_cast<input_t*>(params.out) + b * params.out_batch_stride +
                 c0 * params.out_dim_stride;
  // The tokens [t, t + kStep) of the step at t, as loaded (tokens past seqlen as 0): the next
  // step's are loaded while this one's are computed, so that memory stays busy.
  input_t next[kStep][kNElts];  // (tokens, channels)
  const auto load_step = [&](int64_t t) {
    for_each_token<kStep, kNElts>(count_in(params.seqlen - t, kStep), nch, [&](int j, int n) {
      load_raw<kVectorized>(x + (t + j) * params.x_seqlen_stride, params.x_dim_stride, n,
                            next[j]);
    });
  };
  load_step(run_t0);
  // The window of the step at t: tokens [t - kHalo, t + kStep), as loaded (half the registers
  // of acc_t for 16-bit types); its first kHalo carry over.
  input_t xs[kHalo + kStep][kNElts];  // (tokens, channels)
#pragma unroll
  for (int j = 0; j < kHalo; ++j) {
    acc_t v[kNElts];
    load_x_token<kVectorized, kNElts, input_t>(params, b, c0, nch, run_t0 - kHalo + j, v);
#pragma unroll
    for (int i = 0; i < kNElts; ++i) xs[j][i] = from_acc<input_t>(v[i]);  // exact: from input_t
  }
#pragma unroll 1
  for (int64_t t = run_t0; t < run_end; t += kStep) {
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
#pragma unroll
      for (int i = 0; i < kNElts; ++i) xs[kHalo + j][i] = next[j][i];
    }
    if (t + kStep < run_end) load_step(t + kStep);
    TokenMasks masks{};
    if constexpr (kMasked) masks = token_masks<kStep>(params, taps[0], b, t);
    for_each_token<kStep, kNElts>(count_in(params.seqlen - t, kStep), nch, [&](int j, int n) {
      acc_t o[kNElts];
#pragma unroll
      for (int i = 0; i < kNElts; ++i) {
        const acc_t x_i[kMaxWidth] = {to_acc(xs[j][i]), to_acc(xs[j + 1][i]),
                                      to_acc(xs[j + 2][i]), to_acc(xs[j + 3][i])};
        o[i] = kMasked ? out_of_token<kSilu>(taps[i], x_i, bits_of(masks.reads, j),
                                             masks.padding >> j & 1u)
                       : out_of_token<kSilu>(taps[i], x_i, taps[i].width_bits, false);
      }
      store_from_acc<kVectorized>(out + (t + j) * params.out_seqlen_stride,
                                  params.out_dim_stride, n, o);
    });
#pragma unroll
    for (int j = 0; j < kHalo; ++j) {
#pragma unroll
      for (int i = 0; i < kNElts; ++i) xs[j][i] = xs[kStep + j][i];
    }
  }
  if (params.final_states != nullptr && run == nruns - 1) {
    for (int i = 0; i < nch; ++i) write_final_states<input_t>(params, b, c0 + i);
  }
}

template <typename input_t, bool kVectorized>
__global__ void __launch_bounds__(ChannelsInnerTraits<input_t>::kNThreads)
    causal_conv1d_fwd_channels_inner_kernel(const CausalConv1dFwdParams params) {
  with_flags(params.silu, params.seq_idx != nullptr, [&](auto silu, auto masked) {
    fwd_channels_inner<input_t, kVectorized, decltype(silu)::value, decltype(masked)::value>(
        params);
  });
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
    using Traits = ChannelsInnerTraits<input_t>;
    const int64_t blocks = params.batch * ceil_div(params.seqlen, Traits::kRunTokens) *
                           ceil_div(params.dim, Traits::kBlockChannels);
    return launch_blocks(blocks, Traits::kNThreads, stream,
                         fwd_vectorizable<input_t, Traits::kNElts>(params, true)
                             ? causal_conv1d_fwd_channels_inner_kernel<input_t, true>
                             : causal_conv1d_fwd_channels_inner_kernel<input_t, false>,
                         params);
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
