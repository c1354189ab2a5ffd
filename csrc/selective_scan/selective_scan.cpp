// Host side of the selective scan: checks every argument, allocates the outputs, fills the params
// and dispatches on the activations' dtype. The only selective scan code that touches at::Tensor.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <unordered_set>
#include <vector>

#ifdef MAMBA_EXT_WITH_CUDA
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "common/check.h"
#include "common/dispatch.h"
#include "selective_scan/selective_scan.h"

namespace mamba_ext {
namespace {

constexpr int64_t kMaxDstate = 256;
// The op names that start every error message (constexpr: the dtype dispatch needs them so).
constexpr char kFwdOp[] = "selective_scan_fwd";
constexpr char kBwdOp[] = "selective_scan_bwd";

// The sizes the arguments agree on, found while checking them.
struct ScanShape {
  int64_t batch, dim, seqlen, dstate, ngroups;
  int64_t num_sequences;  // 0: per-row states
  bool variable_B, variable_C;

  // The rows of initial_state, last_state and their gradients, and their name.
  int64_t state_rows() const { return num_sequences > 0 ? num_sequences : batch; }
  const char* state_dims() const {
    return num_sequences > 0 ? "(num_sequences, dim, dstate)" : "(batch, dim, dstate)";
  }
};

// B or C: (dim, dstate) in the weight dtype when constant; (batch, dstate, seqlen) or
// (batch, ngroups, dstate, seqlen) in u's dtype when variable. Returns its ngroups (0: constant).
int64_t check_state_input(const char* op, const char* name, const at::Tensor& t,
                          const ScanShape& s, const at::Tensor& u, at::ScalarType weight_dtype) {
  check_device(op, name, t, u.device(), "u");
  switch (t.dim()) {
    case 2:
      check_shape(op, name, t, {s.dim, s.dstate}, "(dim, dstate)");
      check_dtype(op, name, t, weight_dtype, "a constant B or C is a weight, like A");
      return 0;
    case 3:
      check_shape(op, name, t, {s.batch, s.dstate, s.seqlen}, "(batch, dstate, seqlen)");
      check_dtype(op, name, t, u.scalar_type(), "a variable B or C is an activation, like u");
      return 1;
    case 4: {
      const int64_t ngroups = t.size(1);
      TORCH_CHECK_VALUE(ngroups >= 1 && s.dim % ngroups == 0, op, ": ", name,
                        " must have a number of groups (its size 1) that divides dim = ", s.dim,
                        ", got ", ngroups, " with shape ", shape_str(t.sizes()));
      check_shape(op, name, t, {s.batch, ngroups, s.dstate, s.seqlen},
                  "(batch, ngroups, dstate, seqlen)");
      check_dtype(op, name, t, u.scalar_type(), "a variable B or C is an activation, like u");
      return ngroups;
    }
    default:
      TORCH_CHECK_VALUE(false, op, ": ", name,
                        " must have 2 dimensions (dim, dstate), 3 (batch, dstate, seqlen) or 4 "
                        "(batch, ngroups, dstate, seqlen), got ",
                        t.dim(), " with shape ", shape_str(t.sizes()));
  }
  return 0;
}

// An optional (dim,) weight: D or delta_bias.
void check_channel_weight(const char* op, const char* name, const at::Tensor* t,
                          const ScanShape& s, const at::Tensor& u, at::ScalarType weight_dtype) {
  if (t == nullptr) return;
  check_device(op, name, *t, u.device(), "u");
  check_shape(op, name, *t, {s.dim}, "(dim,)");
  check_dtype(op, name, *t, weight_dtype, "a weight, like A");
}

// A (batch, dim, seqlen) activation in u's dtype: delta, z, dout.
void check_activation(const char* op, const char* name, const at::Tensor& t, const at::Tensor& u) {
  check_device(op, name, t, u.device(), "u");
  check_shape(op, name, t, u.sizes(), "(batch, dim, seqlen)");
  check_dtype(op, name, t, u.scalar_type(), "like u");
}

// A (batch, dim, dstate) state, (num_sequences, dim, dstate) in per-sequence mode, in the
// weight dtype: initial_state, dlast_state.
void check_state(const char* op, const char* name, const at::Tensor& t, const ScanShape& s,
                 const at::Tensor& u, at::ScalarType weight_dtype) {
  check_device(op, name, t, u.device(), "u");
  check_shape(op, name, t, {s.state_rows(), s.dim, s.dstate}, s.state_dims());
  check_dtype(op, name, t, weight_dtype, "states are kept in the weight dtype, like A");
}

// The inputs both ops take; optional ones are null when absent.
struct ScanInputs {
  const at::Tensor &u, &delta, &A, &B, &C;
  const at::Tensor *D, *z, *delta_bias, *initial_state, *seq_idx;
  int64_t num_sequences;
};

// The values of a CPU seq_idx in per-sequence mode: each in [-1, num_sequences), and each
// sequence one run of tokens (its state is one row of last_state). On CUDA reading them would
// cost a device sync, so they are not checked there.
void check_seq_idx_values(const char* op, const at::Tensor& seq_idx, int64_t num_sequences) {
  if (!seq_idx.is_cpu() || num_sequences == 0) return;
  const int32_t* ids = seq_idx.const_data_ptr<int32_t>();
  const int64_t batch = seq_idx.size(0), seqlen = seq_idx.size(1);
  const int64_t batch_stride = seq_idx.stride(0), seqlen_stride = seq_idx.stride(1);
  // A set rather than a flag per sequence: its size is bounded by the tokens, not by the
  // num_sequences the caller passed.
  std::unordered_set<int32_t> seen;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < seqlen; ++t) {
      const int32_t id = ids[b * batch_stride + t * seqlen_stride];
      TORCH_CHECK_VALUE(id >= -1 && id < num_sequences, op,
                        ": seq_idx must have values in [-1, num_sequences) = [-1, ",
                        num_sequences, "), got ", id, " at (", b, ", ", t, ")");
      const bool starts = t == 0 || ids[b * batch_stride + (t - 1) * seqlen_stride] != id;
      if (id < 0 || !starts) continue;
      TORCH_CHECK_VALUE(seen.insert(id).second, op,
                        ": seq_idx must give each sequence one run of tokens in per-sequence "
                        "mode (num_sequences > 0), got a second run of sequence ",
                        id, " starting at (", b, ", ", t, ")");
    }
  }
}

void check_seq_idx(const char* op, const ScanInputs& in, const ScanShape& s) {
  TORCH_CHECK_VALUE(in.num_sequences >= 0, op,
                    ": num_sequences must be >= 0 (0: per-row states), got ", in.num_sequences);
  if (in.seq_idx == nullptr) {
    TORCH_CHECK_VALUE(in.num_sequences == 0, op,
                      ": seq_idx must be given when num_sequences > 0 (per-sequence states), "
                      "got None with num_sequences = ",
                      in.num_sequences);
    return;
  }
  const at::Tensor& seq_idx = *in.seq_idx;
  check_device(op, "seq_idx", seq_idx, in.u.device(), "u");
  check_dtype(op, "seq_idx", seq_idx, at::kInt, "sequence indices");
  check_shape(op, "seq_idx", seq_idx, {s.batch, s.seqlen}, "(batch, seqlen)");
  check_seq_idx_values(op, seq_idx, in.num_sequences);
}

ScanShape check_inputs(const char* op, const ScanInputs& in) {
  const at::Tensor &u = in.u, &A = in.A, &B = in.B, &C = in.C;
  check_rank(op, "u", u, 3, "(batch, dim, seqlen)");
  check_dtype_in(op, "u", u, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  const at::ScalarType weight_dtype = weight_dtype_for(u.scalar_type());
  ScanShape s{};
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.seqlen = u.size(2);
  check_activation(op, "delta", in.delta, u);
  if (in.z != nullptr) check_activation(op, "z", *in.z, u);

  check_device(op, "A", A, u.device(), "u");
  check_rank(op, "A", A, 2, "(dim, dstate)");
  s.dstate = A.size(1);
  TORCH_CHECK_VALUE(s.dstate >= 1 && s.dstate <= kMaxDstate, op,
                    ": A must have dstate (its size 1) between 1 and ", kMaxDstate, ", got ",
                    s.dstate, " with shape ", shape_str(A.sizes()));
  check_shape(op, "A", A, {s.dim, s.dstate}, "(dim, dstate)");
  check_dtype(op, "A", A, weight_dtype, "float32, or float64 when u is float64");

  const int64_t B_groups = check_state_input(op, "B", B, s, u, weight_dtype);
  const int64_t C_groups = check_state_input(op, "C", C, s, u, weight_dtype);
  TORCH_CHECK_VALUE(B_groups == 0 || C_groups == 0 || B_groups == C_groups, op,
                    ": C must have as many groups as B, ", B_groups, " (B has shape ",
                    shape_str(B.sizes()), "), got ", C_groups, " with shape ",
                    shape_str(C.sizes()));
  s.variable_B = B_groups > 0;
  s.variable_C = C_groups > 0;
  s.ngroups = std::max<int64_t>({B_groups, C_groups, 1});

  check_channel_weight(op, "D", in.D, s, u, weight_dtype);
  check_channel_weight(op, "delta_bias", in.delta_bias, s, u, weight_dtype);
  check_seq_idx(op, in, s);
  s.num_sequences = in.num_sequences;
  if (in.initial_state != nullptr)
    check_state(op, "initial_state", *in.initial_state, s, u, weight_dtype);
  return s;
}

// Strides of an optional (batch, dim, seqlen) or (batch, dim, dstate) tensor; zeros when absent.
void strides3(const at::Tensor* t, int64_t& s0, int64_t& s1, int64_t& s2) {
  s0 = t ? t->stride(0) : 0;
  s1 = t ? t->stride(1) : 0;
  s2 = t ? t->stride(2) : 0;
}

// Strides of B or C (or their gradients) in the kernels' view: batch, group, dim, dstate, seqlen.
void state_input_strides(const at::Tensor& t, int64_t& batch, int64_t& group, int64_t& dim,
                         int64_t& dstate, int64_t& seqlen) {
  batch = group = dim = seqlen = 0;
  if (t.dim() == 2) {
    dim = t.stride(0);
    dstate = t.stride(1);
  } else {
    batch = t.stride(0);
    group = t.dim() == 4 ? t.stride(1) : 0;
    dstate = t.stride(-2);
    seqlen = t.stride(-1);
  }
}

const void* data_or_null(const at::Tensor* t) { return t ? t->const_data_ptr() : nullptr; }

// The forward's part of the params; out and last_state are null for the backward.
void fill_fwd_params(SelectiveScanFwdParams& p, const ScanShape& s, const ScanInputs& in,
                     const at::Tensor* out, const at::Tensor* last_state, bool delta_softplus) {
  p.batch = s.batch;
  p.dim = s.dim;
  p.seqlen = s.seqlen;
  p.dstate = s.dstate;
  p.ngroups = s.ngroups;
  p.num_sequences = s.num_sequences;
  strides3(&in.u, p.u_batch_stride, p.u_dim_stride, p.u_seqlen_stride);
  strides3(&in.delta, p.delta_batch_stride, p.delta_dim_stride, p.delta_seqlen_stride);
  strides3(in.z, p.z_batch_stride, p.z_dim_stride, p.z_seqlen_stride);
  strides3(out, p.out_batch_stride, p.out_dim_stride, p.out_seqlen_stride);
  p.A_dim_stride = in.A.stride(0);
  p.A_dstate_stride = in.A.stride(1);
  state_input_strides(in.B, p.B_batch_stride, p.B_group_stride, p.B_dim_stride, p.B_dstate_stride,
                      p.B_seqlen_stride);
  state_input_strides(in.C, p.C_batch_stride, p.C_group_stride, p.C_dim_stride, p.C_dstate_stride,
                      p.C_seqlen_stride);
  p.D_stride = in.D ? in.D->stride(0) : 0;
  p.delta_bias_stride = in.delta_bias ? in.delta_bias->stride(0) : 0;
  strides3(in.initial_state, p.initial_state_batch_stride, p.initial_state_dim_stride,
           p.initial_state_dstate_stride);
  strides3(last_state, p.last_state_batch_stride, p.last_state_dim_stride,
           p.last_state_dstate_stride);
  p.seq_idx_batch_stride = in.seq_idx ? in.seq_idx->stride(0) : 0;
  p.seq_idx_seqlen_stride = in.seq_idx ? in.seq_idx->stride(1) : 0;

  p.u = in.u.const_data_ptr();
  p.delta = in.delta.const_data_ptr();
  p.A = in.A.const_data_ptr();
  p.B = in.B.const_data_ptr();
  p.C = in.C.const_data_ptr();
  p.D = data_or_null(in.D);
  p.z = data_or_null(in.z);
  p.delta_bias = data_or_null(in.delta_bias);
  p.initial_state = data_or_null(in.initial_state);
  p.seq_idx = in.seq_idx ? in.seq_idx->const_data_ptr<int32_t>() : nullptr;
  p.out = out ? out->mutable_data_ptr() : nullptr;
  p.last_state = last_state ? last_state->mutable_data_ptr() : nullptr;

  p.is_variable_B = s.variable_B;
  p.is_variable_C = s.variable_C;
  p.delta_softplus = delta_softplus;
}

// last_state in the forward, dinitial_state in the backward: (state_rows, dim, dstate),
// contiguous. In per-sequence mode the kernels write only the rows of the sequences present in
// seq_idx; the others keep `absent` (initial_state, dlast_state), or 0 when it is null.
at::Tensor state_output(const ScanShape& s, const at::Tensor* absent,
                        const at::TensorOptions& options) {
  const std::vector<int64_t> shape{s.state_rows(), s.dim, s.dstate};
  if (s.num_sequences == 0) return at::empty(shape, options);
  if (absent == nullptr) return at::zeros(shape, options);
  at::Tensor states = at::empty(shape, options);
  states.copy_(*absent);
  return states;
}

// A forward call, checked and ready for a kernel.
struct FwdCall {
  at::Tensor out, last_state;
  SelectiveScanFwdParams params;
};

FwdCall prepare_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                    const c10::optional<at::Tensor>& z,
                    const c10::optional<at::Tensor>& delta_bias,
                    const c10::optional<at::Tensor>& initial_state,
                    const c10::optional<at::Tensor>& seq_idx, int64_t num_sequences,
                    bool delta_softplus) {
  const ScanInputs in{u, delta, A, B, C, opt_ptr(D), opt_ptr(z), opt_ptr(delta_bias),
                      opt_ptr(initial_state), opt_ptr(seq_idx), num_sequences};
  const ScanShape s = check_inputs(kFwdOp, in);
  FwdCall call;
  call.out = at::empty({s.batch, s.dim, s.seqlen}, u.options());
  call.last_state = state_output(s, in.initial_state, A.options());
  fill_fwd_params(call.params, s, in, &call.out, &call.last_state, delta_softplus);
  return call;
}

using FwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The CPU backward needs no checkpoints: they come back empty.
FwdOutputs selective_scan_fwd_cpu_op(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& initial_state,
    const c10::optional<at::Tensor>& seq_idx, int64_t num_sequences, bool delta_softplus,
    bool /*return_checkpoints*/) {
  FwdCall call = prepare_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
                             num_sequences, delta_softplus);
  MAMBA_DISPATCH_INPUT_TYPES(u.scalar_type(), kFwdOp,
                             [&] { selective_scan_fwd_cpu<input_t>(call.params); });
  return {call.out, call.last_state, at::empty({0}, A.options())};
}

// The gradient of an optional input: its shape and dtype, contiguous, when the input is there;
// an empty tensor of `absent_options` when not (the schema has no optional outputs).
at::Tensor gradient_or_empty(const at::Tensor* input, const at::TensorOptions& absent_options) {
  return input ? at::empty(input->sizes(), input->options()) : at::empty({0}, absent_options);
}

using BwdGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor>;

// A backward call, checked and ready for a kernel.
struct BwdCall {
  BwdGrads grads;
  ScanShape shape;
  SelectiveScanBwdParams params;
};

BwdCall prepare_bwd(const at::Tensor& dout, const c10::optional<at::Tensor>& dlast_state,
                    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                    const c10::optional<at::Tensor>& z,
                    const c10::optional<at::Tensor>& delta_bias,
                    const c10::optional<at::Tensor>& initial_state,
                    const c10::optional<at::Tensor>& seq_idx, int64_t num_sequences,
                    bool delta_softplus) {
  const char* op = kBwdOp;
  const ScanInputs in{u, delta, A, B, C, opt_ptr(D), opt_ptr(z), opt_ptr(delta_bias),
                      opt_ptr(initial_state), opt_ptr(seq_idx), num_sequences};
  const ScanShape s = check_inputs(op, in);
  check_activation(op, "dout", dout, u);
  const at::Tensor* dlast = opt_ptr(dlast_state);
  if (dlast != nullptr)
    check_state(op, "dlast_state", *dlast, s, u, weight_dtype_for(u.scalar_type()));

  at::Tensor du = at::empty(u.sizes(), u.options());
  at::Tensor ddelta = at::empty(delta.sizes(), delta.options());
  at::Tensor dA = at::empty(A.sizes(), A.options());
  at::Tensor dB = at::empty(B.sizes(), B.options());
  at::Tensor dC = at::empty(C.sizes(), C.options());
  at::Tensor dD = gradient_or_empty(in.D, A.options());
  at::Tensor dz = gradient_or_empty(in.z, u.options());
  at::Tensor ddelta_bias = gradient_or_empty(in.delta_bias, A.options());
  at::Tensor dinitial_state = in.initial_state ? state_output(s, dlast, A.options())
                                              : at::empty({0}, A.options());
  // The gradients of absent inputs stay empty and are not written.
  const at::Tensor* dz_out = in.z ? &dz : nullptr;
  const at::Tensor* dinitial_out = in.initial_state ? &dinitial_state : nullptr;

  SelectiveScanBwdParams p{};
  fill_fwd_params(p, s, in, nullptr, nullptr, delta_softplus);
  strides3(&dout, p.dout_batch_stride, p.dout_dim_stride, p.dout_seqlen_stride);
  strides3(dlast, p.dlast_state_batch_stride, p.dlast_state_dim_stride,
           p.dlast_state_dstate_stride);
  strides3(&du, p.du_batch_stride, p.du_dim_stride, p.du_seqlen_stride);
  strides3(&ddelta, p.ddelta_batch_stride, p.ddelta_dim_stride, p.ddelta_seqlen_stride);
  strides3(dz_out, p.dz_batch_stride, p.dz_dim_stride, p.dz_seqlen_stride);
  p.dA_dim_stride = dA.stride(0);
  p.dA_dstate_stride = dA.stride(1);
  state_input_strides(dB, p.dB_batch_stride, p.dB_group_stride, p.dB_dim_stride,
                      p.dB_dstate_stride, p.dB_seqlen_stride);
  state_input_strides(dC, p.dC_batch_stride, p.dC_group_stride, p.dC_dim_stride,
                      p.dC_dstate_stride, p.dC_seqlen_stride);
  p.dD_stride = in.D ? dD.stride(0) : 0;
  p.ddelta_bias_stride = in.delta_bias ? ddelta_bias.stride(0) : 0;
  strides3(dinitial_out, p.dinitial_state_batch_stride, p.dinitial_state_dim_stride,
           p.dinitial_state_dstate_stride);

  p.dout = dout.const_data_ptr();
  p.dlast_state = data_or_null(dlast);
  p.du = du.mutable_data_ptr();
  p.ddelta = ddelta.mutable_data_ptr();
  p.dz = in.z ? dz.mutable_data_ptr() : nullptr;
  p.dA = dA.mutable_data_ptr();
  p.dB = dB.mutable_data_ptr();
  p.dC = dC.mutable_data_ptr();
  p.dD = in.D ? dD.mutable_data_ptr() : nullptr;
  p.ddelta_bias = in.delta_bias ? ddelta_bias.mutable_data_ptr() : nullptr;
  p.dinitial_state = in.initial_state ? dinitial_state.mutable_data_ptr() : nullptr;

  return {{du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state}, s, p};
}

BwdGrads selective_scan_bwd_cpu_op(const at::Tensor& dout,
                                   const c10::optional<at::Tensor>& dlast_state,
                                   const at::Tensor& u, const at::Tensor& delta,
                                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                   const c10::optional<at::Tensor>& D,
                                   const c10::optional<at::Tensor>& z,
                                   const c10::optional<at::Tensor>& delta_bias,
                                   const c10::optional<at::Tensor>& initial_state,
                                   const c10::optional<at::Tensor>& seq_idx,
                                   int64_t num_sequences, bool delta_softplus,
                                   const c10::optional<at::Tensor>& /*checkpoints*/) {
  BwdCall call = prepare_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                             initial_state, seq_idx, num_sequences, delta_softplus);
  MAMBA_DISPATCH_INPUT_TYPES(u.scalar_type(), kBwdOp,
                             [&] { selective_scan_bwd_cpu<input_t>(call.params); });
  return call.grads;
}


#ifdef MAMBA_EXT_WITH_CUDA
// The forward's length parallelism when batch x dim gives too few warps (selective_scan.h): sets
// the segments in p and holds their scratch. The backward's checkpoint pass uses it too.
struct ForwardSegments {
  at::Tensor states, dt;
  ForwardSegments(SelectiveScanFwdParams& p, const at::Tensor& u, const at::Tensor& A) {
    const int64_t segment_len =
        selective_scan_fwd_cuda_segment_len(p, u.scalar_type() == at::kDouble);
    if (segment_len == 0) return;
    p.segment_len = segment_len;
    p.segments = (p.seqlen + segment_len - 1) / segment_len;
    states = at::empty({p.batch, p.segments, p.dim, p.dstate}, A.options());
    dt = at::empty({p.batch, p.segments, p.dim}, A.options());
    p.segment_states = states.data_ptr();
    p.segment_dt = dt.data_ptr();
  }
};

// The checkpoints' shape: (batch, dim, ceil(seqlen / checkpoint tokens), dstate).
std::vector<int64_t> checkpoint_sizes(const SelectiveScanFwdParams& p) {
  const int64_t tokens = selective_scan_cuda_checkpoint_tokens();
  return {p.batch, p.dim, (p.seqlen + tokens - 1) / tokens, p.dstate};
}

FwdOutputs selective_scan_fwd_cuda_op(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& initial_state,
    const c10::optional<at::Tensor>& seq_idx, int64_t num_sequences, bool delta_softplus,
    bool return_checkpoints) {
  const c10::cuda::CUDAGuard device_guard(u.device());
  FwdCall call = prepare_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
                             num_sequences, delta_softplus);
  at::Tensor checkpoints = return_checkpoints
                               ? at::empty(checkpoint_sizes(call.params), A.options())
                               : at::empty({0}, A.options());
  if (return_checkpoints) call.params.checkpoints = checkpoints.data_ptr();
  if (call.out.numel() == 0 && call.last_state.numel() == 0)
    return {call.out, call.last_state, checkpoints};
  const ForwardSegments segments(call.params, u, A);
  cudaError_t error = cudaSuccess;
  MAMBA_DISPATCH_INPUT_TYPES(u.scalar_type(), kFwdOp, [&] {
    error = selective_scan_fwd_cuda<cuda_type<input_t>>(call.params,
                                                        at::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(error == cudaSuccess, kFwdOp, ": CUDA kernel launch failed: ",
              cudaGetErrorString(error));
  return {call.out, call.last_state, checkpoints};
}

BwdGrads selective_scan_bwd_cuda_op(const at::Tensor& dout,
                                    const c10::optional<at::Tensor>& dlast_state,
                                    const at::Tensor& u, const at::Tensor& delta,
                                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                    const c10::optional<at::Tensor>& D,
                                    const c10::optional<at::Tensor>& z,
                                    const c10::optional<at::Tensor>& delta_bias,
                                    const c10::optional<at::Tensor>& initial_state,
                                    const c10::optional<at::Tensor>& seq_idx,
                                    int64_t num_sequences, bool delta_softplus,
                                    const c10::optional<at::Tensor>& checkpoints) {
  const c10::cuda::CUDAGuard device_guard(u.device());
  BwdCall call = prepare_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                             initial_state, seq_idx, num_sequences, delta_softplus);
  SelectiveScanBwdParams& p = call.params;
  const ScanShape& s = call.shape;
  const bool double_precision = u.scalar_type() == at::kDouble;
  const SelectiveScanCudaGeometry g = selective_scan_bwd_cuda_geometry(p, double_precision);
  // Scratch (selective_scan.h): deterministic sums keep one partial per slot and add them in
  // order; otherwise every block adds into one zeroed slot with atomics.
  p.deterministic = at::globalContext().deterministicAlgorithms();
  p.BC_slots = p.deterministic ? g.channel_blocks_per_group : 1;
  const int64_t reverse_segment_len = selective_scan_bwd_cuda_reverse_segment_len(p, g);
  at::Tensor segment_dh, segment_decay;
  if (reverse_segment_len > 0) {
    p.reverse_segment_len = reverse_segment_len;
    p.reverse_segments = (s.seqlen + reverse_segment_len - 1) / reverse_segment_len;
    segment_dh = at::empty({p.reverse_segments, s.batch, s.dim, s.dstate}, A.options());
    segment_decay = at::empty({p.reverse_segments, s.batch, s.dim, s.dstate}, A.options());
    p.segment_dh = segment_dh.data_ptr();
    p.segment_decay = segment_decay.data_ptr();
  }
  p.weight_slots = p.deterministic ? s.batch * p.reverse_segments : 1;
  const at::TensorOptions acc = A.options();
  auto scratch = [&](std::initializer_list<int64_t> sizes) {
    return p.deterministic ? at::empty(sizes, acc) : at::zeros(sizes, acc);
  };
  // The forward's checkpoints, or a checkpoint pass of its own.
  at::Tensor own_checkpoints;
  p.checkpoints_ready = checkpoints.has_value() && checkpoints->numel() > 0;
  if (p.checkpoints_ready) {
    const std::vector<int64_t> sizes = checkpoint_sizes(p);
    TORCH_CHECK(checkpoints->device() == u.device() &&
                    checkpoints->scalar_type() == A.scalar_type() &&
                    checkpoints->sizes() == at::IntArrayRef(sizes) && checkpoints->is_contiguous(),
                kBwdOp, ": checkpoints must be selective_scan_fwd's (contiguous ",
                at::IntArrayRef(sizes), " ", A.scalar_type(), " on ", u.device(), "), got ",
                checkpoints->sizes(), " ", checkpoints->scalar_type(), " on ",
                checkpoints->device(), checkpoints->is_contiguous() ? "" : ", not contiguous");
    p.checkpoints = checkpoints->data_ptr();
  } else {
    own_checkpoints = at::empty(checkpoint_sizes(p), acc);
    p.checkpoints = own_checkpoints.data_ptr();
  }
  at::Tensor BC_partials =
      (s.variable_B || s.variable_C)
          ? scratch({p.BC_slots, s.batch, s.ngroups, 2, s.dstate, s.seqlen})
          : at::empty({0}, acc);
  at::Tensor weight_partials = scratch({p.weight_slots, s.dim, 3, s.dstate});
  at::Tensor channel_partials = scratch({p.weight_slots, s.dim, 2});
  at::Tensor slice_partials =
      g.slice_blocks > 1 ? at::empty({g.slice_blocks, 3, s.batch, s.dim, s.seqlen}, acc)
                         : at::empty({0}, acc);
  p.BC_partials = BC_partials.data_ptr();
  p.weight_partials = weight_partials.data_ptr();
  p.channel_partials = channel_partials.data_ptr();
  p.slice_partials = slice_partials.data_ptr();
  std::optional<ForwardSegments> checkpoint_segments;
  if (!p.checkpoints_ready) checkpoint_segments.emplace(p, u, A);
  if (s.batch * s.dim == 0) {
    // No token to scan: the sums are empty.
    for (at::Tensor* grad : {&std::get<2>(call.grads), &std::get<3>(call.grads),
                             &std::get<4>(call.grads), &std::get<5>(call.grads),
                             &std::get<7>(call.grads)})
      grad->zero_();
    return call.grads;
  }
  cudaError_t error = cudaSuccess;
  MAMBA_DISPATCH_INPUT_TYPES(u.scalar_type(), kBwdOp, [&] {
    error = selective_scan_bwd_cuda<cuda_type<input_t>>(p, at::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(error == cudaSuccess, kBwdOp, ": CUDA kernel launch failed: ",
              cudaGetErrorString(error));
  return call.grads;
}
#endif
}  // namespace

TORCH_LIBRARY_IMPL(mamba_ext, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cpu_op);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu_op);
}

#ifdef MAMBA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(mamba_ext, CUDA, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cuda_op);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cuda_op);
}
#endif

}  // namespace mamba_ext
