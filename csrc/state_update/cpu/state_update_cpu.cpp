// CPU kernel of selective_state_update. Rows (batch, head, headdim) are independent, so they are
// split across threads; each row walks its dstate state entries in one loop the compiler
// vectorises.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "common/math.h"
#include "state_update/state_update.h"

namespace mamba_ext {
namespace {

// Updates one state row in place, state = state * dA + B * (dt * x), and returns <state, C>.
// `stride` is std::integral_constant<int64_t, 1> for the usual unit-stride state, so that case
// compiles to contiguous vector loads; any other layout passes its stride at run time.
template <typename state_t, typename acc_t, typename Stride>
acc_t update_state_row(state_t* state, Stride stride, const acc_t* dA, const acc_t* B,
                       const acc_t* C, acc_t dt_x, int64_t dstate) {
  acc_t y = 0;
  // The reduction needs leave to reassociate before it vectorises (the build passes -fopenmp).
#pragma omp simd reduction(+ : y)
  for (int64_t n = 0; n < dstate; ++n) {
    const acc_t s = static_cast<acc_t>(state[n * stride]) * dA[n] + B[n] * dt_x;
    state[n * stride] = static_cast<state_t>(s);
    y += s * C[n];
  }
  return y;
}

template <typename input_t, typename state_t>
void update_rows(const SelectiveStateUpdateParams& p, int64_t begin, int64_t end) {
  using acc_t = acc_type<input_t>;
  const auto* x = static_cast<const input_t*>(p.x);
  const auto* A = static_cast<const acc_t*>(p.A);
  const auto* B = static_cast<const input_t*>(p.B);
  const auto* C = static_cast<const input_t*>(p.C);
  const auto* D = static_cast<const acc_t*>(p.D);
  const auto* z = static_cast<const input_t*>(p.z);
  const auto* dt_bias = static_cast<const acc_t*>(p.dt_bias);
  auto* state = static_cast<state_t*>(p.state);
  auto* out = static_cast<input_t*>(p.out);
  const int64_t heads_per_group = p.nheads / p.ngroups;

  // B and C of one (batch, group) in acc_t, shared by every row of its heads: converted once and
  // reloaded only when a row of another (batch, group) comes.
  acc_t B_row[kSelectiveStateUpdateMaxDstate], C_row[kSelectiveStateUpdateMaxDstate];
  int64_t loaded_batch = -1, loaded_group = -1;
  // The row's step dt and decay dA = exp(A * dt). Mamba-2 broadcasts dt, dt_bias and A over
  // headdim (stride 0), so consecutive rows of a head read the same elements: they are computed
  // once per head then, and their exp and softplus (the costliest part of a short row) skipped.
  acc_t dt = 0, dA[kSelectiveStateUpdateMaxDstate];
  int64_t decay_dt_offset = -1, decay_dt_bias_offset = -1;
  const acc_t* decay_A_row = nullptr;

  // The row's (batch, head, headdim) coordinates, advanced by counting rather than dividing.
  int64_t i = begin % p.headdim;
  int64_t h = begin / p.headdim % p.nheads;
  int64_t b = begin / (p.headdim * p.nheads);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t g = h / heads_per_group;
    if (b != loaded_batch || g != loaded_group) {
      const input_t* B_bg = B + b * p.B_batch_stride + g * p.B_group_stride;  // (dstate,)
      const input_t* C_bg = C + b * p.C_batch_stride + g * p.C_group_stride;  // (dstate,)
      for (int64_t n = 0; n < p.dstate; ++n) {
        B_row[n] = static_cast<acc_t>(B_bg[n * p.B_dstate_stride]);
        C_row[n] = static_cast<acc_t>(C_bg[n * p.C_dstate_stride]);
      }
      loaded_batch = b;
      loaded_group = g;
    }

    const int64_t dt_offset =
        b * p.dt_batch_stride + h * p.dt_head_stride + i * p.dt_headdim_stride;
    const int64_t dt_bias_offset = h * p.dt_bias_head_stride + i * p.dt_bias_headdim_stride;
    const acc_t* A_row = A + h * p.A_head_stride + i * p.A_headdim_stride;  // (dstate,)
    if (dt_offset != decay_dt_offset || dt_bias_offset != decay_dt_bias_offset ||
        A_row != decay_A_row) {
      dt = p.dt_is_float ? static_cast<acc_t>(static_cast<const float*>(p.dt)[dt_offset])
                         : static_cast<acc_t>(static_cast<const input_t*>(p.dt)[dt_offset]);
      if (dt_bias) dt += dt_bias[dt_bias_offset];
      if (p.dt_softplus) dt = softplus(dt);
      if (p.A_dstate_stride == 0) {  // Mamba-2: one exp serves the whole row
        std::fill(dA, dA + p.dstate, std::exp(A_row[0] * dt));
      } else {
        // Vectorised only under -fno-trapping-math: otherwise GCC will not if-convert the float
        // compares of exp_polynomial's clamp, and the loop runs scalar.
#pragma omp simd
        for (int64_t n = 0; n < p.dstate; ++n) {
          dA[n] = exp_polynomial(A_row[n * p.A_dstate_stride] * dt);
        }
      }
      decay_dt_offset = dt_offset;
      decay_dt_bias_offset = dt_bias_offset;
      decay_A_row = A_row;
    }

    const acc_t x_val = static_cast<acc_t>(x[b * p.x_batch_stride + h * p.x_head_stride +
                                            i * p.x_headdim_stride]);
    const int64_t state_b = p.state_batch_indices ? p.state_batch_indices[b] : b;
    state_t* state_row = state + state_b * p.state_batch_stride + h * p.state_head_stride +
                         i * p.state_headdim_stride;  // (dstate,)
    acc_t y = p.state_dstate_stride == 1
                  ? update_state_row(state_row, std::integral_constant<int64_t, 1>{}, dA, B_row,
                                     C_row, dt * x_val, p.dstate)
                  : update_state_row(state_row, p.state_dstate_stride, dA, B_row, C_row,
                                     dt * x_val, p.dstate);
    if (D) y += D[h * p.D_head_stride + i * p.D_headdim_stride] * x_val;
    if (z) {
      y *= silu(static_cast<acc_t>(z[b * p.z_batch_stride + h * p.z_head_stride +
                                     i * p.z_headdim_stride]));
    }
    out[b * p.out_batch_stride + h * p.out_head_stride + i * p.out_headdim_stride] =
        static_cast<input_t>(y);

    if (++i == p.headdim) {
      i = 0;
      if (++h == p.nheads) {
        h = 0;
        ++b;
      }
    }
  }
}

}  // namespace

template <typename input_t, typename state_t>
void selective_state_update_cpu(const SelectiveStateUpdateParams& params) {
  const int64_t rows = params.batch * params.nheads * params.headdim;
  // ATen splits elementwise loops into chunks of at least 32768 elements (at::internal::GRAIN_SIZE,
  // in TensorIterator.h); a row is dstate elements of a few flops each.
  constexpr int64_t kGrainElements = 32768;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / params.dstate);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    update_rows<input_t, state_t>(params, begin, end);
  });
}

// A state in x's dtype (bf16 / fp16) is the only case that adds instantiations: for float and
// double, acc_type<input_t> is input_t itself.
template void selective_state_update_cpu<float, float>(const SelectiveStateUpdateParams&);
template void selective_state_update_cpu<double, double>(const SelectiveStateUpdateParams&);
template void selective_state_update_cpu<c10::Half, float>(const SelectiveStateUpdateParams&);
template void selective_state_update_cpu<c10::Half, c10::Half>(const SelectiveStateUpdateParams&);
template void selective_state_update_cpu<c10::BFloat16, float>(const SelectiveStateUpdateParams&);
template void selective_state_update_cpu<c10::BFloat16, c10::BFloat16>(
    const SelectiveStateUpdateParams&);

}  // namespace mamba_ext
