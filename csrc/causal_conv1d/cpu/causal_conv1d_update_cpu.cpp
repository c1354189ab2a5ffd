// CPU decode update of the causal depthwise conv1d (causal_conv1d.h describes the linear and
// the circular state). Each (batch entry, channel) owns one state row, so rows run in parallel.
#include <ATen/Parallel.h>

#include <algorithm>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "causal_conv1d/causal_conv1d.h"
#include "common/math.h"

namespace mamba_ext {
namespace {

// a mod n in [0, n) for any sign of a, as torch.remainder.
inline int64_t floor_mod(int64_t a, int64_t n) { return ((a % n) + n) % n; }

// One (batch entry b, channel d) row: its tokens against its state row.
template <typename input_t>
void update_row(const CausalConv1dUpdateParams& params, int64_t b, int64_t d) {
  using acc_t = acc_type<input_t>;
  const int64_t width = params.width, seqlen = params.seqlen, state_len = params.state_len;
  const int64_t state_row =
      params.conv_state_indices == nullptr ? b : params.conv_state_indices[b];
  input_t* state = static_cast<input_t*>(params.conv_state) +
                   state_row * params.conv_state_batch_stride +
                   d * params.conv_state_dim_stride;
  const int64_t state_stride = params.conv_state_len_stride;
  const input_t* x = static_cast<const input_t*>(params.x) + b * params.x_batch_stride +
                     d * params.x_dim_stride;
  input_t* out = static_cast<input_t*>(params.out) + b * params.out_batch_stride +
                 d * params.out_dim_stride;
  acc_t weight[4];
  for (int64_t k = 0; k < width; ++k)
    weight[k] = static_cast<const acc_t*>(
        params.weight)[d * params.weight_dim_stride + k * params.weight_width_stride];
  const acc_t bias = params.bias == nullptr
                         ? acc_t(0)
                         : static_cast<const acc_t*>(params.bias)[d * params.bias_stride];
  const auto activate = [&](acc_t z) { return static_cast<input_t>(params.silu ? silu(z) : z); };

  if (params.cache_seqlens != nullptr) {
    // Token j goes to slot start + j and reads the width - 1 slots before it, which hold
    // either older state or the tokens just written (state_len >= width - 1, so a slot is
    // never overwritten before the tokens that need it have read it).
    const int64_t start = params.cache_seqlens[b];
    for (int64_t j = 0; j < seqlen; ++j) {
      const input_t token = x[j * params.x_seqlen_stride];
      acc_t z = bias + weight[width - 1] * static_cast<acc_t>(token);
      for (int64_t k = 0; k + 1 < width; ++k) {
        const int64_t slot = floor_mod(start + j - (width - 1) + k, state_len);
        z += weight[k] * static_cast<acc_t>(state[slot * state_stride]);
      }
      state[floor_mod(start + j, state_len) * state_stride] = token;
      out[j * params.out_seqlen_stride] = activate(z);
    }
  } else {
    // Linear state: token j reads window[j .. j + width - 1] of window = (the last
    // width - 1 state entries, x); then the state drops its seqlen oldest entries and
    // appends x.
    input_t last[3];
    for (int64_t k = 0; k + 1 < width; ++k)
      last[k] = state[(state_len - (width - 1) + k) * state_stride];
    for (int64_t j = 0; j < seqlen; ++j) {
      acc_t z = bias;
      for (int64_t k = 0; k < width; ++k) {
        const int64_t e = j + k;
        const input_t v =
            e < width - 1 ? last[e] : x[(e - (width - 1)) * params.x_seqlen_stride];
        z += weight[k] * static_cast<acc_t>(v);
      }
      out[j * params.out_seqlen_stride] = activate(z);
    }
    const int64_t kept = std::max<int64_t>(state_len - seqlen, 0);
    for (int64_t s = 0; s < kept; ++s)
      state[s * state_stride] = state[(s + seqlen) * state_stride];
    for (int64_t s = kept; s < state_len; ++s)
      state[s * state_stride] = x[(s - state_len + seqlen) * params.x_seqlen_stride];
  }
}

}  // namespace

template <typename input_t>
void causal_conv1d_update_cpu(const CausalConv1dUpdateParams& params) {
  // A task is one batch entry and a block of channels: enough rows to amortise it, few enough
  // that a batch of one still spreads over the threads.
  constexpr int64_t kChannelsPerTask = 256;
  const int64_t dim_blocks = (params.dim + kChannelsPerTask - 1) / kChannelsPerTask;
  at::parallel_for(0, params.batch * dim_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dim_blocks;
      const int64_t d_begin = task % dim_blocks * kChannelsPerTask;
      const int64_t d_end = std::min(params.dim, d_begin + kChannelsPerTask);
      for (int64_t d = d_begin; d < d_end; ++d) update_row<input_t>(params, b, d);
    }
  });
}

template void causal_conv1d_update_cpu<float>(const CausalConv1dUpdateParams&);
template void causal_conv1d_update_cpu<double>(const CausalConv1dUpdateParams&);
template void causal_conv1d_update_cpu<c10::Half>(const CausalConv1dUpdateParams&);
template void causal_conv1d_update_cpu<c10::BFloat16>(const CausalConv1dUpdateParams&);

}  // namespace mamba_ext
