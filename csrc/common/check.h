// Argument checks for the host side of every op. Each failure reads
//   "<op>: <argument> must <expectation>, got <actual>"
// so a user sees which argument of which op is wrong, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace mamba_ext {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream ss;
  ss << "(";
  for (size_t i = 0; i < sizes.size(); ++i) ss << (i ? ", " : "") << sizes[i];
  ss << (sizes.size() == 1 ? ",)" : ")");
  return ss.str();
}

// `dims` names the expected dimensions, e.g. "(batch, dim, seqlen)".
inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                       const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", name, " must have ", rank, " dimensions ", dims,
                    ", got ", t.dim(), " with shape ", shape_str(t.sizes()));
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected, const char* dims) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", dims, " = ",
                    shape_str(expected), ", got ", shape_str(t.sizes()));
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        at::ScalarType expected, const char* why) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": ", name, " must have dtype ", expected,
                   " (", why, "), got ", t.scalar_type());
}

inline void check_dtype_in(const char* op, const char* name, const at::Tensor& t,
                           std::initializer_list<at::ScalarType> allowed) {
  for (auto s : allowed)
    if (t.scalar_type() == s) return;
  std::ostringstream ss;
  bool first = true;
  for (auto s : allowed) {
    ss << (first ? "" : ", ") << s;
    first = false;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must have dtype in {", ss.str(), "}, got ",
                   t.scalar_type());
}

inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Device& device, const char* like) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, " (like ", like,
                    "), got ", t.device());
}

// Stride 1 on the innermost dimension, as kernels that load rows with vector loads need.
inline void check_unit_last_stride(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                    " must have stride 1 in its last dimension, got strides ",
                    shape_str(t.strides()));
}

// Dtype of A, D, biases and states: float64 when the activations are float64 (so gradcheck runs
// on the kernels), float32 otherwise.
inline at::ScalarType weight_dtype_for(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The optional arguments of an op: absent, or a tensor.
inline const at::Tensor* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

}  // namespace mamba_ext
