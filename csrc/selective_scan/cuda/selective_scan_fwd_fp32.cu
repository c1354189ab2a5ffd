// selective_scan_fwd_cuda for float activations.
#include "selective_scan/cuda/selective_scan_fwd_kernel.cuh"

namespace mamba_ext {
template cudaError_t selective_scan_fwd_cuda<float>(const SelectiveScanFwdParams&, cudaStream_t);
}  // namespace mamba_ext
