"""selective_state_update: decode steps of the selective SSM (one token, or a speculative draft of
several), in place on the state.

mamba-ssm's `selective_state_update` (mamba_ssm/ops/triton/selective_state_update.py) over the
custom op torch.ops.mamba_ext.selective_state_update, whose schema marks the state as mutated
(`Tensor(a!) state`), so torch.compile functionalises the update instead of breaking the graph.
"""
import torch

def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, state_batch_indices=None, *,
                           intermediate_states_buffer=None, intermediate_state_indices=None,
                           disable_state_update=False):
    """Recurrent steps, one per token, in place on `state`; returns the output.

    For each token t in order (one launch, the state kept in float32 registers between tokens):

        dt = dt + dt_bias;  dt = softplus(dt) if dt_softplus
        state = state * exp(A * dt) + (B * dt) * x
        out = sum_n state * C + D * x;  out = out * silu(z) if z is given

    Mamba-1 form:
        state: (state_batch, dim, dstate); A: (dim, dstate); D, dt_bias: (dim,).
        One token:   x, dt, z: (batch, dim); B, C: (batch, dstate) or (batch, ngroups, dstate),
                     channel c using group c // (dim / ngroups) as in selective_scan_fn.
        seqlen tokens: x, dt, z: (batch, seqlen, dim); B, C: (batch, seqlen, dstate) or
                     (batch, seqlen, ngroups, dstate).
    Mamba-2 form:
        state: (state_batch, nheads, headdim, dstate); A: (nheads, headdim, dstate);
        D, dt_bias: (nheads, headdim). Mamba2 passes A, dt, dt_bias and D expanded from per-head
        values with stride 0; any strides are read as they are, no copy.
        One token:   x, dt, z: (batch, nheads, headdim); B, C: (batch, ngroups, dstate), head h
                     using group h // (nheads / ngroups).
        seqlen tokens: x, dt, z: (batch, seqlen, nheads, headdim); B, C:
                     (batch, seqlen, ngroups, dstate).
    state_batch_indices: (batch,) int32, the state row of each batch entry (continuous batching);
        on CPU every index must lie in [0, state_batch) and appear once. Without it state_batch
        must equal batch.

    Speculative decoding (FlashInfer's and sglang's names and layout):
    intermediate_states_buffer: optional (rows, seqlen, *state.shape[1:]) tensor in the state's
        dtype; receives the state after each token, so that a verifier that accepts k of the
        seqlen draft tokens restores `buffer[row, k - 1]` (or keeps `state` when k = 0). Its row
        for batch entry b is intermediate_state_indices[b] when given ((batch,) int32; on CPU each
        in [0, rows) and distinct), else b (rows must then be batch).
    disable_state_update: leave `state` as it was (the verify pass of a draft: the accepted
        state is taken from intermediate_states_buffer afterwards).

    Dtypes: x, B, C, z share one of float32, float64, float16, bfloat16; dt is x's dtype or
    float32; A, D, dt_bias are float32 (float64 for float64 x); state is float32 (float64 for
    float64 x) or x's dtype. Arithmetic is in float32 (float64 for float64 x).
    Returns out: x's shape and dtype, contiguous.

    Autograd: none; this is the decode step of an inference cache (train with the scan ops).
    torch.library.register_autograd refuses ops that mutate an input, so the host file registers
    an Autograd kernel: under grad mode an input that requires grad raises a ValueError naming
    it (an output without history would silently cut the graph); call it under torch.no_grad()
    or torch.inference_mode(). On CUDA an index outside its pool is not checked (that would cost
    a device sync): a state_batch_indices entry outside [0, state_batch) skips the row (state
    untouched, out 0, vLLM's padding slot -1), an intermediate_state_indices entry outside
    [0, rows) skips the row's intermediate states.
    """
    return torch.ops.mamba_ext.selective_state_update(
        state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, dt_softplus,
        intermediate_states_buffer, intermediate_state_indices, disable_state_update)


@torch.library.register_fake("mamba_ext::selective_state_update")
def _selective_state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices,
                                 dt_softplus, intermediate_states_buffer=None,
                                 intermediate_state_indices=None, disable_state_update=False):
    return x.new_empty(x.shape)  # x's shape, contiguous
