// The causal conv1d backward for fp64 activations; a file per dtype, so that they compile in
// parallel.
#include "causal_conv1d/cuda/causal_conv1d_bwd_kernel.cuh"

namespace mamba_ext {
template cudaError_t causal_conv1d_bwd_cuda<double>(const CausalConv1dBwdParams&, cudaStream_t);
}  // namespace mamba_ext
