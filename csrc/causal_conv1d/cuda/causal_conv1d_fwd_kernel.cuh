// CUDA forward of the causal depthwise conv1d: the contiguous and the channel-last kernel, and
// the launch. The traits and the loaders they share with the backward are in
// causal_conv1d_common.cuh. Each kernel has a vectorized variant (aligned unit-stride rows:
// 16-byte loads and stores) and an elementwise one for any strides and alignment. Which taps are
// on (the width, seq_idx) comes as bit masks (TokenMasks), the same code with or without seq_idx.
#pragma once

#include "causal_conv1d/cuda/causal_conv1d_common.cuh"

namespace mamba_ext {
namespace causal_conv1d_cuda {

template <typename input_t, bool kVectorized, bool kSilu>
__device__ __forceinline__ void fwd_contiguous(const CausalConv1dFwdParams& params) {
  using Traits = ContiguousTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  constexpr int kNElts = Traits::kNElts, kNVecs = Traits::kNVecs;
  const ContiguousThread<Traits> thread(params);
  Taps<acc_t> taps;
  taps.load(params, thread.d);
  acc_t xs[kNVecs][Traits::kWindow];  // (vector, kHalo + kNElts tokens)
  load_x_windows<Traits, kVectorized>(params, thread, xs);
  acc_t out[kNVecs][kNElts];  // (vector, tokens)
#pragma unroll
  for (int u = 0; u < kNVecs; ++u) {
    const TokenMasks masks = token_masks<kNElts>(params, taps, thread.b, thread.vector_t0(u));
#pragma unroll
    for (int e = 0; e < kNElts; ++e) {
      const acc_t x[kMaxWidth] = {xs[u][e], xs[u][e + 1], xs[u][e + 2], xs[u][e + 3]};
      out[u][e] = zero_unless(!(masks.padding >> e & 1u),
                              activate<kSilu>(taps.conv(x, bits_of(masks.reads, e))));
    }
  }
  store_vectors<kVectorized>(static_cast<input_t*>(params.out) +
                                 thread.b * params.out_batch_stride +
                                 thread.d * params.out_dim_stride,
                             params.out_seqlen_stride, thread.t0, params.seqlen, out);
  if (params.final_states != nullptr && thread.tile == thread.ntiles - 1 && threadIdx.x == 0)
    write_final_states<input_t>(params, thread.b, thread.d);
}

template <typename input_t, bool kVectorized>
__global__ void __launch_bounds__(ContiguousTraits<input_t>::kNThreads)
    causal_conv1d_fwd_contiguous_kernel(const CausalConv1dFwdParams params) {
  with_activation(params.silu, [&](auto silu) {
    fwd_contiguous<input_t, kVectorized, decltype(silu)::value>(params);
  });
}

template <typename input_t, bool kVectorized, bool kSilu>
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
  // The window of the step at t: tokens [t - kHalo, t + kStep); the first kHalo carry over.
  acc_t xs[kHalo + kStep][kNElts];  // (tokens, channels)
  const int64_t run_t0 = run * Traits::kRunTokens;
#pragma unroll
  for (int j = 0; j < kHalo; ++j)
    load_x_token<kVectorized, kNElts, input_t>(params, b, c0, nch, run_t0 - kHalo + j, xs[j]);
  input_t* out = static_cast<input_t*>(params.out) + b * params.out_batch_stride +
                 c0 * params.out_dim_stride;
  const int64_t run_end = min(run_t0 + Traits::kRunTokens, params.seqlen);
#pragma unroll 1
  for (int64_t t = run_t0; t < run_end; t += kStep) {
#pragma unroll
    for (int j = 0; j < kStep; ++j)
      load_x_token<kVectorized, kNElts, input_t>(params, b, c0, nch, t + j, xs[kHalo + j]);
    const TokenMasks masks = token_masks<kStep>(params, taps[0], b, t);
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      acc_t o[kNElts];
#pragma unroll
      for (int i = 0; i < kNElts; ++i) {
        const acc_t x[kMaxWidth] = {xs[j][i], xs[j + 1][i], xs[j + 2][i], xs[j + 3][i]};
        o[i] = zero_unless(!(masks.padding >> j & 1u),
                           activate<kSilu>(taps[i].conv(x, bits_of(masks.reads, j))));
      }
      if (t + j < run_end)
        store_from_acc<kVectorized>(out + (t + j) * params.out_seqlen_stride,
                                    params.out_dim_stride, nch, o);
    }
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
  with_activation(params.silu, [&](auto silu) {
    fwd_channels_inner<input_t, kVectorized, decltype(silu)::value>(params);
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
  using Traits = ContiguousTraits<input_t>;
  const int64_t blocks =
      params.batch * params.dim * ceil_div(params.seqlen, Traits::kTileTokens);
  return launch_blocks(blocks, Traits::kNThreads, stream,
                       fwd_vectorizable<input_t, Traits::kNElts>(params, false)
                           ? causal_conv1d_fwd_contiguous_kernel<input_t, true>
                           : causal_conv1d_fwd_contiguous_kernel<input_t, false>,
                       params);
}

}  // namespace mamba_ext
