// Forward of the selective scan on CUDA: one pass over the sequence, fusing dt (bias,
// softplus), the decay exp, the scan, the C contraction, D and the z gate.
//
// Each thread walks its channel's tokens in order with kStates states in registers; per token
// and state: one exp2 and four FMA-pipe instructions. A chunk of tokens is staged in shared
// memory: dt and dt * u per channel, B and C per token (broadcast to the block), the y partials
// of each state slice; then the block adds the slices and writes out with the token loop on
// the lanes (coalesced).
#pragma once

#include "selective_scan/cuda/selective_scan_common.cuh"

namespace mamba_ext {
namespace scan_cuda {

template <int kChunk, typename acc_t>
__host__ __device__ inline int64_t fwd_smem_elements(const SelectiveScanCudaGeometry& g) {
  const int64_t rows = kChunk * (g.channels_per_block() + 1);
  return (2 + g.slices) * rows + 2 * kChunk * g.slices * g.states_per_thread;
}

template <typename input_t, int kStates>
__global__ void __launch_bounds__(512)
    selective_scan_fwd_kernel(const SelectiveScanFwdParams p, const SelectiveScanCudaGeometry g) {
  using acc_t = acc_type<input_t>;
  constexpr int kChunk = selective_scan_cuda_chunk(sizeof(acc_t) == 8);
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  const BlockPosition pos = block_position(p, g);
  const int cs = pos.channel_stride, c = pos.channel_in_block;
  acc_t* s_dt = reinterpret_cast<acc_t*>(smem_bytes);     // [kChunk][cs]
  acc_t* s_dtu = s_dt + kChunk * cs;                      // [kChunk][cs]
  acc_t* s_y = s_dtu + kChunk * cs;                       // [slices][kChunk][cs]
  acc_t* s_B = s_y + g.slices * kChunk * cs;              // [kChunk][padded_states]
  acc_t* s_C = s_B + kChunk * pos.padded_states;          // [kChunk][padded_states]

  const int64_t channel = pos.channel0 + c;
  acc_t A2[kStates], h[kStates], B_const[kStates], C_const[kStates];
  load_thread_states(A2, p.A, channel * p.A_dim_stride, p.A_dstate_stride, p, pos);
#pragma unroll
  for (int i = 0; i < kStates; ++i) A2[i] *= acc_t(kLog2e);
  if (!p.is_variable_B)
    load_thread_states(B_const, p.B, channel * p.B_dim_stride, p.B_dstate_stride, p, pos);
  if (!p.is_variable_C)
    load_thread_states(C_const, p.C, channel * p.C_dim_stride, p.C_dstate_stride, p, pos);
  load_thread_states(h, p.initial_state,
                     pos.batch * p.initial_state_batch_stride +
                         channel * p.initial_state_dim_stride,
                     p.initial_state_dstate_stride, p, pos);

  const int64_t nchunks = g.chunks(p.seqlen);
  for (int64_t chunk_index = 0; chunk_index < nchunks; ++chunk_index) {
    const int64_t token0 = chunk_index * kChunk;
    if (p.checkpoints != nullptr)
      store_thread_states(h, p.checkpoints, checkpoint_offset(p, pos, nchunks, chunk_index), 1,
                          p, pos);
    load_dt_chunk<kChunk, input_t>(p, pos, token0, s_dt, s_dtu);
    load_variable_BC_chunk<kChunk, input_t>(p, pos, token0, s_B, s_C);
    __syncthreads();

    const int state_offset = pos.slice * kStates;
#pragma unroll 2
    for (int t = 0; t < kChunk; ++t) {
      const acc_t dt = s_dt[t * cs + c], dtu = s_dtu[t * cs + c];
      acc_t B[kStates], C[kStates];
      if (p.is_variable_B) {
        load_smem_states(B, s_B + t * pos.padded_states + state_offset);
      } else {
#pragma unroll
        for (int i = 0; i < kStates; ++i) B[i] = B_const[i];
      }
      if (p.is_variable_C) {
        load_smem_states(C, s_C + t * pos.padded_states + state_offset);
      } else {
#pragma unroll
        for (int i = 0; i < kStates; ++i) C[i] = C_const[i];
      }
      acc_t y = 0;
#pragma unroll
      for (int i = 0; i < kStates; ++i) {
        h[i] = exp2_approx(dt * A2[i]) * h[i] + dtu * B[i];
        y += h[i] * C[i];
      }
      s_y[(pos.slice * kChunk + t) * cs + c] = y;
    }
    __syncthreads();

    if (p.out != nullptr) {
      const Activation<input_t> u(p.u, pos.batch, p.u_batch_stride, p.u_dim_stride,
                                  p.u_seqlen_stride);
      const Activation<input_t> z(p.z, pos.batch, p.z_batch_stride, p.z_dim_stride,
                                  p.z_seqlen_stride);
      const OutputActivation<input_t> out(p.out, pos.batch, p.out_batch_stride,
                                          p.out_dim_stride, p.out_seqlen_stride);
      MAMBA_FOR_CHUNK_ELEMENTS(pos, kChunk, ce, t) {
        const int64_t ch = pos.channel0 + ce, token = token0 + t;
        if (!pos.channel_valid(ce) || token >= p.seqlen) continue;
        acc_t y = 0;
        for (int slice = 0; slice < g.slices; ++slice) y += s_y[(slice * kChunk + t) * cs + ce];
        y += channel_weight<acc_t>(p.D, p.D_stride, ch) * u(ch, token);
        if (p.z != nullptr) y *= silu(acc_t(z(ch, token)));
        out.store(ch, token, y);
      }
    }
    // The next chunk's loads overwrite what this one's readers use.
    __syncthreads();
  }
  store_thread_states(h, p.last_state,
                      pos.batch * p.last_state_batch_stride + channel * p.last_state_dim_stride,
                      p.last_state_dstate_stride, p, pos);
}

template <typename input_t, int kStates>
cudaError_t launch_selective_scan_fwd(const SelectiveScanFwdParams& p,
                                      const SelectiveScanCudaGeometry& g, cudaStream_t stream) {
  using acc_t = acc_type<input_t>;
  constexpr int kChunk = selective_scan_cuda_chunk(sizeof(acc_t) == 8);
  const size_t smem = fwd_smem_elements<kChunk, acc_t>(g) * sizeof(acc_t);
  auto kernel = &selective_scan_fwd_kernel<input_t, kStates>;
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (error != cudaSuccess) return error;
  const dim3 grid(g.channel_blocks_per_group * p.ngroups, p.batch, 1);
  kernel<<<grid, g.threads(), smem, stream>>>(p, g);
  return cudaGetLastError();
}

// The forward with its geometry; the backward's checkpoint pass calls it too (out == null).
template <typename input_t>
cudaError_t run_selective_scan_fwd(const SelectiveScanFwdParams& p, cudaStream_t stream) {
  const SelectiveScanCudaGeometry g =
      selective_scan_fwd_cuda_geometry(p, sizeof(acc_type<input_t>) == 8);
  return g.states_per_thread == 4 ? launch_selective_scan_fwd<input_t, 4>(p, g, stream)
                                  : launch_selective_scan_fwd<input_t, 16>(p, g, stream);
}

}  // namespace scan_cuda

template <typename input_t>
cudaError_t selective_scan_fwd_cuda(const SelectiveScanFwdParams& params, cudaStream_t stream) {
  return scan_cuda::run_selective_scan_fwd<input_t>(params, stream);
}

}  // namespace mamba_ext
