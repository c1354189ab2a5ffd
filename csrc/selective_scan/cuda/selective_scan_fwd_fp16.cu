// selective_scan_fwd_cuda for __half activations.
#include "selective_scan/cuda/selective_scan_fwd_kernel.cuh"

namespace mamba_ext {
template cudaError_t selective_scan_fwd_cuda<__half>(const SelectiveScanFwdParams&, cudaStream_t);
}  // namespace mamba_ext
