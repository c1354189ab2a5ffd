// CUDA decode update of the causal depthwise conv1d (causal_conv1d.h describes the linear and the
// circular state). Latency-bound (a batch of one is dim threads): one launch, one thread per
// (batch entry, channel), a warp's channels of one batch entry reading and writing their state
// rows side by side, with no division to find them.
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

// The one-token decode step with a linear state of at most kMaxWidth entries (the usual case),
// at large batches: a thread takes kUpdateRows batch entries of its channel and loads all of their
// states before it computes any, so that kUpdateRows times the bytes are in flight. On an H100 at
// d4096 bf16 this took a batch of 256 (1M rows of 6 bytes of state) from 24.6 to 21.1 us, but
// slowed batches of 1 and 64 (5.95 to 6.37 us, 10.5 to 12.2 us: a quarter of the threads, and
// in one kernel with the general path it cost that path registers): its own kernel, from
// kUpdateRowsMinRows rows on.
constexpr int kUpdateRows = 4;
constexpr int64_t kUpdateRowsMinRows = int64_t(1) << 20;

inline bool one_token_rows(const CausalConv1dUpdateParams& params) {
  return params.cache_seqlens == nullptr && params.seqlen == 1 &&
         params.state_len <= kMaxWidth && params.batch * params.dim >= kUpdateRowsMinRows;
}

template <typename input_t>
__device__ __forceinline__ void update_one_token_rows(const CausalConv1dUpdateParams& params,
                                                      int64_t b0, int64_t d) {
  using acc_t = acc_type<input_t>;
  const int state_len = static_cast<int>(params.state_len);
  const int64_t state_stride = params.conv_state_len_stride;
  Taps<acc_t> taps;
  taps.load(params, d);
  input_t* states[kUpdateRows] = {};   // nullptr: no state (past the batch, or a skipped row)
  input_t state[kUpdateRows][kMaxWidth];  // (rows, entries), as loaded
  input_t token[kUpdateRows];
#pragma unroll
  for (int r = 0; r < kUpdateRows; ++r) {
    const int64_t b = b0 + r;
    if (b >= params.batch) break;
    const int64_t row = params.conv_state_indices == nullptr ? b : params.conv_state_indices[b];
    token[r] = static_cast<const input_t*>(params.x)[b * params.x_batch_stride +
                                                      d * params.x_dim_stride];
    if (row < 0 || row >= params.state_batch) continue;
    states[r] = static_cast<input_t*>(params.conv_state) + row * params.conv_state_batch_stride +
                d * params.conv_state_dim_stride;
#pragma unroll
    for (int s = 0; s < kMaxWidth; ++s)
      if (s < state_len) state[r][s] = states[r][s * state_stride];
  }
#pragma unroll
  for (int r = 0; r < kUpdateRows; ++r) {
    const int64_t b = b0 + r;
    if (b >= params.batch) break;
    acc_t z = 0;
    if (states[r] != nullptr) {
      // Taps before the token read the state's last kHalo entries (those of the width).
      acc_t window[kMaxWidth] = {};
#pragma unroll
      for (int k = 0; k < kHalo; ++k) {
#pragma unroll
        for (int s = 0; s < kMaxWidth; ++s)
          if (s == state_len - kHalo + k && k >= taps.first) window[k] = to_acc(state[r][s]);
      }
      window[kHalo] = to_acc(token[r]);
      z = taps.conv(window, taps.width_bits);
      z = params.silu ? activate<true>(z) : z;
#pragma unroll
      for (int s = 0; s < kMaxWidth; ++s)
        if (s < state_len)
          states[r][s * state_stride] = s + 1 < state_len ? state[r][s + 1] : token[r];
    }
    static_cast<input_t*>(params.out)[b * params.out_batch_stride + d * params.out_dim_stride] =
        from_acc<input_t>(z);
  }
}

// Grid: (channel blocks, batch entries); past 65535 batch entries a block takes several.
template <typename input_t>
__global__ void __launch_bounds__(kUpdateThreads)
    causal_conv1d_update_kernel(const CausalConv1dUpdateParams params) {
  const int64_t d = int64_t(blockIdx.x) * kUpdateThreads + threadIdx.x;
  if (d >= params.dim) return;
  for (int64_t b = blockIdx.y; b < params.batch; b += gridDim.y) update_row<input_t>(params, b, d);
}

// Grid: (channel blocks, groups of kUpdateRows batch entries), as causal_conv1d_update_kernel.
template <typename input_t>
__global__ void __launch_bounds__(kUpdateThreads)
    causal_conv1d_update_rows_kernel(const CausalConv1dUpdateParams params) {
  const int64_t d = int64_t(blockIdx.x) * kUpdateThreads + threadIdx.x;
  if (d >= params.dim) return;
  for (int64_t b0 = int64_t(blockIdx.y) * kUpdateRows; b0 < params.batch;
       b0 += int64_t(gridDim.y) * kUpdateRows)
    update_one_token_rows<input_t>(params, b0, d);
}

}  // namespace causal_conv1d_cuda

template <typename input_t>
cudaError_t causal_conv1d_update_cuda(const CausalConv1dUpdateParams& params,
                                      cudaStream_t stream) {
  using namespace causal_conv1d_cuda;
  if (params.batch == 0 || params.dim == 0) return cudaSuccess;
  const int64_t channel_blocks = ceil_div(params.dim, kUpdateThreads);
  if (channel_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const bool rows = one_token_rows(params);
  const int64_t row_groups = ceil_div(params.batch, rows ? kUpdateRows : 1);
  const dim3 grid(static_cast<unsigned>(channel_blocks),
                  static_cast<unsigned>(row_groups < 65535 ? row_groups : 65535));
  if (rows) {
    causal_conv1d_update_rows_kernel<input_t><<<grid, kUpdateThreads, 0, stream>>>(params);
  } else {
    causal_conv1d_update_kernel<input_t><<<grid, kUpdateThreads, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace mamba_ext
