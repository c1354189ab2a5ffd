// CPU backward of the causal depthwise conv1d. With dz = dout * act'(z) on tokens that are not
// padding (0 on padding) and same_k[t] = [seq'[t + k] == seq[t]]:
//   dx'[p]        = sum_k weight[d, k] dz[p - k] same_k[p - k]  (+ dfinal_states[p - seqlen])
//   dweight[d, k] = sum_{b, t} dz[t] same_k[t] x'[t + k],   dbias[d] = sum_{b, t} dz[t]
// dx' splits into dinitial_states (p < width - 1) and dx. One task is a tile of (batch row,
// 16 channels, 256 padded positions); each writes its own partial sums of dweight and dbias,
// which are added afterwards in a fixed order, so the result does not depend on the threads.
#include <ATen/Parallel.h>

#include "causal_conv1d/cpu/causal_conv1d_tile.h"

namespace mamba_ext {

template <typename input_t>
void causal_conv1d_bwd_cpu(const CausalConv1dBwdParams& params) {
  using namespace causal_conv1d_cpu;
  using acc_t = acc_type<input_t>;
  const int64_t width = params.width, batch = params.batch, dim = params.dim;
  const int64_t seqlen = params.seqlen;
  const int64_t dim_tiles = ceil_div(dim, kTileDim);
  const int64_t time_tiles = ceil_div(seqlen + width - 1, kTileTokens);
  // Tile c owns the padded positions [c T, c T + T) of dx' (T = kTileTokens), which read the dz
  // of tokens [c T - (width - 1), c T + T); it sums dweight and dbias over tokens [c T, c T + T).
  const int64_t max_tokens = kTileTokens + width - 1;
  const int64_t nsums = width + 1;  // dweight[d, :] then dbias[d]
  std::vector<acc_t> partials(dim * batch * time_tiles * nsums);  // (dim, batch, tiles, nsums)

  const bool dout_channels_inner =
      channels_inner(params.dout_dim_stride, params.dout_seqlen_stride);
  const bool dx_channels_inner = channels_inner(params.dx_dim_stride, params.dx_seqlen_stride);
  const int64_t ntiles = batch * dim_tiles * time_tiles;
  at::parallel_for(0, ntiles, kGrainTiles, [&](int64_t begin, int64_t end) {
    TokenTile<input_t> tile(max_tokens, width);
    std::vector<acc_t> dz_tile(kTileDim * max_tokens);   // (channels, tokens)
    std::vector<acc_t> dx_tile(kTileDim * kTileTokens);  // (channels, positions): dx'
    std::vector<acc_t> z(max_tokens);                    // (tokens,) pre-activation, for silu
    std::vector<acc_t> dz_same(width * max_tokens);      // (width, tokens): dz same_k
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % time_tiles;
      const int64_t d0 = task / time_tiles % dim_tiles * kTileDim;
      const int64_t b = task / (time_tiles * dim_tiles);
      const int64_t p0 = c * kTileTokens;
      const int64_t npos = std::min(kTileTokens, seqlen + width - 1 - p0);
      const int64_t t0 = p0 - (width - 1);
      const int64_t ntok = std::min(p0 + kTileTokens, seqlen) - t0;
      const int64_t ndz = npos + width - 1;  // >= ntok; dz past the last token is 0
      tile.load(params, b, d0, t0, ntok);
      const int64_t ndim = tile.ndim;
      bool final_kept[3] = {false, false, false};
      for (int64_t k = 0; k + 1 < width; ++k) final_kept[k] = final_state_kept(params, b, k);

      // dout of the tile's tokens in [0, seqlen); the halo before token 0 and the tail are 0.
      const int64_t j_first = std::max<int64_t>(0, -t0);
      for (int64_t i = 0; i < ndim; ++i) {
        acc_t* dz = dz_tile.data() + i * max_tokens;
        std::fill(dz, dz + j_first, acc_t(0));
        std::fill(dz + ntok, dz + ndz, acc_t(0));
      }
      const Strided2d<const input_t> dout{
          static_cast<const input_t*>(params.dout) + b * params.dout_batch_stride +
              d0 * params.dout_dim_stride + (t0 + j_first) * params.dout_seqlen_stride,
          params.dout_dim_stride, params.dout_seqlen_stride};
      copy_block(Strided2d<acc_t>{dz_tile.data() + j_first, max_tokens, 1}, dout, ndim,
                 ntok - j_first, dout_channels_inner);

      for (int64_t i = 0; i < ndim; ++i) {
        const int64_t d = d0 + i;
        acc_t* dz = dz_tile.data() + i * max_tokens;
        for (int64_t j = 0; j < ntok; ++j) dz[j] = tile.valid[j] ? dz[j] : acc_t(0);
        if (params.silu) {
          tile.preactivation(params, i, z.data());
          for (int64_t j = 0; j < ntok; ++j) {
            const acc_t s = sigmoid_vectorizable(z[j]);
            dz[j] *= s * (acc_t(1) + z[j] * (acc_t(1) - s));
          }
        }
        const acc_t* dz_tap[4];  // dz_tap[k][j] = dz[j] same_k[j]
        for (int64_t k = 0; k < width; ++k) {
          if (!tile.has_seq_idx) {
            dz_tap[k] = dz;
            continue;
          }
          acc_t* row = dz_same.data() + k * max_tokens;
          const acc_t* same_k = tile.same_row(k);
          for (int64_t j = 0; j < ntok; ++j) row[j] = dz[j] * same_k[j];
          std::fill(row + ntok, row + ndz, acc_t(0));
          dz_tap[k] = row;
        }

        // dx'[p0 + q]: position p0 + q is read by token p0 + q - k = t0 + q + (width - 1 - k).
        acc_t* dxp = dx_tile.data() + i * kTileTokens;
        std::fill(dxp, dxp + npos, acc_t(0));
        for (int64_t k = 0; k < width; ++k) {
          const acc_t w = weight_at<acc_t>(params, d, k);
          const acc_t* __restrict src = dz_tap[k] + (width - 1 - k);
          for (int64_t q = 0; q < npos; ++q) dxp[q] += w * src[q];
        }
        if (params.dfinal_states != nullptr) {
          const input_t* dfinal = static_cast<const input_t*>(params.dfinal_states) +
                                  b * params.dfinal_states_batch_stride +
                                  d * params.dfinal_states_dim_stride;
          for (int64_t k = 0; k + 1 < width; ++k) {
            const int64_t q = seqlen + k - p0;
            if (final_kept[k] && q >= 0 && q < npos)
              dxp[q] += static_cast<acc_t>(dfinal[k * params.dfinal_states_width_stride]);
          }
        }

        // This tile's tokens are j in [width - 1, ntok); the ones before belong to tile c - 1.
        acc_t* partial = partials.data() + ((d * batch + b) * time_tiles + c) * nsums;
        for (int64_t k = 0; k < width; ++k) {
          const acc_t* xk = tile.x_row(i) + k;
          acc_t sum = 0;
          for (int64_t j = width - 1; j < ntok; ++j) sum += dz_tap[k][j] * xk[j];
          partial[k] = sum;
        }
        acc_t dbias_sum = 0;
        for (int64_t j = width - 1; j < ntok; ++j) dbias_sum += dz[j];
        partial[width] = dbias_sum;
      }

      // dx' splits into dinitial_states (positions before width - 1) and dx.
      const int64_t q_x = std::clamp<int64_t>(width - 1 - p0, 0, npos);
      if (params.dinitial_states != nullptr && q_x > 0) {
        const Strided2d<input_t> dinit{
            static_cast<input_t*>(params.dinitial_states) +
                b * params.dinitial_states_batch_stride + d0 * params.dinitial_states_dim_stride +
                p0 * params.dinitial_states_width_stride,
            params.dinitial_states_dim_stride, params.dinitial_states_width_stride};
        copy_block(dinit, Strided2d<const acc_t>{dx_tile.data(), kTileTokens, 1}, ndim, q_x,
                   false);
      }
      const Strided2d<input_t> dx{static_cast<input_t*>(params.dx) + b * params.dx_batch_stride +
                                      d0 * params.dx_dim_stride +
                                      (p0 + q_x - (width - 1)) * params.dx_seqlen_stride,
                                  params.dx_dim_stride, params.dx_seqlen_stride};
      copy_block(dx, Strided2d<const acc_t>{dx_tile.data() + q_x, kTileTokens, 1}, ndim,
                 npos - q_x, dx_channels_inner);
    }
  });

  acc_t* dweight = static_cast<acc_t*>(params.dweight);
  acc_t* dbias = static_cast<acc_t*>(params.dbias);
  at::parallel_for(0, dim, 64, [&](int64_t begin, int64_t end) {
    for (int64_t d = begin; d < end; ++d) {
      const acc_t* partial = partials.data() + d * batch * time_tiles * nsums;
      for (int64_t s = 0; s < nsums; ++s) {
        acc_t total = 0;
        for (int64_t r = 0; r < batch * time_tiles; ++r) total += partial[r * nsums + s];
        if (s < width) dweight[d * width + s] = total;
        else if (dbias != nullptr) dbias[d] = total;
      }
    }
  });
}

template void causal_conv1d_bwd_cpu<float>(const CausalConv1dBwdParams&);
template void causal_conv1d_bwd_cpu<double>(const CausalConv1dBwdParams&);
template void causal_conv1d_bwd_cpu<c10::Half>(const CausalConv1dBwdParams&);
template void causal_conv1d_bwd_cpu<c10::BFloat16>(const CausalConv1dBwdParams&);

}  // namespace mamba_ext
