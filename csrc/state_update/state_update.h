// Params of selective_state_update: seqlen recurrent steps of the selective SSM (one for plain
// decode, several for a speculative draft), in place on the state, in one launch.
//
// Kernels see every call in the Mamba-2 form with a token dimension. The host lifts the Mamba-1
// form (state (state_batch, dim, dstate)) to it by splitting dim into (nheads = ngroups,
// headdim = dim / ngroups), a view: with the usual 2-D B and C that is nheads = 1; a single-token
// call is seqlen = 1 (its token strides are 0).
#pragma once

#include <cstdint>

#ifdef MAMBA_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace mamba_ext {

struct SelectiveStateUpdateParams {
  // Sizes.
  int64_t batch, seqlen, nheads, headdim, dstate;
  int64_t ngroups;      // B and C are shared by nheads / ngroups consecutive heads
  int64_t state_batch;  // rows of the state pool; equals batch without state_batch_indices
  int64_t inter_batch;  // rows of intermediate_states (0 when absent)
  // Strides in elements (int64: products of sizes overflow int32). A stride is 0 where the
  // caller broadcast the tensor (Mamba-2 expands A, dt, dt_bias and D over headdim and dstate),
  // and every stride of an absent optional tensor is 0.
  int64_t state_batch_stride, state_head_stride, state_headdim_stride, state_dstate_stride;
  int64_t x_batch_stride, x_seq_stride, x_head_stride, x_headdim_stride;
  int64_t dt_batch_stride, dt_seq_stride, dt_head_stride, dt_headdim_stride;
  int64_t A_head_stride, A_headdim_stride, A_dstate_stride;
  int64_t B_batch_stride, B_seq_stride, B_group_stride, B_dstate_stride;
  int64_t C_batch_stride, C_seq_stride, C_group_stride, C_dstate_stride;
  int64_t D_head_stride, D_headdim_stride;
  int64_t z_batch_stride, z_seq_stride, z_head_stride, z_headdim_stride;
  int64_t dt_bias_head_stride, dt_bias_headdim_stride;
  int64_t out_batch_stride, out_seq_stride, out_head_stride, out_headdim_stride;
  int64_t inter_batch_stride, inter_seq_stride, inter_head_stride, inter_headdim_stride,
      inter_dstate_stride;
  // Pointers, with the shape they point to. input_t is x's type, acc_t = acc_type<input_t>.
  void* state;                         // (state_batch, nheads, headdim, dstate) state_t, updated
  const void* x;                       // (batch, seqlen, nheads, headdim) input_t
  const void* dt;                      // (batch, seqlen, nheads, headdim) input_t, or float
                                       // if dt_is_float
  const void* A;                       // (nheads, headdim, dstate) acc_t
  const void* B;                       // (batch, seqlen, ngroups, dstate) input_t
  const void* C;                       // (batch, seqlen, ngroups, dstate) input_t
  const void* D;                       // (nheads, headdim) acc_t, or nullptr
  const void* z;                       // (batch, seqlen, nheads, headdim) input_t, or nullptr
  const void* dt_bias;                 // (nheads, headdim) acc_t, or nullptr
  const int32_t* state_batch_indices;  // (batch,) the state row of each batch entry, or nullptr
  // (inter_batch, seqlen, nheads, headdim, dstate) state_t: the state after each token, for
  // rolling back a rejected draft; or nullptr.
  void* inter;
  const int32_t* inter_indices;        // (batch,) the intermediate_states row of each batch
                                       // entry, or nullptr (row = batch entry)
  void* out;                           // (batch, seqlen, nheads, headdim) input_t
  // Flags.
  bool dt_softplus;
  bool dt_is_float;    // dt is float32 while x is not: read per row, so it costs no instantiation
  bool update_state;   // false: the state is only read (disable_state_update)
};

// The largest dstate the kernels take: the CPU kernel keeps a few rows of this length on the stack.
constexpr int64_t kSelectiveStateUpdateMaxDstate = 256;

// state_t is acc_type<input_t> (the usual fp32 state) or input_t (a state kept in bf16 / fp16).
// Between the tokens of one call the state stays in acc_t: it is rounded to state_t only where
// it is stored (the final state, and each intermediate state).
template <typename input_t, typename state_t>
void selective_state_update_cpu(const SelectiveStateUpdateParams& params);

#ifdef MAMBA_EXT_WITH_CUDA
// input_t is float, double, __half or __nv_bfloat16; returns the launch error, if any, for the
// host to raise. A row whose state_batch_indices entry is outside [0, state_batch) (the host
// cannot check without a device sync; vLLM's padding slot -1 is one) leaves the state untouched
// and gets out = 0; an intermediate_state_indices entry outside [0, inter_batch) skips the
// intermediate states of its row.
template <typename input_t, typename state_t>
cudaError_t selective_state_update_cuda(const SelectiveStateUpdateParams& params,
                                        cudaStream_t stream);
#endif

}  // namespace mamba_ext
