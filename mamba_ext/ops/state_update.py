"""selective_state_update: one decode step of the selective SSM, in place on the state.

mamba-ssm's `selective_state_update` (mamba_ssm/ops/triton/selective_state_update.py) over the
custom op torch.ops.mamba_ext.selective_state_update, whose schema marks the state as mutated
(`Tensor(a!) state`), so torch.compile functionalises the update instead of breaking the graph.
"""
import torch

def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, state_batch_indices=None):
    """One recurrent step: updates `state` in place and returns the output.

        dt = dt + dt_bias;  dt = softplus(dt) if dt_softplus
        state = state * exp(A * dt) + (B * dt) * x
        out = sum_n state * C + D * x;  out = out * silu(z) if z is given

    Mamba-1 form:
        state: (state_batch, dim, dstate); x, dt, z: (batch, dim); A: (dim, dstate);
        B, C: (batch, dstate), or (batch, ngroups, dstate) with channel c using group
        c // (dim / ngroups) as in selective_scan_fn; D, dt_bias: (dim,).
    Mamba-2 form:
        state: (state_batch, nheads, headdim, dstate); x, dt, z: (batch, nheads, headdim);
        A: (nheads, headdim, dstate); B, C: (batch, ngroups, dstate), head h using group
        h // (nheads / ngroups); D, dt_bias: (nheads, headdim). Mamba2 passes A, dt, dt_bias and
        D expanded from per-head values with stride 0; any strides are read as they are, no copy.
    state_batch_indices: (batch,) int32, the state row of each batch entry (continuous batching);
        on CPU every index must lie in [0, state_batch) and appear once. Without it state_batch
        must equal batch.

    Dtypes: x, B, C, z share one of float32, float64, float16, bfloat16; dt is x's dtype or
    float32; A, D, dt_bias are float32 (float64 for float64 x); state is float32 (float64 for
    float64 x) or x's dtype. Arithmetic is in float32 (float64 for float64 x).
    Returns out: x's shape and dtype, contiguous.

    Autograd: none; this is the decode step of an inference cache (train with the scan ops).
    torch.library.register_autograd refuses ops that mutate an input, so the host file registers
    an Autograd kernel: under grad mode an input that requires grad raises a ValueError naming
    it (an output without history would silently cut the graph); call it under torch.no_grad()
    or torch.inference_mode(). On CUDA a state_batch_indices entry outside [0, state_batch) is
    not checked (that would cost a device sync): the row is skipped, its out is 0.
    """
    return torch.ops.mamba_ext.selective_state_update(
        state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, dt_softplus)


@torch.library.register_fake("mamba_ext::selective_state_update")
def _selective_state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices,
                                 dt_softplus):
    return x.new_empty(x.shape)  # (batch, nheads, headdim) or (batch, dim), contiguous
