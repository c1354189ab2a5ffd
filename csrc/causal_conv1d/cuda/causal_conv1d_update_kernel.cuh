// CUDA decode update of the causal depthwise conv1d (causal_conv1d.h describes the linear and the
// circular state). Latency-bound: one launch. The general kernel runs a thread per (batch entry,
// channel), a warp's channels of one batch entry reading and writing their state rows side by
// side; the usual one-token step on contiguous tensors takes a vectorized kernel.
#pragma once

#include "causal_conv1d/cuda/causal_conv1d_common.cuh"

namespace mamba_ext {
namespace causal_conv1d_cuda {

constexpr int kUpdateThreads = 128;

// a mod n in [0, n) for any sign of a, as torch.remainder.
__device__ __forceinline__ int64_t floor_mod(int64_t a, int64_t n) { return ((a % n) + n) % n; }

// One (batch entry, channel) row of a thread: a warp's channels of one batch entry side by side.
template <typename input_t>
__device__ __forceinline__ void update_row(const CausalConv1dUpdateParams& params, int64_t b,
                                           int64_t d) {
  using acc_t = acc_type<input_t>;
  const input_t* x = static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
                     d * params.x_dim_stride;
  input_t* out = static_cast<input_t*>(params.out) + b * params.out_batch_stride +
                 d * params.out_dim_stride;
  const int64_t state_row =
      params.conv_state_indices == nullptr ? b : params.conv_state_indices[b];
  if (state_row < 0 || state_row >= params.state_batch) {
    // No state to read or write (a padding slot, or an index the host could not check).
    for (int64_t j = 0; j < params.seqlen; ++j)
      out[j * params.out_seqlen_stride] = from_acc<input_t>(acc_t(0));
    return;
  }
  input_t* state = static_cast<input_t*>(params.conv_state) +
                   state_row * params.conv_state_batch_stride + d * params.conv_state_dim_stride;
  const int64_t state_stride = params.conv_state_len_stride, state_len = params.state_len;
  Taps<acc_t> taps;
  taps.load(params, d);
  acc_t window[kMaxWidth];  // x' at the taps of the token; the token itself last
  const auto out_of_window = [&] {
    const acc_t z = taps.conv(window, taps.width_bits);
    return from_acc<input_t>(params.silu ? activate<true>(z) : z);
  };

  if (params.cache_seqlens != nullptr) {
    // Token j goes to slot start + j and reads the kHalo slots before it, which hold older
    // state or the tokens just written (state_len >= width - 1: no slot a tap of the width reads
    // is overwritten before it is read).
    const int64_t start = params.cache_seqlens[b];
    for (int64_t j = 0; j < params.seqlen; ++j) {
#pragma unroll
      for (int k = 0; k < kHalo; ++k) {
        window[k] = k >= taps.first ? to_acc(state[floor_mod(start + j - kHalo + k, state_len) *
                                                   state_stride])
                                    : acc_t(0);
      }
      const input_t token = x[j * params.x_seqlen_stride];
      window[kHalo] = to_acc(token);
      state[floor_mod(start + j, state_len) * state_stride] = token;
      out[j * params.out_seqlen_stride] = out_of_window();
    }
    return;
  }
  // Linear state: the window starts on the state's last kHalo entries (those of the width) and
  // slides over x; then the state drops its seqlen oldest entries and appends x.
#pragma unroll
  for (int k = 0; k < kHalo; ++k) {
    window[k] = k >= taps.first ? to_acc(state[(state_len - kHalo + k) * state_stride])
                                : acc_t(0);
  }
  for (int64_t j = 0; j < params.seqlen; ++j) {
    window[kHalo] = to_acc(x[j * params.x_seqlen_stride]);
    out[j * params.out_seqlen_stride] = out_of_window();
#pragma unroll
    for (int k = 0; k < kHalo; ++k) window[k] = window[k + 1];
  }
  const int64_t kept = state_len > params.seqlen ? state_len - params.seqlen : 0;
  for (int64_t s = 0; s < kept; ++s)
    state[s * state_stride] = state[(s + params.seqlen) * state_stride];
  for (int64_t s = kept; s < state_len; ++s)
    state[s * state_stride] = x[(s - state_len + params.seqlen) * params.x_seqlen_stride];
}

// Grid: (channel blocks, batch entries); past 65535 batch entries a block takes several.
template <typename input_t>
__global__ void __launch_bounds__(kUpdateThreads)
    causal_conv1d_update_kernel(const CausalConv1dUpdateParams params) {
  const int64_t d = int64_t(blockIdx.x) * kUpdateThreads + threadIdx.x;
  if (d >= params.dim) return;
  for (int64_t b = blockIdx.y; b < params.batch; b += gridDim.y) update_row<input_t>(params, b, d);
}

// The one-token decode step with a linear state of at most kMaxWidth entries (the usual case)
// when every tensor is contiguous over channels and 16-byte aligned. A thread owns kGroup channels
// (16 bytes of x and of out) of up to kUpdateMaxRows batch entries; the group's state rows of
// kStateLen entries lie back to back, kStateLen 16-byte chunks, and its weight rows, width taps
// each, too. The kernel is memory-latency bound (load, compute, store, nothing else), so a thread
// issues all of its loads (indices, weights, bias, x, state: 16-byte vectors) before it uses any:
// one round trip to memory, two with conv_state_indices (a state row's address needs its index).
constexpr int kUpdateVecThreads = 64;  // small blocks: a batch of one still spans several SMs
constexpr int kUpdateMaxRows = 4;
// Batch entries a thread takes: enough that about this many threads cover the batch (~250 an
// H100 multiprocessor, all resident at the kernel's 80-160 registers). At d4096 bf16 a batch of
// 64 is one entry a thread, 256 four: a thread's 160 bytes of weights and bias (L2 hits after the
// first), read once for four entries, then cost a quarter of the L2 traffic.
constexpr int64_t kUpdateVecFlightThreads = 32768;

template <typename input_t> struct UpdateVecTraits {
  using acc_t = acc_type<input_t>;
  static constexpr int kGroup = 16 / int(sizeof(input_t));  // channels of a thread
  // 16-byte chunks of kGroup values in acc_t: a group's bias, or one tap of its weights.
  static constexpr int kAccChunks = kGroup * int(sizeof(acc_t)) / 16;
  static_assert(kAccChunks * 16 == kGroup * int(sizeof(acc_t)), "acc_t runs must be chunks");
};

inline bool aligned_16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename input_t> bool update_vectorizable(const CausalConv1dUpdateParams& params) {
  using Traits = UpdateVecTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  constexpr int kGroup = Traits::kGroup;
  // kGroup channels' rows of state, weight and bias start 16-byte aligned: kGroup * state_len
  // elements are 16 * state_len bytes, kGroup acc_t values are whole chunks.
  return params.cache_seqlens == nullptr && params.seqlen == 1 &&
         params.state_len <= kMaxWidth && params.dim % kGroup == 0 &&
         vectors_aligned<input_t, kGroup>(params.x, params.x_dim_stride, params.x_batch_stride,
                                          0) &&
         vectors_aligned<input_t, kGroup>(params.out, params.out_dim_stride,
                                          params.out_batch_stride, 0) &&
         params.conv_state_len_stride == 1 &&
         params.conv_state_dim_stride == params.state_len &&
         vectors_aligned<input_t, kGroup>(params.conv_state, 1, params.conv_state_batch_stride,
                                          0) &&
         params.weight_width_stride == 1 && params.weight_dim_stride == params.width &&
         aligned_16(params.weight) &&
         (params.bias == nullptr || (params.bias_stride == 1 && aligned_16(params.bias)));
}

// The taps of channel c of a group whose weight rows of `width` taps lie back to back: width, a
// runtime value, picks one of the compile-time slices, so that the rows stay in registers.
template <int kGroup, typename acc_t>
__device__ __forceinline__ Taps<acc_t> group_taps(const acc_t (&weights)[kGroup * kMaxWidth],
                                                  const acc_t (&bias)[kGroup], int width, int c) {
  Taps<acc_t> taps;
  taps.set_width(width);
  taps.bias = bias[c];
#pragma unroll
  for (int w = 2; w <= kMaxWidth; ++w) {
    if (w != width) continue;
#pragma unroll
    for (int k = 0; k < kMaxWidth; ++k) {
      const int tap = k - (kMaxWidth - w);
      taps.w[k] = tap >= 0 ? weights[c * w + (tap >= 0 ? tap : 0)] : acc_t(0);
    }
  }
  return taps;
}

template <typename T, int N>
__device__ __forceinline__ void store_chunks_16(T* p, const T (&values)[N]) {
  static_assert(N * int(sizeof(T)) % 16 == 0, "a run must be whole 16-byte chunks");
#pragma unroll
  for (int i = 0; i < N * int(sizeof(T)) / 16; ++i)
    store_global_16(reinterpret_cast<uint4*>(p) + i, reinterpret_cast<const uint4*>(values)[i]);
}

// Grid: flat, (row groups, channel blocks) row-major; a thread: kGroup channels of
// rows_per_thread (<= kUpdateMaxRows) batch entries.
template <typename input_t, int kStateLen>
__global__ void __launch_bounds__(kUpdateVecThreads)
    causal_conv1d_update_vec_kernel(const CausalConv1dUpdateParams params, int rows_per_thread) {
  using Traits = UpdateVecTraits<input_t>;
  using acc_t = typename Traits::acc_t;
  constexpr int kGroup = Traits::kGroup, kRows = kUpdateMaxRows;
  constexpr int kRun = kGroup * kStateLen;  // a group's state entries, channel-major
  const unsigned channel_blocks =
      static_cast<unsigned>(ceil_div(params.dim / kGroup, kUpdateVecThreads));
  const int64_t d0 = (int64_t(blockIdx.x % channel_blocks) * kUpdateVecThreads + threadIdx.x) *
                     kGroup;
  const int64_t b0 = int64_t(blockIdx.x / channel_blocks) * rows_per_thread;
  if (d0 >= params.dim) return;
  const int rows = count_in(params.batch - b0, rows_per_thread);

  // Loads, all before any use; the indices first, since the state loads wait for them.
  int64_t state_row[kRows];  // -1: no row (past the batch), or one to skip
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    state_row[r] = r >= rows                              ? -1
                   : params.conv_state_indices == nullptr ? b0 + r
                                                          : params.conv_state_indices[b0 + r];
  }
  const int width = static_cast<int>(params.width);
  alignas(16) acc_t weights[kGroup * kMaxWidth] = {};  // rows of width taps, back to back
  const acc_t* weight = static_cast<const acc_t*>(params.weight) + d0 * params.weight_dim_stride;
#pragma unroll
  for (int i = 0; i < kMaxWidth * Traits::kAccChunks; ++i) {
    if (i < width * Traits::kAccChunks)
      reinterpret_cast<uint4*>(weights)[i] = reinterpret_cast<const uint4*>(weight)[i];
  }
  alignas(16) acc_t bias[kGroup] = {};
  if (params.bias != nullptr)
    load_raw<true>(static_cast<const acc_t*>(params.bias) + d0, 1, kGroup, bias);
  alignas(16) input_t tokens[kRows][kGroup];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r < rows)
      load_raw<true>(static_cast<const input_t*>(params.x) + (b0 + r) * params.x_batch_stride + d0,
                     1, kGroup, tokens[r]);
  }
  input_t* states[kRows];
  alignas(16) input_t state[kRows][kRun];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const bool has_state = state_row[r] >= 0 && state_row[r] < params.state_batch;
    states[r] = has_state ? static_cast<input_t*>(params.conv_state) +
                                state_row[r] * params.conv_state_batch_stride + d0 * kStateLen
                          : nullptr;
    if (has_state) load_raw<true>(states[r], 1, kRun, state[r]);
  }
  // Without it ptxas sinks some rows' loads below the compute of the first (to save registers):
  // a second round trip. The fence (MEMBAR.ALL.CTA) waits for the loads, as the first use would.
  asm volatile("fence.acq_rel.cta;" ::: "memory");

  Taps<acc_t> taps[kGroup];  // unpacked once for all rows
#pragma unroll
  for (int c = 0; c < kGroup; ++c) taps[c] = group_taps<kGroup>(weights, bias, width, c);

  // The activation as a branch over all rows, not one per channel.
  const auto compute_and_store = [&](auto silu) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      alignas(16) input_t out[kGroup];
      alignas(16) input_t new_state[kRun];  // each channel's entries shifted left, token last
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
        // Taps before the token read the state's last kHalo entries (state_len >= width - 1:
        // an entry before the row is a tap that is off).
        acc_t window[kMaxWidth];
#pragma unroll
        for (int k = 0; k < kHalo; ++k) {
          const int s = kStateLen - kHalo + k;
          window[k] = s >= 0 && k >= taps[c].first
                          ? to_acc(state[r][c * kStateLen + (s >= 0 ? s : 0)])
                          : acc_t(0);
        }
        window[kHalo] = to_acc(tokens[r][c]);
        const acc_t z = activate<decltype(silu)::value>(taps[c].conv(window, taps[c].width_bits));
        out[c] = from_acc<input_t>(states[r] == nullptr ? acc_t(0) : z);
#pragma unroll
        for (int s = 0; s < kStateLen; ++s)
          new_state[c * kStateLen + s] =
              s + 1 < kStateLen ? state[r][c * kStateLen + s + 1] : tokens[r][c];
      }
      store_chunks_16(
          static_cast<input_t*>(params.out) + (b0 + r) * params.out_batch_stride + d0, out);
      if (states[r] != nullptr) store_chunks_16(states[r], new_state);
    }
  };
  if (params.silu) {
    compute_and_store(std::true_type{});
  } else {
    compute_and_store(std::false_type{});
  }
}

}  // namespace causal_conv1d_cuda

namespace causal_conv1d_cuda {

// Launches causal_conv1d_update_vec_kernel with the state length as a constant (1..kMaxWidth).
template <typename input_t, int kStateLen = 1>
cudaError_t launch_update_vec(const CausalConv1dUpdateParams& params, cudaStream_t stream) {
  if constexpr (kStateLen < kMaxWidth) {
    if (params.state_len > kStateLen)
      return launch_update_vec<input_t, kStateLen + 1>(params, stream);
  }
  const int64_t groups = params.dim / UpdateVecTraits<input_t>::kGroup;
  int rows_per_thread = 1;
  while (rows_per_thread < kUpdateMaxRows &&
         ceil_div(params.batch, rows_per_thread) * groups > kUpdateVecFlightThreads)
    rows_per_thread *= 2;
  const int64_t blocks =
      ceil_div(params.batch, rows_per_thread) * ceil_div(groups, kUpdateVecThreads);
  return launch_blocks(blocks, kUpdateVecThreads, stream,
                       causal_conv1d_update_vec_kernel<input_t, kStateLen>, params,
                       rows_per_thread);
}

}  // namespace causal_conv1d_cuda

template <typename input_t>
cudaError_t causal_conv1d_update_cuda(const CausalConv1dUpdateParams& params,
                                      cudaStream_t stream) {
  using namespace causal_conv1d_cuda;
  if (params.batch == 0 || params.dim == 0) return cudaSuccess;
  if (update_vectorizable<input_t>(params)) return launch_update_vec<input_t>(params, stream);
  const int64_t channel_blocks = ceil_div(params.dim, kUpdateThreads);
  if (channel_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(channel_blocks),
                  static_cast<unsigned>(params.batch < 65535 ? params.batch : 65535));
  causal_conv1d_update_kernel<input_t><<<grid, kUpdateThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace mamba_ext
