// The causal conv1d decode update for every activation dtype: one small kernel each.
#include "causal_conv1d/cuda/causal_conv1d_update_kernel.cuh"

namespace mamba_ext {
template cudaError_t causal_conv1d_update_cuda<float>(const CausalConv1dUpdateParams&,
                                                      cudaStream_t);
template cudaError_t causal_conv1d_update_cuda<double>(const CausalConv1dUpdateParams&,
                                                       cudaStream_t);
template cudaError_t causal_conv1d_update_cuda<__half>(const CausalConv1dUpdateParams&,
                                                       cudaStream_t);
template cudaError_t causal_conv1d_update_cuda<__nv_bfloat16>(const CausalConv1dUpdateParams&,
                                                              cudaStream_t);
}  // namespace mamba_ext
