// Parameters of the selective scan (Mamba-1) kernels: plain data, no torch types, so the kernels
// see only this header and plain C++ (DESIGN.md section 2).
//
//   dt  = delta + delta_bias, then softplus(dt) when delta_softplus
//   h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t            h_{-1} = initial_state or 0
//   out = (<h_t, C_t> + D u_t) * silu(z_t)               the D and z terms when given
//
// Packed variable-length batches (seq_idx given): a sequence starts at t = 0 or where
// seq_idx[b, t] != seq_idx[b, t - 1], and there h_{t-1} := its start state. seq_idx = -1 marks
// padding: out = 0, no gradient, and the state is 0 through it. Per-row mode (num_sequences 0):
// initial_state and last_state are (batch, dim, dstate); the start state is initial_state[b] for
// the sequence that starts at t = 0 and 0 for later ones; last_state[b] is h_{seqlen-1}.
// Per-sequence mode (num_sequences N > 0, seq_idx in [-1, N)): initial_state and last_state are
// (N, dim, dstate), indexed by sequence id; the host fills last_state (and dinitial_state)
// with the value of an absent sequence before the kernel, which writes the rows of those present.
// A sequence id must form one run of tokens (checked on the CPU; undefined on CUDA).
//
// Activations (u, delta, z, dout, variable B / C and their gradients) have the type `input_t` of
// the kernel; weights (A, constant B / C, D, delta_bias, initial_state, last_state and their
// gradients) have acc_type<input_t> (common/math.h). Optional inputs are absent when their
// pointer is null.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/math.h"

#ifdef MAMBA_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace mamba_ext {

struct SelectiveScanFwdParams {
  // Sizes.
  int64_t batch, dim, seqlen, dstate;
  int64_t ngroups;  // of a variable B or C (both have the same); 1 when both are constant
  // 0: per-row states (batch, dim, dstate); N > 0: per-sequence states (N, dim, dstate).
  int64_t num_sequences;

  // Strides in elements (int64: products of sizes overflow int32).
  int64_t u_batch_stride, u_dim_stride, u_seqlen_stride;
  int64_t delta_batch_stride, delta_dim_stride, delta_seqlen_stride;
  int64_t z_batch_stride, z_dim_stride, z_seqlen_stride;
  int64_t out_batch_stride, out_dim_stride, out_seqlen_stride;
  int64_t A_dim_stride, A_dstate_stride;
  // B and C: batch, group, dstate, seqlen strides when variable (a 3-D one has group stride 0);
  // dim and dstate strides when constant.
  int64_t B_batch_stride, B_group_stride, B_dim_stride, B_dstate_stride, B_seqlen_stride;
  int64_t C_batch_stride, C_group_stride, C_dim_stride, C_dstate_stride, C_seqlen_stride;
  int64_t D_stride, delta_bias_stride;
  int64_t initial_state_batch_stride, initial_state_dim_stride, initial_state_dstate_stride;
  int64_t last_state_batch_stride, last_state_dim_stride, last_state_dstate_stride;
  int64_t seq_idx_batch_stride, seq_idx_seqlen_stride;

  // Pointers, with the shape they point to.
  const void* u;              // (batch, dim, seqlen)
  const void* delta;          // (batch, dim, seqlen)
  const void* A;              // (dim, dstate)
  const void* B;              // (batch, ngroups, dstate, seqlen) if variable, else (dim, dstate)
  const void* C;              // (batch, ngroups, dstate, seqlen) if variable, else (dim, dstate)
  const void* D;              // (dim,) or null
  const void* z;              // (batch, dim, seqlen) or null
  const void* delta_bias;     // (dim,) or null
  const void* initial_state;  // (batch or num_sequences, dim, dstate) or null
  const int32_t* seq_idx;     // (batch, seqlen) or null (one sequence per row)
  void* out;                  // (batch, dim, seqlen)
  void* last_state;           // (batch or num_sequences, dim, dstate)

  // Flags.
  bool is_variable_B, is_variable_C;
  bool delta_softplus;

  // CUDA only: when not null, the forward also writes the state before every
  // selective_scan_cuda_checkpoint_tokens() tokens here, (batch, dim, ncheckpoints, dstate) in
  // acc_type; the backward restarts from these checkpoints instead of keeping every state.
  void* checkpoints = nullptr;

  // CUDA only, length parallelism of the forward when batch x dim gives too few warps: the
  // sequence is cut into `segments` of segment_len tokens (a multiple of the chunk), a block row
  // each. Pass 1 runs segments > 0 from a zero state and writes their end states and the sum of
  // dt after their last sequence start (NaN when none: the state does not cross the segment);
  // a combine kernel turns those into each segment's true start state, in place; pass 2 runs
  // every segment from its start state. The host allocates the scratch.
  int64_t segment_len = 0, segments = 1;
  int segment_pass = 0;            // 0: no segments; 1, 2: the passes
  void* segment_states = nullptr;  // (batch, segments, dim, dstate) acc_type
  void* segment_dt = nullptr;      // (batch, segments, dim) acc_type
};

// The gradients of every input given dout and dlast_state. Each gradient has the shape and type
// of its input; those of absent optional inputs are not written (null).
struct SelectiveScanBwdParams : SelectiveScanFwdParams {
  // Strides in elements.
  int64_t dout_batch_stride, dout_dim_stride, dout_seqlen_stride;
  int64_t dlast_state_batch_stride, dlast_state_dim_stride, dlast_state_dstate_stride;
  int64_t du_batch_stride, du_dim_stride, du_seqlen_stride;
  int64_t ddelta_batch_stride, ddelta_dim_stride, ddelta_seqlen_stride;
  int64_t dz_batch_stride, dz_dim_stride, dz_seqlen_stride;
  int64_t dA_dim_stride, dA_dstate_stride;
  int64_t dB_batch_stride, dB_group_stride, dB_dim_stride, dB_dstate_stride, dB_seqlen_stride;
  int64_t dC_batch_stride, dC_group_stride, dC_dim_stride, dC_dstate_stride, dC_seqlen_stride;
  int64_t dD_stride, ddelta_bias_stride;
  int64_t dinitial_state_batch_stride, dinitial_state_dim_stride, dinitial_state_dstate_stride;

  // Pointers, with the shape they point to.
  const void* dout;         // (batch, dim, seqlen)
  const void* dlast_state;  // last_state's shape or null (no gradient flows into last_state)
  void* du;                 // (batch, dim, seqlen)
  void* ddelta;             // (batch, dim, seqlen)
  void* dz;                 // (batch, dim, seqlen) or null
  void* dA;                 // (dim, dstate)
  void* dB;                 // B's shape
  void* dC;                 // C's shape
  void* dD;                 // (dim,) or null
  void* ddelta_bias;        // (dim,) or null
  void* dinitial_state;     // initial_state's shape or null

  // CUDA only: scratch in acc_type that the host allocates with the sizes of
  // selective_scan_bwd_cuda_geometry. Sums over channels, batches or state slices are written
  // as one partial per "slot" and added in a fixed order by a second kernel (deterministic), or,
  // with one slot, added with atomics into zeroed memory (fast).
  void* BC_partials = nullptr;       // (BC_slots, batch, ngroups, 2, dstate, seqlen): dB, dC
  void* weight_partials = nullptr;   // (weight_slots, dim, 3, dstate): dA, constant dB and dC
  void* channel_partials = nullptr;  // (weight_slots, dim, 2): dD, ddelta_bias
  void* slice_partials = nullptr;    // (slice_blocks, 3, batch, dim, seqlen) when slice_blocks > 1
  int64_t BC_slots = 1, weight_slots = 1;
  bool deterministic = false;
  bool checkpoints_ready = false;  // the forward wrote them: no checkpoint pass

  // CUDA only, length parallelism of the reverse pass (one slice block) when
  // batch x dim gives too few warps: `reverse_segments` of reverse_segment_len tokens (a multiple
  // of the chunk), grid z. Pass 1 runs segments > 0 backwards from dh = 0 and writes the dh it
  // reaches at the segment's start and the segment's decay exp(A sum dt); a combine kernel turns
  // them into the dh each segment ends with; pass 2 runs every segment from that dh. Slots of
  // deterministic weight sums: one per (batch, segment).
  int64_t reverse_segment_len = 0, reverse_segments = 1;
  int reverse_pass = 0;          // 0: no segments; 1, 2: the passes
  void* segment_dh = nullptr;    // (reverse_segments, batch, dim, dstate) acc_type
  void* segment_decay = nullptr; // likewise
};

// The CUDA kernels' blocking, shared by the launchers and the host code that sizes the scratch.
// A thread keeps `states_per_thread` states of one channel; a warp holds 32 channels; a block
// holds `channel_warps` warps of channels times `slices` state slices. Blocks never straddle a
// group of B / C. The backward splits the slices over `slice_blocks` blocks when they would not
// fit in one. Tokens go by chunks (loads, checkpoints, synchronisation): 32 in single precision,
// 16 in double, so that double fits the same shared memory.
constexpr MAMBA_HOST_DEVICE int selective_scan_cuda_chunk(bool double_precision) {
  return double_precision ? 16 : 32;
}
// The backward's chunk, and the forward's checkpoint interval: 16 tokens, so that a backward block
// of 2 warps needs under 38 KB of shared memory (6 blocks, 12 warps an SM).
constexpr MAMBA_HOST_DEVICE int selective_scan_cuda_checkpoint_tokens() { return 16; }

struct SelectiveScanCudaGeometry {
  int chunk, states_per_thread, slices, channel_warps, slice_blocks;
  // Lanes that share a channel's slice (1, or 2: neighbouring lanes, half the states each).
  int lanes_per_channel = 1;
  int64_t channel_blocks_per_group;
  MAMBA_HOST_DEVICE int threads() const { return 32 * channel_warps * slices; }
  MAMBA_HOST_DEVICE int channels_per_warp() const { return 32 / lanes_per_channel; }
  MAMBA_HOST_DEVICE int channels_per_block() const { return channels_per_warp() * channel_warps; }
  MAMBA_HOST_DEVICE int64_t chunks(int64_t seqlen) const { return (seqlen + chunk - 1) / chunk; }
};

inline SelectiveScanCudaGeometry selective_scan_cuda_geometry(int64_t dim, int64_t ngroups,
                                                              int64_t dstate,
                                                              bool double_precision,
                                                              int states_per_thread,
                                                              int max_slices, int max_warps,
                                                              int lanes_per_channel = 1) {
  SelectiveScanCudaGeometry g{};
  g.chunk = selective_scan_cuda_chunk(double_precision);
  g.states_per_thread = states_per_thread;
  g.lanes_per_channel = lanes_per_channel;
  const int slices = static_cast<int>((dstate + states_per_thread - 1) / states_per_thread);
  g.slice_blocks = (slices + max_slices - 1) / max_slices;
  g.slices = (slices + g.slice_blocks - 1) / g.slice_blocks;
  const int64_t channel_warps_needed =
      (dim / ngroups + g.channels_per_warp() - 1) / g.channels_per_warp();
  g.channel_warps = static_cast<int>(
      std::min<int64_t>(std::max(1, max_warps / g.slices), channel_warps_needed));
  g.channel_blocks_per_group =
      (dim / ngroups + g.channels_per_block() - 1) / g.channels_per_block();
  return g;
}

// The forward's slices hold 16 states, 8 in each of two neighbouring lanes (16 channels a
// warp: twice the warps of one lane a channel, for latency hiding); all slices in one block (up
// to 16 warps), 4 warps of channels at dstate <= 16. The backward has the same slices and lane
// pairs with at most 4 slices and 2 warps of channels a block (its shared memory holds a
// chunk's sub-chunk states and transposes), more slices in more blocks.
inline SelectiveScanCudaGeometry selective_scan_fwd_cuda_geometry(const SelectiveScanFwdParams& p,
                                                                  bool double_precision) {
  return selective_scan_cuda_geometry(p.dim, p.ngroups, p.dstate, double_precision, 16, 16, 4,
                                      2);
}
// MAMBA_EXT_SCAN_TUNE, a knob for benchmarks and tests: "forward_segments=K",
// "reverse_segments=K" or both (comma-separated) ask a pass for K segments (K = 1: none)
// wherever it can take them. 0: not asked.
inline int64_t selective_scan_cuda_asked_segments(const char* pass) {
  const char* tune = std::getenv("MAMBA_EXT_SCAN_TUNE");
  const char* setting = tune == nullptr ? nullptr : std::strstr(tune, pass);
  long long asked = 0;
  if (setting == nullptr || std::sscanf(setting + std::strlen(pass), "=%lld", &asked) != 1) {
    return 0;
  }
  return asked >= 1 ? asked : 0;
}
// Length parallelism of a pass of geometry g: how many warps an SM it holds (of 132 SMs), cut
// below `cut_below_waves` of them into enough segments to reach `target_waves`, each of at
// least `min_chunks` chunks (so a segment's second pass outweighs its share of the extra work).
struct SelectiveScanCudaSegmentRule {
  const char* pass;
  int64_t warps_per_sm, min_chunks;
  double cut_below_waves, target_waves;
};
// Segment length (a multiple of the chunk) of the launch of geometry g; 0: none.
inline int64_t selective_scan_cuda_segment_len(const SelectiveScanFwdParams& p,
                                               const SelectiveScanCudaGeometry& g,
                                               const SelectiveScanCudaSegmentRule& rule) {
  const int64_t nchunks = g.chunks(p.seqlen), asked = selective_scan_cuda_asked_segments(rule.pass);
  int64_t segments = std::min(asked, nchunks);
  if (asked == 0) {
    const int64_t warps = p.batch * p.ngroups * g.channel_blocks_per_group * g.threads() / 32;
    const double waves = static_cast<double>(warps) / (132 * rule.warps_per_sm);
    if (warps == 0 || waves >= rule.cut_below_waves) return 0;
    segments = std::min<int64_t>(static_cast<int64_t>(std::ceil(rule.target_waves / waves)),
                                 nchunks / rule.min_chunks);
  }
  if (segments < 2) return 0;
  return (nchunks + segments - 1) / segments * g.chunk;
}
// The forward's: 16 warps an SM; its pass 1 is a whole forward, so only below half a wave, to
// two (b1 d4096 l65536 on the H100: 5.60 ms in 9 segments, 4.96 in 16, the same in 24 or 32);
// segments of at least 4 chunks.
inline int64_t selective_scan_fwd_cuda_segment_len(const SelectiveScanFwdParams& p,
                                                   bool double_precision) {
  const SelectiveScanCudaGeometry g = selective_scan_fwd_cuda_geometry(p, double_precision);
  return selective_scan_cuda_segment_len(p, g, {"forward_segments", 16, 4, 0.5, 2.0});
}
// The reverse pass's (one slice block only): the backward's 12 warps an SM. Its pass 1 is light
// (dh alone), and the tail of a launch of 1-2 waves cost 5-13% (H100 sweep,
// selective_scan_reverse_segment_sweep.md), so below two waves it is cut to about 3.5: the
// b8 d4096 launch (1.3 waves) into 3 segments, b1 d4096 into 22; segments of 8 chunks or more.
inline int64_t selective_scan_bwd_cuda_reverse_segment_len(const SelectiveScanFwdParams& p,
                                                           const SelectiveScanCudaGeometry& g) {
  if (g.slice_blocks > 1) return 0;
  return selective_scan_cuda_segment_len(p, g, {"reverse_segments", 12, 8, 2.0, 3.5});
}
inline SelectiveScanCudaGeometry selective_scan_bwd_cuda_geometry(const SelectiveScanFwdParams& p,
                                                                  bool double_precision) {
  SelectiveScanCudaGeometry g =
      selective_scan_cuda_geometry(p.dim, p.ngroups, p.dstate, double_precision, 16, 4, 2, 2);
  g.chunk = selective_scan_cuda_checkpoint_tokens();
  return g;
}

// CPU kernels, instantiated for float, double, c10::Half and c10::BFloat16.
template <typename input_t> void selective_scan_fwd_cpu(const SelectiveScanFwdParams& params);
template <typename input_t> void selective_scan_bwd_cpu(const SelectiveScanBwdParams& params);

#ifdef MAMBA_EXT_WITH_CUDA
// CUDA kernels, instantiated for float, double, __half and __nv_bfloat16 (the caller has
// allocated the outputs and the scratch, and zeroed the scratch when not deterministic).
template <typename input_t>
cudaError_t selective_scan_fwd_cuda(const SelectiveScanFwdParams& params, cudaStream_t stream);
template <typename input_t>
cudaError_t selective_scan_bwd_cuda(const SelectiveScanBwdParams& params, cudaStream_t stream);
#endif

}  // namespace mamba_ext
