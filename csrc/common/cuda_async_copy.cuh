// Asynchronous global-to-shared copies (cp.async, sm_80+): the bytes do not pass through
// registers, so a block can have the next tile of a stream in flight while it computes on the
// current one. No torch includes.
#pragma once

#include <cuda_runtime.h>

namespace mamba_ext {

__device__ __forceinline__ unsigned shared_address(const void* smem) {
  return static_cast<unsigned>(__cvta_generic_to_shared(smem));
}

// Copies 16 bytes, of which the first `src_bytes` (0..16) come from gmem and the rest are zero.
// .cg: through L2 only (streamed data is read once). gmem must be 16-byte aligned and valid even
// when src_bytes is 0.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)),
               "l"(gmem), "r"(src_bytes));
}

// Copies 16 bytes (gmem 16-byte aligned): the above without the zero fill's operand.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(smem)),
               "l"(gmem));
}

// Copies 4 bytes, zero when src_bytes is 0 (any 4-byte aligned element).
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(smem)),
               "l"(gmem), "r"(src_bytes));
}

// Copies 8 bytes, zero when src_bytes is 0 (any 8-byte aligned element).
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(shared_address(smem)),
               "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most kPending of this thread's committed groups are still in flight: the
// copies of the others are then visible to this thread.
template <int kPending> __device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Waits for this thread's copies; a __syncthreads() then makes every thread's visible.
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

}  // namespace mamba_ext
