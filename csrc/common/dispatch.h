// The one dispatch header: dtype and compile-time switches shared by every op family.
#pragma once

#include <ATen/Dispatch.h>

#ifdef MAMBA_EXT_WITH_CUDA
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// Runs __VA_ARGS__ with `input_t` bound to the C++ type of the activations
// (float, double, c10::Half, c10::BFloat16); `op` names the op in the error for other dtypes.
#define MAMBA_DISPATCH_INPUT_TYPES(dtype, op, ...)                                     \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {           \
    using input_t = scalar_t;                                                          \
    __VA_ARGS__();                                                                     \
  })

#ifdef MAMBA_EXT_WITH_CUDA
namespace mamba_ext {
// The CUDA kernels' type for an activation type of MAMBA_DISPATCH_INPUT_TYPES: the kernels see
// no torch headers, so c10's half types become CUDA's (the same bits).
template <typename T> struct CudaTypeOf { using type = T; };
template <> struct CudaTypeOf<c10::Half> { using type = __half; };
template <> struct CudaTypeOf<c10::BFloat16> { using type = __nv_bfloat16; };
template <typename T> using cuda_type = typename CudaTypeOf<T>::type;
}  // namespace mamba_ext
#endif

// Runs __VA_ARGS__ with the constexpr bool `NAME` equal to `cond` (flash-attention's pattern).
#define MAMBA_BOOL_SWITCH(cond, NAME, ...)  \
  [&] {                                     \
    if (cond) {                             \
      constexpr static bool NAME = true;    \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr static bool NAME = false;   \
      return __VA_ARGS__();                 \
    }                                       \
  }()

