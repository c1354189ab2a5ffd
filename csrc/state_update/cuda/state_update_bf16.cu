// selective_state_update for bfloat16 activations, with a float32 or a bfloat16 state.
#include "state_update/cuda/state_update_kernel.cuh"

namespace mamba_ext {
template cudaError_t selective_state_update_cuda<__nv_bfloat16, float>(
    const SelectiveStateUpdateParams&, cudaStream_t);
template cudaError_t selective_state_update_cuda<__nv_bfloat16, __nv_bfloat16>(
    const SelectiveStateUpdateParams&, cudaStream_t);
}  // namespace mamba_ext
