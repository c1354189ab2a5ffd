// selective_state_update for float32 and float64 activations (one file per input type, so that
// they compile in parallel).
#include "state_update/cuda/state_update_kernel.cuh"

namespace mamba_ext {
template cudaError_t selective_state_update_cuda<float, float>(const SelectiveStateUpdateParams&,
                                                               cudaStream_t);
template cudaError_t selective_state_update_cuda<double, double>(
    const SelectiveStateUpdateParams&, cudaStream_t);
}  // namespace mamba_ext
