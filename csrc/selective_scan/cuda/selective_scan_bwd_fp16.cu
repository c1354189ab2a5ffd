// selective_scan_bwd_cuda for __half activations.
#include "selective_scan/cuda/selective_scan_bwd_kernel.cuh"

namespace mamba_ext {
template cudaError_t selective_scan_bwd_cuda<__half>(const SelectiveScanBwdParams&, cudaStream_t);
}  // namespace mamba_ext
