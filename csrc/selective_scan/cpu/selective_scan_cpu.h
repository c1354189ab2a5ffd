// What the CPU forward and backward kernels of the selective scan share: the split of channels
// into blocks and lane groups, the walk over time in chunks, the loads that put a chunk in the
// layout the recurrence reads, and float math written so that loops calling it vectorise.
//
// Layout of the work: a block is a few channels of one group, so they read the same B and C; it
// is walked as lane groups of kLanes channels, the vector lanes of the recurrence. Time is walked
// in chunks. Per chunk, activations are loaded as (step, lane) rows, B and C as (step, state,
// lane) rows (a variable one gathered once per block and repeated over the lanes; a constant one
// is a (state, lane) row per lane group, read at every step), and each lane group runs
// h[n][lane] = exp(dt[lane] A[n][lane]) h[n][lane] + dt[lane] u[lane] B[n][lane] with an inner
// loop over the lanes that the compiler turns into straight vector code. Vectorising over
// channels rather than dstate leaves no sum across lanes in a step and no padding of dstate.
// Padding lanes (a group's channel count need not be a multiple of kLanes) carry zeros:
// u = 0 and A = 0 keep their state at zero, and their results are not stored.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "common/math.h"
#include "selective_scan/selective_scan.h"

// The hot loops are compiled twice, for AVX2 + FMA and for the baseline x86-64 the build
// targets, and the loader picks one by the CPU (GCC function multiversioning): on an AVX2 machine
// that doubles the width of every vector loop without changing the build flags.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MAMBA_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MAMBA_CPU_MULTIVERSION
#endif

namespace mamba_ext {
namespace selective_scan_cpu {

// Channels per lane group: 8 floats fill an AVX2 register.
constexpr int64_t kLanes = 8;
// A block has about this many channels (they share one gather of each chunk of B and C), and a
// group at most kMaxBlocksPerGroup blocks: the backward keeps a float partial of a variable dB
// and dC per block, so this bounds that scratch to kMaxBlocksPerGroup times their size.
constexpr int64_t kBlockChannels = 32;
constexpr int64_t kMaxBlocksPerGroup = 64;
// A chunk's (step, state, lane) buffers hold about this many floats (64 KiB, within L2), which
// sets the chunk length: 128 steps at dstate 16, 32 at dstate 64, 16 from dstate 128, capped at
// max_chunk.
constexpr int64_t kChunkFloats = 16384;
constexpr int64_t kMinChunk = 16;

template <typename acc_t> constexpr acc_t kLog2e = acc_t(1.4426950408889634);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t chunk_length(int64_t dstate, int64_t max_chunk) {
  return std::clamp(kChunkFloats / (dstate * kLanes), kMinChunk, max_chunk);
}

// The channels of each group split into blocks of whole lane groups; the split depends on the
// shapes only, never on the number of threads, so every reduction over blocks is done in the
// same order whatever the machine.
struct ChannelBlocks {
  int64_t channels_per_group, block_len, blocks_per_group, count;

  ChannelBlocks(int64_t dim, int64_t ngroups) : channels_per_group(dim / ngroups) {
    const int64_t wanted =
        std::min(kMaxBlocksPerGroup, ceil_div(channels_per_group, kBlockChannels));
    block_len = wanted > 0 ? ceil_div(ceil_div(channels_per_group, wanted), kLanes) * kLanes : 0;
    blocks_per_group = block_len > 0 ? ceil_div(channels_per_group, block_len) : 0;
    count = ngroups * blocks_per_group;
  }

  int64_t lane_groups() const { return block_len / kLanes; }
  int64_t group(int64_t block) const { return block / blocks_per_group; }
  int64_t begin(int64_t block) const {
    return group(block) * channels_per_group + (block % blocks_per_group) * block_len;
  }
  int64_t end(int64_t block) const {
    return std::min(begin(block) + block_len, (group(block) + 1) * channels_per_group);
  }
};

// The channels [first, first + count) of a lane group, count <= kLanes.
struct Lanes {
  int64_t first, count;
};

// Lane group `index` of the block [begin, end); empty (count 0) past the end.
inline Lanes lane_group(int64_t begin, int64_t end, int64_t index) {
  const int64_t first = begin + index * kLanes;
  return {first, std::clamp(end - first, int64_t(0), kLanes)};
}

template <typename T> const T* typed(const void* p) { return static_cast<const T*>(p); }
template <typename T> T* typed(void* p) { return static_cast<T*>(p); }

// c ? a : b through the bits. Under GCC's default -ftrapping-math a float compare may trap, so
// GCC does not run it unconditionally and a float ?: stays a branch that the vectoriser refuses
// ("control flow in loop"; common/math.h's exp_polynomial, clamped with ?:, is such a loop).
// Integer masks are a vector blend whatever the flags the kernels are built with.
inline float select_bits(bool c, float a, float b) {
  int32_t a_bits, b_bits;
  std::memcpy(&a_bits, &a, sizeof(a));
  std::memcpy(&b_bits, &b, sizeof(b));
  const int32_t mask = -static_cast<int32_t>(c);
  const int32_t bits = (a_bits & mask) | (b_bits & ~mask);
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

// 2^x for float in plain arithmetic (vectorises; a libm call would not): 2^x = 2^k 2^r with
// k = round(x), r in [-1/2, 1/2], and 2^r by a degree-6 polynomial fitted for minimax relative
// error (2e-9 in exact arithmetic, about 1e-7 = 1.7 ulp in float). The scan computes
// exp(dt A) as 2^(dt A log2(e)) with A log2(e) precomputed per channel, which saves the two-part
// ln 2 reduction and the multiply of exp_polynomial. k is clamped to [-126, 127] as an integer
// (two instructions; a float clamp of x through select_bits would be four): below -126 the result
// is about 2^-126, the smallest normal float, instead of 2^x; above 127 it stays finite.
inline float exp2_polynomial(float x) {
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds x to an integer in the mantissa
  const float shifted = x + kRound;
  const float r = x - (shifted - kRound);
  float p = 1.53458110e-4f;
  p = p * r + 1.33999309e-3f;
  p = p * r + 9.61848907e-3f;
  p = p * r + 5.55032864e-2f;
  p = p * r + 2.40226462e-1f;
  p = p * r + 6.93147182e-1f;
  p = p * r + 1.0f;
  // For |x| < 2^22 the bits of `shifted` minus those of kRound are k. Beyond, the difference has
  // x's sign and a magnitude above 127 (or it is NaN, whose r is NaN), so the clamp still holds.
  int32_t bits, round_bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  std::memcpy(&round_bits, &kRound, sizeof(round_bits));
  const int32_t k = std::min(std::max(bits - round_bits, int32_t(-126)), int32_t(127));
  const int32_t scale_bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}
inline double exp2_polynomial(double x) { return std::exp2(x); }

// log1p(e) for e in [0, 1] in plain arithmetic: log1p(e) = 2 atanh(s) with s = e / (2 + e) in
// [0, 1/3], and atanh(s) / s by a degree-4 polynomial in s^2 (minimax, 4e-9 relative; 2.2e-7 in
// float). Accurate in relative terms down to the smallest e, unlike log(1 + e).
inline float log1p_unit_interval(float e) {
  const float s = e / (2.0f + e);
  const float w = s * s;
  float p = 0.140889943f;
  p = p * w + 0.139803350f;
  p = p * w + 0.200124532f;
  p = p * w + 0.333331585f;
  p = p * w + 1.0f;
  return 2.0f * s * p;
}

// softplus and sigmoid as common/math.h defines them, in arithmetic that vectorises for float.
inline float exp_vectorisable(float x) { return exp2_polynomial(x * kLog2e<float>); }
inline float softplus_vectorisable(float x) {
  const float log_term = log1p_unit_interval(exp_vectorisable(-std::fabs(x)));
  return select_bits(x > 20.0f, x, select_bits(x > 0.0f, x, 0.0f) + log_term);
}
inline double softplus_vectorisable(double x) { return softplus(x); }
inline float sigmoid_vectorisable(float x) { return 1.0f / (1.0f + exp_vectorisable(-x)); }
inline double sigmoid_vectorisable(double x) { return sigmoid(x); }

// dt of a chunk, (len, kLanes): delta gets delta_bias (kLanes,) added in place (the backward
// needs it for the softplus gradient), dt is its softplus (or itself), dt_u = dt u.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void compute_dt(int64_t len, const acc_t* __restrict delta_bias,
                                       bool delta_softplus, const acc_t* __restrict u,
                                       acc_t* __restrict delta, acc_t* __restrict dt,
                                       acc_t* __restrict dt_u) {
  for (int64_t t = 0; t < len; ++t) {
    acc_t* __restrict delta_t = delta + t * kLanes;
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) delta_t[j] += delta_bias[j];
  }
  if (delta_softplus) {
#pragma omp simd
    for (int64_t i = 0; i < len * kLanes; ++i) dt[i] = softplus_vectorisable(delta[i]);
  } else {
    std::copy(delta, delta + len * kLanes, dt);
  }
#pragma omp simd
  for (int64_t i = 0; i < len * kLanes; ++i) dt_u[i] = dt[i] * u[i];
}

// Asks for the cache lines of steps [t0, t0 + len) of the rows of channels [first, first + count)
// of batch entry b. The chunks of a row are short (a few hundred bytes) and visited one lane
// group after another, too briefly for the hardware prefetcher: the loads and stores of a lane
// group ask for the next one's rows, which arrive while this one computes. Always inlined:
// GCC's interprocedural analysis takes a function of prefetches alone for one without effects
// and deletes its calls.
template <typename input_t>
[[gnu::always_inline]] inline void prefetch_rows(const void* base, int64_t batch_stride,
                                                int64_t dim_stride, int64_t seqlen_stride,
                                                int64_t b, Lanes next, int64_t t0, int64_t len,
                                                bool for_write) {
  // Steps per 64-byte line; a row broadcast over time (stride 0, as autograd passes the
  // gradient of a sum) is one line.
  const int64_t step_bytes = std::abs(seqlen_stride) * static_cast<int64_t>(sizeof(input_t));
  const int64_t line = step_bytes == 0 ? len : std::max<int64_t>(1, 64 / step_bytes);
  for (int64_t j = 0; j < next.count; ++j) {
    const input_t* row = typed<input_t>(base) + b * batch_stride + (next.first + j) * dim_stride +
                         t0 * seqlen_stride;
    for (int64_t t = 0; t < len; t += line) {
      if (for_write)
        __builtin_prefetch(row + t * seqlen_stride, 1);
      else
        __builtin_prefetch(row + t * seqlen_stride, 0);
    }
  }
}

// Steps [t0, t0 + len) of the lane group's rows of batch entry b of a (batch, dim, seqlen)
// activation, into dst (len, kLanes) with zeros in the padding lanes; prefetches those of the
// lane group `next` (count 0 for none).
template <typename input_t, typename acc_t>
void load_lanes(const void* base, int64_t batch_stride, int64_t dim_stride,
                int64_t seqlen_stride, int64_t b, Lanes lanes, Lanes next, int64_t t0,
                int64_t len, acc_t* dst) {
  prefetch_rows<input_t>(base, batch_stride, dim_stride, seqlen_stride, b, next, t0, len, false);
  // Steps outside, lanes inside: eight rows are read side by side and each step is written as
  // one contiguous row of dst (twice as fast as a row at a time with strided writes).
  const input_t* rows[kLanes];
  for (int64_t j = 0; j < lanes.count; ++j)
    rows[j] = typed<input_t>(base) + b * batch_stride + (lanes.first + j) * dim_stride +
              t0 * seqlen_stride;
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t j = 0; j < lanes.count; ++j)
      dst[t * kLanes + j] = static_cast<acc_t>(rows[j][t * seqlen_stride]);
    for (int64_t j = lanes.count; j < kLanes; ++j) dst[t * kLanes + j] = acc_t(0);
  }
}

// The reverse of load_lanes: src (len, kLanes) into the lane group's rows, padding dropped.
template <typename input_t, typename acc_t>
void store_lanes(const acc_t* src, void* base, int64_t batch_stride, int64_t dim_stride,
                 int64_t seqlen_stride, int64_t b, Lanes lanes, Lanes next, int64_t t0,
                 int64_t len) {
  prefetch_rows<input_t>(base, batch_stride, dim_stride, seqlen_stride, b, next, t0, len, true);
  input_t* rows[kLanes];
  for (int64_t j = 0; j < lanes.count; ++j)
    rows[j] = typed<input_t>(base) + b * batch_stride + (lanes.first + j) * dim_stride +
              t0 * seqlen_stride;
  for (int64_t t = 0; t < len; ++t)
    for (int64_t j = 0; j < lanes.count; ++j)
      rows[j][t * seqlen_stride] = static_cast<input_t>(src[t * kLanes + j]);
}

// The lane group's rows of a (dim, dstate) weight times `scale`, into dst (dstate, kLanes).
template <typename acc_t>
void load_weight_lanes(const void* base, int64_t dim_stride, int64_t dstate_stride,
                       int64_t dstate, Lanes lanes, acc_t scale, acc_t* dst) {
  for (int64_t n = 0; n < dstate; ++n)
    for (int64_t j = 0; j < kLanes; ++j)
      dst[n * kLanes + j] = j < lanes.count
          ? typed<acc_t>(base)[(lanes.first + j) * dim_stride + n * dstate_stride] * scale
          : acc_t(0);
}

// The lane group's entries of a (dim,) weight into dst (kLanes,); zeros when it is absent.
template <typename acc_t>
void load_channel_lanes(const void* base, int64_t stride, Lanes lanes, acc_t* dst) {
  for (int64_t j = 0; j < kLanes; ++j)
    dst[j] = base != nullptr && j < lanes.count ? typed<acc_t>(base)[(lanes.first + j) * stride]
                                                : acc_t(0);
}

// The lane group's rows of row b of a (rows, dim, dstate) state into dst (dstate, kLanes);
// zeros when it is absent or b is -1.
template <typename acc_t>
void load_state_lanes(const void* state, int64_t batch_stride, int64_t dim_stride,
                      int64_t dstate_stride, int64_t b, int64_t dstate, Lanes lanes, acc_t* dst) {
  if (state == nullptr || b < 0) {
    std::fill(dst, dst + dstate * kLanes, acc_t(0));
    return;
  }
  load_weight_lanes(typed<acc_t>(state) + b * batch_stride, dim_stride, dstate_stride, dstate,
                    lanes, acc_t(1), dst);
}

// The reverse of load_state_lanes: src (dstate, kLanes) into the lane group's rows.
template <typename acc_t>
void store_state_lanes(const acc_t* src, void* state, int64_t batch_stride, int64_t dim_stride,
                       int64_t dstate_stride, int64_t b, int64_t dstate, Lanes lanes) {
  for (int64_t j = 0; j < lanes.count; ++j)
    for (int64_t n = 0; n < dstate; ++n)
      typed<acc_t>(state)[b * batch_stride + (lanes.first + j) * dim_stride + n * dstate_stride] =
          src[n * kLanes + j];
}

// u, delta + delta_bias, dt and dt u of a lane group of batch entry b over [t0, t0 + len), each
// (len, kLanes); delta_bias is the lane group's (kLanes,). Prefetches the rows of `next`.
template <typename input_t, typename acc_t>
void load_step_inputs(const SelectiveScanFwdParams& p, int64_t b, Lanes lanes, Lanes next,
                      int64_t t0, int64_t len, const acc_t* delta_bias, acc_t* u, acc_t* delta,
                      acc_t* dt, acc_t* dt_u) {
  load_lanes<input_t>(p.u, p.u_batch_stride, p.u_dim_stride, p.u_seqlen_stride, b, lanes, next,
                      t0, len, u);
  load_lanes<input_t>(p.delta, p.delta_batch_stride, p.delta_dim_stride, p.delta_seqlen_stride,
                      b, lanes, next, t0, len, delta);
  compute_dt(len, delta_bias, p.delta_softplus, u, delta, dt, dt_u);
}

// A run of steps [t0 + offset, t0 + offset + len) of one row that share a seq_idx value, within
// a chunk: the kernels walk a chunk run by run, resetting the state where a sequence starts.
// Without seq_idx a chunk is one run of sequence 0.
struct Run {
  int64_t offset, len;
  int32_t id;        // seq_idx of its steps
  bool padding;      // seq_idx = -1: out 0, state 0, no gradient
  bool starts, ends;  // its first step starts a sequence, its last step ends one
};

// The runs of steps [t0, t0 + len) of row b into `runs` (cleared first).
inline void split_runs(const SelectiveScanFwdParams& p, int64_t b, int64_t t0, int64_t len,
                       std::vector<Run>& runs) {
  runs.clear();
  if (p.seq_idx == nullptr) {
    runs.push_back({0, len, 0, false, t0 == 0, t0 + len == p.seqlen});
    return;
  }
  const int32_t* ids = p.seq_idx + b * p.seq_idx_batch_stride;
  auto id_at = [&](int64_t t) { return ids[t * p.seq_idx_seqlen_stride]; };
  int64_t offset = 0;
  while (offset < len) {
    const int32_t id = id_at(t0 + offset);
    int64_t end = offset + 1;
    while (end < len && id_at(t0 + end) == id) ++end;
    const int64_t first = t0 + offset, last = t0 + end - 1;
    runs.push_back({offset, end - offset, id, id == -1,
                    first == 0 || id_at(first - 1) != id,
                    last == p.seqlen - 1 || id_at(last + 1) != id});
    offset = end;
  }
}

// The row of a (rows, dim, dstate) state that a run starting a sequence begins from
// (initial_state, dinitial_state) or that one ending it ends in (last_state, dlast_state); -1
// when there is none: the state is 0 there, or the sequence's state is not kept. Per-row mode
// keeps row b's state at its first and last step; per-sequence mode every sequence's.
inline int64_t start_row(const SelectiveScanFwdParams& p, int64_t b, int64_t t0, const Run& run) {
  if (run.padding) return -1;
  if (p.num_sequences > 0) return run.id;
  return t0 + run.offset == 0 ? b : -1;
}
inline int64_t end_row(const SelectiveScanFwdParams& p, int64_t b, int64_t t0, const Run& run) {
  if (run.padding) return -1;
  if (p.num_sequences > 0) return run.id;
  return t0 + run.offset + run.len == p.seqlen ? b : -1;
}

// Where a run starts a sequence, h (dstate, kLanes) of a lane group becomes the sequence's start
// state; through padding it is 0.
template <typename acc_t>
void reset_state(const SelectiveScanFwdParams& p, int64_t b, int64_t t0, const Run& run,
                 Lanes lanes, acc_t* h) {
  if (run.starts || run.padding)
    load_state_lanes(p.initial_state, p.initial_state_batch_stride, p.initial_state_dim_stride,
                     p.initial_state_dstate_stride, start_row(p, b, t0, run), p.dstate, lanes, h);
}

// Zeros the steps of the padding runs in each (len, kLanes) buffer.
template <typename acc_t>
void zero_padding(const std::vector<Run>& runs, std::initializer_list<acc_t*> buffers) {
  for (const Run& run : runs)
    if (run.padding)
      for (acc_t* buffer : buffers)
        std::fill(buffer + run.offset * kLanes, buffer + (run.offset + run.len) * kLanes,
                  acc_t(0));
}

// B or C as the recurrence reads it: (step, state, lane) rows of acc_t. A variable one is
// gathered chunk by chunk for the block's group and repeated over the lanes; a constant one is
// loaded once per block as a (state, lane) row per lane group, read at every step (step 0).
template <typename acc_t> class StateInput {
 public:
  StateInput(const void* base, bool variable, int64_t batch_stride, int64_t group_stride,
             int64_t dim_stride, int64_t dstate_stride, int64_t seqlen_stride, int64_t dstate,
             int64_t max_chunk, int64_t max_lane_groups)
      : base_(base), variable_(variable), batch_stride_(batch_stride),
        group_stride_(group_stride), dim_stride_(dim_stride), dstate_stride_(dstate_stride),
        seqlen_stride_(seqlen_stride), dstate_(dstate),
        rows_((variable ? max_chunk : max_lane_groups) * dstate * kLanes) {}

  static StateInput B(const SelectiveScanFwdParams& p, int64_t max_chunk,
                      int64_t max_lane_groups) {
    return StateInput(p.B, p.is_variable_B, p.B_batch_stride, p.B_group_stride, p.B_dim_stride,
                      p.B_dstate_stride, p.B_seqlen_stride, p.dstate, max_chunk, max_lane_groups);
  }
  static StateInput C(const SelectiveScanFwdParams& p, int64_t max_chunk,
                      int64_t max_lane_groups) {
    return StateInput(p.C, p.is_variable_C, p.C_batch_stride, p.C_group_stride, p.C_dim_stride,
                      p.C_dstate_stride, p.C_seqlen_stride, p.dstate, max_chunk, max_lane_groups);
  }

  // A constant one: the rows of the block's channels [begin, end).
  void load_block(int64_t begin, int64_t end) {
    if (variable_) return;
    for (int64_t index = 0; index * kLanes < end - begin; ++index)
      load_weight_lanes(base_, dim_stride_, dstate_stride_, dstate_,
                        lane_group(begin, end, index), acc_t(1), rows(index));
  }

  // A variable one: the steps [t0, t0 + len) of batch entry b and group `group`. Reading along
  // time in the inner loop keeps the reads sequential (B's dstate stride is seqlen).
  template <typename input_t> void load_chunk(int64_t b, int64_t group, int64_t t0, int64_t len) {
    if (!variable_) return;
    const input_t* src = typed<input_t>(base_) + b * batch_stride_ + group * group_stride_ +
                         t0 * seqlen_stride_;
    for (int64_t n = 0; n < dstate_; ++n) {
      const input_t* row = src + n * dstate_stride_;
      for (int64_t t = 0; t < len; ++t) {
        const acc_t value = static_cast<acc_t>(row[t * seqlen_stride_]);
        acc_t* dst = rows_.data() + (t * dstate_ + n) * kLanes;
        for (int64_t j = 0; j < kLanes; ++j) dst[j] = value;
      }
    }
  }

  // The first row lane group `index` reads, and the distance between steps.
  acc_t* rows(int64_t index) {
    return variable_ ? rows_.data() : rows_.data() + index * dstate_ * kLanes;
  }
  int64_t step() const { return variable_ ? dstate_ * kLanes : 0; }

 private:
  const void* base_;
  bool variable_;
  int64_t batch_stride_, group_stride_, dim_stride_, dstate_stride_, seqlen_stride_, dstate_;
  std::vector<acc_t> rows_;
};

}  // namespace selective_scan_cpu
}  // namespace mamba_ext
