// CUDA forward of the causal depthwise conv1d: the contiguous and the channel-last kernel, and
// the launch. The traits and the loaders they share with the backward are in
// causal_conv1d_common.cuh. Each kernel has a vectorized variant (aligned unit-stride rows:
// 16-byte loads and stores) and an elementwise one for any strides and alignment. Which taps are
// on comes as bit masks: the width's alone (the same for every token, so the compiler hoists
// them) or, with seq_idx, per token (TokenMasks).
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
  using Traits = ContiguousFwdTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  constexpr int kNElts = Traits::kNElts, kNVecs = Traits::kNVecs;
  const ContiguousThread<Traits> thread(params);
  Taps<acc_t> taps;
  taps.load(params, thread.d);
  XWindows<Traits> xs;
  xs.template load<kVectorized>(params, thread);
  input_t* out = static_cast<input_t*>(params.out) + thread.b * params.out_batch_stride +
                 thread.d * params.out_dim_stride;
  // A vector's out is computed where it is stored, so that only one vector of it is live.
  for_each_vector<kNVecs, kNElts>(thread.t0, params.seqlen, [&](int u, int64_t t, int n_valid) {
    TokenMasks masks{};
    if constexpr (kMasked) masks = token_masks<kNElts>(params, taps, thread.b, t);
    acc_t o[kNElts];
#pragma unroll
    for (int e = 0; e < kNElts; ++e) {
      acc_t x[kMaxWidth];
      xs.taps_of(u, e, x);
      o[e] = kMasked ? out_of_token<kSilu>(taps, x, bits_of(masks.reads, e),
                                           masks.padding >> e & 1u)
                     : out_of_token<kSilu>(taps, x, taps.width_bits, false);
    }
    store_from_acc<kVectorized>(out + t * params.out_seqlen_stride, params.out_seqlen_stride,
                                n_valid, o);
  });
  if (params.final_states != nullptr && thread.tile == thread.ntiles - 1 && threadIdx.x == 0)
    write_final_states<input_t>(params, thread.b, thread.d);
}

// 16-bit types at 8 blocks a multiprocessor (at most 64 registers; left alone the compiler takes
// 75, 6 blocks), so that 64 KB of x are in flight on each: more than fp32's 56 KB, which reached
// 99% of a copy's bandwidth. (Only the elementwise variant spills, a few bytes.)
template <typename input_t, bool kVectorized>
__global__ void __launch_bounds__(ContiguousFwdTraits<input_t>::kNThreads,
                                  sizeof(input_t) == 2 ? 8 : 1)
    causal_conv1d_fwd_contiguous_kernel(const CausalConv1dFwdParams params) {
  with_flags(params.silu, params.seq_idx != nullptr, [&](auto silu, auto masked) {
    fwd_contiguous<input_t, kVectorized, decltype(silu)::value, decltype(masked)::value>(params);
  });
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
  using Traits = ContiguousFwdTraits<input_t>;
  const int64_t blocks =
      params.batch * params.dim * ceil_div(params.seqlen, Traits::kTileTokens);
  return launch_blocks(blocks, Traits::kNThreads, stream,
                       fwd_vectorizable<input_t, Traits::kNElts>(params, false)
                           ? causal_conv1d_fwd_contiguous_kernel<input_t, true>
                           : causal_conv1d_fwd_contiguous_kernel<input_t, false>,
                       params);
}

}  // namespace mamba_ext
