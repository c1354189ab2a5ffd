// Scalar math shared by the CPU and CUDA kernels. No torch includes: kernels see plain C++.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MAMBA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MAMBA_HOST_DEVICE inline
#endif

namespace mamba_ext {

// The type of states, weights and accumulation for activations of type T: double for double
// (so gradcheck runs on the kernels themselves), float for float, half and bfloat16.
template <typename T> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename T> using acc_type = typename AccumulateType<T>::type;

// softplus(x) = log(1 + exp(x)), returning x above 20 as torch.nn.functional.softplus does.
template <typename T> MAMBA_HOST_DEVICE T softplus(T x) {
  return x <= T(20) ? std::log1p(std::exp(x)) : x;
}

template <typename T> MAMBA_HOST_DEVICE T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T> MAMBA_HOST_DEVICE T silu(T x) { return x * sigmoid(x); }

// d/dx silu(x) = s (1 + x (1 - s)) with s = sigmoid(x).
template <typename T> MAMBA_HOST_DEVICE T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

// exp(x) for float in plain arithmetic, so that a loop calling it vectorises on the CPU (a libm
// call stops the vectoriser). Cephes' method: exp(x) = 2^k exp(r), k = round(x / ln 2), r reduced
// with a two-part ln 2 so it is exact, exp(r) by its Taylor series to degree 7 on |r| <= ln2 / 2
// (truncation < 1e-8, below float rounding). Inputs are clamped to [-87, 88]: exp(-87) is 1.6e-38,
// far below anything a sum over the state can resolve, and beyond 88 float overflows anyway.
// The clamp vectorises only without trapping math: the build passes -fno-trapping-math.
inline float exp_polynomial(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to integer
  const float k = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.98412698e-4f;  // 1/7!
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_polynomial(double x) { return std::exp(x); }

}  // namespace mamba_ext
