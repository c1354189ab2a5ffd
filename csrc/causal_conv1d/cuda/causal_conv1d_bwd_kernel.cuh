// CUDA backward of the causal depthwise conv1d. With dz = dout * act'(z) on tokens that are not
// padding (0 on padding and past the end), z recomputed from x (no saved activations), and
// tap k of token t reading x' at t - kHalo + k when it is on (Taps):
//   dx'[s]   = sum_k w[k] dz[s + kHalo - k] [tap k of token s + kHalo - k is on]
//              (+ dfinal_states at the last width - 1 positions, where kept)
//   dw[k]    = sum_t dz[t] x'[t - kHalo + k] [tap k of token t is on],   dbias = sum_t dz[t]
// dx' splits into dinitial_states (positions before 0) and dx. Each block writes its tile's sums
// of dweight and dbias to a row of dweight_partials; a second kernel adds the rows in a fixed
// order, so the result is the same from run to run (no float atomics).
//
// Contiguous x: the forward's tiles (ContiguousTraits); a vector's dz of the kHalo tokens after
// it comes from the right lane by a shuffle, for lane 31 from its own next vector or, after its
// last, computed from the x and dout of those tokens, which it loads itself. Channel-last x: a
// warp of threads side by side along channels sweeps a run of tokens with a window of x and of
// dz (ChannelsInnerTraits).
#pragma once

#include "causal_conv1d/cuda/causal_conv1d_common.cuh"

namespace mamba_ext {
namespace causal_conv1d_cuda {

// dfinal_states[b, d, k] where position s is final state k (s = seqlen - (width - 1) + k) and it
// is kept, else 0.
template <typename input_t>
__device__ __forceinline__ acc_type<input_t> dfinal_at(const CausalConv1dBwdParams& params,
                                                       int64_t b, int64_t d, int64_t s) {
  const int64_t k = s - (params.seqlen - (params.width - 1));
  if (params.dfinal_states == nullptr || k < 0 || k >= params.width - 1 ||
      !final_state_kept(params, b, k))
    return acc_type<input_t>(0);
  return to_acc(static_cast<const input_t*>(params.dfinal_states)[
      b * params.dfinal_states_batch_stride + d * params.dfinal_states_dim_stride +
      k * params.dfinal_states_width_stride]);
}

// Whether dfinal_states reaches a position before `end`: only the last width - 1 positions.
__device__ __forceinline__ bool dfinal_before(const CausalConv1dBwdParams& params, int64_t end) {
  return params.dfinal_states != nullptr && end > params.seqlen - (params.width - 1);
}

template <typename input_t>
__device__ __forceinline__ void store_dinitial_state(const CausalConv1dBwdParams& params,
                                                     int64_t b, int64_t d, int64_t s,
                                                     acc_type<input_t> v) {
  static_cast<input_t*>(params.dinitial_states)[
      b * params.dinitial_states_batch_stride + d * params.dinitial_states_dim_stride +
      (s + params.width - 1) * params.dinitial_states_width_stride] = from_acc<input_t>(v);
}

// dz of one token: dy (dout) times act'(z), z from the token's window x and the taps on; 0 on
// padding. Past seqlen dout loads as 0, so dz is 0 there with no check.
template <bool kSilu, typename acc_t>
__device__ __forceinline__ acc_t dz_of_token(const Taps<acc_t>& taps, const acc_t (&x)[kMaxWidth],
                                             unsigned on, bool padding, acc_t dy) {
  return zero_unless(!padding, dy * activation_grad<kSilu>(taps.conv(x, on)));
}

template <typename input_t, bool kVectorized, bool kSilu, bool kMasked>
__device__ __forceinline__ void bwd_contiguous(const CausalConv1dBwdParams& params) {
  using Traits = ContiguousBwdTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  constexpr int kNElts = Traits::kNElts, kNVecs = Traits::kNVecs;
  const ContiguousThread<Traits> thread(params);
  const int64_t b = thread.b, d = thread.d;
  const int lane = thread.lane;
  Taps<acc_t> taps;
  taps.load(params, d);
  const input_t* dout = static_cast<const input_t*>(params.dout) + b * params.dout_batch_stride +
                        d * params.dout_dim_stride;

  // Lane 31 computes the dz of the kHalo tokens after the warp's itself: their x and dout,
  // issued first so that they are in flight with the vectors.
  const int64_t warp_end = thread.warp_t0 + Traits::kWarpTokens;
  acc_t x_after[kHalo] = {}, dy_after[kHalo] = {};
  if (lane == 31) {
    const input_t* x = static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
                       d * params.x_dim_stride;
    if (warp_end + kHalo <= params.seqlen) {  // inside the row
#pragma unroll
      for (int i = 0; i < kHalo; ++i) {
        x_after[i] = to_acc(x[(warp_end + i) * params.x_seqlen_stride]);
        dy_after[i] = to_acc(dout[(warp_end + i) * params.dout_seqlen_stride]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kHalo; ++i) {
        if (warp_end + i >= params.seqlen) break;
        x_after[i] = to_acc(x[(warp_end + i) * params.x_seqlen_stride]);
        dy_after[i] = to_acc(dout[(warp_end + i) * params.dout_seqlen_stride]);
      }
    }
  }
  input_t dy[kNVecs][kNElts];  // (vector, tokens), as loaded
  load_vectors<kVectorized>(dout, params.dout_seqlen_stride, thread.t0, params.seqlen, dy);
  XWindows<Traits> xs;
  xs.template load<kVectorized>(params, thread);

  // Which taps are on, by token (reads) and by position (read_by): the width's alone without
  // seq_idx, the same for every token.
  TokenMasks masks[kNVecs];
#pragma unroll
  for (int u = 0; u < kNVecs; ++u) {
    masks[u] = kMasked ? token_masks<kNElts>(params, taps, b, thread.vector_t0(u))
                       : TokenMasks{repeat_bits<kNElts>(taps.width_bits),
                                    repeat_bits<kNElts>(taps.width_bits), 0u};
  }
  const auto reads = [&](int u, int e) {
    return kMasked ? bits_of(masks[u].reads, e) : taps.width_bits;
  };
  const auto read_by = [&](int u, int e) {
    return kMasked ? bits_of(masks[u].read_by, e) : taps.width_bits;
  };
  const auto padding = [&](int u, int e) { return kMasked && (masks[u].padding >> e & 1u); };

  // dz[u]: the tokens of vector u, then the kHalo tokens after it.
  acc_t dz[kNVecs][kNElts + kHalo];
#pragma unroll
  for (int u = 0; u < kNVecs; ++u) {
#pragma unroll
    for (int e = 0; e < kNElts; ++e) {
      acc_t x[kMaxWidth];
      xs.taps_of(u, e, x);
      dz[u][e] = dz_of_token<kSilu>(taps, x, reads(u, e), padding(u, e), to_acc(dy[u][e]));
    }
  }
  acc_t dz_after[kHalo] = {};
  if (lane == 31) {
    const TokenMasks after =
        kMasked ? token_masks<kHalo>(params, taps, b, warp_end)
                : TokenMasks{repeat_bits<kHalo>(taps.width_bits), 0u, 0u};
#pragma unroll
    for (int i = 0; i < kHalo; ++i) {
      acc_t x[kMaxWidth];
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k)
        x[k] = i + k < kHalo ? xs.at(kNVecs - 1, kNElts + i + k) : x_after[i + k - kHalo];
      dz_after[i] = dz_of_token<kSilu>(taps, x, bits_of(after.reads, i),
                                       after.padding >> i & 1u, dy_after[i]);
    }
  }
  // The right halo: the head of the next vector, the right lane's or, for lane 31, its own next.
#pragma unroll
  for (int u = 0; u < kNVecs; ++u) {
#pragma unroll
    for (int i = 0; i < kHalo; ++i) {
      const acc_t from_right = __shfl_down_sync(kFullMask, dz[u][i], 1);
      const acc_t from_next =
          u + 1 < kNVecs ? __shfl_sync(kFullMask, dz[u + 1 < kNVecs ? u + 1 : u][i], 0)
                         : dz_after[i];
      dz[u][kNElts + i] = lane < 31 ? from_right : from_next;
    }
  }

  // A vector's dx is computed where it is stored, so that only one vector of it is live.
  acc_t sums[kNSums] = {};  // dw[0..kMaxWidth), dbias
  const bool has_dfinal = dfinal_before(params, thread.vector_t0(kNVecs - 1) + kNElts);
  input_t* dx = static_cast<input_t*>(params.dx) + b * params.dx_batch_stride +
                d * params.dx_dim_stride;
  for_each_vector<kNVecs, kNElts>(thread.t0, params.seqlen, [&](int u, int64_t t, int n_valid) {
    acc_t g[kNElts];
#pragma unroll
    for (int e = 0; e < kNElts; ++e) {
      // Position t + e is read by tap k of token t + e + kHalo - k.
      g[e] = 0;
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k) {
        g[e] = (read_by(u, e) >> k & 1u) ? fma(taps.w[k], dz[u][e + kHalo - k], g[e]) : g[e];
        sums[k] = (reads(u, e) >> k & 1u) ? fma(dz[u][e], xs.at(u, e + k), sums[k]) : sums[k];
      }
      sums[kMaxWidth] += dz[u][e];
      if (has_dfinal) g[e] += dfinal_at<input_t>(params, b, d, t + e);
    }
    store_from_acc<kVectorized>(dx + t * params.dx_seqlen_stride, params.dx_seqlen_stride,
                                n_valid, g);
  });
  // dinitial_states: the positions [-(width - 1), 0) before token 0, thread 0 of tile 0.
  if (params.dinitial_states != nullptr && thread.tile == 0 && threadIdx.x == 0) {
    const unsigned before = kMasked ? token_masks<kHalo>(params, taps, b, -kHalo).read_by
                                    : repeat_bits<kHalo>(taps.width_bits);
#pragma unroll
    for (int s = -kHalo; s < 0; ++s) {
      if (s < -(params.width - 1)) continue;
      acc_t g = 0;
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k) {
        const int j = s + kHalo - k;  // the token of tap k, dz[0][j]: token 0 on
        if (j >= 0 && (bits_of(before, s + kHalo) >> k & 1u)) g = fma(taps.w[k], dz[0][j], g);
      }
      store_dinitial_state<input_t>(params, b, d, s, g + dfinal_at<input_t>(params, b, d, s));
    }
  }

  // The block's sums, in a fixed order: a butterfly within each warp, then the warps in turn.
  __shared__ acc_t warp_sums[Traits::kNWarps][kNSums];
#pragma unroll
  for (int k = 0; k < kNSums; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      sums[k] += __shfl_xor_sync(kFullMask, sums[k], offset);
    if (lane == 0) warp_sums[thread.warp][k] = sums[k];
  }
  __syncthreads();
  if (threadIdx.x < kNSums) {
    acc_t total = 0;
#pragma unroll
    for (int w = 0; w < Traits::kNWarps; ++w) total += warp_sums[w][threadIdx.x];
    static_cast<acc_t*>(params.dweight_partials)[
        ((b * thread.ntiles + thread.tile) * params.dim + d) * kNSums + threadIdx.x] = total;
  }
}

// Blocks a multiprocessor runs at once: left alone the compiler takes 96 registers for 16-bit types
// (5 blocks) and 90 for fp32, and on an H100 the bf16 backward then reached only 1.9 TB/s, each
// block computing for about as long as it waits for memory. More blocks hide more of it: at 6
// (80 registers) 16-bit types spill 8 bytes, at 7 (72) fp32 none.
template <typename input_t> constexpr int bwd_contiguous_min_blocks() {
  return sizeof(input_t) == 2 ? 6 : (sizeof(input_t) == 4 ? 7 : 1);
}

template <typename input_t, bool kVectorized>
__global__ void __launch_bounds__(ContiguousBwdTraits<input_t>::kNThreads,
                                  bwd_contiguous_min_blocks<input_t>())
    causal_conv1d_bwd_contiguous_kernel(const CausalConv1dBwdParams params) {
  with_flags(params.silu, params.seq_idx != nullptr, [&](auto silu, auto masked) {
    bwd_contiguous<input_t, kVectorized, decltype(silu)::value, decltype(masked)::value>(params);
  });
}

template <typename input_t, bool kVectorized, bool kSilu, bool kMasked>
__device__ __forceinline__ void bwd_channels_inner(const CausalConv1dBwdParams& params) {
  using Traits = ChannelsInnerTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  constexpr int kNElts = Traits::kNElts, kStep = Traits::kBwdStepTokens;
  constexpr int kBlockChannels = Traits::kBwdBlockChannels;
  // 32-bit division: the grid has fewer than 2^31 blocks.
  const unsigned channel_blocks = ceil_div(params.dim, kBlockChannels);
  const unsigned ntiles = ceil_div(params.seqlen, Traits::kBwdTileTokens);
  const int64_t block_c0 = int64_t(blockIdx.x % channel_blocks) * kBlockChannels;
  const int64_t tile = blockIdx.x / channel_blocks % ntiles;
  const int64_t b = blockIdx.x / channel_blocks / ntiles;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t c0 = block_c0 + lane * kNElts;
  // Threads past the last channel run with no channels: they take part in the block's sums.
  const int nch = count_in(params.dim - c0, kNElts);
  const int64_t run_t0 = tile * Traits::kBwdTileTokens + warp * Traits::kBwdRunTokens;
  const int64_t run_end = min(run_t0 + Traits::kBwdRunTokens, params.seqlen);

  Taps<acc_t> taps[kNElts];
#pragma unroll
  for (int i = 0; i < kNElts; ++i) taps[i].load(params, nch > 0 ? c0 + (i < nch ? i : 0) : 0);
  // The window of the step at t: tokens [t - kHalo, t + kStep); the first kHalo carry over.
  acc_t xs[kHalo + kStep][kNElts];  // (tokens, channels)
  acc_t dz[kHalo + kStep][kNElts];  // (tokens, channels); 0 before the run, unread there
#pragma unroll
  for (int j = 0; j < kHalo; ++j) {
    load_x_token<kVectorized, kNElts, input_t>(params, b, c0, nch, run_t0 - kHalo + j, xs[j]);
#pragma unroll
    for (int i = 0; i < kNElts; ++i) dz[j][i] = acc_t(0);
  }
  acc_t dw[kMaxWidth][kNElts] = {};  // (taps, channels)
  acc_t dbias[kNElts] = {};
  const input_t* x = static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
                     c0 * params.x_dim_stride;
  const input_t* dout = static_cast<const input_t*>(params.dout) + b * params.dout_batch_stride +
                        c0 * params.dout_dim_stride;
  input_t* dx = static_cast<input_t*>(params.dx) + b * params.dx_batch_stride +
                c0 * params.dx_dim_stride;
  const bool has_dinitial = params.dinitial_states != nullptr && run_t0 == 0;
  // A step computes dz of tokens [t, t + kStep) and emits dx' at the positions [t - kHalo,
  // t - kHalo + kStep), whose dz are then complete: the sweep runs kHalo tokens past the run.
#pragma unroll 1
  for (int64_t t = run_t0; t - kHalo < run_end; t += kStep) {
    // Tokens past seqlen load as 0: their dz is 0.
    const int n_tokens = count_in(params.seqlen - t, kStep);
    acc_t dy[kStep][kNElts];  // (tokens, channels)
    for_each_token<kStep, kNElts>(n_tokens, nch, [&](int j, int n) {
      load_as_acc<kVectorized>(x + (t + j) * params.x_seqlen_stride, params.x_dim_stride, n,
                               xs[kHalo + j]);
      load_as_acc<kVectorized>(dout + (t + j) * params.dout_seqlen_stride,
                               params.dout_dim_stride, n, dy[j]);
    });
    TokenMasks token{}, position{};
    if constexpr (kMasked) {
      token = token_masks<kStep>(params, taps[0], b, t);
      position = token_masks<kStep>(params, taps[0], b, t - kHalo);
    }
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      const unsigned reads = kMasked ? bits_of(token.reads, j) : taps[0].width_bits;
      const bool own = t + j < run_end;  // else the next run's token
#pragma unroll
      for (int i = 0; i < kNElts; ++i) {
        const acc_t x_i[kMaxWidth] = {xs[j][i], xs[j + 1][i], xs[j + 2][i], xs[j + 3][i]};
        const acc_t g =
            dz_of_token<kSilu>(taps[i], x_i, reads, kMasked && (token.padding >> j & 1u), dy[j][i]);
        dz[kHalo + j][i] = g;
        if (own) {
#pragma unroll
          for (int k = 0; k < kMaxWidth; ++k)
            dw[k][i] = (reads >> k & 1u) ? fma(g, x_i[k], dw[k][i]) : dw[k][i];
          dbias[i] += g;
        }
      }
    }
    const bool dfinal_here = dfinal_before(params, t - kHalo + kStep);
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      const int64_t pos = t - kHalo + j;  // read by tap k of window token j + kHalo - k
      const bool to_dx = pos >= run_t0 && pos < run_end;
      const bool to_dinitial = has_dinitial && pos < 0 && pos >= -(params.width - 1);
      if (!to_dx && !to_dinitial) continue;
      const unsigned read_by = kMasked ? bits_of(position.read_by, j) : taps[0].width_bits;
      acc_t g[kNElts];
#pragma unroll
      for (int i = 0; i < kNElts; ++i) {
        g[i] = 0;
#pragma unroll
        for (int k = 0; k < kMaxWidth; ++k)
          g[i] = (read_by >> k & 1u) ? fma(taps[i].w[k], dz[j + kHalo - k][i], g[i]) : g[i];
        if (dfinal_here && i < nch) g[i] += dfinal_at<input_t>(params, b, c0 + i, pos);
      }
      if (to_dx) {
        store_from_acc<kVectorized>(dx + pos * params.dx_seqlen_stride, params.dx_dim_stride,
                                    nch, g);
      } else {
        for (int i = 0; i < nch; ++i) store_dinitial_state<input_t>(params, b, c0 + i, pos, g[i]);
      }
    }
#pragma unroll
    for (int j = 0; j < kHalo; ++j) {
#pragma unroll
      for (int i = 0; i < kNElts; ++i) {
        xs[j][i] = xs[kStep + j][i];
        dz[j][i] = dz[kStep + j][i];
      }
    }
  }

  // The block's sums over its warps, in order; then written channel by channel, coalesced.
  __shared__ acc_t warp_sums[Traits::kNWarps][kNSums][kBlockChannels];
#pragma unroll
  for (int i = 0; i < kNElts; ++i) {
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) warp_sums[warp][k][lane * kNElts + i] = dw[k][i];
    warp_sums[warp][kMaxWidth][lane * kNElts + i] = dbias[i];
  }
  __syncthreads();
  acc_t* partials = static_cast<acc_t*>(params.dweight_partials) +
                    ((b * ntiles + tile) * params.dim + block_c0) * kNSums;
  for (int idx = threadIdx.x; idx < kBlockChannels * kNSums; idx += Traits::kNThreads) {
    const int channel = idx / kNSums, k = idx % kNSums;
    if (block_c0 + channel >= params.dim) break;
    acc_t total = 0;
#pragma unroll
    for (int w = 0; w < Traits::kNWarps; ++w) total += warp_sums[w][k][channel];
    partials[idx] = total;
  }
}

template <typename input_t, bool kVectorized>
__global__ void __launch_bounds__(ChannelsInnerTraits<input_t>::kNThreads)
    causal_conv1d_bwd_channels_inner_kernel(const CausalConv1dBwdParams params) {
  with_flags(params.silu, params.seq_idx != nullptr, [&](auto silu, auto masked) {
    bwd_channels_inner<input_t, kVectorized, decltype(silu)::value, decltype(masked)::value>(
        params);
  });
}

// dweight[d, :] and dbias[d]: the sums of the rows of dweight_partials, in row order.
template <typename acc_t>
__global__ void causal_conv1d_reduce_dweight_kernel(const CausalConv1dBwdParams params,
                                                    int64_t rows) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= params.dim * kNSums) return;
  const int64_t d = idx / kNSums;
  const int k = idx % kNSums;
  const acc_t* partials = static_cast<const acc_t*>(params.dweight_partials);
  acc_t total = 0;
  for (int64_t r = 0; r < rows; ++r) total += partials[r * params.dim * kNSums + idx];
  const int first = kMaxWidth - static_cast<int>(params.width);
  if (k == kMaxWidth) {
    if (params.dbias != nullptr) static_cast<acc_t*>(params.dbias)[d] = total;
  } else if (k >= first) {
    static_cast<acc_t*>(params.dweight)[d * params.width + k - first] = total;
  }
}

// Whether x, dout and dx are vectors of N tokens (contiguous) or N channels (channel-last).
template <typename input_t, int N>
bool bwd_vectorizable(const CausalConv1dBwdParams& params, bool channels_inner) {
  return rows_vectorizable<input_t, N>(channels_inner, params.x, params.x_batch_stride,
                                       params.x_dim_stride, params.x_seqlen_stride) &&
         rows_vectorizable<input_t, N>(channels_inner, params.dout, params.dout_batch_stride,
                                       params.dout_dim_stride, params.dout_seqlen_stride) &&
         rows_vectorizable<input_t, N>(channels_inner, params.dx, params.dx_batch_stride,
                                       params.dx_dim_stride, params.dx_seqlen_stride);
}

}  // namespace causal_conv1d_cuda

template <typename input_t>
cudaError_t causal_conv1d_bwd_cuda(const CausalConv1dBwdParams& params, cudaStream_t stream) {
  using namespace causal_conv1d_cuda;
  using acc_t = acc_type<input_t>;
  if (params.dim == 0) return cudaSuccess;
  cudaError_t error = cudaSuccess;
  if (params.batch > 0 && causal_conv1d_cuda_channels_inner(params)) {
    using Traits = ChannelsInnerTraits<input_t>;
    const int64_t blocks = params.batch * ceil_div(params.seqlen, Traits::kBwdTileTokens) *
                           ceil_div(params.dim, Traits::kBwdBlockChannels);
    error = launch_blocks(blocks, Traits::kNThreads, stream,
                          bwd_vectorizable<input_t, Traits::kNElts>(params, true)
                              ? causal_conv1d_bwd_channels_inner_kernel<input_t, true>
                              : causal_conv1d_bwd_channels_inner_kernel<input_t, false>,
                          params);
  } else if (params.batch > 0) {
    using Traits = ContiguousBwdTraits<input_t>;
    const int64_t blocks =
        params.batch * params.dim * ceil_div(params.seqlen, Traits::kTileTokens);
    error = launch_blocks(blocks, Traits::kNThreads, stream,
                          bwd_vectorizable<input_t, Traits::kNElts>(params, false)
                              ? causal_conv1d_bwd_contiguous_kernel<input_t, true>
                              : causal_conv1d_bwd_contiguous_kernel<input_t, false>,
                          params);
  }
  if (error != cudaSuccess) return error;
  // Also with no batch rows: dweight and dbias are then zeros.
  constexpr int kReduceThreads = 256;
  return launch_blocks(ceil_div(params.dim * kNSums, kReduceThreads), kReduceThreads, stream,
                       causal_conv1d_reduce_dweight_kernel<acc_t>, params,
                       causal_conv1d_cuda_partial_rows(params, sizeof(input_t)));
}

}  // namespace mamba_ext
