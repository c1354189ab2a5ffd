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
// Contiguous x: a warp sweeps a tile of a row step by step (ContiguousTileTraits), a vector a
// lane, the next steps' x and dout copied into shared memory (cp.async) while this one computes,
// so that the bytes in flight do not cost registers. A vector's dx needs the dz of the
// kHalo tokens after it, the head of the right lane's vector (for lane 31, of lane 0's next
// one): a step computes its dz, then completes the dx of the step before. After the last step,
// lane 31 computes the dz of the tokens after the tile from their x and dout. Channel-last x: a
// warp of threads side by side along channels sweeps a run of tokens with a window of x and of
// dz (ChannelsInnerTraits).
#pragma once

#include "causal_conv1d/cuda/causal_conv1d_common.cuh"
#include "common/cuda_async_copy.cuh"

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

// What the contiguous backward keeps of one lane's vector from a step to the next: its tokens'
// dz, the dz of the first kHalo tokens of the next lane's vector (the right halo of its dx), its
// masks.
template <typename Traits> struct BwdStep {
  using acc_t = typename Traits::acc_t;
  acc_t dz[Traits::kNElts];
  acc_t dz_right[kHalo];  // from lane + 1; lane 31 has lane 0's, the head of its next vector
  TokenMasks masks;
};

template <typename input_t, bool kVectorized, bool kSilu, bool kMasked>
__device__ __forceinline__ void bwd_contiguous(const CausalConv1dBwdParams& params) {
  using Traits = ContiguousTileTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  using Step = BwdStep<Traits>;
  constexpr int kNElts = Traits::kNElts;
  __shared__ StagedTile<Traits> tiles[Traits::kNWarps][2];  // a warp's x and dout
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  StagedTile<Traits>& x_tile = tiles[warp][0];
  StagedTile<Traits>& dy_tile = tiles[warp][1];
  const WarpTile<Traits> place(params, warp);
  if (!place.exists) return;  // the whole warp: no block-wide sync follows
  const int64_t ntiles = place.ntiles, b = place.b, d = place.d, tile = place.tile;
  const int64_t warp_t0 = place.t0;
  // Tokens are numbered from the tile's start in 32-bit ints from here on: the row's tokens from
  // there, capped where the tile no longer meets dfinal_states' last kHalo positions.
  const int tile_len = int(min(params.seqlen - warp_t0, int64_t(Traits::kTileTokens + kHalo)));
  // Steps with tokens. A tile the row ends in runs one more step, and an even count (its tokens
  // all past seqlen: dz 0, nothing stored), whose dz completes the dx of the last real one; a
  // full tile's last step ends in the steps[1] the epilogue completes.
  const int n_steps = min(Traits::kNSteps, int(ceil_div(tile_len, Traits::kStepTokens)));
  // (Said through tile_len, live in the loop, so that no register holds it across the loop.)
  const auto full_tile = [&] { return tile_len > (Traits::kNSteps - 1) * Traits::kStepTokens; };
  const int n_run = full_tile() ? Traits::kNSteps : (n_steps + 2) / 2 * 2;
  // A vectorized row has stride 1: said outright, so that the compiler keeps no offsets of
  // i * stride in registers for the elementwise paths (it hoists them out of the step loop).
  const int64_t x_stride = kVectorized ? 1 : params.x_seqlen_stride;
  const int64_t dout_stride = kVectorized ? 1 : params.dout_seqlen_stride;
  const int64_t dx_stride = kVectorized ? 1 : params.dx_seqlen_stride;
  // The tile's first tokens: a valid address (the tile has tokens), 16-byte aligned if vectorized.
  const input_t* x = static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
                     d * params.x_dim_stride + warp_t0 * x_stride;
  const input_t* dout = static_cast<const input_t*>(params.dout) + b * params.dout_batch_stride +
                        d * params.dout_dim_stride + warp_t0 * dout_stride;
  input_t* dx = static_cast<input_t*>(params.dx) + b * params.dx_batch_stride +
                d * params.dx_dim_stride + warp_t0 * dx_stride;

  // This lane's x and dout of step s, from the tiles.
  const auto read_stage = [&](int s, input_t (&xv)[kNElts], input_t (&dyv)[kNElts]) {
    x_tile.read(s, lane, xv);
    dy_tile.read(s, lane, dyv);
  };
  // The whole tile in flight (zeros past tile_len: dz is 0 there), before the per-tile loads
  // below, so that those wait alongside.
  start_tile<Traits>(tile_len, n_run, lane, [&](int s, int t, int n_valid) {
    x_tile.template fill<kVectorized>(s, lane, x, t, x_stride, n_valid);
    dy_tile.template fill<kVectorized>(s, lane, dout, t, dout_stride, n_valid);
  });

  Taps<acc_t> taps;
  taps.load(params, d);
  // dfinal_states at the last kHalo positions of the row (0 where it does not reach), so that
  // the steps need neither b nor d for it.
  acc_t dfinal_tail[kHalo];
#pragma unroll
  for (int i = 0; i < kHalo; ++i)
    dfinal_tail[i] = dfinal_at<input_t>(params, b, d, params.seqlen - kHalo + i);
  LeftHalos<Traits> halos(params, b, d, warp_t0);

  const auto reads = [&](const TokenMasks& m, int e) {
    return kMasked ? bits_of(m.reads, e) : taps.width_bits;
  };
  const auto padding = [&](const TokenMasks& m, int e) {
    return kMasked && (m.padding >> e & 1u);
  };
  // dx of the vector of step s (its dz and its right halo's complete), stored.
  const auto emit_dx = [&](int s, const Step& v, const acc_t (&right)[kHalo]) {
    const int t = s * Traits::kStepTokens + lane * kNElts;
    acc_t dz[kNElts + kHalo];
#pragma unroll
    for (int e = 0; e < kNElts; ++e) dz[e] = v.dz[e];
#pragma unroll
    for (int i = 0; i < kHalo; ++i) dz[kNElts + i] = right[i];
    acc_t g[kNElts];
#pragma unroll
    for (int e = 0; e < kNElts; ++e) {
      // Position t + e is read by tap k of token t + e + kHalo - k.
      const unsigned read_by = kMasked ? bits_of(v.masks.read_by, e) : taps.width_bits;
      // The last tap first: on at every width without seq_idx, so that the taps that may be off
      // add to a sum of the position's own, with no copies for their selects.
      g[e] = 0;
#pragma unroll
      for (int k = kMaxWidth - 1; k >= 0; --k)
        g[e] = (read_by >> k & 1u) ? fma(taps.w[k], dz[e + kHalo - k], g[e]) : g[e];
    }
    const int tail_t0 = tile_len - kHalo;  // the positions of dfinal_tail
    if (t + kNElts > tail_t0) {
#pragma unroll
      for (int e = 0; e < kNElts; ++e) {
#pragma unroll
        for (int i = 0; i < kHalo; ++i) g[e] += t + e == tail_t0 + i ? dfinal_tail[i] : acc_t(0);
      }
    }
    store_tile_vector<kVectorized>(dx, dx_stride, t, count_in(tile_len - t, kNElts), g);
  };

  acc_t sums[kNSums] = {};  // dw[0..kMaxWidth), dbias
  // Step s: its x and dout from its stage; prev holds the dz of step s - 1, whose dx this step
  // completes.
  const auto step = [&](int s, Step& cur, Step& prev) {
    wait_for_step<Traits>();
    alignas(16) input_t xv[kNElts], dyv[kNElts];
    read_stage(s, xv, dyv);
    acc_t xw[kHalo + kNElts];  // tokens [t - kHalo, t + kNElts)
    halos.window(lane, xv, xw);
    if constexpr (kMasked)
      cur.masks = token_masks<kNElts>(params, taps, b,
                                      warp_t0 + s * Traits::kStepTokens + lane * kNElts);
    const auto dz_token = [&](int e) {
      const acc_t xe[kMaxWidth] = {xw[e], xw[e + 1], xw[e + 2], xw[e + 3]};
      const unsigned on = reads(cur.masks, e);
      const acc_t g = dz_of_token<kSilu>(taps, xe, on, padding(cur.masks, e), to_acc(dyv[e]));
      cur.dz[e] = g;
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k)
        sums[k] = (on >> k & 1u) ? fma(g, xe[k], sums[k]) : sums[k];
      sums[kMaxWidth] += g;
    };
    // The head of the vector first: the right halo of the left lane's, which completes the dx of
    // the step before, so that its dz need not stay live while the rest of this one is computed.
#pragma unroll
    for (int e = 0; e < kHalo; ++e) dz_token(e);
#pragma unroll
    for (int i = 0; i < kHalo; ++i)
      cur.dz_right[i] = __shfl_sync(kFullMask, cur.dz[i], (lane + 1) % 32);
    if (s > 0) {
      acc_t right[kHalo];
#pragma unroll
      for (int i = 0; i < kHalo; ++i) right[i] = lane < 31 ? prev.dz_right[i] : cur.dz_right[i];
      emit_dx(s - 1, prev, right);
    }
#pragma unroll
    for (int e = kHalo; e < kNElts; ++e) dz_token(e);
  };
  Step steps[2];
  // Two steps an iteration, the buffers swapping roles, so that they stay in registers.
#pragma unroll 1
  for (int s = 0; s < n_run; s += 2) {
    step(s, steps[0], steps[1]);
    step(s + 1, steps[1], steps[0]);
  }
  if (full_tile()) {
    // The last vector's right halo: for lane 31, the dz of the kHalo tokens after the tile (0
    // past seqlen), from their x and dout and the last kHalo tokens of x before them (in the
    // last step's stage).
    const Step& last = steps[1];
    alignas(16) input_t xv[kNElts], dyv[kNElts];
    read_stage(Traits::kNSteps - 1, xv, dyv);
    const int64_t end = warp_t0 + Traits::kTileTokens;
    const TokenMasks after = kMasked ? token_masks<kHalo>(params, taps, b, end)
                                     : TokenMasks{repeat_bits<kHalo>(taps.width_bits), 0u, 0u};
    acc_t xa[kHalo + kHalo], right[kHalo];
#pragma unroll
    for (int i = 0; i < kHalo; ++i) {
      xa[i] = to_acc(xv[kNElts - kHalo + i]);
      xa[kHalo + i] = x_at<input_t>(params, b, d, end + i);
    }
#pragma unroll
    for (int i = 0; i < kHalo; ++i) {
      const acc_t dy = end + i < params.seqlen
                           ? to_acc(dout[(Traits::kTileTokens + i) * dout_stride]) : acc_t(0);
      const acc_t xe[kMaxWidth] = {xa[i], xa[i + 1], xa[i + 2], xa[i + 3]};
      const acc_t g = dz_of_token<kSilu>(taps, xe, bits_of(after.reads, i),
                                         after.padding >> i & 1u, dy);
      right[i] = lane < 31 ? last.dz_right[i] : g;
    }
    emit_dx(Traits::kNSteps - 1, last, right);
  }
  // dinitial_states: the positions [-(width - 1), 0) before token 0, lane 0 of tile 0 (whose
  // dout is the row's), from the dz of tokens 0..kHalo - 1, recomputed.
  if (params.dinitial_states != nullptr && tile == 0 && lane == 0) {
    const TokenMasks head = kMasked ? token_masks<kHalo>(params, taps, b, 0)
                                    : TokenMasks{repeat_bits<kHalo>(taps.width_bits), 0u, 0u};
    const unsigned before = kMasked ? token_masks<kHalo>(params, taps, b, -kHalo).read_by
                                    : repeat_bits<kHalo>(taps.width_bits);
    acc_t xh[kHalo + kHalo], dz[kHalo];
#pragma unroll
    for (int i = 0; i < kHalo + kHalo; ++i) xh[i] = x_at<input_t>(params, b, d, i - kHalo);
#pragma unroll
    for (int i = 0; i < kHalo; ++i) {
      const acc_t dy = i < params.seqlen ? to_acc(dout[i * dout_stride]) : acc_t(0);
      const acc_t xe[kMaxWidth] = {xh[i], xh[i + 1], xh[i + 2], xh[i + 3]};
      dz[i] = dz_of_token<kSilu>(taps, xe, bits_of(head.reads, i), head.padding >> i & 1u, dy);
    }
#pragma unroll
    for (int p = -kHalo; p < 0; ++p) {
      if (p < -(params.width - 1)) continue;
      acc_t g = 0;
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k) {
        const int j = p + kHalo - k;  // the token of tap k
        if (j >= 0 && (bits_of(before, p + kHalo) >> k & 1u)) g = fma(taps.w[k], dz[j], g);
      }
      store_dinitial_state<input_t>(params, b, d, p, g + dfinal_at<input_t>(params, b, d, p));
    }
  }

  // The warp's sums (a butterfly, a fixed order), one row of dweight_partials.
#pragma unroll
  for (int k = 0; k < kNSums; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      sums[k] += __shfl_xor_sync(kFullMask, sums[k], offset);
  }
  if (lane == 0) {
    acc_t* partials = static_cast<acc_t*>(params.dweight_partials) +
                      ((b * ntiles + tile) * params.dim + d) * kNSums;
#pragma unroll
    for (int k = 0; k < kNSums; ++k) partials[k] = sums[k];
  }
}

// Blocks a multiprocessor runs at once for 16-bit and 32-bit types: the most that leave each
// variant unspilled (ptxas, sm_90a): 6 (80 registers) for vectorized rows without seq_idx, the
// case that matters, 5 (96) with it or for elementwise rows, 4 (128) for elementwise rows with
// it. The bytes in flight sit in shared memory (32 KB a block, 192 KB at 6): a warp's tile,
// 8 KB, goes out as the warp starts it, where the register-prefetch kernel kept 1 KB a warp
// (20 KB a multiprocessor at 5 blocks) and could not stay near the ~23 KB that ~3 TB/s at ~1 us
// latency asks of each of 132.
template <typename input_t, bool kVectorized, bool kMasked>
constexpr int bwd_contiguous_min_blocks() {
  if (sizeof(input_t) > 4) return 1;
  return kVectorized && !kMasked ? 6 : (kVectorized || !kMasked ? 5 : 4);
}

// A kernel per activation and masking (kernel_for).
template <typename input_t, bool kVectorized, bool kSilu, bool kMasked>
__global__ void __launch_bounds__(ContiguousTileTraits<input_t>::kNThreads,
                                  bwd_contiguous_min_blocks<input_t, kVectorized, kMasked>())
    causal_conv1d_bwd_contiguous_kernel(const CausalConv1dBwdParams params) {
  bwd_contiguous<input_t, kVectorized, kSilu, kMasked>(params);
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
    using Traits = ContiguousTileTraits<input_t>;
    const auto kernel = kernel_for(
        bwd_vectorizable<input_t, Traits::kNElts>(params, false), params,
        [](auto vectorized, auto silu, auto masked) {
          return causal_conv1d_bwd_contiguous_kernel<input_t, decltype(vectorized)::value,
                                                     decltype(silu)::value,
                                                     decltype(masked)::value>;
        });
    // A block's tiles take 32 KB of shared memory: the largest carve-out, so that shared
    // memory does not hold an SM below the blocks its registers allow.
    error = launch_blocks_max_shared(Traits::grid_blocks(params), Traits::kNThreads, stream,
                                     kernel, params);
  }
  if (error != cudaSuccess) return error;
  // Also with no batch rows: dweight and dbias are then zeros.
  constexpr int kReduceThreads = 256;
  return launch_blocks(ceil_div(params.dim * kNSums, kReduceThreads), kReduceThreads, stream,
                       causal_conv1d_reduce_dweight_kernel<acc_t>, params,
                       causal_conv1d_cuda_partial_rows(params, sizeof(input_t)));
}

}  // namespace mamba_ext
