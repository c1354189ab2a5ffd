// Host side of the causal depthwise conv1d ops: argument checks, allocation, params, dtype
// dispatch and the registrations. The only file of the family that touches at::Tensor. One
// function per op serves the CPU and the CUDA kernels: they share every check and the params.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <utility>

#ifdef MAMBA_EXT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include "causal_conv1d/causal_conv1d.h"
#include "common/check.h"
#include "common/dispatch.h"

namespace mamba_ext {
namespace {

constexpr const char* kFwdOp = "causal_conv1d_fwd";
constexpr const char* kBwdOp = "causal_conv1d_bwd";
constexpr const char* kUpdateOp = "causal_conv1d_update";
constexpr int64_t kMinWidth = 2;
constexpr int64_t kMaxWidth = 4;

// The layout of out and dx, which the fake kernels (mamba_ext/ops/causal_conv1d.py) mirror:
// channel-last, i.e. (batch, seqlen, dim) in memory, when x has stride 1 over dim and not over
// seqlen; contiguous otherwise.
bool is_channel_last(const at::Tensor& x) { return x.stride(1) == 1 && x.stride(2) != 1; }

at::Tensor empty_in_layout_of(const at::Tensor& x) {
  if (is_channel_last(x))
    return at::empty({x.size(0), x.size(2), x.size(1)}, x.options()).transpose(1, 2);
  return at::empty(x.sizes(), x.options());
}

void strides3(const at::Tensor& t, int64_t& batch, int64_t& dim, int64_t& time) {
  batch = t.stride(0), dim = t.stride(1), time = t.stride(2);
}

void check_x_dtype(const char* op, const at::Tensor& x) {
  check_dtype_in(op, "x", x, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
}

// weight and bias come in x's dtype or in the accumulation dtype (float32; float64 for float64 x).
void check_param_dtype(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& x) {
  const at::ScalarType acc = weight_dtype_for(x.scalar_type());
  if (acc == x.scalar_type()) {
    check_dtype(op, name, t, acc, "like x");
  } else {
    check_dtype_in(op, name, t, {x.scalar_type(), acc});
  }
}

// Checks weight and bias for an x of `dim` channels; returns the width.
int64_t check_weight_and_bias(const char* op, const at::Tensor& x, int64_t dim,
                              const at::Tensor& weight, const at::Tensor* bias) {
  check_rank(op, "weight", weight, 2, "(dim, width)");
  const int64_t width = weight.size(1);
  TORCH_CHECK_VALUE(width >= kMinWidth && width <= kMaxWidth, op,
                    ": weight must have a width (last dimension) in [", kMinWidth, ", ",
                    kMaxWidth, "], got ", width, " with shape ", shape_str(weight.sizes()));
  check_shape(op, "weight", weight, {dim, width}, "(dim, width)");
  check_param_dtype(op, "weight", weight, x);
  check_device(op, "weight", weight, x.device(), "x");
  if (bias != nullptr) {
    check_shape(op, "bias", *bias, {dim}, "(dim,)");
    check_param_dtype(op, "bias", *bias, x);
    check_device(op, "bias", *bias, x.device(), "x");
  }
  return width;
}

// Checks the inputs of the forward, which the backward takes too; returns the width.
int64_t check_conv_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor* bias, const at::Tensor* seq_idx,
                          const at::Tensor* initial_states) {
  check_rank(op, "x", x, 3, "(batch, dim, seqlen)");
  check_x_dtype(op, x);
  const int64_t batch = x.size(0), dim = x.size(1), seqlen = x.size(2);
  TORCH_CHECK_VALUE(seqlen >= 1, op, ": x must have seqlen >= 1, got shape ",
                    shape_str(x.sizes()));
  const int64_t width = check_weight_and_bias(op, x, dim, weight, bias);
  if (seq_idx != nullptr) {
    check_shape(op, "seq_idx", *seq_idx, {batch, seqlen}, "(batch, seqlen)");
    check_dtype(op, "seq_idx", *seq_idx, at::kInt, "sequence indices");
    check_device(op, "seq_idx", *seq_idx, x.device(), "x");
  }
  if (initial_states != nullptr) {
    check_shape(op, "initial_states", *initial_states, {batch, dim, width - 1},
                "(batch, dim, width - 1)");
    check_dtype(op, "initial_states", *initial_states, x.scalar_type(), "like x");
    check_device(op, "initial_states", *initial_states, x.device(), "x");
  }
  return width;
}

#ifdef MAMBA_EXT_WITH_CUDA
// The CUDA launches return their launch error; the host raises it.
void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

// weight and bias in the accumulation dtype, as the kernels read them (they are tiny).
struct AccWeights {
  AccWeights(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias)
      : weight(weight.to(weight_dtype_for(x.scalar_type()))),
        bias(bias == nullptr ? at::Tensor() : bias->to(weight_dtype_for(x.scalar_type()))) {}
  at::Tensor weight;  // (dim, width)
  at::Tensor bias;    // (dim,) or undefined
};

// The params of the inputs; the outputs are left to the caller.
CausalConv1dFwdParams conv_params(const at::Tensor& x, const AccWeights& acc,
                                  const at::Tensor* seq_idx, const at::Tensor* initial_states,
                                  bool silu) {
  CausalConv1dFwdParams params{};
  params.batch = x.size(0), params.dim = x.size(1), params.seqlen = x.size(2);
  params.width = acc.weight.size(1);
  strides3(x, params.x_batch_stride, params.x_dim_stride, params.x_seqlen_stride);
  params.weight_dim_stride = acc.weight.stride(0);
  params.weight_width_stride = acc.weight.stride(1);
  params.x = x.data_ptr();
  params.weight = acc.weight.data_ptr();
  if (acc.bias.defined()) {
    params.bias_stride = acc.bias.stride(0);
    params.bias = acc.bias.data_ptr();
  }
  if (seq_idx != nullptr) {
    params.seq_idx_batch_stride = seq_idx->stride(0);
    params.seq_idx_seqlen_stride = seq_idx->stride(1);
    params.seq_idx = seq_idx->data_ptr<int32_t>();
  }
  if (initial_states != nullptr) {
    strides3(*initial_states, params.initial_states_batch_stride,
             params.initial_states_dim_stride, params.initial_states_width_stride);
    params.initial_states = initial_states->data_ptr();
  }
  params.silu = silu;
  return params;
}

std::tuple<at::Tensor, at::Tensor> causal_conv1d_fwd_op(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& initial_states,
    bool return_final_states, bool silu) {
  const int64_t width = check_conv_inputs(kFwdOp, x, weight, opt_ptr(bias), opt_ptr(seq_idx),
                                          opt_ptr(initial_states));
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const AccWeights acc(x, weight, opt_ptr(bias));
  at::Tensor out = empty_in_layout_of(x);  // (batch, dim, seqlen)
  at::Tensor final_states = return_final_states  // (batch, dim, width - 1) or (0,)
                                ? at::empty({x.size(0), x.size(1), width - 1}, x.options())
                                : at::empty({0}, x.options());
  CausalConv1dFwdParams params =
      conv_params(x, acc, opt_ptr(seq_idx), opt_ptr(initial_states), silu);
  strides3(out, params.out_batch_stride, params.out_dim_stride, params.out_seqlen_stride);
  params.out = out.data_ptr();
  if (return_final_states) {
    strides3(final_states, params.final_states_batch_stride, params.final_states_dim_stride,
             params.final_states_width_stride);
    params.final_states = final_states.data_ptr();
  }
  MAMBA_DISPATCH_INPUT_TYPES(x.scalar_type(), kFwdOp, [&] {
#ifdef MAMBA_EXT_WITH_CUDA
    if (x.is_cuda()) {
      return check_launch(kFwdOp,
                          causal_conv1d_fwd_cuda<cuda_type<input_t>>(params, current_stream()));
    }
#endif
    causal_conv1d_fwd_cpu<input_t>(params);
  });
  return {out, final_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd_op(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal_states, const at::Tensor& x,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& initial_states,
    bool silu) {
  const int64_t width = check_conv_inputs(kBwdOp, x, weight, opt_ptr(bias), opt_ptr(seq_idx),
                                          opt_ptr(initial_states));
  const int64_t batch = x.size(0), dim = x.size(1);
  check_shape(kBwdOp, "dout", dout, x.sizes(), "(batch, dim, seqlen)");
  check_dtype(kBwdOp, "dout", dout, x.scalar_type(), "like x");
  check_device(kBwdOp, "dout", dout, x.device(), "x");
  const at::Tensor* dfinal = opt_ptr(dfinal_states);
  if (dfinal != nullptr) {
    check_shape(kBwdOp, "dfinal_states", *dfinal, {batch, dim, width - 1},
                "(batch, dim, width - 1)");
    check_dtype(kBwdOp, "dfinal_states", *dfinal, x.scalar_type(), "like x");
    check_device(kBwdOp, "dfinal_states", *dfinal, x.device(), "x");
  }
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const AccWeights acc(x, weight, opt_ptr(bias));
  const at::TensorOptions acc_options = acc.weight.options();
  at::Tensor dx = empty_in_layout_of(x);                              // (batch, dim, seqlen)
  at::Tensor dweight_acc = at::empty({dim, width}, acc_options);     // (dim, width)
  at::Tensor dbias_acc = bias.has_value() ? at::empty({dim}, acc_options) : at::Tensor();
  at::Tensor dinitial_states = initial_states.has_value()  // (batch, dim, width - 1) or (0,)
                                   ? at::empty({batch, dim, width - 1}, x.options())
                                   : at::empty({0}, x.options());

  CausalConv1dBwdParams params{};
  static_cast<CausalConv1dFwdParams&>(params) =
      conv_params(x, acc, opt_ptr(seq_idx), opt_ptr(initial_states), silu);
  strides3(dout, params.dout_batch_stride, params.dout_dim_stride, params.dout_seqlen_stride);
  params.dout = dout.data_ptr();
  if (dfinal != nullptr) {
    strides3(*dfinal, params.dfinal_states_batch_stride, params.dfinal_states_dim_stride,
             params.dfinal_states_width_stride);
    params.dfinal_states = dfinal->data_ptr();
  }
  strides3(dx, params.dx_batch_stride, params.dx_dim_stride, params.dx_seqlen_stride);
  params.dx = dx.data_ptr();
  params.dweight = dweight_acc.data_ptr();
  params.dbias = dbias_acc.defined() ? dbias_acc.data_ptr() : nullptr;
  if (initial_states.has_value()) {
    strides3(dinitial_states, params.dinitial_states_batch_stride,
             params.dinitial_states_dim_stride, params.dinitial_states_width_stride);
    params.dinitial_states = dinitial_states.data_ptr();
  }
#ifdef MAMBA_EXT_WITH_CUDA
  at::Tensor dweight_partials;  // (partial_rows, dim, 4 taps + bias): the CUDA kernels' scratch
  if (x.is_cuda()) {
    dweight_partials = at::empty(
        {causal_conv1d_cuda_partial_rows(params, x.element_size()), dim,
         kCausalConv1dCudaPartialSums}, acc_options);
    params.dweight_partials = dweight_partials.data_ptr();
  }
#endif
  MAMBA_DISPATCH_INPUT_TYPES(x.scalar_type(), kBwdOp, [&] {
#ifdef MAMBA_EXT_WITH_CUDA
    if (x.is_cuda()) {
      return check_launch(kBwdOp,
                          causal_conv1d_bwd_cuda<cuda_type<input_t>>(params, current_stream()));
    }
#endif
    causal_conv1d_bwd_cpu<input_t>(params);
  });

  at::Tensor dbias = bias.has_value() ? dbias_acc.to(bias->scalar_type())  // (dim,) or (0,)
                                      : at::empty({0}, weight.options());
  return {dx, dweight_acc.to(weight.scalar_type()), dbias, dinitial_states};
}

at::Tensor causal_conv1d_update_op(const at::Tensor& x, const at::Tensor& conv_state,
                                       const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias,
                                       const c10::optional<at::Tensor>& cache_seqlens,
                                       const c10::optional<at::Tensor>& conv_state_indices,
                                       bool silu) {
  const char* op = kUpdateOp;
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, op,
                    ": x must have 2 dimensions (batch, dim) or 3 (batch, dim, seqlen), got ",
                    x.dim(), " with shape ", shape_str(x.sizes()));
  check_x_dtype(op, x);
  const at::Tensor x3 = x.dim() == 2 ? x.unsqueeze(-1) : x;  // (batch, dim, seqlen)
  const int64_t batch = x3.size(0), dim = x3.size(1);
  const int64_t width = check_weight_and_bias(op, x, dim, weight, opt_ptr(bias));

  check_rank(op, "conv_state", conv_state, 3, "(state_batch, dim, state_len)");
  const int64_t state_batch = conv_state.size(0), state_len = conv_state.size(2);
  const at::Tensor* indices = opt_ptr(conv_state_indices);
  if (indices == nullptr) {
    check_shape(op, "conv_state", conv_state, {batch, dim, state_len},
                "(batch, dim, state_len) without conv_state_indices");
  } else {
    check_shape(op, "conv_state", conv_state, {state_batch, dim, state_len},
                "(state_batch, dim, state_len)");
  }
  TORCH_CHECK_VALUE(state_len >= width - 1, op, ": conv_state must have state_len >= width - 1 = ",
                    width - 1, ", got shape ", shape_str(conv_state.sizes()));
  check_dtype(op, "conv_state", conv_state, x.scalar_type(), "like x");
  check_device(op, "conv_state", conv_state, x.device(), "x");
  // The kernel reads both index tensors as contiguous int32 arrays.
  at::Tensor cache_seqlens_c, indices_c;
  if (const at::Tensor* seqlens = opt_ptr(cache_seqlens)) {
    check_shape(op, "cache_seqlens", *seqlens, {batch}, "(batch,)");
    check_dtype(op, "cache_seqlens", *seqlens, at::kInt, "sequence lengths");
    check_device(op, "cache_seqlens", *seqlens, x.device(), "x");
    cache_seqlens_c = seqlens->contiguous();
  }
  if (indices != nullptr) {
    check_shape(op, "conv_state_indices", *indices, {batch}, "(batch,)");
    check_dtype(op, "conv_state_indices", *indices, at::kInt, "row indices");
    check_device(op, "conv_state_indices", *indices, x.device(), "x");
    indices_c = indices->contiguous();
    // A bad index would write outside conv_state: on the CPU, refuse it here, where the data is.
    // On a GPU that would take a device sync: the CUDA kernel skips it instead (causal_conv1d.h).
    if (!x.is_cuda()) {
      const int32_t* rows = indices_c.data_ptr<int32_t>();
      for (int64_t b = 0; b < batch; ++b) {
        TORCH_CHECK_VALUE(rows[b] >= 0 && rows[b] < state_batch, op,
                          ": conv_state_indices must be in [0, state_batch) = [0, ", state_batch,
                          "), got ", rows[b], " at batch entry ", b);
      }
    }
  }

  const at::OptionalDeviceGuard guard(at::device_of(x));
  const AccWeights acc(x, weight, opt_ptr(bias));
  at::Tensor out = at::empty(x.sizes(), x.options());   // x's shape, contiguous
  const at::Tensor out3 = x.dim() == 2 ? out.unsqueeze(-1) : out;  // (batch, dim, seqlen)
  CausalConv1dUpdateParams params{};
  params.batch = batch, params.dim = dim, params.seqlen = x3.size(2), params.width = width;
  params.state_batch = state_batch, params.state_len = state_len;
  strides3(x3, params.x_batch_stride, params.x_dim_stride, params.x_seqlen_stride);
  strides3(conv_state, params.conv_state_batch_stride, params.conv_state_dim_stride,
           params.conv_state_len_stride);
  params.weight_dim_stride = acc.weight.stride(0);
  params.weight_width_stride = acc.weight.stride(1);
  strides3(out3, params.out_batch_stride, params.out_dim_stride, params.out_seqlen_stride);
  params.x = x3.data_ptr();
  params.conv_state = conv_state.data_ptr();
  params.weight = acc.weight.data_ptr();
  if (acc.bias.defined()) {
    params.bias_stride = acc.bias.stride(0);
    params.bias = acc.bias.data_ptr();
  }
  params.cache_seqlens = cache_seqlens_c.defined() ? cache_seqlens_c.data_ptr<int32_t>() : nullptr;
  params.conv_state_indices = indices_c.defined() ? indices_c.data_ptr<int32_t>() : nullptr;
  params.out = out3.data_ptr();
  params.silu = silu;
  MAMBA_DISPATCH_INPUT_TYPES(x.scalar_type(), kUpdateOp, [&] {
#ifdef MAMBA_EXT_WITH_CUDA
    if (x.is_cuda()) {
      return check_launch(kUpdateOp,
                          causal_conv1d_update_cuda<cuda_type<input_t>>(params, current_stream()));
    }
#endif
    causal_conv1d_update_cpu<input_t>(params);
  });
  // Records the in-place update as ATen's in-place ops do, so that autograd refuses a backward
  // that saved the old conv_state. (Inference tensors have no version counter.)
  if (!conv_state.is_inference()) conv_state.unsafeGetTensorImpl()->bump_version();
  return out;
}

// The update is a decode step with no backward (and torch.library.register_autograd refuses ops
// that mutate an input). Under grad mode an input that requires grad is refused, rather than
// PyTorch's default for a custom op without an autograd kernel: a warning and None gradients.
// Otherwise the op runs below autograd.
at::Tensor causal_conv1d_update_autograd_op(const at::Tensor& x, const at::Tensor& conv_state,
                                            const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const c10::optional<at::Tensor>& cache_seqlens,
                                            const c10::optional<at::Tensor>& conv_state_indices,
                                            bool silu) {
  if (at::GradMode::is_enabled()) {
    const std::initializer_list<std::pair<const char*, const at::Tensor*>> named_tensors{
        {"x", &x}, {"conv_state", &conv_state}, {"weight", &weight}, {"bias", opt_ptr(bias)}};
    for (const auto& [name, t] : named_tensors) {
      TORCH_CHECK_VALUE(t == nullptr || !t->requires_grad(), kUpdateOp, ": ", name,
                        " must not require grad (a decode step has no backward: call it under "
                        "torch.no_grad() or torch.inference_mode()), got a tensor that requires "
                        "grad");
    }
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mamba_ext::causal_conv1d_update", "")
                             .typed<decltype(causal_conv1d_update_autograd_op)>();
  return op.call(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, silu);
}

}  // namespace
}  // namespace mamba_ext

TORCH_LIBRARY_IMPL(mamba_ext, CPU, m) {
  m.impl("causal_conv1d_fwd", &mamba_ext::causal_conv1d_fwd_op);
  m.impl("causal_conv1d_bwd", &mamba_ext::causal_conv1d_bwd_op);
  m.impl("causal_conv1d_update", &mamba_ext::causal_conv1d_update_op);
}

#ifdef MAMBA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(mamba_ext, CUDA, m) {
  m.impl("causal_conv1d_fwd", &mamba_ext::causal_conv1d_fwd_op);
  m.impl("causal_conv1d_bwd", &mamba_ext::causal_conv1d_bwd_op);
  m.impl("causal_conv1d_update", &mamba_ext::causal_conv1d_update_op);
}
#endif

TORCH_LIBRARY_IMPL(mamba_ext, Autograd, m) {
  m.impl("causal_conv1d_update", &mamba_ext::causal_conv1d_update_autograd_op);
}
