// Selective scan forward on the CPU: tasks over (batch entry, block of channels of one group) run
// in parallel; each walks time in chunks, gathers the chunk of B and C once for its block, and
// runs every channel's recurrence over the chunk (selective_scan_cpu.h explains the layout).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "selective_scan/cpu/selective_scan_cpu.h"

namespace mamba_ext {
namespace selective_scan_cpu {
namespace {

// The recurrence over `len` steps of one channel: h (n_pad) advances in place and
// y_t = <h_t, C_t>.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void scan_chunk(int64_t len, int64_t n_pad, const acc_t* __restrict dt,
                                       const acc_t* __restrict dt_u,
                                       const acc_t* __restrict A_log2e, const acc_t* B,
                                       int64_t B_step, const acc_t* C, int64_t C_step,
                                       acc_t* __restrict h, acc_t* __restrict y) {
  for (int64_t t = 0; t < len; ++t) {
    const acc_t* __restrict B_t = B + t * B_step;  // (n_pad,)
    const acc_t* __restrict C_t = C + t * C_step;  // (n_pad,)
    const acc_t dt_t = dt[t], dt_u_t = dt_u[t];
    acc_t y_lanes[kLanes] = {};
    for (int64_t n0 = 0; n0 < n_pad; n0 += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t n = n0 + j;
        h[n] = exp2_polynomial(dt_t * A_log2e[n]) * h[n] + dt_u_t * B_t[n];
        y_lanes[j] += h[n] * C_t[n];
      }
    }
    y[t] = sum_lanes(y_lanes);
  }
}

// out = (y + D u) * silu(z), in place in y; z is null when absent (D is 0 when absent).
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void finish_output(int64_t len, acc_t D, const acc_t* __restrict u,
                                          const acc_t* __restrict z, acc_t* __restrict y) {
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) y[t] += D * u[t];
  if (z == nullptr) return;
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) y[t] *= z[t] * sigmoid_vectorisable(z[t]);
}

}  // namespace
}  // namespace selective_scan_cpu

template <typename input_t> void selective_scan_fwd_cpu(const SelectiveScanFwdParams& p) {
  using namespace selective_scan_cpu;
  using acc_t = acc_type<input_t>;
  const ChannelBlocks blocks(p.dim, p.ngroups);
  const int64_t n_pad = padded_dstate(p.dstate);
  const int64_t block_len = blocks.block_len;

  at::parallel_for(0, p.batch * blocks.count, 1, [&](int64_t task_begin, int64_t task_end) {
    auto B = StateInput<acc_t>::B(p, kForwardChunk, block_len);
    auto C = StateInput<acc_t>::C(p, kForwardChunk, block_len);
    std::vector<acc_t> A_log2e(block_len * n_pad), h(block_len * n_pad);  // (block_len, n_pad)
    // One channel's rows over the chunk, (kForwardChunk,) each.
    std::vector<acc_t> u(kForwardChunk), delta(kForwardChunk), dt(kForwardChunk),
        dt_u(kForwardChunk), z(kForwardChunk), y(kForwardChunk);

    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / blocks.count, block = task % blocks.count;
      const int64_t begin = blocks.begin(block), end = blocks.end(block);
      const int64_t group = blocks.group(block);
      B.load_block(begin, end);
      C.load_block(begin, end);
      for (int64_t d = begin; d < end; ++d) {
        const int64_t k = d - begin;
        load_padded(typed<acc_t>(p.A) + d * p.A_dim_stride, p.A_dstate_stride, p.dstate, n_pad,
                    kLog2e<acc_t>, A_log2e.data() + k * n_pad);
        load_state_row(p.initial_state, p.initial_state_batch_stride, p.initial_state_dim_stride,
                       p.initial_state_dstate_stride, b, d, p.dstate, n_pad, h.data() + k * n_pad);
      }

      for (int64_t t0 = 0; t0 < p.seqlen; t0 += kForwardChunk) {
        const int64_t len = std::min(kForwardChunk, p.seqlen - t0);
        B.template load_chunk<input_t>(b, group, t0, len);
        C.template load_chunk<input_t>(b, group, t0, len);
        for (int64_t d = begin; d < end; ++d) {
          const int64_t k = d - begin;
          load_step_inputs<input_t>(p, b, d, t0, len, u.data(), delta.data(), dt.data(),
                                    dt_u.data());
          scan_chunk(len, n_pad, dt.data(), dt_u.data(), A_log2e.data() + k * n_pad, B.rows(k),
                     B.step(), C.rows(k), C.step(), h.data() + k * n_pad, y.data());
          if (p.z != nullptr)
            load_activation<input_t>(p.z, p.z_batch_stride, p.z_dim_stride, p.z_seqlen_stride, b,
                                     d, t0, len, z.data());
          const acc_t D = p.D ? typed<acc_t>(p.D)[d * p.D_stride] : 0;
          finish_output(len, D, u.data(), p.z ? z.data() : nullptr, y.data());
          store_activation<acc_t, input_t>(y.data(), p.out, p.out_batch_stride, p.out_dim_stride,
                                           p.out_seqlen_stride, b, d, t0, len);
        }
      }

      for (int64_t d = begin; d < end; ++d)
        store_row(h.data() + (d - begin) * n_pad, p.dstate,
                  typed<acc_t>(p.last_state) + b * p.last_state_batch_stride +
                      d * p.last_state_dim_stride,
                  p.last_state_dstate_stride);
    }
  });
}

template void selective_scan_fwd_cpu<float>(const SelectiveScanFwdParams&);
template void selective_scan_fwd_cpu<double>(const SelectiveScanFwdParams&);
template void selective_scan_fwd_cpu<c10::Half>(const SelectiveScanFwdParams&);
template void selective_scan_fwd_cpu<c10::BFloat16>(const SelectiveScanFwdParams&);

}  // namespace mamba_ext
