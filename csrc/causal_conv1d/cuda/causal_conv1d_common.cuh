// What the CUDA kernels of the causal conv1d share: conversions, the taps of one channel, scalar
// reads of the padded time axis (causal_conv1d.h defines x' and seq'), vector loads and stores.
//
// Widths 2..4 run as 4 taps with the weights right-aligned (leading taps off), so that one
// kernel serves every width. A tap that is off (before the width, or reading another sequence)
// is selected away rather than multiplied by 0, so that it never brings in a NaN or Inf.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "causal_conv1d/causal_conv1d.h"
#include "common/cuda_async_copy.cuh"
#include "common/cuda_math.cuh"
#include "common/math.h"

namespace mamba_ext {
namespace causal_conv1d_cuda {

constexpr int kMaxWidth = 4;
constexpr int kHalo = kMaxWidth - 1;  // tokens a token reads before itself
constexpr int kNSums = kMaxWidth + 1;  // a row of dweight_partials: 4 taps, then the bias
static_assert(kNSums == kCausalConv1dCudaPartialSums, "the host sizes dweight_partials");
constexpr unsigned kFullMask = 0xffffffffu;

// sigmoid on the special-function unit (2^x flushing denormals, and a reciprocal): a kernel at
// the bandwidth roofline has no issue slots to spare for a full-precision expf (the relative
// error, ~1e-6, is far inside fp32's tolerance).
__device__ __forceinline__ float sigmoid_fast(float z) {
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(z * -1.4426950408889634f));
  return __fdividef(1.0f, 1.0f + e);
}
__device__ __forceinline__ double sigmoid_fast(double z) { return 1.0 / (1.0 + exp(-z)); }

template <bool kSilu, typename acc_t> __device__ __forceinline__ acc_t activate(acc_t z) {
  return kSilu ? z * sigmoid_fast(z) : z;
}

// d out / d z.
template <bool kSilu, typename acc_t> __device__ __forceinline__ acc_t activation_grad(acc_t z) {
  if (!kSilu) return acc_t(1);
  // s (1 + z (1 - s)) as two fmas: t = z - z s, then s + t s.
  const acc_t s = sigmoid_fast(z);
  return fma(fma(-z, s, z), s, s);
}

// v, or +0 where !keep, by masking its bits: no branch, and a NaN or Inf in v does not leak.
__device__ __forceinline__ float zero_unless(bool keep, float v) {
  return __int_as_float(__float_as_int(v) & (keep ? ~0 : 0));
}
__device__ __forceinline__ double zero_unless(bool keep, double v) {
  return __longlong_as_double(__double_as_longlong(v) & (keep ? ~0ll : 0ll));
}

// Runs body(silu, masked) with each an std::integral_constant<bool>: the activation and whether
// seq_idx masks taps (masked = seq_idx given) as branches over the whole kernel, uniform, so that
// the per-token code has neither.
template <typename Body>
__device__ __forceinline__ void with_flags(bool silu, bool masked, Body body) {
  const auto with_mask = [&](auto silu_flag) {
    if (masked) {
      body(silu_flag, std::true_type{});
    } else {
      body(silu_flag, std::false_type{});
    }
  };
  if (silu) {
    with_mask(std::true_type{});
  } else {
    with_mask(std::false_type{});
  }
}

// The taps of one channel. Params is CausalConv1dFwdParams or CausalConv1dUpdateParams.
// Which taps are on for a token is a mask of kMaxWidth bits, bit k for tap k.
template <typename acc_t> struct Taps {
  acc_t w[kMaxWidth];  // weight[d, k - first] at k >= first, 0 before
  acc_t bias;
  int first;             // kMaxWidth - width
  unsigned width_bits;   // the taps of the width: bits [first, kMaxWidth)

  __device__ __forceinline__ void set_width(int width) {
    first = kMaxWidth - width;
    // The last two taps are on at every width (>= 2): said outright, so that the compiler drops
    // their per-token checks.
    width_bits = (((1u << kMaxWidth) - 1) & ~((1u << first) - 1)) | 0b1100u;
  }

  template <typename Params> __device__ __forceinline__ void load(const Params& params, int64_t d) {
    set_width(static_cast<int>(params.width));
    const acc_t* weight = static_cast<const acc_t*>(params.weight) + d * params.weight_dim_stride;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k)
      w[k] = k >= first ? weight[(k - first) * params.weight_width_stride] : acc_t(0);
    bias = params.bias == nullptr ? acc_t(0)
                                  : static_cast<const acc_t*>(params.bias)[d * params.bias_stride];
  }

  // The taps of the width whose sequence seq[k] is `own`, the sequence of the token.
  __device__ __forceinline__ unsigned in_sequence(const int (&seq)[kMaxWidth], int own) const {
    unsigned bits = 0;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) bits |= unsigned(seq[k] == own) << k;
    return width_bits & bits;
  }

  // bias + sum_k w[k] x[k] over the taps on in `on`; x[kHalo] is the token itself. Explicit
  // fmas, so that every kernel (and the backward's recomputation) rounds alike.
  __device__ __forceinline__ acc_t conv(const acc_t (&x)[kMaxWidth], unsigned on) const {
    acc_t z = bias;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) z = (on >> k & 1u) ? fma(w[k], x[k], z) : z;
    return z;
  }
};

// The masks of kN tokens side by side, kMaxWidth bits each: token e's at bits [4 e, 4 e + 4).
template <int kN> __device__ __forceinline__ unsigned repeat_bits(unsigned bits) {
  static_assert(kN * kMaxWidth <= 32, "the masks of a vector must fit in 32 bits");
  unsigned all = 0;
#pragma unroll
  for (int e = 0; e < kN; ++e) all |= bits << (kMaxWidth * e);
  return all;
}

__device__ __forceinline__ unsigned bits_of(unsigned masks, int e) {
  return masks >> (kMaxWidth * e) & ((1u << kMaxWidth) - 1);
}

// x'[b, d, t + width - 1] in x's token numbering: x at t >= 0, initial_states (or 0) at
// t in [-(width - 1), 0), 0 elsewhere (before the width, or past the end).
template <typename input_t>
__device__ __forceinline__ acc_type<input_t> x_at(const CausalConv1dFwdParams& params, int64_t b,
                                                   int64_t d, int64_t t) {
  using acc_t = acc_type<input_t>;
  if (t >= 0 && t < params.seqlen) {
    return to_acc(static_cast<const input_t*>(params.x)[b * params.x_batch_stride +
                                                         d * params.x_dim_stride +
                                                         t * params.x_seqlen_stride]);
  }
  const int64_t p = t + params.width - 1;  // position in initial_states
  if (t < 0 && p >= 0 && params.initial_states != nullptr) {
    return to_acc(static_cast<const input_t*>(params.initial_states)[
        b * params.initial_states_batch_stride + d * params.initial_states_dim_stride +
        p * params.initial_states_width_stride]);
  }
  return acc_t(0);
}

// seq'[b, t + width - 1]: the sequence of token t, tokens before 0 in the first token's and
// past the end in the last's; 0 without seq_idx.
__device__ __forceinline__ int seq_at(const CausalConv1dFwdParams& params, int64_t b, int64_t t) {
  if (params.seq_idx == nullptr) return 0;
  t = t < 0 ? 0 : (t >= params.seqlen ? params.seqlen - 1 : t);
  return params.seq_idx[b * params.seq_idx_batch_stride + t * params.seq_idx_seqlen_stride];
}

// Which taps are on around the kN tokens [t, t + kN) of batch row b: seq_idx's masks, or the
// width's alone without seq_idx. Bits as repeat_bits lays them out.
struct TokenMasks {
  unsigned reads;    // token t + e: its taps that are on (its conv, its share of dweight); none
                     // for padding, so that its z stays finite
  unsigned read_by;  // position t + e: bit k when tap k of token t + e + kHalo - k is on (dx')
  unsigned padding;  // bit e: token t + e is padding (seq_idx -1)
};

template <int kN, typename acc_t>
__device__ __forceinline__ TokenMasks token_masks(const CausalConv1dFwdParams& params,
                                                  const Taps<acc_t>& taps, int64_t b,
                                                  int64_t t) {
  if (params.seq_idx == nullptr) {
    const unsigned all = repeat_bits<kN>(taps.width_bits);
    return {all, all, 0u};
  }
  int seq[kHalo + kN + kHalo];  // seq[i]: token t - kHalo + i
#pragma unroll
  for (int i = 0; i < kHalo + kN + kHalo; ++i) seq[i] = seq_at(params, b, t - kHalo + i);
  TokenMasks masks{0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < kN; ++e) {
    const int own = seq[e + kHalo];
    const int taps_of_token[kMaxWidth] = {seq[e], seq[e + 1], seq[e + 2], seq[e + 3]};
    const int tokens_of_position[kMaxWidth] = {seq[e + 6], seq[e + 5], seq[e + 4], seq[e + 3]};
    masks.reads |= (own < 0 ? 0u : taps.in_sequence(taps_of_token, own)) << (kMaxWidth * e);
    masks.read_by |= taps.in_sequence(tokens_of_position, own) << (kMaxWidth * e);
    masks.padding |= unsigned(own < 0) << e;
  }
  return masks;
}

// Whether final_states[b, :, k] (token seqlen - (width - 1) + k) is kept: it belongs to the
// sequence of the last token, and the last token is not padding.
__device__ __forceinline__ bool final_state_kept(const CausalConv1dFwdParams& params, int64_t b,
                                                 int64_t k) {
  const int last = seq_at(params, b, params.seqlen - 1);
  return last >= 0 && seq_at(params, b, params.seqlen - (params.width - 1) + k) == last;
}

template <typename input_t>
__device__ void write_final_states(const CausalConv1dFwdParams& params, int64_t b, int64_t d) {
  input_t* final_states = static_cast<input_t*>(params.final_states) +
                          b * params.final_states_batch_stride +
                          d * params.final_states_dim_stride;
  for (int64_t k = 0; k + 1 < params.width; ++k) {
    const int64_t t = params.seqlen - (params.width - 1) + k;
    final_states[k * params.final_states_width_stride] = from_acc<input_t>(
        final_state_kept(params, b, k) ? x_at<input_t>(params, b, d, t) : acc_type<input_t>(0));
  }
}

// An unsigned type of kBytes, for vector loads and stores.
template <int kBytes> struct Chunk;
template <> struct Chunk<16> { using type = uint4; };
template <> struct Chunk<8> { using type = uint2; };
template <> struct Chunk<4> { using type = unsigned; };

// The bytes of one load of a vector of N elements: 16, or the whole vector when it is smaller.
template <typename T, int N> constexpr int chunk_bytes() {
  return N * int(sizeof(T)) >= 16 ? 16 : N * int(sizeof(T));
}

// Stores 16 bytes at p (global, 16-byte aligned) in one instruction: a uint4 store of values
// converted to a 16-bit type can come out of the compiler as four 4-byte stores.
__device__ __forceinline__ void store_global_16(void* p, const uint4& v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w));
}

// Loads the first n_valid (<= N) of p[0], p[stride], ..., p[(N - 1) stride], zeros after them.
// kVectorized: p is aligned to chunk_bytes<T, N>() and stride is 1, so a whole vector takes loads
// of chunk_bytes.
template <bool kVectorized, int N, typename T>
__device__ __forceinline__ void load_raw(const T* p, int64_t stride, int n_valid, T (&out)[N]) {
  if constexpr (kVectorized) {
    constexpr int kChunk = chunk_bytes<T, N>();
    static_assert(N * int(sizeof(T)) % kChunk == 0, "a vector must be whole chunks");
    using chunk_t = typename Chunk<kChunk>::type;
    if (n_valid == N) {
#pragma unroll
      for (int i = 0; i < N * int(sizeof(T)) / kChunk; ++i)
        reinterpret_cast<chunk_t*>(out)[i] = reinterpret_cast<const chunk_t*>(p)[i];
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
    out[i] = i < n_valid ? p[i * stride] : from_acc<T>(acc_type<T>(0));
}

// load_raw, converted to acc_t.
template <bool kVectorized, int N, typename T, typename acc_t>
__device__ __forceinline__ void load_as_acc(const T* p, int64_t stride, int n_valid,
                                            acc_t (&out)[N]) {
  alignas(chunk_bytes<T, N>()) T raw[N];
  load_raw<kVectorized>(p, stride, n_valid, raw);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_acc(raw[i]);
}

// Stores the first n_valid (<= N) values at p[0], p[stride], ...; kVectorized as load_as_acc.
template <bool kVectorized, int N, typename T, typename acc_t>
__device__ __forceinline__ void store_from_acc(T* p, int64_t stride, int n_valid,
                                               const acc_t (&in)[N]) {
  if constexpr (kVectorized) {
    constexpr int kChunk = chunk_bytes<T, N>();
    static_assert(N * int(sizeof(T)) % kChunk == 0, "a vector must be whole chunks");
    using chunk_t = typename Chunk<kChunk>::type;
    if (n_valid == N) {
      alignas(kChunk) T raw[N];
#pragma unroll
      for (int i = 0; i < N; ++i) raw[i] = from_acc<T>(in[i]);
#pragma unroll
      for (int i = 0; i < N * int(sizeof(T)) / kChunk; ++i)
        reinterpret_cast<chunk_t*>(p)[i] = reinterpret_cast<const chunk_t*>(raw)[i];
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (i < n_valid) p[i * stride] = from_acc<T>(in[i]);
}

// Whether a tensor's vectors of N elements, starting at multiples of N along its unit-stride
// dimension, are aligned to their chunks: the base is, and so is every step along the other two.
template <typename T, int N>
inline bool vectors_aligned(const void* base, int64_t unit_stride, int64_t stride_a,
                            int64_t stride_b) {
  constexpr int64_t kChunk = chunk_bytes<T, N>();
  return unit_stride == 1 && reinterpret_cast<uintptr_t>(base) % kChunk == 0 &&
         stride_a * int64_t(sizeof(T)) % kChunk == 0 &&
         stride_b * int64_t(sizeof(T)) % kChunk == 0;
}

// Whether a (batch, dim, seqlen) tensor's rows are vectors of N aligned to their chunks, along
// its unit-stride dimension: dim for the channel-last kernels, seqlen for the contiguous ones.
template <typename T, int N>
inline bool rows_vectorizable(bool channels_inner, const void* data, int64_t batch_stride,
                              int64_t dim_stride, int64_t seqlen_stride) {
  return channels_inner ? vectors_aligned<T, N>(data, dim_stride, batch_stride, seqlen_stride)
                        : vectors_aligned<T, N>(data, seqlen_stride, batch_stride, dim_stride);
}

MAMBA_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Launches a flat grid (rows of (batch, dim) outnumber gridDim.y's 65535) and returns the launch
// error, if any.
template <typename... KernelArgs, typename... Args>
inline cudaError_t launch_blocks(int64_t blocks, int threads, cudaStream_t stream,
                                 void (*kernel)(KernelArgs...), const Args&... args) {
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(args...);
  return cudaGetLastError();
}

// launch_blocks for a kernel whose static shared memory would hold a multiprocessor below the
// blocks its registers allow under the default carve-out: it asks for the largest one first.
template <typename... KernelArgs, typename... Args>
inline cudaError_t launch_blocks_max_shared(int64_t blocks, int threads, cudaStream_t stream,
                                            void (*kernel)(KernelArgs...), const Args&... args) {
  const cudaError_t error = cudaFuncSetAttribute(
      kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (error != cudaSuccess) return error;
  return launch_blocks(blocks, threads, stream, kernel, args...);
}

// The kernel of a combination of the flags, for kernels compiled once per combination (so that
// the masked variant's registers do not set the others'): kernel_of(vectorized, silu, masked),
// each an std::integral_constant<bool>; masked: seq_idx is given.
template <typename KernelOf>
inline auto kernel_for(bool vectorized, const CausalConv1dFwdParams& params, KernelOf kernel_of) {
  const auto with_masked = [&](auto v, auto silu) {
    return params.seq_idx != nullptr ? kernel_of(v, silu, std::true_type{})
                                     : kernel_of(v, silu, std::false_type{});
  };
  const auto with_silu = [&](auto v) {
    return params.silu ? with_masked(v, std::true_type{}) : with_masked(v, std::false_type{});
  };
  return vectorized ? with_silu(std::true_type{}) : with_silu(std::false_type{});
}

// How many of the n elements left fit in a vector of `cap`: n clamped to [0, cap].
__device__ __forceinline__ int count_in(int64_t n, int cap) {
  return n <= 0 ? 0 : (n >= cap ? cap : static_cast<int>(n));
}

// Contiguous x (threads along tokens): a warp sweeps a tile of kCausalConv1dCudaTileBytes of x of
// one (batch, channel) row in steps of 32 vectors, one a lane: lane l's vector of step s starts
// at token tile * kTileTokens + (s * 32 + l) * kNElts. The tile's rows (x, and dout for the
// backward) are copied into shared memory (cp.async) as it starts, a commit group a step, and a
// step waits for its own group only: up to the whole tile is in flight, with no registers held
// for it (StagedTile). The per-tile costs (taps, halos, the sums of dweight) are paid once per
// tile rather than once per vector.
template <typename input_t_> struct ContiguousTileTraits {
  using input_t = input_t_;
  using acc_t = acc_type<input_t>;
  static constexpr int kNThreads = 128;
  static constexpr int kNWarps = kNThreads / 32;  // a warp a tile: the block needs no sync
  // Tokens of a vector: 16 bytes (8 halves, 4 floats), and more than kHalo, so that a vector's
  // left halo lies in one neighbour: 4 doubles, two 16-byte chunks.
  static constexpr int kNElts =
      16 / int(sizeof(input_t)) > kHalo ? 16 / int(sizeof(input_t)) : kHalo + 1;
  static constexpr int kStepTokens = 32 * kNElts;
  static constexpr int kTileTokens = int(kCausalConv1dCudaTileBytes) / int(sizeof(input_t));
  static constexpr int kNSteps = kTileTokens / kStepTokens;  // 8 (4 for double)
  // A vector's last kHalo tokens, the left halo of the vector after it, pass between lanes as
  // whole 32-bit words: the last kTailElts elements (4 of a 16-bit type, 3 of wider ones).
  static constexpr int kTailWords = (kHalo * int(sizeof(input_t)) + 3) / 4;
  static constexpr int kTailElts = kTailWords * 4 / int(sizeof(input_t));
  static_assert(kNElts > kHalo, "a vector's left halo must lie in one neighbour");
  static_assert(kNSteps * kStepTokens == kTileTokens, "a tile must be whole steps");
  static_assert(kTailElts >= kHalo && kTailElts <= kNElts, "a tail must lie in one vector");

  // The blocks of the grid: a warp a tile (WarpTile).
  static int64_t grid_blocks(const CausalConv1dFwdParams& params) {
    return ceil_div(params.batch * params.dim * ceil_div(params.seqlen, kTileTokens), kNWarps);
  }
};

// Channel-last x (threads along channels). A thread owns kNElts channels of one batch row and
// slides a window of kMaxWidth tokens over a run of tokens, loading kStepTokens at a time, so
// that a run of T tokens costs T + kHalo loads. (2e5f1ef's forward, a warp's ring of tokens in
// shared memory, gave wrong channel-last results on an H100: the forward is this one again.)
template <typename input_t_> struct ChannelsInnerTraits {
  using input_t = input_t_;
  using acc_t = acc_type<input_t>;
  static constexpr int kNThreads = 128;
  static constexpr int kNWarps = kNThreads / 32;
  // Channels of a thread: 4 (16 bytes of floats, 8 of halves: whole 32-byte sectors across a
  // warp), 2 doubles. More would cost registers (taps and window grow with them) that are worth
  // more as tokens in flight.
  static constexpr int kNElts = 16 / int(sizeof(input_t)) < 4 ? 16 / int(sizeof(input_t)) : 4;
  // Forward: a block of threads side by side along channels, each over a run of tokens, loading
  // a step of 64 bytes (8 tokens of 16-bit channels, 4 of wider ones) while computing the last.
  static constexpr int kStepTokens = 64 / (kNElts * int(sizeof(input_t)));
  static constexpr int kRunTokens = 32;
  static constexpr int kBlockChannels = kNThreads * kNElts;
  // Backward: the window holds dz too, so fewer tokens a step; a warp along channels, the
  // block's warps along tokens, so that the block's sums of dweight cover a whole tile.
  static constexpr int kBwdStepTokens = 4;
  static constexpr int kBwdTileTokens = int(kCausalConv1dCudaBwdTileTokensChannelsInner);
  static constexpr int kBwdRunTokens = kBwdTileTokens / kNWarps;
  static constexpr int kBwdBlockChannels = 32 * kNElts;
  static_assert(16 % sizeof(input_t) == 0, "16 bytes must be whole elements");
  static_assert(kRunTokens % kStepTokens == 0, "a run must be whole steps");
  static_assert(kBwdRunTokens * kNWarps == kBwdTileTokens, "a tile must be whole runs");
};

// Calls f(j, n) for the kStep tokens of a step of a channel-last kernel, n the channels of token
// j to load or store: n_channels for the first n_tokens tokens, 0 after them. When all kStep
// tokens and kN channels are there, n is the constant kN: the step's loads or stores then go
// with no branch between them, all in flight at once.
template <int kStep, int kN, typename F>
__device__ __forceinline__ void for_each_token(int n_tokens, int n_channels, F f) {
  if (n_tokens == kStep && n_channels == kN) {
#pragma unroll
    for (int j = 0; j < kStep; ++j) f(j, kN);
    return;
  }
#pragma unroll
  for (int j = 0; j < kStep; ++j) f(j, j < n_tokens ? n_channels : 0);
}

// The task of a warp of a grid of kNWarps-warp blocks whose warps take the tasks of an
// (n0, n1, n2) box in order, n2 fastest. 32-bit division where it fits.
struct WarpTask {
  int64_t i0, i1, i2;
  bool exists;  // false for the warps past the last task (the whole warp)

  template <int kNWarps>
  __device__ __forceinline__ static WarpTask of(int warp, int64_t n0, int64_t n1, int64_t n2) {
    const int64_t n = n0 * n1 * n2;
    const int64_t task = int64_t(blockIdx.x) * kNWarps + warp;
    WarpTask w;
    w.exists = task < n;
    if (n <= 0xffffffffll) {
      const unsigned outer = unsigned(task) / unsigned(n2);
      w.i2 = unsigned(task) % unsigned(n2);
      w.i0 = outer / unsigned(n1), w.i1 = outer % unsigned(n1);
    } else {
      const int64_t outer = task / n2;
      w.i2 = task % n2;
      w.i0 = outer / n1, w.i1 = outer % n1;
    }
    return w;
  }
};

// The tile of a warp of a contiguous kernel (ContiguousTileTraits): the grid's warps in the order
// (b * dim + d) * ntiles + tile.
template <typename Traits> struct WarpTile {
  int64_t ntiles, b, d, tile;
  int64_t t0;   // the tile's first token
  bool exists;  // false for the warps past the last tile (the whole warp)

  __device__ __forceinline__ WarpTile(const CausalConv1dFwdParams& params, int warp) {
    ntiles = ceil_div(params.seqlen, Traits::kTileTokens);
    const WarpTask task =
        WarpTask::of<Traits::kNWarps>(warp, params.batch, params.dim, ntiles);
    exists = task.exists;
    b = task.i0, d = task.i1, tile = task.i2;
    t0 = tile * Traits::kTileTokens;
  }
};

// A warp's vectors of one tensor in shared memory, kSlots of them a lane (the steps of a
// contiguous tile), each kNElts elements of 16-byte chunks:
// chunk c of lane l's vector of slot s at [s][c][l], so that a warp's 16-byte accesses touch
// every bank once. A lane reads only the vectors it copied itself: no warp sync.
template <typename input_t, int kNElts, int kSlots> struct StagedVectors {
  static constexpr int kChunkElts = 16 / int(sizeof(input_t));
  static constexpr int kChunks = kNElts / kChunkElts;
  static_assert(kChunks * 16 == kNElts * int(sizeof(input_t)), "a vector must be whole chunks");
  uint4 chunks[kSlots][kChunks][32];

  // Starts the copy of lane's vector into slot s: the n_valid (<= kNElts) elements at
  // base[(at + i) * stride], zeros after them; base is a valid address. Vectorized rows (stride
  // 1, 16-byte aligned vectors) copy asynchronously, so that the bytes in flight need no
  // registers; the elementwise variant (misaligned or strided rows) loads and stores.
  template <bool kVectorized>
  __device__ __forceinline__ void fill(int s, int lane, const input_t* base, int at,
                                       int64_t stride, int n_valid) {
    if constexpr (kVectorized) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int bytes = min(max(n_valid * int(sizeof(input_t)) - 16 * c, 0), 16);
        // A chunk with nothing to copy names base.
        cp_async_16(&chunks[s][c][lane], base + (bytes > 0 ? at + c * kChunkElts : 0), bytes);
      }
    } else {
      alignas(16) input_t v[kNElts];
      load_raw<false>(base + at * stride, stride, n_valid, v);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) chunks[s][c][lane] = reinterpret_cast<const uint4*>(v)[c];
    }
  }

  __device__ __forceinline__ void read(int s, int lane, input_t (&v)[kNElts]) const {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) reinterpret_cast<uint4*>(v)[c] = chunks[s][c][lane];
  }
};

// One row's share of a warp's contiguous tile (ContiguousTileTraits), step by step.
template <typename Traits>
using StagedTile = StagedVectors<typename Traits::input_t, Traits::kNElts, Traits::kNSteps>;

// Stores lane's vector of values v at token t of a tile (token i at tile[i * stride]), the first
// n_valid: a vectorized row's full vector in 16-byte stores (one STG.128 a chunk).
template <bool kVectorized, typename T, typename acc_t, int N>
__device__ __forceinline__ void store_tile_vector(T* tile, int64_t stride, int t, int n_valid,
                                                  const acc_t (&v)[N]) {
  if (kVectorized && n_valid == N) {
    constexpr int kChunks = N * int(sizeof(T)) / 16;
    static_assert(kChunks * 16 == N * int(sizeof(T)), "a vector must be whole chunks");
    alignas(16) T raw[N];
#pragma unroll
    for (int e = 0; e < N; ++e) raw[e] = from_acc<T>(v[e]);
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
      store_global_16(tile + t + c * (16 / int(sizeof(T))), reinterpret_cast<const uint4*>(raw)[c]);
  } else {
    store_from_acc<false>(tile + t * stride, stride, n_valid, v);
  }
}

// Starts the copies of a warp's tile of tile_len tokens: fill(s, t, n_valid) starts lane's
// vector of step s (tile token t, n_valid tokens), for the first n_run steps, a commit group a
// step (empty ones past n_run), so that wait_for_step's count is a constant.
template <typename Traits, typename Fill>
__device__ __forceinline__ void start_tile(int tile_len, int n_run, int lane, Fill fill) {
  const auto vector_t0 = [&](int s) { return s * Traits::kStepTokens + lane * Traits::kNElts; };
  if (tile_len >= Traits::kTileTokens) {  // every vector full: the copies with no counting
#pragma unroll
    for (int s = 0; s < Traits::kNSteps; ++s) {
      fill(s, vector_t0(s), Traits::kNElts);
      cp_async_commit();
    }
    return;
  }
#pragma unroll
  for (int s = 0; s < Traits::kNSteps; ++s) {
    if (s < n_run) fill(s, vector_t0(s), count_in(tile_len - vector_t0(s), Traits::kNElts));
    cp_async_commit();
  }
}

// Waits for the copies of the next step of the tile, steps taken in order from 0. Before step s,
// kNSteps + s groups are committed: the tile's, then an empty one a step. Step s's group is in
// once no more than the kNSteps - 1 after it are pending.
template <typename Traits> __device__ __forceinline__ void wait_for_step() {
  cp_async_wait_group<Traits::kNSteps - 1>();
  cp_async_commit();
}

// The windows of a warp's vectors as it sweeps its tile. A vector's left halo is the tail of the
// left lane's vector; lane 0's the tail of lane 31's vector of the step before, carried as words
// (at step 0 the tokens before the tile: x_at's rules, initial_states or 0 before the row).
template <typename Traits> struct LeftHalos {
  using input_t = typename Traits::input_t;
  using acc_t = typename Traits::acc_t;
  static constexpr int kNElts = Traits::kNElts;
  static constexpr int kTailElts = Traits::kTailElts, kTailWords = Traits::kTailWords;
  uint32_t carry[kTailWords];  // lane 0's left halo of the next step

  __device__ __forceinline__ LeftHalos(const CausalConv1dFwdParams& params, int64_t b, int64_t d,
                                       int64_t tile_t0) {
    alignas(4) input_t before[kTailElts];
#pragma unroll
    for (int i = 0; i < kTailElts; ++i)
      before[i] = from_acc<input_t>(x_at<input_t>(params, b, d, tile_t0 - kTailElts + i));
    memcpy(carry, before, sizeof(carry));
  }

  // The window of lane's vector xv of the next step: tokens [t - kHalo, t + kNElts) in acc_t.
  // The whole warp calls it (shuffles).
  __device__ __forceinline__ void window(int lane, const input_t (&xv)[kNElts],
                                         acc_t (&xw)[kHalo + kNElts]) {
    // The words of the last kTailElts elements, from the left lane (shuffled as 32-bit words, so
    // that 16-bit types take 2 shuffles for the 3 halo tokens).
    uint32_t left[kTailWords];
    memcpy(left, &xv[kNElts - kTailElts], sizeof(left));
#pragma unroll
    for (int i = 0; i < kTailWords; ++i)
      left[i] = __shfl_sync(kFullMask, left[i], (lane + 31) % 32);
#pragma unroll
    for (int i = 0; i < kTailWords; ++i) {
      const uint32_t own = lane == 0 ? carry[i] : left[i];
      carry[i] = left[i];  // lane 0's: lane 31's tail, the halo of its next vector
      left[i] = own;
    }
    alignas(4) input_t halo[kTailElts];
    memcpy(halo, left, sizeof(halo));
#pragma unroll
    for (int i = 0; i < kHalo; ++i) xw[i] = to_acc(halo[kTailElts - kHalo + i]);
#pragma unroll
    for (int e = 0; e < kNElts; ++e) xw[kHalo + e] = to_acc(xv[e]);
  }
};

// x' at token t for kN channels [c0, c0 + n_channels) of batch row b: vectorized where t is a
// token of x, x_at's rules elsewhere.
template <bool kVectorized, int kN, typename input_t, typename acc_t>
__device__ __forceinline__ void load_x_token(const CausalConv1dFwdParams& params, int64_t b,
                                             int64_t c0, int n_channels, int64_t t,
                                             acc_t (&v)[kN]) {
  if (t >= 0 && t < params.seqlen) {
    load_as_acc<kVectorized>(static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
                                 t * params.x_seqlen_stride + c0 * params.x_dim_stride,
                             params.x_dim_stride, n_channels, v);
    return;
  }
#pragma unroll
  for (int i = 0; i < kN; ++i)
    v[i] = i < n_channels ? x_at<input_t>(params, b, c0 + i, t) : acc_t(0);
}

}  // namespace causal_conv1d_cuda
}  // namespace mamba_ext
