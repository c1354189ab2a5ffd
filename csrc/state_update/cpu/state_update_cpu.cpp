// CPU kernel of selective_state_update. Rows (batch, head, headdim) are independent, so they are
// split across threads. A thread takes up to kBlockRows rows of one (batch, head) at a time, copies
// their state into acc_t buffers, runs every token over them (B and C of a token are converted
// once for the block, dt and exp(A dt) once per token where Mamba-2 broadcasts them), and stores
// the state back once: between tokens it stays in acc_t, as on CUDA.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "common/math.h"
#include "state_update/state_update.h"

namespace mamba_ext {
namespace {

// Rows of one (batch, head) updated together: their acc_t state buffers stay in L1
// (16 x 256 x 4 bytes for float).
constexpr int64_t kBlockRows = 16;

// One token on one row: state = state * dA + B * dt_x in place, returns <state, C>.
template <typename acc_t>
acc_t update_row(acc_t* state, const acc_t* dA, const acc_t* B, const acc_t* C, acc_t dt_x,
                 int64_t dstate) {
  acc_t y = 0;
  // The reduction needs leave to reassociate before it vectorises (the build passes -fopenmp).
#pragma omp simd reduction(+ : y)
  for (int64_t n = 0; n < dstate; ++n) {
    const acc_t s = state[n] * dA[n] + B[n] * dt_x;
    state[n] = s;
    y += s * C[n];
  }
  return y;
}

// Copies a row between the acc_t buffer and a state_t row of stride `stride`.
template <typename state_t, typename acc_t>
void load_row(acc_t* dst, const state_t* src, int64_t stride, int64_t dstate) {
  if (stride == 1) {
    for (int64_t n = 0; n < dstate; ++n) dst[n] = static_cast<acc_t>(src[n]);
  } else {
    for (int64_t n = 0; n < dstate; ++n) dst[n] = static_cast<acc_t>(src[n * stride]);
  }
}
template <typename state_t, typename acc_t>
void store_row(state_t* dst, int64_t stride, const acc_t* src, int64_t dstate) {
  if (stride == 1) {
    for (int64_t n = 0; n < dstate; ++n) dst[n] = static_cast<state_t>(src[n]);
  } else {
    for (int64_t n = 0; n < dstate; ++n) dst[n * stride] = static_cast<state_t>(src[n]);
  }
}

// Rows [begin, end) (flat over (batch, head, headdim)), in blocks of one (batch, head).
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
  auto* inter = static_cast<state_t*>(p.inter);
  auto* out = static_cast<input_t*>(p.out);
  const int64_t heads_per_group = p.nheads / p.ngroups;
  const int64_t dstate = p.dstate;

  acc_t S[kBlockRows][kSelectiveStateUpdateMaxDstate];  // the block's states, in acc_t
  acc_t B_row[kSelectiveStateUpdateMaxDstate], C_row[kSelectiveStateUpdateMaxDstate];
  // The row's step dt and decay dA = exp(A * dt). Mamba-2 broadcasts dt, dt_bias and A over
  // headdim (stride 0), so consecutive rows of a head read the same elements: they are computed
  // once per head and token then, and their exp and softplus (the costliest part of a short row)
  // skipped.
  acc_t dt = 0, dA[kSelectiveStateUpdateMaxDstate];

  for (int64_t row = begin; row < end;) {
    const int64_t i0 = row % p.headdim;
    const int64_t h = row / p.headdim % p.nheads;
    const int64_t b = row / (p.headdim * p.nheads);
    const int64_t g = h / heads_per_group;
    const int64_t rows = std::min({kBlockRows, p.headdim - i0, end - row});
    const int64_t state_b = p.state_batch_indices ? p.state_batch_indices[b] : b;
    const int64_t inter_b = p.inter_indices ? p.inter_indices[b] : b;
    state_t* state_bh = state + state_b * p.state_batch_stride + h * p.state_head_stride;
    for (int64_t r = 0; r < rows; ++r) {
      load_row(S[r], state_bh + (i0 + r) * p.state_headdim_stride, p.state_dstate_stride, dstate);
    }
    int64_t decay_dt_offset = -1, decay_dt_bias_offset = -1;
    const acc_t* decay_A_row = nullptr;
    for (int64_t t = 0; t < p.seqlen; ++t) {
      const input_t* B_t = B + b * p.B_batch_stride + t * p.B_seq_stride + g * p.B_group_stride;
      const input_t* C_t = C + b * p.C_batch_stride + t * p.C_seq_stride + g * p.C_group_stride;
      for (int64_t n = 0; n < dstate; ++n) {
        B_row[n] = static_cast<acc_t>(B_t[n * p.B_dstate_stride]);
        C_row[n] = static_cast<acc_t>(C_t[n * p.C_dstate_stride]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const int64_t dt_offset = b * p.dt_batch_stride + t * p.dt_seq_stride +
                                  h * p.dt_head_stride + i * p.dt_headdim_stride;
        const int64_t dt_bias_offset = h * p.dt_bias_head_stride + i * p.dt_bias_headdim_stride;
        const acc_t* A_row = A + h * p.A_head_stride + i * p.A_headdim_stride;  // (dstate,)
        if (dt_offset != decay_dt_offset || dt_bias_offset != decay_dt_bias_offset ||
            A_row != decay_A_row) {
          dt = p.dt_is_float ? static_cast<acc_t>(static_cast<const float*>(p.dt)[dt_offset])
                             : static_cast<acc_t>(static_cast<const input_t*>(p.dt)[dt_offset]);
          if (dt_bias) dt += dt_bias[dt_bias_offset];
          if (p.dt_softplus) dt = softplus(dt);
          if (p.A_dstate_stride == 0) {  // Mamba-2: one exp serves the whole row
            std::fill(dA, dA + dstate, std::exp(A_row[0] * dt));
          } else {
            // Vectorised only under -fno-trapping-math: otherwise GCC will not if-convert the
            // float compares of exp_polynomial's clamp, and the loop runs scalar.
#pragma omp simd
            for (int64_t n = 0; n < dstate; ++n) {
              dA[n] = exp_polynomial(A_row[n * p.A_dstate_stride] * dt);
            }
          }
          decay_dt_offset = dt_offset;
          decay_dt_bias_offset = dt_bias_offset;
          decay_A_row = A_row;
        }
        const acc_t x_val = static_cast<acc_t>(x[b * p.x_batch_stride + t * p.x_seq_stride +
                                                h * p.x_head_stride + i * p.x_headdim_stride]);
        acc_t y = update_row(S[r], dA, B_row, C_row, dt * x_val, dstate);
        if (D) y += D[h * p.D_head_stride + i * p.D_headdim_stride] * x_val;
        if (z) {
          y *= silu(static_cast<acc_t>(z[b * p.z_batch_stride + t * p.z_seq_stride +
                                         h * p.z_head_stride + i * p.z_headdim_stride]));
        }
        out[b * p.out_batch_stride + t * p.out_seq_stride + h * p.out_head_stride +
            i * p.out_headdim_stride] = static_cast<input_t>(y);
        if (inter) {
          store_row(inter + inter_b * p.inter_batch_stride + t * p.inter_seq_stride +
                        h * p.inter_head_stride + i * p.inter_headdim_stride,
                    p.inter_dstate_stride, S[r], dstate);
        }
      }
    }
    if (p.update_state) {
      for (int64_t r = 0; r < rows; ++r) {
        store_row(state_bh + (i0 + r) * p.state_headdim_stride, p.state_dstate_stride, S[r],
                  dstate);
      }
    }
    row += rows;
  }
}

}  // namespace

template <typename input_t, typename state_t>
void selective_state_update_cpu(const SelectiveStateUpdateParams& params) {
  const int64_t rows = params.batch * params.nheads * params.headdim;
  // ATen splits elementwise loops into chunks of at least 32768 elements (at::internal::GRAIN_SIZE,
  // in TensorIterator.h); a row is dstate elements of a few flops each, per token.
  constexpr int64_t kGrainElements = 32768;
  const int64_t grain =
      std::max<int64_t>(1, kGrainElements / (params.dstate * std::max<int64_t>(1, params.seqlen)));
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
