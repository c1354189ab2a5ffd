// CPU decode update of the causal depthwise conv1d (causal_conv1d.h describes the linear and
// the circular state). Each (batch entry, channel) owns one state row, so a task is one batch
// entry and a block of channels; within it, tokens run in order and channels innermost, so that
// the activation of a token runs as one loop over the block.
#include <ATen/Parallel.h>

#include <algorithm>

#include "causal_conv1d/cpu/causal_conv1d_tile.h"

namespace mamba_ext {
namespace {

constexpr int64_t kChannelsPerTask = 256;

// a mod n in [0, n) for any sign of a, as torch.remainder.
inline int64_t floor_mod(int64_t a, int64_t n) { return ((a % n) + n) % n; }

// The tokens of batch entry b for the channels [d0, d0 + ndim).
template <typename input_t>
void update_block(const CausalConv1dUpdateParams& params, int64_t b, int64_t d0, int64_t ndim) {
  using acc_t = acc_type<input_t>;
  const int64_t width = params.width, seqlen = params.seqlen, state_len = params.state_len;
  const int64_t state_row =
      params.conv_state_indices == nullptr ? b : params.conv_state_indices[b];
  input_t* state = static_cast<input_t*>(params.conv_state) +
                   state_row * params.conv_state_batch_stride + d0 * params.conv_state_dim_stride;
  const input_t* x = static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
                     d0 * params.x_dim_stride;
  input_t* out = static_cast<input_t*>(params.out) + b * params.out_batch_stride +
                 d0 * params.out_dim_stride;
  const acc_t* weight = static_cast<const acc_t*>(params.weight) + d0 * params.weight_dim_stride;
  const acc_t* bias = static_cast<const acc_t*>(params.bias);
  const auto state_at = [&](int64_t i, int64_t slot) -> input_t& {
    return state[i * params.conv_state_dim_stride + slot * params.conv_state_len_stride];
  };
  const auto x_at = [&](int64_t i, int64_t j) {
    return x[i * params.x_dim_stride + j * params.x_seqlen_stride];
  };
  const auto tap = [&](int64_t i, int64_t k) {
    return weight[i * params.weight_dim_stride + k * params.weight_width_stride];
  };
  acc_t z[kChannelsPerTask];

  for (int64_t j = 0; j < seqlen; ++j) {
    for (int64_t i = 0; i < ndim; ++i) {
      z[i] = (bias == nullptr ? acc_t(0) : bias[(d0 + i) * params.bias_stride]) +
             tap(i, width - 1) * static_cast<acc_t>(x_at(i, j));
    }
    if (params.cache_seqlens != nullptr) {
      // Token j goes to slot start + j and reads the width - 1 slots before it: older state or
      // the tokens just written (state_len >= width - 1, so no slot is overwritten before the
      // tokens that read it have run).
      const int64_t slot = params.cache_seqlens[b] + j;
      for (int64_t k = 0; k + 1 < width; ++k) {
        const int64_t read = floor_mod(slot - (width - 1) + k, state_len);
        for (int64_t i = 0; i < ndim; ++i)
          z[i] += tap(i, k) * static_cast<acc_t>(state_at(i, read));
      }
      const int64_t write = floor_mod(slot, state_len);
      for (int64_t i = 0; i < ndim; ++i) state_at(i, write) = x_at(i, j);
    } else {
      // Linear state, shifted after all tokens: token j reads (the last width - 1 state
      // entries, x)[j .. j + width - 2] before its own token.
      for (int64_t k = 0; k + 1 < width; ++k) {
        const int64_t e = j + k;  // index into (the last width - 1 state entries, x)
        for (int64_t i = 0; i < ndim; ++i) {
          const input_t v = e < width - 1 ? state_at(i, state_len - (width - 1) + e)
                                          : x_at(i, e - (width - 1));
          z[i] += tap(i, k) * static_cast<acc_t>(v);
        }
      }
    }
    if (params.silu)
      for (int64_t i = 0; i < ndim; ++i) z[i] *= causal_conv1d_cpu::sigmoid_vectorizable(z[i]);
    for (int64_t i = 0; i < ndim; ++i)
      out[i * params.out_dim_stride + j * params.out_seqlen_stride] = static_cast<input_t>(z[i]);
  }

  if (params.cache_seqlens == nullptr) {
    // The linear state drops its seqlen oldest entries and appends x.
    const int64_t kept = std::max<int64_t>(state_len - seqlen, 0);
    for (int64_t i = 0; i < ndim; ++i) {
      for (int64_t s = 0; s < kept; ++s) state_at(i, s) = state_at(i, s + seqlen);
      for (int64_t s = kept; s < state_len; ++s) state_at(i, s) = x_at(i, s - state_len + seqlen);
    }
  }
}

}  // namespace

template <typename input_t>
void causal_conv1d_update_cpu(const CausalConv1dUpdateParams& params) {
  // A thread takes at least 32768 tokens (ATen's grain for elementwise kernels), so that a
  // small decode step stays on one thread.
  const int64_t dim_blocks = (params.dim + kChannelsPerTask - 1) / kChannelsPerTask;
  const int64_t tokens_per_task = kChannelsPerTask * std::max<int64_t>(1, params.seqlen);
  const int64_t grain = std::max<int64_t>(1, 32768 / tokens_per_task);
  at::parallel_for(0, params.batch * dim_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dim_blocks;
      const int64_t d0 = task % dim_blocks * kChannelsPerTask;
      update_block<input_t>(params, b, d0, std::min(kChannelsPerTask, params.dim - d0));
    }
  });
}

template void causal_conv1d_update_cpu<float>(const CausalConv1dUpdateParams&);
template void causal_conv1d_update_cpu<double>(const CausalConv1dUpdateParams&);
template void causal_conv1d_update_cpu<c10::Half>(const CausalConv1dUpdateParams&);
template void causal_conv1d_update_cpu<c10::BFloat16>(const CausalConv1dUpdateParams&);

}  // namespace mamba_ext
