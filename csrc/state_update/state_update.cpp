// Host side of selective_state_update: checks every argument, lifts the Mamba-1 form to the
// Mamba-2 one (views, never copies), fills the params and dispatches to the kernel.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#ifdef MAMBA_EXT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <vector>

#include "common/check.h"
#include "common/dispatch.h"
#include "common/math.h"
#include "state_update/state_update.h"

namespace mamba_ext {
namespace {

constexpr const char* kOp = "selective_state_update";

// dt and state each allow two dtypes, which coincide for float32 activations.
void check_dtype_either(const char* name, const at::Tensor& t, at::ScalarType first,
                        at::ScalarType second, const char* why) {
  if (first == second) {
    check_dtype(kOp, name, t, first, why);
  } else {
    check_dtype_in(kOp, name, t, {first, second});
  }
}

// Reads every index on the host: one out of range would write outside `pool_name`, and a
// repeated one would let two threads update the same row at once.
void check_indices_on_host(const char* name, const at::Tensor& indices, const char* pool_name,
                           int64_t pool_rows) {
  const int32_t* index = indices.data_ptr<int32_t>();  // (batch,)
  std::vector<int64_t> used_at(pool_rows, -1);
  for (int64_t b = 0; b < indices.numel(); ++b) {
    const int32_t row = index[b];
    TORCH_CHECK_VALUE(row >= 0 && row < pool_rows, kOp, ": ", name, " must hold rows of ",
                      pool_name, " in [0, ", pool_rows, "), got ", row, " at position ", b);
    TORCH_CHECK_VALUE(used_at[row] < 0, kOp, ": ", name,
                      " must not repeat a row (each is written once), got row ", row,
                      " at positions ", used_at[row], " and ", b);
    used_at[row] = b;
  }
}

int64_t stride_or_zero(const at::Tensor& t, int64_t dim) { return t.defined() ? t.stride(dim) : 0; }

// A checked call: the params, the output they point into, and the tensors they borrow from.
struct PreparedCall {
  SelectiveStateUpdateParams params;
  at::Tensor out;           // x's shape
  at::Tensor state_rows;    // (batch,) contiguous state_batch_indices, or undefined
  at::Tensor inter_rows;    // (batch,) contiguous intermediate_state_indices, or undefined
  at::ScalarType input_type;
  bool state_in_input_type;  // a bf16 / fp16 state rather than the float32 one
};

// Checks every argument and fills the params. The CPU reads the index tensors on the host
// (check_indices_on_host); on CUDA that would cost a device sync, so the kernel skips a row whose
// index is outside the pool instead (state untouched, out = 0).
//
// Forms, told apart by the ranks of state and x:
//   Mamba-1, one token:  state (state_batch, dim, dstate), x (batch, dim)
//   Mamba-1, s tokens:   state (state_batch, dim, dstate), x (batch, seqlen, dim)
//   Mamba-2, one token:  state (state_batch, nheads, headdim, dstate), x (batch, nheads, headdim)
//   Mamba-2, s tokens:   state (state_batch, nheads, headdim, dstate),
//                        x (batch, seqlen, nheads, headdim)
// dt and z are shaped like x; B and C like x with the channels replaced by (ngroups, dstate)
// ((dstate,) alone for Mamba-1 with one group).
PreparedCall prepare(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                     const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                     const c10::optional<at::Tensor>& D_opt,
                     const c10::optional<at::Tensor>& z_opt,
                     const c10::optional<at::Tensor>& dt_bias_opt,
                     const c10::optional<at::Tensor>& indices_opt, bool dt_softplus,
                     const c10::optional<at::Tensor>& inter_opt,
                     const c10::optional<at::Tensor>& inter_indices_opt,
                     bool disable_state_update, bool check_indices_on_host_side) {
  const at::Tensor* D = opt_ptr(D_opt);
  const at::Tensor* z = opt_ptr(z_opt);
  const at::Tensor* dt_bias = opt_ptr(dt_bias_opt);
  const at::Tensor* indices = opt_ptr(indices_opt);
  const at::Tensor* inter = opt_ptr(inter_opt);
  const at::Tensor* inter_indices = opt_ptr(inter_indices_opt);

  // Shapes. The state's rank picks the form; its middle dimensions are the channels,
  // (nheads, headdim) for Mamba-2 and (dim,) for Mamba-1. x's rank then says whether a token
  // dimension follows batch.
  TORCH_CHECK_VALUE(state.dim() == 3 || state.dim() == 4, kOp,
                    ": state must have 3 dimensions (state_batch, dim, dstate) or 4 "
                    "(state_batch, nheads, headdim, dstate), got ",
                    state.dim(), " with shape ", shape_str(state.sizes()));
  const bool has_heads = state.dim() == 4;
  TORCH_CHECK_VALUE(x.dim() == state.dim() - 1 || x.dim() == state.dim(), kOp, ": x must have ",
                    state.dim() - 1, " dimensions ",
                    has_heads ? "(batch, nheads, headdim)" : "(batch, dim)", " or ", state.dim(),
                    " ", has_heads ? "(batch, seqlen, nheads, headdim)" : "(batch, seqlen, dim)",
                    ", got ", x.dim(), " with shape ", shape_str(x.sizes()));
  const bool has_seq = x.dim() == state.dim();
  const char* x_dims = has_heads ? (has_seq ? "(batch, seqlen, nheads, headdim)"
                                            : "(batch, nheads, headdim)")
                                 : (has_seq ? "(batch, seqlen, dim)" : "(batch, dim)");
  const char* A_dims = has_heads ? "(nheads, headdim, dstate)" : "(dim, dstate)";
  const char* weight_dims = has_heads ? "(nheads, headdim)" : "(dim,)";
  const std::vector<int64_t> channels(state.sizes().begin() + 1, state.sizes().end() - 1);
  const int64_t nheads = state.size(1);  // dim for Mamba-1
  const int64_t dstate = state.size(-1);
  TORCH_CHECK_VALUE(dstate >= 1 && dstate <= kSelectiveStateUpdateMaxDstate, kOp,
                    ": state must have dstate (its last dimension) in [1, ",
                    kSelectiveStateUpdateMaxDstate, "], got ", dstate);
  const int64_t batch = x.size(0);
  const int64_t seqlen = has_seq ? x.size(1) : 1;
  std::vector<int64_t> lead{batch};  // (batch,) or (batch, seqlen)
  if (has_seq) lead.push_back(seqlen);
  std::vector<int64_t> x_shape(lead);
  x_shape.insert(x_shape.end(), channels.begin(), channels.end());
  std::vector<int64_t> A_shape(channels);
  A_shape.push_back(dstate);
  check_shape(kOp, "x", x, x_shape, x_dims);
  check_shape(kOp, "dt", dt, x_shape, x_dims);
  check_shape(kOp, "A", A, A_shape, A_dims);
  // B's group dimension: always there for Mamba-2, optional for Mamba-1.
  const int64_t B_rank_grouped = static_cast<int64_t>(lead.size()) + 2;
  const char* B_grouped_dims =
      has_seq ? "(batch, seqlen, ngroups, dstate)" : "(batch, ngroups, dstate)";
  const char* B_flat_dims = has_seq ? "(batch, seqlen, dstate)" : "(batch, dstate)";
  if (has_heads) {
    check_rank(kOp, "B", B, B_rank_grouped, B_grouped_dims);
  } else {
    TORCH_CHECK_VALUE(B.dim() == B_rank_grouped - 1 || B.dim() == B_rank_grouped, kOp,
                      ": B must have ", B_rank_grouped - 1, " dimensions ", B_flat_dims, " or ",
                      B_rank_grouped, " ", B_grouped_dims, ", got ", B.dim(), " with shape ",
                      shape_str(B.sizes()));
  }
  const bool B_grouped = B.dim() == B_rank_grouped;
  const char* B_dims = B_grouped ? B_grouped_dims : B_flat_dims;
  const int64_t ngroups = B_grouped ? B.size(-2) : 1;
  TORCH_CHECK_VALUE(ngroups >= 1 && nheads % ngroups == 0, kOp, ": B must have ngroups dividing ",
                    has_heads ? "nheads" : "dim", " = ", nheads, ", got ngroups = ", ngroups);
  std::vector<int64_t> B_shape(lead);
  if (B_grouped) B_shape.push_back(ngroups);
  B_shape.push_back(dstate);
  check_shape(kOp, "B", B, B_shape, B_dims);
  check_shape(kOp, "C", C, B_shape, B_dims);
  if (D) check_shape(kOp, "D", *D, channels, weight_dims);
  if (z) check_shape(kOp, "z", *z, x_shape, x_dims);
  if (dt_bias) check_shape(kOp, "dt_bias", *dt_bias, channels, weight_dims);
  if (indices) {
    check_shape(kOp, "state_batch_indices", *indices, {batch}, "(batch,)");
  } else {
    TORCH_CHECK_VALUE(state.size(0) == batch, kOp, ": state must have state_batch = batch = ",
                      batch, " rows when state_batch_indices is absent, got ", state.size(0));
  }
  TORCH_CHECK_VALUE(at::has_internal_overlap(state) != at::MemOverlap::Yes, kOp,
                    ": state must not have overlapping memory (it is updated in place), got "
                    "strides ",
                    shape_str(state.strides()));
  TORCH_CHECK_VALUE(inter || !inter_indices, kOp,
                    ": intermediate_state_indices must come with intermediate_states_buffer, "
                    "got intermediate_state_indices alone");
  const char* inter_dims = has_heads ? "(rows, seqlen, nheads, headdim, dstate)"
                                     : "(rows, seqlen, dim, dstate)";
  if (inter) {
    check_rank(kOp, "intermediate_states_buffer", *inter, state.dim() + 1, inter_dims);
    std::vector<int64_t> inter_shape{inter_indices ? inter->size(0) : batch, seqlen};
    inter_shape.insert(inter_shape.end(), channels.begin(), channels.end());
    inter_shape.push_back(dstate);
    check_shape(kOp, "intermediate_states_buffer", *inter, inter_shape,
                inter_indices ? inter_dims
                              : (has_heads ? "(batch, seqlen, nheads, headdim, dstate)"
                                           : "(batch, seqlen, dim, dstate)"));
    TORCH_CHECK_VALUE(at::has_internal_overlap(*inter) != at::MemOverlap::Yes, kOp,
                      ": intermediate_states_buffer must not have overlapping memory (it is "
                      "written), got strides ",
                      shape_str(inter->strides()));
  }
  if (inter_indices) {
    check_shape(kOp, "intermediate_state_indices", *inter_indices, {batch}, "(batch,)");
  }

  // Dtypes.
  check_dtype_in(kOp, "x", x, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  const at::ScalarType input_type = x.scalar_type();
  const at::ScalarType weight_type = weight_dtype_for(input_type);
  const char* weight_why = "float32, float64 for float64 x";
  check_dtype_either("state", state, weight_type, input_type, "like x");
  check_dtype_either("dt", dt, input_type, at::kFloat, "like x");
  check_dtype(kOp, "A", A, weight_type, weight_why);
  check_dtype(kOp, "B", B, input_type, "like x");
  check_dtype(kOp, "C", C, input_type, "like x");
  if (D) check_dtype(kOp, "D", *D, weight_type, weight_why);
  if (z) check_dtype(kOp, "z", *z, input_type, "like x");
  if (dt_bias) check_dtype(kOp, "dt_bias", *dt_bias, weight_type, weight_why);
  if (indices) check_dtype(kOp, "state_batch_indices", *indices, at::kInt, "row indices");
  if (inter) {
    check_dtype(kOp, "intermediate_states_buffer", *inter, state.scalar_type(), "like state");
  }
  if (inter_indices) {
    check_dtype(kOp, "intermediate_state_indices", *inter_indices, at::kInt, "row indices");
  }

  // Devices.
  const std::initializer_list<std::pair<const char*, const at::Tensor*>> named_tensors{
      {"state", &state}, {"dt", &dt}, {"A", &A}, {"B", &B}, {"C", &C}, {"D", D}, {"z", z},
      {"dt_bias", dt_bias}, {"state_batch_indices", indices},
      {"intermediate_states_buffer", inter}, {"intermediate_state_indices", inter_indices}};
  for (const auto& [name, t] : named_tensors) {
    if (t) check_device(kOp, name, *t, x.device(), "x");
  }

  // The index tensors are tiny: a contiguous copy, where one is strided, spares the kernel a
  // stride.
  const at::Tensor state_rows = indices ? indices->contiguous() : at::Tensor();  // (batch,)
  const at::Tensor inter_rows =
      inter_indices ? inter_indices->contiguous() : at::Tensor();  // (batch,)
  if (check_indices_on_host_side) {
    if (indices) check_indices_on_host("state_batch_indices", state_rows, "state", state.size(0));
    if (inter_indices) {
      check_indices_on_host("intermediate_state_indices", inter_rows,
                            "intermediate_states_buffer", inter->size(0));
    }
  }

  at::Tensor out = at::empty(x.sizes(), x.options());  // x's shape

  // Every tensor as its Mamba-2 view with a token dimension: a single-token tensor gets a token
  // dimension of size 1, then the Mamba-1 form splits dim into (nheads = ngroups,
  // headdim = dim / ngroups) and B and C get their group dimension.
  const auto with_seq = [&](const at::Tensor& t) {
    return has_seq || !t.defined() ? t : t.unsqueeze(1);
  };
  const auto lift = [&](const at::Tensor& t, int64_t channel_dim) {
    return has_heads || !t.defined() ? t : t.unflatten(channel_dim, {ngroups, nheads / ngroups});
  };
  const at::Tensor state4 = lift(state, 1);  // (state_batch, nheads, headdim, dstate)
  const at::Tensor x4 = lift(with_seq(x), 2);  // (batch, seqlen, nheads, headdim)
  const at::Tensor dt4 = lift(with_seq(dt), 2);  // (batch, seqlen, nheads, headdim)
  const at::Tensor z4 = lift(with_seq(z ? *z : at::Tensor()), 2);  // (batch, seqlen, nheads, headdim)
  const at::Tensor out4 = lift(with_seq(out), 2);  // (batch, seqlen, nheads, headdim)
  const at::Tensor A3 = lift(A, 0);  // (nheads, headdim, dstate)
  const at::Tensor D2 = lift(D ? *D : at::Tensor(), 0);  // (nheads, headdim)
  const at::Tensor dt_bias2 = lift(dt_bias ? *dt_bias : at::Tensor(), 0);  // (nheads, headdim)
  const at::Tensor B4 = B_grouped ? with_seq(B) : with_seq(B).unsqueeze(2);  // (batch, seqlen, ngroups, dstate)
  const at::Tensor C4 = B_grouped ? with_seq(C) : with_seq(C).unsqueeze(2);  // (batch, seqlen, ngroups, dstate)
  const at::Tensor inter5 = lift(inter ? *inter : at::Tensor(), 2);  // (rows, seqlen, nheads, headdim, dstate)

  SelectiveStateUpdateParams params{};
  params.batch = batch;
  params.seqlen = seqlen;
  params.nheads = state4.size(1);
  params.headdim = state4.size(2);
  params.dstate = dstate;
  params.ngroups = ngroups;
  params.state_batch = state4.size(0);
  params.inter_batch = inter ? inter->size(0) : 0;
  params.state_batch_stride = state4.stride(0);
  params.state_head_stride = state4.stride(1);
  params.state_headdim_stride = state4.stride(2);
  params.state_dstate_stride = state4.stride(3);
  params.x_batch_stride = x4.stride(0);
  params.x_seq_stride = x4.stride(1);
  params.x_head_stride = x4.stride(2);
  params.x_headdim_stride = x4.stride(3);
  params.dt_batch_stride = dt4.stride(0);
  params.dt_seq_stride = dt4.stride(1);
  params.dt_head_stride = dt4.stride(2);
  params.dt_headdim_stride = dt4.stride(3);
  params.A_head_stride = A3.stride(0);
  params.A_headdim_stride = A3.stride(1);
  params.A_dstate_stride = A3.stride(2);
  params.B_batch_stride = B4.stride(0);
  params.B_seq_stride = B4.stride(1);
  params.B_group_stride = B4.stride(2);
  params.B_dstate_stride = B4.stride(3);
  params.C_batch_stride = C4.stride(0);
  params.C_seq_stride = C4.stride(1);
  params.C_group_stride = C4.stride(2);
  params.C_dstate_stride = C4.stride(3);
  params.D_head_stride = stride_or_zero(D2, 0);
  params.D_headdim_stride = stride_or_zero(D2, 1);
  params.z_batch_stride = stride_or_zero(z4, 0);
  params.z_seq_stride = stride_or_zero(z4, 1);
  params.z_head_stride = stride_or_zero(z4, 2);
  params.z_headdim_stride = stride_or_zero(z4, 3);
  params.dt_bias_head_stride = stride_or_zero(dt_bias2, 0);
  params.dt_bias_headdim_stride = stride_or_zero(dt_bias2, 1);
  params.out_batch_stride = out4.stride(0);
  params.out_seq_stride = out4.stride(1);
  params.out_head_stride = out4.stride(2);
  params.out_headdim_stride = out4.stride(3);
  params.inter_batch_stride = stride_or_zero(inter5, 0);
  params.inter_seq_stride = stride_or_zero(inter5, 1);
  params.inter_head_stride = stride_or_zero(inter5, 2);
  params.inter_headdim_stride = stride_or_zero(inter5, 3);
  params.inter_dstate_stride = stride_or_zero(inter5, 4);
  params.state = state4.data_ptr();
  params.x = x4.const_data_ptr();
  params.dt = dt4.const_data_ptr();
  params.A = A3.const_data_ptr();
  params.B = B4.const_data_ptr();
  params.C = C4.const_data_ptr();
  params.D = D2.defined() ? D2.const_data_ptr() : nullptr;
  params.z = z4.defined() ? z4.const_data_ptr() : nullptr;
  params.dt_bias = dt_bias2.defined() ? dt_bias2.const_data_ptr() : nullptr;
  params.state_batch_indices = indices ? state_rows.const_data_ptr<int32_t>() : nullptr;
  params.inter = inter5.defined() ? inter5.data_ptr() : nullptr;
  params.inter_indices = inter_indices ? inter_rows.const_data_ptr<int32_t>() : nullptr;
  params.out = out4.data_ptr();
  params.dt_softplus = dt_softplus;
  params.dt_is_float = dt.scalar_type() != input_type;
  params.update_state = !disable_state_update;

  return PreparedCall{params, out, state_rows, inter_rows, input_type,
                      state.scalar_type() == input_type && input_type != weight_type};
}

// Records the in-place update as ATen's in-place ops do, so that autograd refuses a backward that
// would read a tensor some other op saved before this overwrote it. (Inference tensors have no
// version counter.)
void bump_version(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// The arguments of the op, in schema order (the C++ type of each argument, once).
#define MAMBA_SSU_ARGS                                                                           \
  at::Tensor &state, const at::Tensor &x, const at::Tensor &dt, const at::Tensor &A,             \
      const at::Tensor &B, const at::Tensor &C, const c10::optional<at::Tensor> &D,              \
      const c10::optional<at::Tensor> &z, const c10::optional<at::Tensor> &dt_bias,              \
      const c10::optional<at::Tensor> &indices, bool dt_softplus,                                \
      const c10::optional<at::Tensor> &inter, const c10::optional<at::Tensor> &inter_indices,    \
      bool disable_state_update

void bump_versions(at::Tensor& state, const c10::optional<at::Tensor>& inter,
                   bool disable_state_update) {
  if (!disable_state_update) bump_version(state);
  if (inter.has_value()) bump_version(*inter);
}

at::Tensor selective_state_update_cpu_op(MAMBA_SSU_ARGS) {
  const PreparedCall call = prepare(state, x, dt, A, B, C, D, z, dt_bias, indices, dt_softplus,
                                    inter, inter_indices, disable_state_update, true);
  MAMBA_DISPATCH_INPUT_TYPES(call.input_type, kOp, [&] {
    if (call.state_in_input_type) {
      selective_state_update_cpu<input_t, input_t>(call.params);
    } else {
      selective_state_update_cpu<input_t, acc_type<input_t>>(call.params);
    }
  });
  bump_versions(state, inter, disable_state_update);
  return call.out;
}

#ifdef MAMBA_EXT_WITH_CUDA
at::Tensor selective_state_update_cuda_op(MAMBA_SSU_ARGS) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const PreparedCall call = prepare(state, x, dt, A, B, C, D, z, dt_bias, indices, dt_softplus,
                                    inter, inter_indices, disable_state_update, false);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t error = cudaSuccess;
  MAMBA_DISPATCH_INPUT_TYPES(call.input_type, kOp, [&] {
    using cuda_input_t = cuda_type<input_t>;
    if (call.state_in_input_type) {
      error = selective_state_update_cuda<cuda_input_t, cuda_input_t>(call.params, stream);
    } else {
      error = selective_state_update_cuda<cuda_input_t, acc_type<input_t>>(call.params, stream);
    }
  });
  TORCH_CHECK(error == cudaSuccess, kOp, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
  bump_versions(state, inter, disable_state_update);
  return call.out;
}
#endif

// The op is a decode step with no backward. Under grad mode an input that requires grad is
// refused with a clear error rather than letting the output silently cut the graph; otherwise the
// op runs below autograd. (torch.library.register_autograd refuses ops that mutate an input.)
at::Tensor selective_state_update_autograd_op(MAMBA_SSU_ARGS) {
  if (at::GradMode::is_enabled()) {
    const std::initializer_list<std::pair<const char*, const at::Tensor*>> named_tensors{
        {"state", &state}, {"x", &x}, {"dt", &dt}, {"A", &A}, {"B", &B}, {"C", &C},
        {"D", opt_ptr(D)}, {"z", opt_ptr(z)}, {"dt_bias", opt_ptr(dt_bias)},
        {"intermediate_states_buffer", opt_ptr(inter)}};
    for (const auto& [name, t] : named_tensors) {
      TORCH_CHECK_VALUE(t == nullptr || !t->requires_grad(), kOp, ": ", name,
                        " must not require grad (a decode step has no backward: call it under "
                        "torch.no_grad() or torch.inference_mode()), got a tensor that requires "
                        "grad");
    }
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mamba_ext::selective_state_update", "")
                             .typed<decltype(selective_state_update_autograd_op)>();
  return op.call(state, x, dt, A, B, C, D, z, dt_bias, indices, dt_softplus, inter,
                 inter_indices, disable_state_update);
}

#undef MAMBA_SSU_ARGS

}  // namespace

TORCH_LIBRARY_IMPL(mamba_ext, CPU, m) {
  m.impl("selective_state_update", &selective_state_update_cpu_op);
}

#ifdef MAMBA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(mamba_ext, CUDA, m) {
  m.impl("selective_state_update", &selective_state_update_cuda_op);
}
#endif

TORCH_LIBRARY_IMPL(mamba_ext, Autograd, m) {
  m.impl("selective_state_update", &selective_state_update_autograd_op);
}

}  // namespace mamba_ext
