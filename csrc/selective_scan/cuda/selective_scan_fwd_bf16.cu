// selective_scan_fwd_cuda for __nv_bfloat16 activations.
#include "selective_scan/cuda/selective_scan_fwd_kernel.cuh"

namespace mamba_ext {
template cudaError_t selective_scan_fwd_cuda<__nv_bfloat16>(const SelectiveScanFwdParams&, cudaStream_t);
}  // namespace mamba_ext
