// What the CPU kernels share: reading the padded time axis (causal_conv1d.h defines x' and
// seq'), the tile of it that one forward or backward task works on, and a sigmoid that
// vectorises.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "causal_conv1d/causal_conv1d.h"
#include "common/math.h"

namespace mamba_ext {
namespace causal_conv1d_cpu {

// Channels per tile: they share one set of sequence masks.
constexpr int64_t kTileDim = 16;
// Tokens per tile: a tile of 16 channels with its halo (16 x 262 floats = 17 KB) stays in L1
// while its channels are computed one after another.
constexpr int64_t kTileTokens = 256;
// Tiles a thread takes at least: 32768 elements, ATen's grain for elementwise kernels, so that
// small inputs do not pay for waking threads.
constexpr int64_t kGrainTiles = 32768 / (kTileDim * kTileTokens);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// x'[b, d, p], exact in input_t; zero outside the padded axis [0, seqlen + width - 1).
template <typename input_t>
inline input_t padded_x(const CausalConv1dFwdParams& params, int64_t b, int64_t d, int64_t p) {
  const int64_t t = p - (params.width - 1);
  if (t >= 0 && t < params.seqlen) {
    return static_cast<const input_t*>(params.x)[b * params.x_batch_stride +
                                                 d * params.x_dim_stride +
                                                 t * params.x_seqlen_stride];
  }
  if (t < 0 && p >= 0 && params.initial_states != nullptr) {
    return static_cast<const input_t*>(params.initial_states)[
        b * params.initial_states_batch_stride + d * params.initial_states_dim_stride +
        p * params.initial_states_width_stride];
  }
  return input_t(0);
}

// seq'[b, p]: 0 everywhere without seq_idx; positions past the end repeat the last token's.
inline int32_t padded_seq(const CausalConv1dFwdParams& params, int64_t b, int64_t p) {
  if (params.seq_idx == nullptr) return 0;
  const int64_t t = std::clamp<int64_t>(p - (params.width - 1), 0, params.seqlen - 1);
  return params.seq_idx[b * params.seq_idx_batch_stride + t * params.seq_idx_seqlen_stride];
}

// Whether final_states[b, :, k] = x'[b, :, seqlen + k] is kept: that position belongs to the
// sequence of the last token, and the last token is not padding.
inline bool final_state_kept(const CausalConv1dFwdParams& params, int64_t b, int64_t k) {
  const int32_t last = padded_seq(params, b, params.seqlen + params.width - 2);
  return last >= 0 && padded_seq(params, b, params.seqlen + k) == last;
}

template <typename acc_t> inline acc_t weight_at(const CausalConv1dFwdParams& params, int64_t d,
                                                 int64_t k) {
  return static_cast<const acc_t*>(params.weight)[d * params.weight_dim_stride +
                                                  k * params.weight_width_stride];
}

// sigmoid through exp_polynomial, so that loops over tokens calling it can vectorise.
template <typename T> inline T sigmoid_vectorizable(T x) {
  return T(1) / (T(1) + exp_polynomial(-x));
}

// A (channels, tokens) view of a tensor or of a tile.
template <typename T> struct Strided2d {
  T* data;
  int64_t dim_stride, time_stride;
  T& operator()(int64_t i, int64_t j) const { return data[i * dim_stride + j * time_stride]; }
};

// Whether to walk a tensor's channels innermost: when they are closer in memory than its tokens
// (channel-last), so that its rows are read or written in order.
inline bool channels_inner(int64_t dim_stride, int64_t time_stride) {
  return std::abs(dim_stride) < std::abs(time_stride);
}

// dst(i, j) = src(i, j) for the (ndim, ntok) block, converting the type.
template <typename To, typename From>
inline void copy_block(Strided2d<To> dst, Strided2d<From> src, int64_t ndim, int64_t ntok,
                       bool walk_channels_inner) {
  if (walk_channels_inner) {
    for (int64_t j = 0; j < ntok; ++j)
      for (int64_t i = 0; i < ndim; ++i) dst(i, j) = static_cast<To>(src(i, j));
  } else if (dst.time_stride == 1 && src.time_stride == 1) {
    // Unit strides spelled out, so that the compiler vectorises the copy.
    for (int64_t i = 0; i < ndim; ++i) {
      To* __restrict d = dst.data + i * dst.dim_stride;
      const From* __restrict s = src.data + i * src.dim_stride;
      for (int64_t j = 0; j < ntok; ++j) d[j] = static_cast<To>(s[j]);
    }
  } else {
    for (int64_t i = 0; i < ndim; ++i)
      for (int64_t j = 0; j < ntok; ++j) dst(i, j) = static_cast<To>(src(i, j));
  }
}

// The tokens [t0, t0 + ntok) of the channels [d0, d0 + ndim) of batch row b, in acc_t: the x'
// window they read, and which entries of it each token may read. Tokens outside [0, seqlen)
// (the backward's left halo) are loaded as padding.
template <typename input_t>
struct TokenTile {
  using acc_t = acc_type<input_t>;

  TokenTile(int64_t max_tokens, int64_t width)
      : max_tokens(max_tokens),
        x_pitch(max_tokens + width - 1),
        x(kTileDim * x_pitch),
        seq(x_pitch),
        same(width * max_tokens),
        valid(max_tokens) {}

  void load(const CausalConv1dFwdParams& params, int64_t b_, int64_t d0_, int64_t t0_,
            int64_t ntok_) {
    b = b_, d0 = d0_, t0 = t0_, ntok = ntok_;
    ndim = std::min(kTileDim, params.dim - d0);
    has_seq_idx = params.seq_idx != nullptr;
    const int64_t width = params.width;
    const int64_t npos = ntok + width - 1;  // padded positions [t0, t0 + npos)
    // Positions [x_begin, x_end) of the tile are tokens of x; before them, initial states.
    const int64_t x_begin = std::clamp<int64_t>(width - 1 - t0, 0, npos);
    const int64_t x_end = std::clamp<int64_t>(params.seqlen + width - 1 - t0, x_begin, npos);
    for (int64_t i = 0; i < ndim; ++i) {
      acc_t* row = x_row(i);
      for (int64_t j = 0; j < x_begin; ++j)
        row[j] = static_cast<acc_t>(padded_x<input_t>(params, b, d0 + i, t0 + j));
      std::fill(row + x_end, row + npos, acc_t(0));
    }
    if (x_begin < x_end) {
      const Strided2d<const input_t> x_block{
          static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
              d0 * params.x_dim_stride + (t0 + x_begin - (width - 1)) * params.x_seqlen_stride,
          params.x_dim_stride, params.x_seqlen_stride};
      copy_block(Strided2d<acc_t>{x_row(0) + x_begin, x_pitch, 1}, x_block, ndim,
                 x_end - x_begin, channels_inner(params.x_dim_stride, params.x_seqlen_stride));
    }
    for (int64_t j = 0; j < npos; ++j) seq[j] = padded_seq(params, b, t0 + j);
    for (int64_t j = 0; j < ntok; ++j) {
      const int64_t t = t0 + j;
      valid[j] = t >= 0 && t < params.seqlen && seq[j + width - 1] >= 0;
    }
    if (!has_seq_idx) return;
    for (int64_t k = 0; k < width; ++k)
      for (int64_t j = 0; j < ntok; ++j)
        same_row(k)[j] = seq[j + k] == seq[j + width - 1] ? acc_t(1) : acc_t(0);
  }

  // z[j] = bias[d] + sum_k weight[d, k] x'[t0 + j + k] [same sequence], d = d0 + i.
  void preactivation(const CausalConv1dFwdParams& params, int64_t i, acc_t* __restrict z) const {
    switch (params.width) {
      case 2: return preactivation_of_width<2>(params, i, z);
      case 3: return preactivation_of_width<3>(params, i, z);
      default: return preactivation_of_width<4>(params, i, z);  // the host checks 2..4
    }
  }

  // With the width known at compile time the taps unroll and each z[j] is summed in a register.
  template <int kWidth>
  void preactivation_of_width(const CausalConv1dFwdParams& params, int64_t i,
                              acc_t* __restrict z) const {
    const int64_t d = d0 + i;
    const acc_t bias = params.bias == nullptr
                           ? acc_t(0)
                           : static_cast<const acc_t*>(params.bias)[d * params.bias_stride];
    acc_t w[kWidth];
    for (int k = 0; k < kWidth; ++k) w[k] = weight_at<acc_t>(params, d, k);
    const acc_t* __restrict xs = x_row(i);
    if (has_seq_idx) {
      const acc_t* __restrict same_all = same.data();  // same_all[k * max_tokens + j]
      for (int64_t j = 0; j < ntok; ++j) {
        acc_t sum = bias;
        for (int k = 0; k < kWidth; ++k) sum += w[k] * xs[j + k] * same_all[k * max_tokens + j];
        z[j] = sum;
      }
    } else {
      for (int64_t j = 0; j < ntok; ++j) {
        acc_t sum = bias;
        for (int k = 0; k < kWidth; ++k) sum += w[k] * xs[j + k];
        z[j] = sum;
      }
    }
  }

  acc_t* x_row(int64_t i) { return x.data() + i * x_pitch; }
  const acc_t* x_row(int64_t i) const { return x.data() + i * x_pitch; }
  acc_t* same_row(int64_t k) { return same.data() + k * max_tokens; }
  const acc_t* same_row(int64_t k) const { return same.data() + k * max_tokens; }

  const int64_t max_tokens, x_pitch;
  int64_t b = 0, d0 = 0, ndim = 0, t0 = 0, ntok = 0;
  bool has_seq_idx = false;
  std::vector<acc_t> x;         // (kTileDim, ntok + width - 1): x'[b, d0 + i, t0 + j]
  std::vector<int32_t> seq;     // (ntok + width - 1,): seq'[b, t0 + j]
  std::vector<acc_t> same;      // (width, ntok): 1 where x'[t0 + j + k] is in token t0 + j's
                                // sequence; filled only with seq_idx
  std::vector<uint8_t> valid;   // (ntok,): 1 for tokens of x that are not padding
};

}  // namespace causal_conv1d_cpu
}  // namespace mamba_ext
