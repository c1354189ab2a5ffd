// What the CPU forward and backward kernels of the selective scan share: the split of channels
// into blocks, the walk over time in chunks, the gathers that turn a chunk of B or C into
// contiguous [step][dstate] rows, and float math written so that loops calling it vectorise.
//
// Layout of the work: a block is a few channels of one group, so they read the same B and C.
// Time is walked in chunks; each chunk of B and C is gathered once per block into [step][dstate]
// buffers (B's dstate stride is seqlen, so vectorising over dstate needs that transpose), and
// then every channel of the block runs its recurrence over the chunk with an inner loop over
// dstate that the compiler vectorises. dstate is padded to a multiple of kLanes with zeros in A,
// B, C and h, which leaves the padded lanes of h at zero and the sums unchanged.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// dstate is padded to a multiple of this: 8 floats fill an AVX2 register. The hot loops walk
// dstate in blocks of kLanes with an inner loop of fixed length, which the compiler turns into
// straight vector code, and keep sums over dstate as kLanes partial sums (sum_lanes at the end
// of a step) rather than as an OpenMP reduction, which GCC spills to memory in every clone.
constexpr int64_t kLanes = 8;
// Steps of a chunk in the forward: its [step][dstate] buffers of B and C stay in L1 / L2.
constexpr int64_t kForwardChunk = 256;
// A block has at most this many channels (it shares one gather of each chunk of B and C), and
// a group at most kMaxBlocksPerGroup blocks: the backward keeps a float partial of the variable
// dB and dC per block, so this bounds that scratch to kMaxBlocksPerGroup times their size.
constexpr int64_t kBlockChannels = 16;
constexpr int64_t kMaxBlocksPerGroup = 64;

template <typename acc_t> constexpr acc_t kLog2e = acc_t(1.4426950408889634);

inline int64_t padded_dstate(int64_t dstate) { return (dstate + kLanes - 1) / kLanes * kLanes; }

// The channels of each group split into blocks of nearly equal length; the split depends on
// the shapes only, never on the number of threads, so every reduction over blocks is done in
// the same order whatever the machine.
struct ChannelBlocks {
  int64_t channels_per_group, blocks_per_group, block_len, count;

  ChannelBlocks(int64_t dim, int64_t ngroups)
      : channels_per_group(dim / ngroups),
        blocks_per_group(std::min(kMaxBlocksPerGroup,
                                  (channels_per_group + kBlockChannels - 1) / kBlockChannels)),
        block_len(blocks_per_group > 0
                      ? (channels_per_group + blocks_per_group - 1) / blocks_per_group
                      : 0),
        count(ngroups * blocks_per_group) {}

  int64_t group(int64_t block) const { return block / blocks_per_group; }
  int64_t begin(int64_t block) const {
    return group(block) * channels_per_group + (block % blocks_per_group) * block_len;
  }
  int64_t end(int64_t block) const {
    return std::min(begin(block) + block_len, (group(block) + 1) * channels_per_group);
  }
};

// The sum of kLanes partial sums as a tree: halves of a vector added, not eight dependent adds.
template <typename acc_t> acc_t sum_lanes(const acc_t* lanes) {
  static_assert(kLanes == 8, "sum_lanes adds 8 lanes");
  acc_t half[4], quarter[2];
  for (int64_t j = 0; j < 4; ++j) half[j] = lanes[j] + lanes[j + 4];
  for (int64_t j = 0; j < 2; ++j) quarter[j] = half[j] + half[j + 2];
  return quarter[0] + quarter[1];
}

template <typename T> const T* typed(const void* p) { return static_cast<const T*>(p); }
template <typename T> T* typed(void* p) { return static_cast<T*>(p); }

// c ? a : b through the bits. GCC (12) turns a float ?: whose arm is a constant into a branch
// that the vectoriser refuses ("control flow in loop"), which is also why common/math.h's
// exp_polynomial (clamped with ?:) does not vectorise here; integer masks stay a vector blend.
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
// (two instructions; a float clamp of x would be four, see select_bits): below -126 the result
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

// softplus and sigmoid as common/math.h defines them, in arithmetic that vectorises for float
// (common/math.h's exp_polynomial has the ?: clamp above, which does not).
inline float exp_vectorisable(float x) { return exp2_polynomial(x * kLog2e<float>); }
inline float softplus_vectorisable(float x) {
  const float log_term = log1p_unit_interval(exp_vectorisable(-std::fabs(x)));
  return select_bits(x > 20.0f, x, select_bits(x > 0.0f, x, 0.0f) + log_term);
}
inline double softplus_vectorisable(double x) { return softplus(x); }
inline float sigmoid_vectorisable(float x) { return 1.0f / (1.0f + exp_vectorisable(-x)); }
inline double sigmoid_vectorisable(double x) { return sigmoid(x); }

// dt of one chunk: delta gets delta_bias added in place (the backward needs it for the softplus
// gradient), dt is its softplus (or itself), dt_u = dt u.
template <typename acc_t>
MAMBA_CPU_MULTIVERSION void compute_dt(int64_t len, acc_t delta_bias, bool delta_softplus,
                                       const acc_t* __restrict u, acc_t* __restrict delta,
                                       acc_t* __restrict dt, acc_t* __restrict dt_u) {
  if (delta_softplus) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      delta[t] += delta_bias;
      dt[t] = softplus_vectorisable(delta[t]);
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) dt[t] = delta[t] += delta_bias;
  }
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) dt_u[t] = dt[t] * u[t];
}

// Reads `len` elements of a row with a stride into acc_t.
template <typename input_t, typename acc_t>
void load_row(const input_t* src, int64_t stride, int64_t len, acc_t* dst) {
  for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<acc_t>(src[t * stride]);
}

template <typename acc_t, typename input_t>
void store_row(const acc_t* src, int64_t len, input_t* dst, int64_t stride) {
  for (int64_t t = 0; t < len; ++t) dst[t * stride] = static_cast<input_t>(src[t]);
}

// One channel's weights, padded to n_pad with zeros: A log2(e), and B and C when constant.
template <typename acc_t>
void load_padded(const acc_t* src, int64_t stride, int64_t dstate, int64_t n_pad, acc_t scale,
                 acc_t* dst) {
  for (int64_t n = 0; n < dstate; ++n) dst[n] = src[n * stride] * scale;
  std::fill(dst + dstate, dst + n_pad, acc_t(0));
}

// Row (b, d) of a (batch, dim, dstate) state, padded, into dst (n_pad); zeros when it is absent.
template <typename acc_t>
void load_state_row(const void* state, int64_t batch_stride, int64_t dim_stride,
                    int64_t dstate_stride, int64_t b, int64_t d, int64_t dstate, int64_t n_pad,
                    acc_t* dst) {
  if (state == nullptr) {
    std::fill(dst, dst + n_pad, acc_t(0));
    return;
  }
  load_padded(typed<acc_t>(state) + b * batch_stride + d * dim_stride, dstate_stride, dstate,
              n_pad, acc_t(1), dst);
}

// The chunk [t0, t0 + len) of row (b, d) of a (batch, dim, seqlen) activation into acc_t.
template <typename input_t, typename acc_t>
void load_activation(const void* base, int64_t batch_stride, int64_t dim_stride,
                     int64_t seqlen_stride, int64_t b, int64_t d, int64_t t0, int64_t len,
                     acc_t* dst) {
  load_row(typed<input_t>(base) + b * batch_stride + d * dim_stride + t0 * seqlen_stride,
           seqlen_stride, len, dst);
}

template <typename acc_t, typename input_t>
void store_activation(const acc_t* src, void* base, int64_t batch_stride, int64_t dim_stride,
                      int64_t seqlen_stride, int64_t b, int64_t d, int64_t t0, int64_t len) {
  store_row(src, len, typed<input_t>(base) + b * batch_stride + d * dim_stride + t0 * seqlen_stride,
            seqlen_stride);
}

// u, delta + delta_bias, dt and dt u of channel d of batch entry b over [t0, t0 + len).
template <typename input_t, typename acc_t>
void load_step_inputs(const SelectiveScanFwdParams& p, int64_t b, int64_t d, int64_t t0,
                      int64_t len, acc_t* u, acc_t* delta, acc_t* dt, acc_t* dt_u) {
  load_activation<input_t>(p.u, p.u_batch_stride, p.u_dim_stride, p.u_seqlen_stride, b, d, t0,
                           len, u);
  load_activation<input_t>(p.delta, p.delta_batch_stride, p.delta_dim_stride,
                           p.delta_seqlen_stride, b, d, t0, len, delta);
  const acc_t bias = p.delta_bias ? typed<acc_t>(p.delta_bias)[d * p.delta_bias_stride] : 0;
  compute_dt(len, bias, p.delta_softplus, u, delta, dt, dt_u);
}

// A chunk of a variable B or C, (dstate, len) with strides, into [step][n_pad] rows with zero
// padding. Reading along time in the inner loop keeps the source reads sequential.
template <typename input_t, typename acc_t>
void gather_chunk(const input_t* src, int64_t dstate_stride, int64_t seqlen_stride, int64_t dstate,
                  int64_t n_pad, int64_t len, acc_t* dst) {
  for (int64_t n = 0; n < dstate; ++n) {
    const input_t* row = src + n * dstate_stride;
    for (int64_t t = 0; t < len; ++t) dst[t * n_pad + n] = static_cast<acc_t>(row[t * seqlen_stride]);
  }
  for (int64_t t = 0; t < len; ++t) std::fill(dst + t * n_pad + dstate, dst + (t + 1) * n_pad, acc_t(0));
}

// B or C as the recurrence reads it: [step][n_pad] rows of acc_t. A variable one is gathered
// chunk by chunk for the block's group; a constant one is loaded once per block, one row per
// channel, and read at every step (step stride 0).
template <typename acc_t> class StateInput {
 public:
  StateInput(const void* base, bool variable, int64_t batch_stride, int64_t group_stride,
             int64_t dim_stride, int64_t dstate_stride, int64_t seqlen_stride, int64_t dstate,
             int64_t max_chunk, int64_t max_block_len)
      : base_(base), variable_(variable), batch_stride_(batch_stride),
        group_stride_(group_stride), dim_stride_(dim_stride), dstate_stride_(dstate_stride),
        seqlen_stride_(seqlen_stride), dstate_(dstate), n_pad_(padded_dstate(dstate)),
        rows_((variable ? max_chunk : max_block_len) * n_pad_) {}

  static StateInput B(const SelectiveScanFwdParams& p, int64_t max_chunk, int64_t max_block_len) {
    return StateInput(p.B, p.is_variable_B, p.B_batch_stride, p.B_group_stride, p.B_dim_stride,
                      p.B_dstate_stride, p.B_seqlen_stride, p.dstate, max_chunk, max_block_len);
  }
  static StateInput C(const SelectiveScanFwdParams& p, int64_t max_chunk, int64_t max_block_len) {
    return StateInput(p.C, p.is_variable_C, p.C_batch_stride, p.C_group_stride, p.C_dim_stride,
                      p.C_dstate_stride, p.C_seqlen_stride, p.dstate, max_chunk, max_block_len);
  }

  // A constant one: the rows of the channels [begin, end).
  void load_block(int64_t begin, int64_t end) {
    if (variable_) return;
    for (int64_t d = begin; d < end; ++d)
      load_padded(typed<acc_t>(base_) + d * dim_stride_, dstate_stride_, dstate_, n_pad_, acc_t(1),
                  rows_.data() + (d - begin) * n_pad_);
  }

  // A variable one: the steps [t0, t0 + len) of batch entry b and group `group`.
  template <typename input_t> void load_chunk(int64_t b, int64_t group, int64_t t0, int64_t len) {
    if (!variable_) return;
    const input_t* src = typed<input_t>(base_) + b * batch_stride_ + group * group_stride_ +
                         t0 * seqlen_stride_;
    gather_chunk(src, dstate_stride_, seqlen_stride_, dstate_, n_pad_, len, rows_.data());
  }

  // The first row the channel `channel_in_block` reads, and the distance between steps.
  const acc_t* rows(int64_t channel_in_block) const {
    return variable_ ? rows_.data() : rows_.data() + channel_in_block * n_pad_;
  }
  int64_t step() const { return variable_ ? n_pad_ : 0; }

 private:
  const void* base_;
  bool variable_;
  int64_t batch_stride_, group_stride_, dim_stride_, dstate_stride_, seqlen_stride_;
  int64_t dstate_, n_pad_;
  std::vector<acc_t> rows_;
};

}  // namespace selective_scan_cpu
}  // namespace mamba_ext
