// selective_state_update for float16 activations, with a float32 or a float16 state.
#include "state_update/cuda/state_update_kernel.cuh"

namespace mamba_ext {
template cudaError_t selective_state_update_cuda<__half, float>(const SelectiveStateUpdateParams&,
                                                                cudaStream_t);
template cudaError_t selective_state_update_cuda<__half, __half>(
    const SelectiveStateUpdateParams&, cudaStream_t);
}  // namespace mamba_ext
