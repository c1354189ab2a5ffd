// The causal conv1d forward for fp64 activations; a file per dtype, so that they compile in
// parallel.
#include "causal_conv1d/cuda/causal_conv1d_fwd_kernel.cuh"

namespace mamba_ext {
template cudaError_t causal_conv1d_fwd_cuda<double>(const CausalConv1dFwdParams&, cudaStream_t);
}  // namespace mamba_ext
