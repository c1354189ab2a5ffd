// Selective scan forward on the CPU: tasks over (batch entry, block of channels of one group) run
// in parallel; each walks time in chunks, loads the chunk of B and C once for its block, and runs
// the recurrence of each lane group of kLanes channels over the chunk (selective_scan_cpu.h
// explains the layout), run by run where seq_idx splits it into sequences.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "selective_scan/cpu/selective_scan_cpu.h"

namespace mamba_ext {
namespace selective_scan_cpu {
namespace {

constexpr int64_t kMaxChunk = 256;

// The recurrence of one lane group over `len` steps: h (dstate, kLanes) advances in place and
// y (len, kLanes) gets <h_t, C_t> per lane. dt and dt_u are (len, kLanes); A_log2e is
// (dstate, kLanes); B and C are (dstate, kLanes) rows B_step / C_step apart per step.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void scan_chunk(int64_t len, int64_t dstate, const acc_t* __restrict dt,
                                       const acc_t* __restrict dt_u,
                                       const acc_t* __restrict A_log2e, const acc_t* B,
                                       int64_t B_step, const acc_t* C, int64_t C_step,
                                       acc_t* __restrict h, acc_t* __restrict y) {
  for (int64_t t = 0; t < len; ++t) {
    const acc_t* __restrict dt_t = dt + t * kLanes;
    const acc_t* __restrict dt_u_t = dt_u + t * kLanes;
    const acc_t* __restrict B_t = B + t * B_step;
    const acc_t* __restrict C_t = C + t * C_step;
    acc_t y_t[kLanes] = {};
    for (int64_t n = 0; n < dstate; ++n) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t i = n * kLanes + j;
        h[i] = exp2_polynomial(dt_t[j] * A_log2e[i]) * h[i] + dt_u_t[j] * B_t[i];
        y_t[j] += h[i] * C_t[i];
      }
    }
    std::copy(y_t, y_t + kLanes, y + t * kLanes);
  }
}

// out = (y + D u) * silu(z), in place in y (len, kLanes); D is (kLanes,) (zeros when absent),
// z is null when absent.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void finish_output(int64_t len, const acc_t* __restrict D,
                                          const acc_t* __restrict u, const acc_t* __restrict z,
                                          acc_t* __restrict y) {
  for (int64_t t = 0; t < len; ++t) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) y[t * kLanes + j] += D[j] * u[t * kLanes + j];
  }
  if (z == nullptr) return;
#pragma omp simd
  for (int64_t i = 0; i < len * kLanes; ++i) y[i] *= z[i] * sigmoid_vectorisable(z[i]);
}

}  // namespace
}  // namespace selective_scan_cpu

template <typename input_t> void selective_scan_fwd_cpu(const SelectiveScanFwdParams& p) {
  using namespace selective_scan_cpu;
  using acc_t = acc_type<input_t>;
  const ChannelBlocks blocks(p.dim, p.ngroups);
  const int64_t chunk = chunk_length(p.dstate, kMaxChunk);
  const int64_t lane_groups = blocks.lane_groups();
  const int64_t state_size = p.dstate * kLanes;  // of one lane group

  at::parallel_for(0, p.batch * blocks.count, 1, [&](int64_t task_begin, int64_t task_end) {
    auto B = StateInput<acc_t>::B(p, chunk, lane_groups);
    auto C = StateInput<acc_t>::C(p, chunk, lane_groups);
    // Per lane group: (dstate, kLanes) and (kLanes,).
    std::vector<acc_t> A_log2e(lane_groups * state_size), h(lane_groups * state_size);
    std::vector<acc_t> D(lane_groups * kLanes), delta_bias(lane_groups * kLanes);
    // One lane group's rows over the chunk, (chunk, kLanes) each.
    std::vector<acc_t> u(chunk * kLanes), delta(chunk * kLanes), dt(chunk * kLanes),
        dt_u(chunk * kLanes), z(chunk * kLanes), y(chunk * kLanes);
    std::vector<Run> runs;
    runs.reserve(chunk);

    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / blocks.count, block = task % blocks.count;
      const int64_t begin = blocks.begin(block), end = blocks.end(block);
      const int64_t group = blocks.group(block), groups_here = ceil_div(end - begin, kLanes);
      B.load_block(begin, end);
      C.load_block(begin, end);
      for (int64_t lg = 0; lg < groups_here; ++lg) {
        const Lanes lanes = lane_group(begin, end, lg);
        load_weight_lanes(p.A, p.A_dim_stride, p.A_dstate_stride, p.dstate, lanes, kLog2e<acc_t>,
                          A_log2e.data() + lg * state_size);
        // Per-row mode's state for seqlen 0; a sequence's first step loads it again.
        load_state_lanes(p.initial_state, p.initial_state_batch_stride,
                         p.initial_state_dim_stride, p.initial_state_dstate_stride,
                         p.num_sequences > 0 ? -1 : b, p.dstate, lanes,
                         h.data() + lg * state_size);
        load_channel_lanes(p.D, p.D_stride, lanes, D.data() + lg * kLanes);
        load_channel_lanes(p.delta_bias, p.delta_bias_stride, lanes,
                           delta_bias.data() + lg * kLanes);
      }

      for (int64_t t0 = 0; t0 < p.seqlen; t0 += chunk) {
        const int64_t len = std::min(chunk, p.seqlen - t0);
        split_runs(p, b, t0, len, runs);
        B.template load_chunk<input_t>(b, group, t0, len);
        C.template load_chunk<input_t>(b, group, t0, len);
        for (int64_t lg = 0; lg < groups_here; ++lg) {
          const Lanes lanes = lane_group(begin, end, lg), next = lane_group(begin, end, lg + 1);
          acc_t* h_lg = h.data() + lg * state_size;
          load_step_inputs<input_t>(p, b, lanes, next, t0, len, delta_bias.data() + lg * kLanes,
                                    u.data(), delta.data(), dt.data(), dt_u.data());
          for (const Run& run : runs) {
            reset_state(p, b, t0, run, lanes, h_lg);
            if (run.padding) continue;
            const int64_t at = run.offset * kLanes;
            scan_chunk(run.len, p.dstate, dt.data() + at, dt_u.data() + at,
                       A_log2e.data() + lg * state_size, B.rows(lg) + run.offset * B.step(),
                       B.step(), C.rows(lg) + run.offset * C.step(), C.step(), h_lg,
                       y.data() + at);
            if (run.ends && p.num_sequences > 0)
              store_state_lanes(h_lg, p.last_state, p.last_state_batch_stride,
                                p.last_state_dim_stride, p.last_state_dstate_stride, run.id,
                                p.dstate, lanes);
          }
          if (p.z != nullptr)
            load_lanes<input_t>(p.z, p.z_batch_stride, p.z_dim_stride, p.z_seqlen_stride, b,
                                lanes, next, t0, len, z.data());
          finish_output(len, D.data() + lg * kLanes, u.data(), p.z ? z.data() : nullptr,
                        y.data());
          zero_padding<acc_t>(runs, {y.data()});
          store_lanes<input_t>(y.data(), p.out, p.out_batch_stride, p.out_dim_stride,
                               p.out_seqlen_stride, b, lanes, next, t0, len);
        }
      }

      // Per-row mode: h_{seqlen-1} (0 after padding); per-sequence states are stored above.
      if (p.num_sequences == 0)
        for (int64_t lg = 0; lg < groups_here; ++lg)
          store_state_lanes(h.data() + lg * state_size, p.last_state, p.last_state_batch_stride,
                          p.last_state_dim_stride, p.last_state_dstate_stride, b, p.dstate,
                          lane_group(begin, end, lg));
    }
  });
}

template void selective_scan_fwd_cpu<float>(const SelectiveScanFwdParams&);
template void selective_scan_fwd_cpu<double>(const SelectiveScanFwdParams&);
template void selective_scan_fwd_cpu<c10::Half>(const SelectiveScanFwdParams&);
template void selective_scan_fwd_cpu<c10::BFloat16>(const SelectiveScanFwdParams&);

}  // namespace mamba_ext
