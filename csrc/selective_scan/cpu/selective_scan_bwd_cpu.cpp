// Selective scan backward on the CPU, deterministic and without atomics.
//
// Tasks over blocks of channels (selective_scan_cpu.h) run in parallel, each looping over the
// batch inside, so the gradients summed over batch and time (dA, dD, ddelta_bias, a constant dB
// or dC) belong to one task and need no reduction. Per batch entry a task walks forward once,
// keeping each lane group's state at the start of every chunk (a checkpoint), then walks the
// chunks in reverse: recomputes the chunk's states from its checkpoint into a small buffer and
// backpropagates through them. With a_t = exp(dt_t A), g = dL/dh_t (from dlast_state at the end)
// and dy_t = dout_t * silu(z_t) (or dout_t):
//   g += dy_t C_t;  dC_t += dy_t h_t;  dB_t += g dt_t u_t;  du_t = dt_t <g, B_t> + D dy_t
//   d(dt_t) = <g, A a_t h_{t-1} + B_t u_t>;  dA += g a_t h_{t-1} dt_t;  g *= a_t for step t - 1
// and dinitial_state is the last g. With seq_idx, a chunk is walked run by run (Run in
// selective_scan_cpu.h): g restarts from dlast_state (or 0) at the last step of each sequence,
// is dinitial_state at its first, and padding runs get no gradient. Each run's states start with
// their own h_{t-1} (the checkpoint, or the start state of its sequence), so the states buffer
// holds one more state per run. A variable dB (or dC) sums over the channels of a group:
// the lanes of a block add into one (step, state, lane) buffer, summed over the lanes once per
// chunk into a float partial per block, and a last pass adds the blocks' partials in block order.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <memory>

#include "selective_scan/cpu/selective_scan_cpu.h"

namespace mamba_ext {
namespace selective_scan_cpu {
namespace {

// Chunks of at most kMaxChunk steps, as the sums over time of dA and a constant dB / dC run in
// float within a chunk (a double sum gets each chunk's); but a lane group keeps at most
// kMaxCheckpoints checkpoints, so for long sequences the chunks lengthen and the memory of a
// task is bounded whatever the length.
constexpr int64_t kMaxChunk = 64;
constexpr int64_t kMaxCheckpoints = 128;

// h (dstate, kLanes) advances over `len` steps in place (the shapes of scan_chunk).
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void advance_chunk(int64_t len, int64_t dstate, const acc_t* __restrict dt,
                                          const acc_t* __restrict dt_u,
                                          const acc_t* __restrict A_log2e, const acc_t* B,
                                          int64_t B_step, acc_t* __restrict h) {
  for (int64_t t = 0; t < len; ++t) {
    const acc_t* __restrict dt_t = dt + t * kLanes;
    const acc_t* __restrict dt_u_t = dt_u + t * kLanes;
    const acc_t* __restrict B_t = B + t * B_step;
    for (int64_t n = 0; n < dstate; ++n) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t i = n * kLanes + j;
        h[i] = exp2_polynomial(dt_t[j] * A_log2e[i]) * h[i] + dt_u_t[j] * B_t[i];
      }
    }
  }
}

// The states of a chunk from its checkpoint: states is (len + 1, dstate, kLanes) with states[0]
// the checkpoint h_{t0 - 1} on entry and states[t + 1] = h_{t0 + t} on return; decay
// (len, dstate, kLanes) gets a_t.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void recompute_chunk(int64_t len, int64_t dstate,
                                            const acc_t* __restrict dt,
                                            const acc_t* __restrict dt_u,
                                            const acc_t* __restrict A_log2e, const acc_t* B,
                                            int64_t B_step, acc_t* __restrict states,
                                            acc_t* __restrict decay) {
  const int64_t state_size = dstate * kLanes;
  for (int64_t t = 0; t < len; ++t) {
    const acc_t* __restrict dt_t = dt + t * kLanes;
    const acc_t* __restrict dt_u_t = dt_u + t * kLanes;
    const acc_t* __restrict B_t = B + t * B_step;
    const acc_t* __restrict h_prev = states + t * state_size;
    acc_t* __restrict h = states + (t + 1) * state_size;
    acc_t* __restrict a = decay + t * state_size;
    for (int64_t n = 0; n < dstate; ++n) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t i = n * kLanes + j;
        a[i] = exp2_polynomial(dt_t[j] * A_log2e[i]);
        h[i] = a[i] * h_prev[i] + dt_u_t[j] * B_t[i];
      }
    }
  }
}

// Backpropagates g (dstate, kLanes) through the `len` steps of a chunk, last step first (the
// header comment gives the formulas). dB and dC get the chunk's terms added per lane:
// (len, dstate, kLanes) for a variable one (step dstate * kLanes), one (dstate, kLanes) row for a
// constant one (step 0); dA (dstate, kLanes) gets its terms added. Per step and lane (each
// (len, kLanes)): du_dot = dt_t <g, B_t>, ddt = d(dt_t), y = <h_t, C_t>.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void backward_chunk(
    int64_t len, int64_t dstate, const acc_t* __restrict dt, const acc_t* __restrict dt_u,
    const acc_t* __restrict u, const acc_t* __restrict dy, const acc_t* __restrict A,
    const acc_t* B, int64_t B_step, const acc_t* C, int64_t C_step,
    const acc_t* __restrict states, const acc_t* __restrict decay, acc_t* __restrict g,
    acc_t* dB, int64_t dB_step, acc_t* dC, int64_t dC_step, acc_t* __restrict dA,
    acc_t* __restrict du_dot, acc_t* __restrict ddt, acc_t* __restrict y) {
  const int64_t state_size = dstate * kLanes;
  for (int64_t t = len - 1; t >= 0; --t) {
    const acc_t* __restrict dt_t = dt + t * kLanes;
    const acc_t* __restrict dt_u_t = dt_u + t * kLanes;
    const acc_t* __restrict u_t = u + t * kLanes;
    const acc_t* __restrict dy_t = dy + t * kLanes;
    const acc_t* __restrict B_t = B + t * B_step;
    const acc_t* __restrict C_t = C + t * C_step;
    acc_t* __restrict dB_t = dB + t * dB_step;
    acc_t* __restrict dC_t = dC + t * dC_step;
    const acc_t* __restrict h_prev = states + t * state_size;
    const acc_t* __restrict h = states + (t + 1) * state_size;
    const acc_t* __restrict a = decay + t * state_size;
    acc_t g_dot_B[kLanes] = {}, ddt_t[kLanes] = {}, y_t[kLanes] = {};
    for (int64_t n = 0; n < dstate; ++n) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t i = n * kLanes + j;
        const acc_t g_i = g[i] + dy_t[j] * C_t[i];
        const acc_t decayed = a[i] * h_prev[i];
        dC_t[i] += dy_t[j] * h[i];
        dB_t[i] += g_i * dt_u_t[j];
        dA[i] += g_i * decayed * dt_t[j];
        g_dot_B[j] += g_i * B_t[i];
        ddt_t[j] += g_i * (A[i] * decayed + u_t[j] * B_t[i]);
        y_t[j] += h[i] * C_t[i];
        g[i] = g_i * a[i];
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      du_dot[t * kLanes + j] = dt_t[j] * g_dot_B[j];
      ddt[t * kLanes + j] = ddt_t[j];
      y[t * kLanes + j] = y_t[j];
    }
  }
}

// dy = dout * silu(z), or dout when z is null; n elements.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void gate_gradient(int64_t n, const acc_t* __restrict z,
                                          const acc_t* __restrict dout, acc_t* __restrict dy) {
  if (z == nullptr) {
    std::copy(dout, dout + n, dy);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dy[i] = dout[i] * z[i] * sigmoid_vectorisable(z[i]);
}

// The per-step gradients of a chunk (len, kLanes) from backward_chunk's sums, in place: du_dot
// becomes du, ddt becomes ddelta, y becomes dz (when z is given). dD and ddelta_bias (kLanes,)
// get the chunk's terms added (in double: they are sums over batch and time); D is (kLanes,).
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void finish_gradients(
    int64_t len, const acc_t* __restrict D, bool delta_softplus, const acc_t* __restrict u,
    const acc_t* __restrict delta_biased, const acc_t* __restrict z,
    const acc_t* __restrict dout, const acc_t* __restrict dy, acc_t* __restrict du,
    acc_t* __restrict ddelta, acc_t* __restrict y, double* __restrict dD,
    double* __restrict ddelta_bias) {
  if (z != nullptr) {
    for (int64_t t = 0; t < len; ++t) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t i = t * kLanes + j;
        const acc_t s = sigmoid_vectorisable(z[i]);
        y[i] = dout[i] * (y[i] + D[j] * u[i]) * s * (acc_t(1) + z[i] * (acc_t(1) - s));
      }
    }
  }
  if (delta_softplus) {
#pragma omp simd
    for (int64_t i = 0; i < len * kLanes; ++i) ddelta[i] *= sigmoid_vectorisable(delta_biased[i]);
  }
  for (int64_t t = 0; t < len; ++t) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const int64_t i = t * kLanes + j;
      du[i] += D[j] * dy[i];
      dD[j] += dy[i] * u[i];
      ddelta_bias[j] += ddelta[i];
    }
  }
}

// Adds the blocks' partials of a variable dB or dC, (blocks_per_group, batch, ngroups, seqlen,
// dstate), in block order and writes the sum with the gradient's strides.
template <typename input_t, typename acc_t>
void reduce_partials(const acc_t* partials, const SelectiveScanBwdParams& p,
                     int64_t blocks_per_group, void* grad, int64_t batch_stride,
                     int64_t group_stride, int64_t dstate_stride, int64_t seqlen_stride) {
  const int64_t block_stride = p.batch * p.ngroups * p.seqlen * p.dstate;
  at::parallel_for(0, p.batch * p.ngroups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(p.dstate);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / p.ngroups, group = bg % p.ngroups;
      input_t* out = typed<input_t>(grad) + b * batch_stride + group * group_stride;
      for (int64_t t = 0; t < p.seqlen; ++t) {
        const acc_t* partial = partials + (bg * p.seqlen + t) * p.dstate;
        std::copy(partial, partial + p.dstate, sum.begin());
        for (int64_t j = 1; j < blocks_per_group; ++j)
          for (int64_t n = 0; n < p.dstate; ++n) sum[n] += partial[j * block_stride + n];
        for (int64_t n = 0; n < p.dstate; ++n)
          out[n * dstate_stride + t * seqlen_stride] = static_cast<input_t>(sum[n]);
      }
    }
  });
}

// The sum over the lanes of each (step, state) of a (len, dstate, kLanes) buffer, into dst
// (len, dstate).
template <typename acc_t>
void sum_over_lanes(const acc_t* src, int64_t len, int64_t dstate, acc_t* dst) {
  for (int64_t i = 0; i < len * dstate; ++i) {
    acc_t sum = 0;
    for (int64_t j = 0; j < kLanes; ++j) sum += src[i * kLanes + j];
    dst[i] = sum;
  }
}

template <typename acc_t> void add_to(const acc_t* src, int64_t n, double* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// A lane group's sums over batch and time, (dstate, kLanes) in double, into the lane group's
// rows of a (dim, dstate) weight gradient (dstate 1 for a (dim,) one).
template <typename acc_t>
void store_weight_gradient(const double* sum, int64_t dstate, Lanes lanes, void* grad,
                           int64_t dim_stride, int64_t dstate_stride) {
  for (int64_t j = 0; j < lanes.count; ++j)
    for (int64_t n = 0; n < dstate; ++n)
      typed<acc_t>(grad)[(lanes.first + j) * dim_stride + n * dstate_stride] =
          static_cast<acc_t>(sum[n * kLanes + j]);
}

}  // namespace
}  // namespace selective_scan_cpu

template <typename input_t> void selective_scan_bwd_cpu(const SelectiveScanBwdParams& p) {
  using namespace selective_scan_cpu;
  using acc_t = acc_type<input_t>;
  const ChannelBlocks blocks(p.dim, p.ngroups);
  const int64_t chunk =
      std::max(chunk_length(p.dstate, kMaxChunk), ceil_div(p.seqlen, kMaxCheckpoints));
  const int64_t nchunks = ceil_div(p.seqlen, chunk);
  const int64_t lane_groups = blocks.lane_groups();
  const int64_t state_size = p.dstate * kLanes;  // of one lane group

  // (blocks_per_group, batch, ngroups, seqlen, dstate) each, when variable.
  const int64_t partial_size =
      blocks.blocks_per_group * p.batch * p.ngroups * p.seqlen * p.dstate;
  // Left uninitialised (every element is written before it is read): filling them would cost
  // a pass over memory as large as the partials.
  std::unique_ptr<acc_t[]> dB_partials(new acc_t[p.is_variable_B ? partial_size : 0]);
  std::unique_ptr<acc_t[]> dC_partials(new acc_t[p.is_variable_C ? partial_size : 0]);

  at::parallel_for(0, blocks.count, 1, [&](int64_t task_begin, int64_t task_end) {
    auto B = StateInput<acc_t>::B(p, chunk, lane_groups);
    auto C = StateInput<acc_t>::C(p, chunk, lane_groups);
    // Per lane group, (dstate, kLanes) each, (kLanes,) for D and delta_bias.
    std::vector<acc_t> A_log2e(lane_groups * state_size), A(lane_groups * state_size),
        h(lane_groups * state_size), g(lane_groups * state_size);
    std::vector<acc_t> D(lane_groups * kLanes), delta_bias(lane_groups * kLanes);
    std::vector<acc_t> checkpoints(lane_groups * nchunks * state_size);  // (.., nchunks, ..)
    // Sums over batch and time per lane group, in double: each chunk's float sum is added to
    // them, so long sequences lose no precision.
    std::vector<double> dA_sum(lane_groups * state_size), dB_sum(lane_groups * state_size),
        dC_sum(lane_groups * state_size), dD_sum(lane_groups * kLanes),
        ddelta_bias_sum(lane_groups * kLanes);
    // The chunk: states (chunk + runs, dstate, kLanes) (run k's are from step offset + k, at most
    // one run without seq_idx and chunk with it), decay (chunk, dstate, kLanes); dB / dC
    // (chunk, dstate, kLanes) added over the block's lane groups when variable (then
    // (chunk, dstate) summed over lanes), one lane group's (dstate, kLanes) when constant.
    std::vector<acc_t> states((chunk + (p.seq_idx ? chunk : 1)) * state_size),
        decay(chunk * state_size);
    std::vector<acc_t> dB_chunk((p.is_variable_B ? chunk : 1) * state_size),
        dC_chunk((p.is_variable_C ? chunk : 1) * state_size);
    std::vector<acc_t> dA_chunk(state_size);
    // One lane group's rows over the chunk, (chunk, kLanes) each.
    std::vector<acc_t> u(chunk * kLanes), delta(chunk * kLanes), dt(chunk * kLanes),
        dt_u(chunk * kLanes), z(chunk * kLanes), dout(chunk * kLanes), dy(chunk * kLanes),
        du(chunk * kLanes), ddelta(chunk * kLanes), y(chunk * kLanes);
    std::vector<Run> runs;
    runs.reserve(chunk);

    for (int64_t block = task_begin; block < task_end; ++block) {
      const int64_t begin = blocks.begin(block), end = blocks.end(block);
      const int64_t group = blocks.group(block), block_in_group = block % blocks.blocks_per_group;
      const int64_t groups_here = ceil_div(end - begin, kLanes);
      B.load_block(begin, end);
      C.load_block(begin, end);
      for (int64_t lg = 0; lg < groups_here; ++lg) {
        const Lanes lanes = lane_group(begin, end, lg);
        load_weight_lanes(p.A, p.A_dim_stride, p.A_dstate_stride, p.dstate, lanes, kLog2e<acc_t>,
                          A_log2e.data() + lg * state_size);
        load_weight_lanes(p.A, p.A_dim_stride, p.A_dstate_stride, p.dstate, lanes, acc_t(1),
                          A.data() + lg * state_size);
        load_channel_lanes(p.D, p.D_stride, lanes, D.data() + lg * kLanes);
        load_channel_lanes(p.delta_bias, p.delta_bias_stride, lanes,
                           delta_bias.data() + lg * kLanes);
      }
      for (auto* sum : {&dA_sum, &dB_sum, &dC_sum, &dD_sum, &ddelta_bias_sum})
        std::fill(sum->begin(), sum->end(), 0.0);

      for (int64_t b = 0; b < p.batch; ++b) {
        // Forward: the checkpoints, the states h_{t0 - 1} before each chunk.
        for (int64_t c = 0; c < nchunks; ++c) {
          const int64_t t0 = c * chunk, len = std::min(chunk, p.seqlen - t0);
          split_runs(p, b, t0, len, runs);
          B.template load_chunk<input_t>(b, group, t0, len);
          for (int64_t lg = 0; lg < groups_here; ++lg) {
            const Lanes lanes = lane_group(begin, end, lg);
            acc_t* h_lg = h.data() + lg * state_size;
            std::copy(h_lg, h_lg + state_size,
                      checkpoints.data() + (lg * nchunks + c) * state_size);
            load_step_inputs<input_t>(p, b, lanes, lane_group(begin, end, lg + 1), t0, len,
                                      delta_bias.data() + lg * kLanes, u.data(), delta.data(),
                                      dt.data(), dt_u.data());
            for (const Run& run : runs) {
              reset_state(p, b, t0, run, lanes, h_lg);
              if (run.padding) continue;
              advance_chunk(run.len, p.dstate, dt.data() + run.offset * kLanes,
                            dt_u.data() + run.offset * kLanes, A_log2e.data() + lg * state_size,
                            B.rows(lg) + run.offset * B.step(), B.step(), h_lg);
            }
          }
        }

        // Backward, chunk by chunk from the last. Per-row mode's g for seqlen 0; the last step of
        // a sequence loads it again.
        for (int64_t lg = 0; lg < groups_here; ++lg)
          load_state_lanes(p.dlast_state, p.dlast_state_batch_stride, p.dlast_state_dim_stride,
                           p.dlast_state_dstate_stride, p.num_sequences > 0 ? -1 : b, p.dstate,
                           lane_group(begin, end, lg), g.data() + lg * state_size);
        for (int64_t c = nchunks - 1; c >= 0; --c) {
          const int64_t t0 = c * chunk, len = std::min(chunk, p.seqlen - t0);
          split_runs(p, b, t0, len, runs);
          B.template load_chunk<input_t>(b, group, t0, len);
          C.template load_chunk<input_t>(b, group, t0, len);
          if (p.is_variable_B) std::fill(dB_chunk.begin(), dB_chunk.begin() + len * state_size, 0);
          if (p.is_variable_C) std::fill(dC_chunk.begin(), dC_chunk.begin() + len * state_size, 0);
          for (int64_t lg = 0; lg < groups_here; ++lg) {
            const Lanes lanes = lane_group(begin, end, lg), next = lane_group(begin, end, lg + 1);
            load_step_inputs<input_t>(p, b, lanes, next, t0, len, delta_bias.data() + lg * kLanes,
                                      u.data(), delta.data(), dt.data(), dt_u.data());
            load_lanes<input_t>(p.dout, p.dout_batch_stride, p.dout_dim_stride,
                                p.dout_seqlen_stride, b, lanes, next, t0, len, dout.data());
            if (p.z != nullptr)
              load_lanes<input_t>(p.z, p.z_batch_stride, p.z_dim_stride, p.z_seqlen_stride, b,
                                  lanes, next, t0, len, z.data());
            const acc_t* z_or_null = p.z ? z.data() : nullptr;
            gate_gradient(len * kLanes, z_or_null, dout.data(), dy.data());

            // The states of each run from its h_{t-1}: the checkpoint for a first run that
            // continues the previous chunk's sequence, the start state for a run that starts one.
            const acc_t* checkpoint = checkpoints.data() + (lg * nchunks + c) * state_size;
            for (size_t k = 0; k < runs.size(); ++k) {
              const Run& run = runs[k];
              if (run.padding) continue;
              acc_t* run_states = states.data() + (run.offset + k) * state_size;
              if (run.starts)
                reset_state(p, b, t0, run, lanes, run_states);
              else
                std::copy(checkpoint, checkpoint + state_size, run_states);
              recompute_chunk(run.len, p.dstate, dt.data() + run.offset * kLanes,
                              dt_u.data() + run.offset * kLanes,
                              A_log2e.data() + lg * state_size,
                              B.rows(lg) + run.offset * B.step(), B.step(), run_states,
                              decay.data() + run.offset * state_size);
            }
            if (!p.is_variable_B) std::fill(dB_chunk.begin(), dB_chunk.end(), 0);
            if (!p.is_variable_C) std::fill(dC_chunk.begin(), dC_chunk.end(), 0);
            std::fill(dA_chunk.begin(), dA_chunk.end(), 0);
            acc_t* g_lg = g.data() + lg * state_size;
            for (size_t k = runs.size(); k-- > 0;) {
              const Run& run = runs[k];
              if (run.ends || run.padding)
                load_state_lanes(p.dlast_state, p.dlast_state_batch_stride,
                                 p.dlast_state_dim_stride, p.dlast_state_dstate_stride,
                                 end_row(p, b, t0, run), p.dstate, lanes, g_lg);
              if (run.padding) continue;
              const int64_t at = run.offset * kLanes;
              backward_chunk(run.len, p.dstate, dt.data() + at, dt_u.data() + at, u.data() + at,
                             dy.data() + at, A.data() + lg * state_size,
                             B.rows(lg) + run.offset * B.step(), B.step(),
                             C.rows(lg) + run.offset * C.step(), C.step(),
                             states.data() + (run.offset + k) * state_size,
                             decay.data() + run.offset * state_size, g_lg,
                             dB_chunk.data() + run.offset * B.step(), B.step(),
                             dC_chunk.data() + run.offset * C.step(), C.step(), dA_chunk.data(),
                             du.data() + at, ddelta.data() + at, y.data() + at);
              if (run.starts && p.num_sequences > 0 && p.dinitial_state != nullptr)
                store_state_lanes(g_lg, p.dinitial_state, p.dinitial_state_batch_stride,
                                  p.dinitial_state_dim_stride, p.dinitial_state_dstate_stride,
                                  run.id, p.dstate, lanes);
            }
            // Padding steps have no gradient: what finish_gradients reads there is zeroed.
            zero_padding<acc_t>(runs, {dout.data(), dy.data(), du.data(), ddelta.data(),
                                       y.data()});
            finish_gradients(len, D.data() + lg * kLanes, p.delta_softplus, u.data(),
                             delta.data(), z_or_null, dout.data(), dy.data(), du.data(),
                             ddelta.data(), y.data(), dD_sum.data() + lg * kLanes,
                             ddelta_bias_sum.data() + lg * kLanes);
            add_to(dA_chunk.data(), state_size, dA_sum.data() + lg * state_size);
            if (!p.is_variable_B)
              add_to(dB_chunk.data(), state_size, dB_sum.data() + lg * state_size);
            if (!p.is_variable_C)
              add_to(dC_chunk.data(), state_size, dC_sum.data() + lg * state_size);

            store_lanes<input_t>(du.data(), p.du, p.du_batch_stride, p.du_dim_stride,
                                 p.du_seqlen_stride, b, lanes, next, t0, len);
            store_lanes<input_t>(ddelta.data(), p.ddelta, p.ddelta_batch_stride,
                                 p.ddelta_dim_stride, p.ddelta_seqlen_stride, b, lanes, next, t0,
                                 len);
            if (p.dz != nullptr)
              store_lanes<input_t>(y.data(), p.dz, p.dz_batch_stride, p.dz_dim_stride,
                                   p.dz_seqlen_stride, b, lanes, next, t0, len);
          }
          // This block's partial of the variable dB / dC over the chunk.
          const int64_t partial_offset =
              (((block_in_group * p.batch + b) * p.ngroups + group) * p.seqlen + t0) * p.dstate;
          if (p.is_variable_B)
            sum_over_lanes(dB_chunk.data(), len, p.dstate, dB_partials.get() + partial_offset);
          if (p.is_variable_C)
            sum_over_lanes(dC_chunk.data(), len, p.dstate, dC_partials.get() + partial_offset);
        }

        // Per-row mode: g at step 0 (0 when it is padding); per-sequence ones are stored above.
        if (p.dinitial_state != nullptr && p.num_sequences == 0)
          for (int64_t lg = 0; lg < groups_here; ++lg)
            store_state_lanes(g.data() + lg * state_size, p.dinitial_state,
                              p.dinitial_state_batch_stride, p.dinitial_state_dim_stride,
                              p.dinitial_state_dstate_stride, b, p.dstate,
                              lane_group(begin, end, lg));
      }

      for (int64_t lg = 0; lg < groups_here; ++lg) {
        const Lanes lanes = lane_group(begin, end, lg);
        store_weight_gradient<acc_t>(dA_sum.data() + lg * state_size, p.dstate, lanes, p.dA,
                                     p.dA_dim_stride, p.dA_dstate_stride);
        if (!p.is_variable_B)
          store_weight_gradient<acc_t>(dB_sum.data() + lg * state_size, p.dstate, lanes, p.dB,
                                       p.dB_dim_stride, p.dB_dstate_stride);
        if (!p.is_variable_C)
          store_weight_gradient<acc_t>(dC_sum.data() + lg * state_size, p.dstate, lanes, p.dC,
                                       p.dC_dim_stride, p.dC_dstate_stride);
        if (p.dD != nullptr)
          store_weight_gradient<acc_t>(dD_sum.data() + lg * kLanes, 1, lanes, p.dD, p.dD_stride,
                                       0);
        if (p.ddelta_bias != nullptr)
          store_weight_gradient<acc_t>(ddelta_bias_sum.data() + lg * kLanes, 1, lanes,
                                       p.ddelta_bias, p.ddelta_bias_stride, 0);
      }
    }
  });

  if (p.is_variable_B)
    reduce_partials<input_t>(dB_partials.get(), p, blocks.blocks_per_group, p.dB,
                             p.dB_batch_stride, p.dB_group_stride, p.dB_dstate_stride,
                             p.dB_seqlen_stride);
  if (p.is_variable_C)
    reduce_partials<input_t>(dC_partials.get(), p, blocks.blocks_per_group, p.dC,
                             p.dC_batch_stride, p.dC_group_stride, p.dC_dstate_stride,
                             p.dC_seqlen_stride);
}

template void selective_scan_bwd_cpu<float>(const SelectiveScanBwdParams&);
template void selective_scan_bwd_cpu<double>(const SelectiveScanBwdParams&);
template void selective_scan_bwd_cpu<c10::Half>(const SelectiveScanBwdParams&);
template void selective_scan_bwd_cpu<c10::BFloat16>(const SelectiveScanBwdParams&);

}  // namespace mamba_ext
