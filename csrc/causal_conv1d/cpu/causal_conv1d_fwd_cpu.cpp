// CPU forward of the causal depthwise conv1d. One task is a tile of (batch row, 16 channels,
// 256 tokens); tiles are independent, so they run in parallel in any order.
#include <ATen/Parallel.h>

#include "causal_conv1d/cpu/causal_conv1d_tile.h"

namespace mamba_ext {
namespace {

template <typename input_t>
void write_final_states(const CausalConv1dFwdParams& params) {
  const int64_t nstate = params.width - 1;
  at::parallel_for(0, params.batch * params.dim, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / params.dim, d = row % params.dim;
      input_t* final_states = static_cast<input_t*>(params.final_states) +
                              b * params.final_states_batch_stride +
                              d * params.final_states_dim_stride;
      for (int64_t k = 0; k < nstate; ++k) {
        final_states[k * params.final_states_width_stride] =
            causal_conv1d_cpu::final_state_kept(params, b, k)
                ? causal_conv1d_cpu::padded_x<input_t>(params, b, d, params.seqlen + k)
                : input_t(0);
      }
    }
  });
}

}  // namespace

template <typename input_t>
void causal_conv1d_fwd_cpu(const CausalConv1dFwdParams& params) {
  using namespace causal_conv1d_cpu;
  using acc_t = acc_type<input_t>;
  const int64_t dim_tiles = ceil_div(params.dim, kTileDim);
  const int64_t time_tiles = ceil_div(params.seqlen, kTileTokens);
  const int64_t ntiles = params.batch * dim_tiles * time_tiles;
  at::parallel_for(0, ntiles, kGrainTiles, [&](int64_t begin, int64_t end) {
    TokenTile<input_t> tile(kTileTokens, params.width);
    std::vector<acc_t> out_tile(kTileDim * kTileTokens);  // (channels, tokens)
    const bool out_channels_inner = channels_inner(params.out_dim_stride, params.out_seqlen_stride);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t0 = task % time_tiles * kTileTokens;
      const int64_t d0 = task / time_tiles % dim_tiles * kTileDim;
      const int64_t b = task / (time_tiles * dim_tiles);
      tile.load(params, b, d0, t0, std::min(kTileTokens, params.seqlen - t0));
      for (int64_t i = 0; i < tile.ndim; ++i) {
        acc_t* z = out_tile.data() + i * kTileTokens;
        tile.preactivation(params, i, z);
        if (params.silu)
          for (int64_t j = 0; j < tile.ntok; ++j) z[j] *= sigmoid_vectorizable(z[j]);
        for (int64_t j = 0; j < tile.ntok; ++j) z[j] = tile.valid[j] ? z[j] : acc_t(0);
      }
      const Strided2d<input_t> out{static_cast<input_t*>(params.out) +
                                       b * params.out_batch_stride + d0 * params.out_dim_stride +
                                       t0 * params.out_seqlen_stride,
                                   params.out_dim_stride, params.out_seqlen_stride};
      copy_block(out, Strided2d<const acc_t>{out_tile.data(), kTileTokens, 1}, tile.ndim,
                 tile.ntok, out_channels_inner);
    }
  });
  if (params.final_states != nullptr) write_final_states<input_t>(params);
}

template void causal_conv1d_fwd_cpu<float>(const CausalConv1dFwdParams&);
template void causal_conv1d_fwd_cpu<double>(const CausalConv1dFwdParams&);
template void causal_conv1d_fwd_cpu<c10::Half>(const CausalConv1dFwdParams&);
template void causal_conv1d_fwd_cpu<c10::BFloat16>(const CausalConv1dFwdParams&);

}  // namespace mamba_ext
