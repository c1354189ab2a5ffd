// Params of the causal depthwise conv1d ops: plain data, no torch includes, so that kernels see
// only this file and plain C++ types.
//
// Padded time: x' = concat(initial_states or 0, x) along time and seq' = concat(seq_idx[:, 0]
// repeated width - 1 times, seq_idx), so token t reads x'[t .. t + width - 1] and
//   out[b, d, t] = act(bias[d] + sum_k weight[d, k] x'[b, d, t + k] [seq'[b, t + k] == seq[b, t]])
// for tokens with seq[b, t] >= 0, and 0 for padding tokens (seq[b, t] == -1).
#pragma once

#include <cstdint>

#ifdef MAMBA_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace mamba_ext {

struct CausalConv1dFwdParams {
  // Sizes.
  int64_t batch, dim, seqlen, width;  // width in 2..4
  // Strides in elements (int64: products of sizes overflow int32).
  int64_t x_batch_stride, x_dim_stride, x_seqlen_stride;
  int64_t weight_dim_stride, weight_width_stride;
  int64_t bias_stride;
  int64_t seq_idx_batch_stride, seq_idx_seqlen_stride;
  int64_t initial_states_batch_stride, initial_states_dim_stride, initial_states_width_stride;
  int64_t out_batch_stride, out_dim_stride, out_seqlen_stride;
  int64_t final_states_batch_stride, final_states_dim_stride, final_states_width_stride;
  // Pointers, with the shape they point to. weight and bias hold acc_type<input_t> (the host
  // converts them: they are tiny); the other floating tensors hold input_t.
  const void* x;               // (batch, dim, seqlen)
  const void* weight;          // (dim, width)
  const void* bias;            // (dim,), or nullptr
  const int32_t* seq_idx;      // (batch, seqlen), or nullptr: one sequence per row
  const void* initial_states;  // (batch, dim, width - 1), or nullptr: zeros
  void* out;                   // (batch, dim, seqlen); unused by the backward
  // final_states[b, d, k] = x'[b, d, seqlen + k] where that position belongs to the sequence of
  // the last token (and the last token is not padding), else 0.
  void* final_states;  // (batch, dim, width - 1), or nullptr: not wanted
  // Flags.
  bool silu;
};

struct CausalConv1dBwdParams : CausalConv1dFwdParams {
  // Strides in elements.
  int64_t dout_batch_stride, dout_dim_stride, dout_seqlen_stride;
  int64_t dfinal_states_batch_stride, dfinal_states_dim_stride, dfinal_states_width_stride;
  int64_t dx_batch_stride, dx_dim_stride, dx_seqlen_stride;
  int64_t dinitial_states_batch_stride, dinitial_states_dim_stride, dinitial_states_width_stride;
  // Pointers. dweight and dbias are contiguous and hold acc_type<input_t>.
  const void* dout;           // (batch, dim, seqlen)
  const void* dfinal_states;  // (batch, dim, width - 1), or nullptr: no gradient
  void* dx;                   // (batch, dim, seqlen)
  void* dweight;              // (dim, width)
  void* dbias;                // (dim,), or nullptr: no bias
  void* dinitial_states;      // (batch, dim, width - 1), or nullptr: no initial_states
  // CUDA only: scratch of per-block partial sums of dweight and dbias, contiguous
  // acc_type<input_t>; causal_conv1d_cuda_partial_rows says how many rows.
  void* dweight_partials;  // (partial_rows, dim, kCausalConv1dCudaPartialSums)
};

// Decode: each new token of x is convolved with the width - 1 state entries before it, then
// written into the state. Linear state (cache_seqlens == nullptr): the newest entry is last and
// the state shifts left by one per token. Circular state: token j of batch entry b is written at
// (cache_seqlens[b] + j) mod state_len and reads the width - 1 entries before that, circularly.
struct CausalConv1dUpdateParams {
  // Sizes.
  int64_t batch, dim, seqlen, width, state_batch, state_len;
  // Strides in elements.
  int64_t x_batch_stride, x_dim_stride, x_seqlen_stride;
  int64_t conv_state_batch_stride, conv_state_dim_stride, conv_state_len_stride;
  int64_t weight_dim_stride, weight_width_stride;
  int64_t bias_stride;
  int64_t out_batch_stride, out_dim_stride, out_seqlen_stride;
  // Pointers; weight and bias hold acc_type<input_t>, x, conv_state and out hold input_t.
  const void* x;                      // (batch, dim, seqlen)
  void* conv_state;                   // (state_batch, dim, state_len), updated in place
  const void* weight;                 // (dim, width)
  const void* bias;                   // (dim,), or nullptr
  const int32_t* cache_seqlens;       // (batch,), or nullptr: linear state
  const int32_t* conv_state_indices;  // (batch,) in [0, state_batch), or nullptr: row b
  void* out;                          // (batch, dim, seqlen)
  // Flags.
  bool silu;
};

template <typename input_t> void causal_conv1d_fwd_cpu(const CausalConv1dFwdParams& params);
template <typename input_t> void causal_conv1d_bwd_cpu(const CausalConv1dBwdParams& params);
template <typename input_t> void causal_conv1d_update_cpu(const CausalConv1dUpdateParams& params);

#ifdef MAMBA_EXT_WITH_CUDA
// Which CUDA kernel runs: the channel-last one (threads along channels, a window sliding over
// tokens) when x's channels are closer in memory than its tokens, the contiguous one (threads
// along tokens) otherwise.
inline bool causal_conv1d_cuda_channels_inner(const CausalConv1dFwdParams& params) {
  const int64_t dim_stride = params.x_dim_stride < 0 ? -params.x_dim_stride : params.x_dim_stride;
  const int64_t seqlen_stride =
      params.x_seqlen_stride < 0 ? -params.x_seqlen_stride : params.x_seqlen_stride;
  return dim_stride < seqlen_stride;
}

// The contiguous kernels' warps take tiles of kCausalConv1dCudaTileBytes of x of a row (4096
// bytes: 2048 bf16 tokens). The backward's blocks sum dweight and dbias over tiles of tokens of
// one batch row: those of the contiguous kernel, of
// kCausalConv1dCudaBwdTileTokensChannelsInner tokens for the channel-last one. A tile's sums
// of a channel: the 4 taps of the weights padded to 4 (leading zeros), then the bias.
constexpr int64_t kCausalConv1dCudaTileBytes = 4096;
constexpr int64_t kCausalConv1dCudaBwdTileTokensChannelsInner = 512;
constexpr int64_t kCausalConv1dCudaPartialSums = 5;

// Rows of dweight_partials for x of element_size bytes: one per (batch row, tile). A second
// kernel adds them in a fixed order, so dweight and dbias are the same from run to run (no
// float atomics).
inline int64_t causal_conv1d_cuda_partial_rows(const CausalConv1dFwdParams& params,
                                               int64_t element_size) {
  const int64_t tile = causal_conv1d_cuda_channels_inner(params)
                           ? kCausalConv1dCudaBwdTileTokensChannelsInner
                           : kCausalConv1dCudaTileBytes / element_size;
  return params.batch * ((params.seqlen + tile - 1) / tile);
}

// input_t is float, double, __half or __nv_bfloat16. Each returns the launch error, if any
// (cudaGetLastError after its launches), for the host to raise.
template <typename input_t>
cudaError_t causal_conv1d_fwd_cuda(const CausalConv1dFwdParams& params, cudaStream_t stream);
template <typename input_t>
cudaError_t causal_conv1d_bwd_cuda(const CausalConv1dBwdParams& params, cudaStream_t stream);
// conv_state_indices cannot be range-checked on the host without a device sync: an entry outside
// [0, state_batch) leaves conv_state untouched and gets out = 0 (vLLM's padding slot, -1, too).
template <typename input_t>
cudaError_t causal_conv1d_update_cuda(const CausalConv1dUpdateParams& params,
                                      cudaStream_t stream);
#endif

}  // namespace mamba_ext
