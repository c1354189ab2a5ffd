// Selective scan backward on the CPU, deterministic and without atomics.
//
// Tasks over blocks of channels (selective_scan_cpu.h) run in parallel, each looping over the
// batch inside, so the gradients summed over batch and time (dA, dD, ddelta_bias, a constant dB
// or dC) belong to one task and need no reduction. Per batch entry a task walks forward once,
// keeping the state of each channel at the start of every chunk (a checkpoint), then walks the
// chunks in reverse: recomputes the chunk's states from its checkpoint into a small buffer and
// backpropagates through them. With a_t = exp(dt_t A), g = dL/dh_t (from dlast_state at the end)
// and dy_t = dout_t * silu(z_t) (or dout_t):
//   g += dy_t C_t;  dC_t += dy_t h_t;  dB_t += g dt_t u_t;  du_t = dt_t <g, B_t> + D dy_t
//   d(dt_t) = <g, A a_t h_{t-1} + B_t u_t>;  dA += g a_t h_{t-1} dt_t;  g *= a_t for step t - 1
// and dinitial_state is the last g. A variable dB (or dC) sums over the channels of a group,
// which several blocks share: each block writes its float partial, summed over its channels, into
// a scratch and a last pass adds the blocks' partials in block order.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "selective_scan/cpu/selective_scan_cpu.h"

namespace mamba_ext {
namespace selective_scan_cpu {
namespace {

// Steps of a chunk in the backward, raised for long sequences so that a channel keeps at most
// kMaxCheckpoints checkpoints: the memory of a task stays bounded whatever the length.
constexpr int64_t kBackwardChunk = 256;
constexpr int64_t kMaxCheckpoints = 128;

// h (n_pad) advances over `len` steps in place.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void advance_chunk(int64_t len, int64_t n_pad, const acc_t* __restrict dt,
                                          const acc_t* __restrict dt_u,
                                          const acc_t* __restrict A_log2e, const acc_t* B,
                                          int64_t B_step, acc_t* __restrict h) {
  for (int64_t t = 0; t < len; ++t) {
    const acc_t* __restrict B_t = B + t * B_step;
    const acc_t dt_t = dt[t], dt_u_t = dt_u[t];
    for (int64_t n0 = 0; n0 < n_pad; n0 += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t n = n0 + j;
        h[n] = exp2_polynomial(dt_t * A_log2e[n]) * h[n] + dt_u_t * B_t[n];
      }
    }
  }
}

// The states of a chunk from its checkpoint: states is (len + 1, n_pad) with states[0] the
// checkpoint h_{t0 - 1} on entry and states[t + 1] = h_{t0 + t} on return; decay (len, n_pad)
// gets a_t.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void recompute_chunk(int64_t len, int64_t n_pad, const acc_t* __restrict dt,
                                            const acc_t* __restrict dt_u,
                                            const acc_t* __restrict A_log2e, const acc_t* B,
                                            int64_t B_step, acc_t* __restrict states,
                                            acc_t* __restrict decay) {
  for (int64_t t = 0; t < len; ++t) {
    const acc_t* __restrict B_t = B + t * B_step;
    const acc_t* __restrict h_prev = states + t * n_pad;
    acc_t* __restrict h = states + (t + 1) * n_pad;
    acc_t* __restrict a = decay + t * n_pad;
    const acc_t dt_t = dt[t], dt_u_t = dt_u[t];
    for (int64_t n0 = 0; n0 < n_pad; n0 += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t n = n0 + j;
        a[n] = exp2_polynomial(dt_t * A_log2e[n]);
        h[n] = a[n] * h_prev[n] + dt_u_t * B_t[n];
      }
    }
  }
}

// Backpropagates g (n_pad) through the `len` steps of a chunk, last step first (the header
// comment gives the formulas). dB and dC get the chunk's terms added, (len, n_pad) rows
// for a variable one (step n_pad), one (n_pad) row for a constant one (step 0); dA (n_pad) gets
// its terms added. Per step: du_dot[t] = dt_t <g, B_t>, ddt[t] = d(dt_t), y[t] = <h_t, C_t>.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void backward_chunk(
    int64_t len, int64_t n_pad, const acc_t* __restrict dt, const acc_t* __restrict dt_u,
    const acc_t* __restrict u, const acc_t* __restrict dy, const acc_t* __restrict A,
    const acc_t* B, int64_t B_step, const acc_t* C, int64_t C_step,
    const acc_t* __restrict states, const acc_t* __restrict decay, acc_t* __restrict g,
    acc_t* dB, int64_t dB_step, acc_t* dC, int64_t dC_step, acc_t* __restrict dA,
    acc_t* __restrict du_dot, acc_t* __restrict ddt, acc_t* __restrict y) {
  for (int64_t t = len - 1; t >= 0; --t) {
    const acc_t* __restrict B_t = B + t * B_step;
    const acc_t* __restrict C_t = C + t * C_step;
    acc_t* __restrict dB_t = dB + t * dB_step;
    acc_t* __restrict dC_t = dC + t * dC_step;
    const acc_t* __restrict h_prev = states + t * n_pad;
    const acc_t* __restrict h = states + (t + 1) * n_pad;
    const acc_t* __restrict a = decay + t * n_pad;
    const acc_t dt_t = dt[t], dt_u_t = dt_u[t], u_t = u[t], dy_t = dy[t];
    acc_t g_dot_B[kLanes] = {}, ddt_lanes[kLanes] = {}, y_lanes[kLanes] = {};
    for (int64_t n0 = 0; n0 < n_pad; n0 += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t n = n0 + j;
        const acc_t g_n = g[n] + dy_t * C_t[n];
        const acc_t decayed = a[n] * h_prev[n];
        dC_t[n] += dy_t * h[n];
        dB_t[n] += g_n * dt_u_t;
        dA[n] += g_n * decayed * dt_t;
        g_dot_B[j] += g_n * B_t[n];
        ddt_lanes[j] += g_n * (A[n] * decayed + u_t * B_t[n]);
        y_lanes[j] += h[n] * C_t[n];
        g[n] = g_n * a[n];
      }
    }
    du_dot[t] = dt_t * sum_lanes(g_dot_B);
    ddt[t] = sum_lanes(ddt_lanes);
    y[t] = sum_lanes(y_lanes);
  }
}

// dy = dout * silu(z), or dout when z is null.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void gate_gradient(int64_t len, const acc_t* __restrict z,
                                          const acc_t* __restrict dout, acc_t* __restrict dy) {
  if (z == nullptr) {
    std::copy(dout, dout + len, dy);
    return;
  }
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) dy[t] = dout[t] * z[t] * sigmoid_vectorisable(z[t]);
}

// The per-step gradients of a chunk from backward_chunk's sums, in place: du_dot becomes du,
// ddt becomes ddelta, y becomes dz (when z is given). Returns the chunk's sums of the terms of dD
// and ddelta_bias in dD_chunk and ddelta_bias_chunk.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void finish_gradients(
    int64_t len, acc_t D, bool delta_softplus, const acc_t* __restrict u,
    const acc_t* __restrict delta_biased, const acc_t* __restrict z,
    const acc_t* __restrict dout, const acc_t* __restrict dy, acc_t* __restrict du,
    acc_t* __restrict ddelta, acc_t* __restrict y, acc_t& dD_chunk, acc_t& ddelta_bias_chunk) {
  acc_t dD_sum = 0, ddelta_bias_sum = 0;
#pragma omp simd reduction(+ : dD_sum)
  for (int64_t t = 0; t < len; ++t) {
    du[t] += D * dy[t];
    dD_sum += dy[t] * u[t];
  }
  if (z != nullptr) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const acc_t s = sigmoid_vectorisable(z[t]);
      y[t] = dout[t] * (y[t] + D * u[t]) * s * (acc_t(1) + z[t] * (acc_t(1) - s));
    }
  }
  if (delta_softplus) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) ddelta[t] *= sigmoid_vectorisable(delta_biased[t]);
  }
#pragma omp simd reduction(+ : ddelta_bias_sum)
  for (int64_t t = 0; t < len; ++t) ddelta_bias_sum += ddelta[t];
  dD_chunk = dD_sum;
  ddelta_bias_chunk = ddelta_bias_sum;
}

// Adds the blocks' partials of a variable dB or dC, (blocks_per_group, batch, ngroups, seqlen,
// n_pad), in block order and writes the sum with the gradient's strides.
template <typename input_t, typename acc_t>
void reduce_partials(const std::vector<acc_t>& partials, const SelectiveScanBwdParams& p,
                     int64_t blocks_per_group, void* grad, int64_t batch_stride,
                     int64_t group_stride, int64_t dstate_stride, int64_t seqlen_stride) {
  const int64_t n_pad = padded_dstate(p.dstate);
  const int64_t block_stride = p.batch * p.ngroups * p.seqlen * n_pad;
  at::parallel_for(0, p.batch * p.ngroups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(n_pad);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / p.ngroups, group = bg % p.ngroups;
      input_t* out = typed<input_t>(grad) + b * batch_stride + group * group_stride;
      for (int64_t t = 0; t < p.seqlen; ++t) {
        const acc_t* partial = partials.data() + (bg * p.seqlen + t) * n_pad;
        std::copy(partial, partial + n_pad, sum.begin());
        for (int64_t j = 1; j < blocks_per_group; ++j)
          for (int64_t n = 0; n < n_pad; ++n) sum[n] += partial[j * block_stride + n];
        for (int64_t n = 0; n < p.dstate; ++n)
          out[n * dstate_stride + t * seqlen_stride] = static_cast<input_t>(sum[n]);
      }
    }
  });
}

}  // namespace
}  // namespace selective_scan_cpu

template <typename input_t> void selective_scan_bwd_cpu(const SelectiveScanBwdParams& p) {
  using namespace selective_scan_cpu;
  using acc_t = acc_type<input_t>;
  const ChannelBlocks blocks(p.dim, p.ngroups);
  const int64_t n_pad = padded_dstate(p.dstate);
  const int64_t chunk =
      std::max(kBackwardChunk, (p.seqlen + kMaxCheckpoints - 1) / kMaxCheckpoints);
  const int64_t nchunks = (p.seqlen + chunk - 1) / chunk;
  const int64_t block_len = blocks.block_len;

  // (blocks_per_group, batch, ngroups, seqlen, n_pad) each, when variable.
  const int64_t partial_size = blocks.blocks_per_group * p.batch * p.ngroups * p.seqlen * n_pad;
  std::vector<acc_t> dB_partials(p.is_variable_B ? partial_size : 0);
  std::vector<acc_t> dC_partials(p.is_variable_C ? partial_size : 0);

  at::parallel_for(0, blocks.count, 1, [&](int64_t task_begin, int64_t task_end) {
    auto B = StateInput<acc_t>::B(p, chunk, block_len);
    auto C = StateInput<acc_t>::C(p, chunk, block_len);
    // Per channel of the block, (block_len, n_pad) each.
    std::vector<acc_t> A_log2e(block_len * n_pad), A(block_len * n_pad);
    std::vector<acc_t> h(block_len * n_pad), g(block_len * n_pad);
    std::vector<acc_t> checkpoints(block_len * nchunks * n_pad);  // (block_len, nchunks, n_pad)
    // Sums over batch and time, per channel, in double: each chunk's sum is added to them, so
    // long sequences lose no precision.
    std::vector<double> dA_sum(block_len * n_pad), dB_sum(block_len * n_pad),
        dC_sum(block_len * n_pad), dD_sum(block_len), ddelta_bias_sum(block_len);
    // The chunk: states (chunk + 1, n_pad), decay (chunk, n_pad); dB / dC (chunk, n_pad) summed
    // over the block's channels when variable, one channel's (n_pad) when constant.
    std::vector<acc_t> states((chunk + 1) * n_pad), decay(chunk * n_pad);
    std::vector<acc_t> dB_chunk((p.is_variable_B ? chunk : 1) * n_pad);
    std::vector<acc_t> dC_chunk((p.is_variable_C ? chunk : 1) * n_pad);
    std::vector<acc_t> dA_chunk(n_pad);
    // One channel's rows over the chunk, (chunk,) each.
    std::vector<acc_t> u(chunk), delta(chunk), dt(chunk), dt_u(chunk), z(chunk), dout(chunk),
        dy(chunk), du(chunk), ddelta(chunk), y(chunk);

    for (int64_t block = task_begin; block < task_end; ++block) {
      const int64_t begin = blocks.begin(block), end = blocks.end(block);
      const int64_t group = blocks.group(block), block_in_group = block % blocks.blocks_per_group;
      B.load_block(begin, end);
      C.load_block(begin, end);
      for (int64_t d = begin; d < end; ++d) {
        const acc_t* A_row = typed<acc_t>(p.A) + d * p.A_dim_stride;
        load_padded(A_row, p.A_dstate_stride, p.dstate, n_pad, kLog2e<acc_t>,
                    A_log2e.data() + (d - begin) * n_pad);
        load_padded(A_row, p.A_dstate_stride, p.dstate, n_pad, acc_t(1),
                    A.data() + (d - begin) * n_pad);
      }
      std::fill(dA_sum.begin(), dA_sum.end(), 0.0);
      std::fill(dB_sum.begin(), dB_sum.end(), 0.0);
      std::fill(dC_sum.begin(), dC_sum.end(), 0.0);
      std::fill(dD_sum.begin(), dD_sum.end(), 0.0);
      std::fill(ddelta_bias_sum.begin(), ddelta_bias_sum.end(), 0.0);

      for (int64_t b = 0; b < p.batch; ++b) {
        // Forward: the checkpoints.
        for (int64_t d = begin; d < end; ++d)
          load_state_row(p.initial_state, p.initial_state_batch_stride, p.initial_state_dim_stride,
                         p.initial_state_dstate_stride, b, d, p.dstate, n_pad,
                         h.data() + (d - begin) * n_pad);
        for (int64_t c = 0; c < nchunks; ++c) {
          const int64_t t0 = c * chunk, len = std::min(chunk, p.seqlen - t0);
          B.template load_chunk<input_t>(b, group, t0, len);
          for (int64_t d = begin; d < end; ++d) {
            const int64_t k = d - begin;
            acc_t* h_d = h.data() + k * n_pad;
            std::copy(h_d, h_d + n_pad, checkpoints.data() + (k * nchunks + c) * n_pad);
            load_step_inputs<input_t>(p, b, d, t0, len, u.data(), delta.data(), dt.data(),
                                      dt_u.data());
            advance_chunk(len, n_pad, dt.data(), dt_u.data(), A_log2e.data() + k * n_pad,
                          B.rows(k), B.step(), h_d);
          }
        }

        // Backward, chunk by chunk from the last.
        for (int64_t d = begin; d < end; ++d)
          load_state_row(p.dlast_state, p.dlast_state_batch_stride, p.dlast_state_dim_stride,
                         p.dlast_state_dstate_stride, b, d, p.dstate, n_pad,
                         g.data() + (d - begin) * n_pad);
        for (int64_t c = nchunks - 1; c >= 0; --c) {
          const int64_t t0 = c * chunk, len = std::min(chunk, p.seqlen - t0);
          B.template load_chunk<input_t>(b, group, t0, len);
          C.template load_chunk<input_t>(b, group, t0, len);
          if (p.is_variable_B) std::fill(dB_chunk.begin(), dB_chunk.begin() + len * n_pad, 0);
          if (p.is_variable_C) std::fill(dC_chunk.begin(), dC_chunk.begin() + len * n_pad, 0);
          for (int64_t d = begin; d < end; ++d) {
            const int64_t k = d - begin;
            load_step_inputs<input_t>(p, b, d, t0, len, u.data(), delta.data(), dt.data(),
                                      dt_u.data());
            load_activation<input_t>(p.dout, p.dout_batch_stride, p.dout_dim_stride,
                                     p.dout_seqlen_stride, b, d, t0, len, dout.data());
            if (p.z != nullptr)
              load_activation<input_t>(p.z, p.z_batch_stride, p.z_dim_stride, p.z_seqlen_stride,
                                       b, d, t0, len, z.data());
            const acc_t* z_or_null = p.z ? z.data() : nullptr;
            gate_gradient(len, z_or_null, dout.data(), dy.data());

            const acc_t* checkpoint = checkpoints.data() + (k * nchunks + c) * n_pad;
            std::copy(checkpoint, checkpoint + n_pad, states.begin());
            recompute_chunk(len, n_pad, dt.data(), dt_u.data(), A_log2e.data() + k * n_pad,
                            B.rows(k), B.step(), states.data(), decay.data());
            if (!p.is_variable_B) std::fill(dB_chunk.begin(), dB_chunk.end(), 0);
            if (!p.is_variable_C) std::fill(dC_chunk.begin(), dC_chunk.end(), 0);
            std::fill(dA_chunk.begin(), dA_chunk.end(), 0);
            backward_chunk(len, n_pad, dt.data(), dt_u.data(), u.data(), dy.data(),
                           A.data() + k * n_pad, B.rows(k), B.step(), C.rows(k), C.step(),
                           states.data(), decay.data(), g.data() + k * n_pad, dB_chunk.data(),
                           B.step(), dC_chunk.data(), C.step(), dA_chunk.data(), du.data(),
                           ddelta.data(), y.data());
            const acc_t D = p.D ? typed<acc_t>(p.D)[d * p.D_stride] : 0;
            acc_t dD_chunk, ddelta_bias_chunk;
            finish_gradients(len, D, p.delta_softplus, u.data(), delta.data(), z_or_null,
                             dout.data(), dy.data(), du.data(), ddelta.data(), y.data(),
                             dD_chunk, ddelta_bias_chunk);
            dD_sum[k] += dD_chunk;
            ddelta_bias_sum[k] += ddelta_bias_chunk;
            for (int64_t n = 0; n < n_pad; ++n) {
              dA_sum[k * n_pad + n] += dA_chunk[n];
              if (!p.is_variable_B) dB_sum[k * n_pad + n] += dB_chunk[n];
              if (!p.is_variable_C) dC_sum[k * n_pad + n] += dC_chunk[n];
            }

            store_activation<acc_t, input_t>(du.data(), p.du, p.du_batch_stride, p.du_dim_stride,
                                             p.du_seqlen_stride, b, d, t0, len);
            store_activation<acc_t, input_t>(ddelta.data(), p.ddelta, p.ddelta_batch_stride,
                                             p.ddelta_dim_stride, p.ddelta_seqlen_stride, b, d,
                                             t0, len);
            if (p.dz != nullptr)
              store_activation<acc_t, input_t>(y.data(), p.dz, p.dz_batch_stride,
                                               p.dz_dim_stride, p.dz_seqlen_stride, b, d, t0, len);
          }
          // This block's partial of the variable dB / dC over the chunk.
          const int64_t partial_offset =
              ((block_in_group * p.batch + b) * p.ngroups + group) * p.seqlen * n_pad +
              t0 * n_pad;
          if (p.is_variable_B)
            std::copy(dB_chunk.begin(), dB_chunk.begin() + len * n_pad,
                      dB_partials.begin() + partial_offset);
          if (p.is_variable_C)
            std::copy(dC_chunk.begin(), dC_chunk.begin() + len * n_pad,
                      dC_partials.begin() + partial_offset);
        }

        if (p.dinitial_state != nullptr)
          for (int64_t d = begin; d < end; ++d)
            store_row(g.data() + (d - begin) * n_pad, p.dstate,
                      typed<acc_t>(p.dinitial_state) + b * p.dinitial_state_batch_stride +
                          d * p.dinitial_state_dim_stride,
                      p.dinitial_state_dstate_stride);
      }

      for (int64_t d = begin; d < end; ++d) {
        const int64_t k = d - begin;
        auto store_weight_row = [&](const std::vector<double>& sum, void* grad,
                                    int64_t dim_stride, int64_t dstate_stride) {
          for (int64_t n = 0; n < p.dstate; ++n)
            typed<acc_t>(grad)[d * dim_stride + n * dstate_stride] =
                static_cast<acc_t>(sum[k * n_pad + n]);
        };
        store_weight_row(dA_sum, p.dA, p.dA_dim_stride, p.dA_dstate_stride);
        if (!p.is_variable_B) store_weight_row(dB_sum, p.dB, p.dB_dim_stride, p.dB_dstate_stride);
        if (!p.is_variable_C) store_weight_row(dC_sum, p.dC, p.dC_dim_stride, p.dC_dstate_stride);
        if (p.dD != nullptr) typed<acc_t>(p.dD)[d * p.dD_stride] = static_cast<acc_t>(dD_sum[k]);
        if (p.ddelta_bias != nullptr)
          typed<acc_t>(p.ddelta_bias)[d * p.ddelta_bias_stride] =
              static_cast<acc_t>(ddelta_bias_sum[k]);
      }
    }
  });

  if (p.is_variable_B)
    reduce_partials<input_t>(dB_partials, p, blocks.blocks_per_group, p.dB, p.dB_batch_stride,
                             p.dB_group_stride, p.dB_dstate_stride, p.dB_seqlen_stride);
  if (p.is_variable_C)
    reduce_partials<input_t>(dC_partials, p, blocks.blocks_per_group, p.dC, p.dC_batch_stride,
                             p.dC_group_stride, p.dC_dstate_stride, p.dC_seqlen_stride);
}

template void selective_scan_bwd_cpu<float>(const SelectiveScanBwdParams&);
template void selective_scan_bwd_cpu<double>(const SelectiveScanBwdParams&);
template void selective_scan_bwd_cpu<c10::Half>(const SelectiveScanBwdParams&);
template void selective_scan_bwd_cpu<c10::BFloat16>(const SelectiveScanBwdParams&);

}  // namespace mamba_ext
