// CUDA kernels of selective_state_update: seqlen decode steps in one launch, in place on the state.
// Two kernels: the general one below (any seqlen, intermediate states, any strides), and a
// single-token one (further down) that the launcher picks for the plain decode step with a
// float32 state.
//
// General kernel: a block owns a tile of rows of one (batch, head): its threads split each row of dstate entries
// over `lanes` consecutive lanes (a power of two, up to a warp), each lane owning kChunks chunks
// of kElts consecutive entries, interleaved so that a warp's loads of one chunk are contiguous;
// and each thread takes up to kMaxRows rows of the tile (`rows_per_thread`, chosen on the host
// so that the grid still fills the GPU). The row's <state, C> is reduced over its lanes by
// shuffles.
//
// The state is the traffic (read and written once per call, whatever seqlen): every row of a
// thread is loaded before any is used, so that up to kMaxRows * kChunks 16-byte loads are in
// flight per thread, with the streaming (evict-first) hint since each line is touched once. The
// lane's columns are the same for all its rows, so B and C (and A where Mamba-2 broadcasts it)
// are loaded once per token for all of them, and the per-row scalars (dt, x, z, D) of a token are
// loaded together before any store, so that a single-token call waits for memory once. Between
// tokens the state stays in registers, in acc_t.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "common/cuda_math.cuh"
#include "common/math.h"
#include "state_update/state_update.h"

namespace mamba_ext {
namespace state_update_cuda {

constexpr int kMaxThreads = 128;
constexpr int kElts = 4;       // state entries per lane and chunk: 16 bytes of a float32 state
constexpr int kMaxLanes = 32;  // a row never spans more than a warp
constexpr int kChunks = 2;     // chunks per lane: 32 bytes of float32 state per row and thread
constexpr int kMaxRows = 4;    // rows per thread: up to 128 bytes of float32 state in flight
// Resident blocks per SM the register budget is cut for: 96 registers a thread, 640 threads and
// 80 KB of state loads in flight per SM (ptxas spills about 10 values, to L1, at this bound; left
// free it takes 168 registers, 384 threads and 48 KB).
constexpr int kMinBlocks = 5;
static_assert(kMaxThreads % kMaxLanes == 0, "a block holds whole warps");
static_assert(kMaxLanes * kChunks * kElts >= kSelectiveStateUpdateMaxDstate,
              "a warp must cover the largest dstate");

template <typename T> struct alignas(sizeof(T) * kElts) Vec {
  T v[kElts];
};

// Vector loads by the Vec's size in bytes: streaming (cache-as-evict-first) for the state, each
// line of which is touched once, and read-only (ld.global.nc) for B and C.
template <typename T, bool kStream> __device__ __forceinline__ Vec<T> load_vec(const Vec<T>* p) {
  const auto load = [](const auto* q) { return kStream ? __ldcs(q) : __ldg(q); };
  Vec<T> r;
  if constexpr (sizeof(Vec<T>) == 8) {
    *reinterpret_cast<uint2*>(&r) = load(reinterpret_cast<const uint2*>(p));
  } else if constexpr (sizeof(Vec<T>) == 16) {
    *reinterpret_cast<uint4*>(&r) = load(reinterpret_cast<const uint4*>(p));
  } else {
    static_assert(sizeof(Vec<T>) == 32, "a Vec is 8, 16 or 32 bytes");
    reinterpret_cast<uint4*>(&r)[0] = load(reinterpret_cast<const uint4*>(p));
    reinterpret_cast<uint4*>(&r)[1] = load(reinterpret_cast<const uint4*>(p) + 1);
  }
  return r;
}
template <typename T> __device__ __forceinline__ void store_stream(Vec<T>* p, const Vec<T>& v) {
  if constexpr (sizeof(Vec<T>) == 8) {
    __stcs(reinterpret_cast<uint2*>(p), *reinterpret_cast<const uint2*>(&v));
  } else if constexpr (sizeof(Vec<T>) == 16) {
    __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&v));
  } else {
    static_assert(sizeof(Vec<T>) == 32, "a Vec is 8, 16 or 32 bytes");
    __stcs(reinterpret_cast<uint4*>(p), reinterpret_cast<const uint4*>(&v)[0]);
    __stcs(reinterpret_cast<uint4*>(p) + 1, reinterpret_cast<const uint4*>(&v)[1]);
  }
}

// Read-only loads of the inputs (never written during the launch), so the compiler may hoist
// them above the stores of an earlier token.
template <typename T> __device__ __forceinline__ T load_input(const T* p) { return __ldg(p); }
template <> __device__ __forceinline__ __nv_bfloat16 load_input(const __nv_bfloat16* p) {
  const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
  return *reinterpret_cast<const __nv_bfloat16*>(&bits);
}
template <> __device__ __forceinline__ __half load_input(const __half* p) {
  const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
  return *reinterpret_cast<const __half*>(&bits);
}

// B and C rows (dstate,) at a lane's columns (kChunks chunks of kElts entries from
// chunk_start(chunk)), in acc_t; entries past dstate are left unset. kVec: contiguous, aligned
// rows, one vector load per chunk.
template <bool kVec, typename input_t, typename acc_t, typename ChunkStart>
__device__ __forceinline__ void load_columns(const input_t* B, int64_t B_stride, const input_t* C,
                                             int64_t C_stride, int64_t dstate,
                                             const ChunkStart& chunk_start,
                                             acc_t (&B_val)[kChunks * kElts],
                                             acc_t (&C_val)[kChunks * kElts]) {
#pragma unroll
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    const int64_t n0 = chunk_start(chunk);
    if (n0 >= dstate) continue;
    if constexpr (kVec) {
      const Vec<input_t> vb = load_vec<input_t, false>(reinterpret_cast<const Vec<input_t>*>(B + n0));
      const Vec<input_t> vc = load_vec<input_t, false>(reinterpret_cast<const Vec<input_t>*>(C + n0));
#pragma unroll
      for (int e = 0; e < kElts; ++e) {
        B_val[chunk * kElts + e] = to_acc(vb.v[e]);
        C_val[chunk * kElts + e] = to_acc(vc.v[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kElts; ++e) {
        if (n0 + e >= dstate) continue;
        B_val[chunk * kElts + e] = to_acc(load_input(B + (n0 + e) * B_stride));
        C_val[chunk * kElts + e] = to_acc(load_input(C + (n0 + e) * C_stride));
      }
    }
  }
}

// Lanes per row: the fewest that cover dstate with kChunks chunks each.
inline int lanes_for(int64_t dstate) {
  int lanes = 1;
  while (lanes < kMaxLanes && lanes * kChunks * kElts < dstate) lanes *= 2;
  return lanes;
}

// kVec: the state (and the intermediate states) have contiguous, 16-byte aligned rows, B and C
// contiguous, aligned rows, and dstate % kElts == 0, so each chunk is one vector load or store.
template <typename input_t, typename state_t, bool kVec>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    selective_state_update_kernel(const SelectiveStateUpdateParams p, const int lanes,
                                  const int rows_per_thread, const unsigned tiles) {
  using acc_t = decltype(to_acc(input_t{}));
  constexpr int kRowElts = kChunks * kElts;
  const unsigned tile = blockIdx.x % tiles;
  const unsigned bh = blockIdx.x / tiles;
  const int64_t h = bh % static_cast<unsigned>(p.nheads);
  const int64_t b = bh / static_cast<unsigned>(p.nheads);
  const int64_t g = h / (p.nheads / p.ngroups);
  const int lane = threadIdx.x & (lanes - 1);
  const int slots = blockDim.x / lanes;  // rows a block updates at once
  const int64_t i0 = static_cast<int64_t>(tile) * slots * rows_per_thread + threadIdx.x / lanes;
  // The shuffles of a row stay among its own lanes.
  const int warp_lane = threadIdx.x % 32;
  const unsigned row_mask =
      lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u) << (warp_lane / lanes * lanes);
  const auto row_of = [&](int k) { return i0 + static_cast<int64_t>(k) * slots; };
  const auto active = [&](int k) { return k < rows_per_thread && row_of(k) < p.headdim; };
  // Entry chunk_start(chunk) + e of the row, for the lane's chunks; chunks past dstate are off.
  const auto chunk_start = [&](int chunk) {
    return (static_cast<int64_t>(chunk) * lanes + lane) * kElts;
  };

  // Stores the lane's entries of one row (dstate,) of stride `stride` (1 when kVec).
  const auto store_row = [&](state_t* row, int64_t stride, const acc_t(&values)[kChunks * kElts]) {
#pragma unroll
    for (int chunk = 0; chunk < kChunks; ++chunk) {
      const int64_t n0 = chunk_start(chunk);
      if (n0 >= p.dstate) continue;
      if constexpr (kVec) {
        Vec<state_t> v;
#pragma unroll
        for (int e = 0; e < kElts; ++e) v.v[e] = from_acc<state_t>(values[chunk * kElts + e]);
        store_stream(reinterpret_cast<Vec<state_t>*>(row + n0), v);
      } else {
#pragma unroll
        for (int e = 0; e < kElts; ++e) {
          if (n0 + e < p.dstate) row[(n0 + e) * stride] = from_acc<state_t>(values[chunk * kElts + e]);
        }
      }
    }
  };

  auto* out = static_cast<input_t*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  const int64_t state_b = p.state_batch_indices ? p.state_batch_indices[b] : b;
  if (state_b < 0 || state_b >= p.state_batch) {  // a padding slot: no state to update
    if (lane == 0) {
      for (int k = 0; k < kMaxRows; ++k) {
        if (!active(k)) continue;
        for (int64_t t = 0; t < p.seqlen; ++t) {
          out[t * p.out_seq_stride + row_of(k) * p.out_headdim_stride] = from_acc<input_t>(acc_t(0));
        }
      }
    }
    return;
  }
  const int64_t inter_b = p.inter_indices ? p.inter_indices[b] : b;
  state_t* inter = p.inter != nullptr && inter_b >= 0 && inter_b < p.inter_batch
                       ? static_cast<state_t*>(p.inter) + inter_b * p.inter_batch_stride +
                             h * p.inter_head_stride
                       : nullptr;  // (seqlen, headdim, dstate)
  state_t* state = static_cast<state_t*>(p.state) + state_b * p.state_batch_stride +
                   h * p.state_head_stride;  // (headdim, dstate)

  // The state of the thread's rows, all loads issued before any is used.
  acc_t s[kMaxRows][kRowElts];
#pragma unroll
  for (int k = 0; k < kMaxRows; ++k) {
    if (!active(k)) continue;
    const state_t* row = state + row_of(k) * p.state_headdim_stride;  // (dstate,)
#pragma unroll
    for (int chunk = 0; chunk < kChunks; ++chunk) {
      const int64_t n0 = chunk_start(chunk);
      if (n0 >= p.dstate) continue;
      if constexpr (kVec) {
        const Vec<state_t> v =
            load_vec<state_t, true>(reinterpret_cast<const Vec<state_t>*>(row + n0));
#pragma unroll
        for (int e = 0; e < kElts; ++e) s[k][chunk * kElts + e] = to_acc(v.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < kElts; ++e) {
          if (n0 + e < p.dstate) s[k][chunk * kElts + e] = to_acc(row[(n0 + e) * p.state_dstate_stride]);
        }
      }
    }
  }

  const auto* A = static_cast<const acc_t*>(p.A) + h * p.A_head_stride;  // (headdim, dstate)
  const bool scalar_A = p.A_dstate_stride == 0;  // Mamba-2: one decay per row and token
  for (int64_t t = 0; t < p.seqlen; ++t) {
    // B and C of the token at the lane's columns, shared by all its rows.
    const input_t* B = static_cast<const input_t*>(p.B) + b * p.B_batch_stride +
                       t * p.B_seq_stride + g * p.B_group_stride;  // (dstate,)
    const input_t* C = static_cast<const input_t*>(p.C) + b * p.C_batch_stride +
                       t * p.C_seq_stride + g * p.C_group_stride;  // (dstate,)
    acc_t B_val[kRowElts], C_val[kRowElts];
    load_columns<kVec>(B, p.B_dstate_stride, C, p.C_dstate_stride, p.dstate, chunk_start, B_val,
                       C_val);
    // The per-row scalars of the token, loaded together before any store.
    acc_t dt[kMaxRows], x[kMaxRows], z[kMaxRows], D[kMaxRows], A0[kMaxRows];
#pragma unroll
    for (int k = 0; k < kMaxRows; ++k) {
      if (!active(k)) continue;
      const int64_t i = row_of(k);
      const int64_t dt_offset = b * p.dt_batch_stride + t * p.dt_seq_stride +
                                h * p.dt_head_stride + i * p.dt_headdim_stride;
      dt[k] = p.dt_is_float ? load_input(static_cast<const float*>(p.dt) + dt_offset)
                            : to_acc(load_input(static_cast<const input_t*>(p.dt) + dt_offset));
      if (p.dt_bias) {
        dt[k] += load_input(static_cast<const acc_t*>(p.dt_bias) + h * p.dt_bias_head_stride +
                            i * p.dt_bias_headdim_stride);
      }
      x[k] = to_acc(load_input(static_cast<const input_t*>(p.x) + b * p.x_batch_stride +
                               t * p.x_seq_stride + h * p.x_head_stride +
                               i * p.x_headdim_stride));
      z[k] = p.z ? to_acc(load_input(static_cast<const input_t*>(p.z) + b * p.z_batch_stride +
                                     t * p.z_seq_stride + h * p.z_head_stride +
                                     i * p.z_headdim_stride))
                 : acc_t(0);
      D[k] = p.D ? load_input(static_cast<const acc_t*>(p.D) + h * p.D_head_stride +
                              i * p.D_headdim_stride)
                 : acc_t(0);
      A0[k] = scalar_A ? load_input(A + i * p.A_headdim_stride) : acc_t(0);
    }
#pragma unroll
    for (int k = 0; k < kMaxRows; ++k) {
      if (!active(k)) continue;  // the same for all lanes of a row: its shuffles stay whole
      const int64_t i = row_of(k);
      const acc_t dt_k = p.dt_softplus ? softplus(dt[k]) : dt[k];
      const acc_t dt_x = dt_k * x[k];
      const acc_t decay_row = exp_fast(A0[k] * dt_k);  // used when scalar_A
      const acc_t* A_row = A + i * p.A_headdim_stride;  // (dstate,)
      acc_t y = 0;
#pragma unroll
      for (int chunk = 0; chunk < kChunks; ++chunk) {
#pragma unroll
        for (int e = 0; e < kElts; ++e) {
          const int64_t n = chunk_start(chunk) + e;
          if (n >= p.dstate) continue;
          const acc_t decay =
              scalar_A ? decay_row : exp_fast(load_input(A_row + n * p.A_dstate_stride) * dt_k);
          acc_t& state_n = s[k][chunk * kElts + e];
          state_n = state_n * decay + B_val[chunk * kElts + e] * dt_x;
          y += state_n * C_val[chunk * kElts + e];
        }
      }
      if (inter != nullptr) {  // the state after this token, for a rollback
        store_row(inter + t * p.inter_seq_stride + i * p.inter_headdim_stride,
                  p.inter_dstate_stride, s[k]);
      }
      for (int offset = lanes / 2; offset > 0; offset /= 2) {
        y += __shfl_xor_sync(row_mask, y, offset, lanes);
      }
      if (lane == 0) {
        y += D[k] * x[k];
        if (p.z) y *= silu(z[k]);
        out[t * p.out_seq_stride + i * p.out_headdim_stride] = from_acc<input_t>(y);
      }
    }
  }

  if (!p.update_state) return;
#pragma unroll
  for (int k = 0; k < kMaxRows; ++k) {
    if (active(k)) store_row(state + row_of(k) * p.state_headdim_stride, p.state_dstate_stride, s[k]);
  }
}

// The single-token kernel (seqlen = 1, no intermediate states, a float32 state whose rows are
// contiguous and 16-byte aligned): the plain decode step, which is a streaming read and write of
// the state, so it is built to keep the memory system busy rather than to share work.
//
// Work is cut into units: (32 / lanes) * kFastRows rows of one (batch, head), one unit per warp
// at a time (2 KB of state at dstate 128). Each lane owns the same columns as in the kernel
// above (kChunks chunks of kElts entries). The grid is persistent (at most what is resident);
// warp w of block k takes units k + w * gridDim.x, then every gridDim.x * kFastWarps-th one, so
// that a small batch spreads over all SMs. A warp copies the state of its next kStages - 1
// units into a ring in shared memory with cp.async (16 bytes a lane, each lane copying exactly
// the pieces it later reads, so no barrier is needed: cp.async.wait_group orders its own copies)
// while it computes the current unit from the ring; the new state is stored from registers with
// the streaming hint. So up to kStages - 1 units of state loads are in flight per warp, and no
// block's start or end leaves a gap in the traffic. Measured on an H100 (d76566c), the warps'
// pace is what limits it: each unit's other inputs (x, dt, then z after the reduction) are
// loaded after the wait, a chain of round trips per 2 KB unit, and throughput grows with the
// resident warps (b256: 611 / 1080 / 1469 / 1733 / 2027 GB/s at 1 / 2 / 3 / 4 / 6 blocks per
// SM). Loading them before the wait took 95 registers and lost a block per SM: slower
// (benchmarks/results/h100/state_update_notes.md).
constexpr int kFastWarps = 4;
constexpr int kFastThreads = kFastWarps * 32;
constexpr int kFastRows = 2;  // rows per thread and unit
constexpr int kStages = 4;    // units in the ring per warp: kStages - 1 in flight

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(gmem)
               : "memory");
#else
  *static_cast<uint4*>(smem) = __ldcs(static_cast<const uint4*>(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most kStages - 1 of the thread's committed groups are pending.
__device__ __forceinline__ void cp_async_wait_ring() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kStages - 1) : "memory");
#endif
}

// input_t is float, __half or __nv_bfloat16 (acc_t float); requires the vector conditions of the
// kernel above (`vec` in the launcher).
template <typename input_t>
__global__ void __launch_bounds__(kFastThreads)
    selective_state_update_single_token_kernel(const SelectiveStateUpdateParams p,
                                               const int lanes, const unsigned tiles,
                                               const unsigned units) {
  using acc_t = float;
  // ring[stage][warp][piece][lane]: a warp's 16-byte pieces of one (row, chunk) are contiguous.
  __shared__ uint4 ring[kStages][kFastWarps][kFastRows * kChunks][32];
  const int warp = threadIdx.x / 32;
  const int warp_lane = threadIdx.x % 32;
  const int lane = warp_lane & (lanes - 1);
  const int rows_per_step = 32 / lanes;  // rows a warp covers with one piece a lane
  const int unit_rows = rows_per_step * kFastRows;
  const int row_in_step = warp_lane / lanes;
  const unsigned row_mask =
      lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u) << (row_in_step * lanes);
  const auto chunk_start = [&](int chunk) { return (chunk * lanes + lane) * kElts; };
  const unsigned stride = gridDim.x * kFastWarps;

  // The (batch, head, first row) of a unit, and the state row of its batch entry.
  struct Unit {
    int64_t b, h, i0, state_b;
    bool padding;  // state_batch_indices points outside the pool: skip the state, out = 0
  };
  const auto unit_of = [&](unsigned u) {
    Unit unit;
    const unsigned bh = u / tiles;
    unit.i0 = static_cast<int64_t>(u % tiles) * unit_rows;
    unit.h = bh % static_cast<unsigned>(p.nheads);
    unit.b = bh / static_cast<unsigned>(p.nheads);
    unit.state_b = p.state_batch_indices ? p.state_batch_indices[unit.b] : unit.b;
    unit.padding = unit.state_b < 0 || unit.state_b >= p.state_batch;
    return unit;
  };
  const auto state_row = [&](const Unit& unit, int64_t i) {  // (dstate,)
    return static_cast<float*>(p.state) + unit.state_b * p.state_batch_stride +
           unit.h * p.state_head_stride + i * p.state_headdim_stride;
  };
  // Copies the lane's pieces of unit u into the ring's `stage`; commits a group either way, so
  // that the group count per stage stays fixed.
  const auto issue = [&](unsigned u, int stage) {
    if (u < units) {
      const Unit unit = unit_of(u);
      if (!unit.padding) {
#pragma unroll
        for (int r = 0; r < kFastRows; ++r) {
          const int64_t i = unit.i0 + r * rows_per_step + row_in_step;
          if (i >= p.headdim) continue;
          const float* row = state_row(unit, i);
#pragma unroll
          for (int chunk = 0; chunk < kChunks; ++chunk) {
            const int n0 = chunk_start(chunk);
            if (n0 < p.dstate) cp_async_16(&ring[stage][warp][r * kChunks + chunk][warp_lane], row + n0);
          }
        }
      }
    }
    cp_async_commit();
  };

  unsigned next = blockIdx.x + warp * gridDim.x;
  const unsigned first = next;
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage, next += stride) issue(next, stage);
  int stage = 0;
  for (unsigned u = first; u < units; u += stride, next += stride) {
    // The stage refilled now was read in the previous iteration: the warp-wide barrier (every
    // lane gets here together) orders those reads before the copies that overwrite it.
    __syncwarp();
    issue(next, (stage + kStages - 1) % kStages);
    cp_async_wait_ring();  // the group of unit u is complete
    const Unit unit = unit_of(u);
    auto* out = static_cast<input_t*>(p.out) + unit.b * p.out_batch_stride +
                unit.h * p.out_head_stride;
    if (unit.padding) {
      if (lane == 0) {
        for (int r = 0; r < kFastRows; ++r) {
          const int64_t i = unit.i0 + r * rows_per_step + row_in_step;
          if (i < p.headdim) out[i * p.out_headdim_stride] = from_acc<input_t>(acc_t(0));
        }
      }
      stage = (stage + 1) % kStages;
      continue;
    }
    const int64_t g = unit.h / (p.nheads / p.ngroups);
    // B and C at the lane's columns, shared by its rows.
    const input_t* B = static_cast<const input_t*>(p.B) + unit.b * p.B_batch_stride +
                       g * p.B_group_stride;  // (dstate,)
    const input_t* C = static_cast<const input_t*>(p.C) + unit.b * p.C_batch_stride +
                       g * p.C_group_stride;  // (dstate,)
    acc_t B_val[kChunks * kElts], C_val[kChunks * kElts];
    load_columns<true>(B, 1, C, 1, p.dstate, chunk_start, B_val, C_val);
    const auto* A = static_cast<const acc_t*>(p.A) + unit.h * p.A_head_stride;  // (headdim, dstate)
    const bool scalar_A = p.A_dstate_stride == 0;  // Mamba-2: one decay per row
#pragma unroll
    for (int r = 0; r < kFastRows; ++r) {
      const int64_t i = unit.i0 + r * rows_per_step + row_in_step;
      if (i >= p.headdim) continue;  // the same for all lanes of a row: its shuffles stay whole
      const int64_t dt_offset =
          unit.b * p.dt_batch_stride + unit.h * p.dt_head_stride + i * p.dt_headdim_stride;
      acc_t dt = p.dt_is_float ? load_input(static_cast<const float*>(p.dt) + dt_offset)
                               : to_acc(load_input(static_cast<const input_t*>(p.dt) + dt_offset));
      if (p.dt_bias) {
        dt += load_input(static_cast<const acc_t*>(p.dt_bias) + unit.h * p.dt_bias_head_stride +
                         i * p.dt_bias_headdim_stride);
      }
      const acc_t x = to_acc(load_input(static_cast<const input_t*>(p.x) +
                                        unit.b * p.x_batch_stride + unit.h * p.x_head_stride +
                                        i * p.x_headdim_stride));
      if (p.dt_softplus) dt = softplus(dt);
      const acc_t dt_x = dt * x;
      const acc_t* A_row = A + i * p.A_headdim_stride;  // (dstate,)
      const acc_t decay_row = scalar_A ? exp_fast(load_input(A_row) * dt) : acc_t(0);
      float* row = state_row(unit, i);
      acc_t y = 0;
#pragma unroll
      for (int chunk = 0; chunk < kChunks; ++chunk) {
        const int n0 = chunk_start(chunk);
        if (n0 >= p.dstate) continue;
        Vec<float> s = *reinterpret_cast<const Vec<float>*>(&ring[stage][warp][r * kChunks + chunk][warp_lane]);
#pragma unroll
        for (int e = 0; e < kElts; ++e) {
          const acc_t decay =
              scalar_A ? decay_row : exp_fast(load_input(A_row + (n0 + e) * p.A_dstate_stride) * dt);
          s.v[e] = s.v[e] * decay + B_val[chunk * kElts + e] * dt_x;
          y += s.v[e] * C_val[chunk * kElts + e];
        }
        if (p.update_state) store_stream(reinterpret_cast<Vec<float>*>(row + n0), s);
      }
      for (int offset = lanes / 2; offset > 0; offset /= 2) {
        y += __shfl_xor_sync(row_mask, y, offset, lanes);
      }
      if (lane == 0) {
        if (p.D) {
          y += load_input(static_cast<const acc_t*>(p.D) + unit.h * p.D_head_stride +
                          i * p.D_headdim_stride) * x;
        }
        if (p.z) {
          y *= silu(to_acc(load_input(static_cast<const input_t*>(p.z) +
                                      unit.b * p.z_batch_stride + unit.h * p.z_head_stride +
                                      i * p.z_headdim_stride)));
        }
        out[i * p.out_headdim_stride] = from_acc<input_t>(y);
      }
    }
    stage = (stage + 1) % kStages;
  }
}

inline bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Streaming multiprocessors of the current device, read once per device.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 132;
  if (counts[device] == 0) {
    int count = 0;
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    counts[device] = count > 0 ? count : 132;
  }
  return counts[device];
}

}  // namespace state_update_cuda

template <typename input_t, typename state_t>
cudaError_t selective_state_update_cuda(const SelectiveStateUpdateParams& p,
                                        cudaStream_t stream) {
  using namespace state_update_cuda;
  if (p.batch * p.nheads * p.headdim == 0 || p.seqlen == 0) return cudaSuccess;
  int lanes = lanes_for(p.dstate);
  int rows_per_thread = kMaxRows;
  // A tuning knob for benchmarks and tests, MAMBA_EXT_STATE_UPDATE_TUNE:
  //   "lanes,rows"  the general kernel with that launch shape (lanes a power of two from
  //                 lanes_for(dstate) to 32, rows in 1..kMaxRows) instead of the heuristic below;
  //   "general"     the general kernel with the heuristic shape, even where the single-token
  //                 kernel applies;
  //   "blocks=K"    the single-token kernel (where it applies) with K blocks per SM (K >= 1)
  //                 instead of as many as are resident.
  int tuned_lanes = 0, tuned_rows = 0, tuned_blocks = 0;
  bool force_general = false;
  if (const char* tune = std::getenv("MAMBA_EXT_STATE_UPDATE_TUNE")) {
    if (std::sscanf(tune, "blocks=%d", &tuned_blocks) == 1) {
      if (tuned_blocks < 1) tuned_blocks = 0;
    } else if (std::sscanf(tune, "%d,%d", &tuned_lanes, &tuned_rows) == 2) {
      force_general = true;
      if (tuned_lanes < lanes || tuned_lanes > kMaxLanes ||
          (tuned_lanes & (tuned_lanes - 1)) != 0 || tuned_rows < 1 || tuned_rows > kMaxRows) {
        tuned_lanes = tuned_rows = 0;
      }
    } else {
      force_general = std::string(tune) == "general";
    }
  }
  const bool vec = p.state_dstate_stride == 1 && p.dstate % kElts == 0 &&
                   aligned(p.state, sizeof(Vec<state_t>)) && p.state_batch_stride % kElts == 0 &&
                   p.state_head_stride % kElts == 0 && p.state_headdim_stride % kElts == 0 &&
                   p.B_dstate_stride == 1 && p.C_dstate_stride == 1 &&
                   aligned(p.B, sizeof(Vec<input_t>)) && aligned(p.C, sizeof(Vec<input_t>)) &&
                   p.B_batch_stride % kElts == 0 && p.B_seq_stride % kElts == 0 &&
                   p.B_group_stride % kElts == 0 && p.C_batch_stride % kElts == 0 &&
                   p.C_seq_stride % kElts == 0 && p.C_group_stride % kElts == 0 &&
                   (p.inter == nullptr ||
                    (p.inter_dstate_stride == 1 && aligned(p.inter, sizeof(Vec<state_t>)) &&
                     p.inter_batch_stride % kElts == 0 && p.inter_seq_stride % kElts == 0 &&
                     p.inter_head_stride % kElts == 0 && p.inter_headdim_stride % kElts == 0));

  // The plain decode step with a float32 state: the single-token kernel.
  if constexpr (std::is_same_v<state_t, float> && !std::is_same_v<input_t, double>) {
    if (vec && p.seqlen == 1 && p.inter == nullptr && !force_general) {
      const int64_t unit_rows = static_cast<int64_t>(kMaxLanes / lanes) * kFastRows;
      const int64_t tiles = (p.headdim + unit_rows - 1) / unit_rows;
      const int64_t units = p.batch * p.nheads * tiles;
      // unsigned unit indices, with room for the ring's look-ahead past the last one.
      if (units > INT32_MAX) return cudaErrorInvalidConfiguration;
      const auto kernel = selective_state_update_single_token_kernel<input_t>;
      // Blocks resident per SM, read once per device (with the shared memory carve-out at its
      // largest: the ring is 32 KB a block).
      static int resident[64] = {};
      int device = 0;
      if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) device = 0;
      if (resident[device] == 0) {
        cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
        int count = 0;
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, kernel, kFastThreads, 0);
        resident[device] = count > 0 ? count : 1;
        (void)cudaGetLastError();  // neither query leaves an error for the launch to report
      }
      const int blocks_per_sm = tuned_blocks > 0 ? tuned_blocks : resident[device];
      const int64_t blocks = std::min<int64_t>((units + kFastWarps - 1) / kFastWarps,
                                               static_cast<int64_t>(sm_count()) * blocks_per_sm);
      kernel<<<static_cast<unsigned>(blocks), kFastThreads, 0, stream>>>(
          p, lanes, static_cast<unsigned>(tiles), static_cast<unsigned>(units));
      return cudaGetLastError();
    }
  }

  if (tuned_lanes > 0) lanes = tuned_lanes;
  // Row slots of a block: at most kMaxThreads / lanes, fewer for a short head.
  int slots = 1;
  while (slots * lanes < kMaxThreads && slots < p.headdim) slots *= 2;
  const auto blocks_for = [&](int rows) {
    const int64_t tile_rows = static_cast<int64_t>(slots) * rows;
    return p.batch * p.nheads * ((p.headdim + tile_rows - 1) / tile_rows);
  };
  // Rows per thread: as many as keep two blocks per SM (more rows per thread put more loads in
  // flight and share B and C wider, but a small batch then leaves SMs idle).
  while (rows_per_thread > 1 && (static_cast<int64_t>(slots) * (rows_per_thread / 2) >= p.headdim ||
                                 blocks_for(rows_per_thread) < 2 * sm_count())) {
    rows_per_thread /= 2;
  }
  if (tuned_rows > 0) rows_per_thread = tuned_rows;
  const int64_t tile_rows = static_cast<int64_t>(slots) * rows_per_thread;
  const int64_t tiles = (p.headdim + tile_rows - 1) / tile_rows;
  const int64_t blocks = blocks_for(rows_per_thread);
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;  // the block index is 32-bit
  const int threads = slots * lanes;
  const auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        p, lanes, rows_per_thread, static_cast<unsigned>(tiles));
  };
  if (vec) {
    launch(selective_state_update_kernel<input_t, state_t, true>);
  } else {
    launch(selective_state_update_kernel<input_t, state_t, false>);
  }
  return cudaGetLastError();
}

}  // namespace mamba_ext
