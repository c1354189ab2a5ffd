"""Causal depthwise conv1d: causal-conv1d's causal_conv1d_fn and causal_conv1d_update over the
torch.ops.mamba_ext custom ops, with their fake kernels and the forward's autograd formula.

Shapes: x (batch, dim, seqlen); weight (dim, width), width in 2..4; bias (dim,).
"""
import torch

__all__ = ["causal_conv1d_fn", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")


def _is_silu(fn_name, activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"{fn_name}: activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                     return_final_states=False, final_states_out=None, activation=None):
    """Causal depthwise conv1d over time, causal-conv1d's causal_conv1d_fn.

    x: (batch, dim, seqlen) in float32, float64, float16 or bfloat16, with any strides;
        channel-last x (made as (batch, seqlen, dim) and transposed) gives a channel-last out.
    weight: (dim, width), width in 2..4; bias: (dim,). Both in x's dtype or float32
        (float64 for float64 x); gradients come back in each input's dtype.
    seq_idx: (batch, seqlen) int32, the sequence of each token in a packed batch; a token only
        sees earlier tokens of its own sequence, and padding tokens (-1) get output 0.
    initial_states: (batch, dim, width - 1) in x's dtype: the tokens before x, seen by the first
        sequence of each row (together with seq_idx too, which causal-conv1d refuses).
    return_final_states: also return final_states (batch, dim, width - 1), the window a next
        token of the last sequence would see (0 where it reaches into another sequence); copied
        into final_states_out when that is given (used only with return_final_states).
    activation: None, "silu" or "swish".

    Returns out (batch, dim, seqlen) in x's dtype, or (out, final_states).
    """
    silu = _is_silu("causal_conv1d_fn", activation)
    out, final_states = torch.ops.mamba_ext.causal_conv1d_fwd(
        x, weight, bias, seq_idx, initial_states, return_final_states, silu)
    if not return_final_states:
        return out
    if final_states_out is not None:
        final_states_out.copy_(final_states)
        final_states = final_states_out
    return out, final_states


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """One decode step (or several tokens) against a rolling conv_state, causal-conv1d's
    causal_conv1d_update. Updates conv_state in place. It has no backward: it is for decoding
    (and torch.library refuses an autograd formula for an op that mutates an input), so under
    grad mode an input that requires grad raises a ValueError; call it under torch.no_grad() or
    torch.inference_mode().

    x: (batch, dim) or (batch, dim, seqlen), the new tokens.
    conv_state: (state_batch, dim, state_len) in x's dtype, state_len >= width - 1.
        Linear (cache_seqlens None): the newest entry is last; each token sees the last
        width - 1 entries, then the state shifts left by one and appends it.
    cache_seqlens: (batch,) int32: conv_state is a ring buffer; token j of batch entry b is
        written at (cache_seqlens[b] + j) % state_len and sees the width - 1 entries before
        that slot, circularly.
    conv_state_indices: (batch,) int32, the conv_state row of each batch entry, each in
        [0, state_batch) (checked) and distinct.
    weight, bias, activation: as in causal_conv1d_fn.

    Returns out with x's shape and dtype.
    """
    silu = _is_silu("causal_conv1d_update", activation)
    return torch.ops.mamba_ext.causal_conv1d_update(
        x, conv_state, weight, bias, cache_seqlens, conv_state_indices, silu)


def _empty_in_layout_of(x):
    """out's and dx's layout, as csrc/causal_conv1d/causal_conv1d.cpp allocates them: channel-last
    when x has stride 1 over dim and not over seqlen, contiguous otherwise."""
    batch, dim, seqlen = x.shape
    if x.stride(1) == 1 and x.stride(2) != 1:
        return x.new_empty((batch, seqlen, dim)).transpose(1, 2)
    return x.new_empty((batch, dim, seqlen))


@torch.library.register_fake("mamba_ext::causal_conv1d_fwd")
def _causal_conv1d_fwd_fake(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    batch, dim, _ = x.shape
    width = weight.shape[1]
    final_states = x.new_empty((batch, dim, width - 1) if return_final_states else (0,))
    return _empty_in_layout_of(x), final_states


@torch.library.register_fake("mamba_ext::causal_conv1d_bwd")
def _causal_conv1d_bwd_fake(dout, dfinal_states, x, weight, bias, seq_idx, initial_states, silu):
    batch, dim, _ = x.shape
    width = weight.shape[1]
    dbias = bias.new_empty((dim,)) if bias is not None else weight.new_empty((0,))
    dinitial_states = x.new_empty((batch, dim, width - 1) if initial_states is not None else (0,))
    return _empty_in_layout_of(x), weight.new_empty((dim, width)), dbias, dinitial_states


# No register_autograd for the update: torch.library raises "Cannot register autograd formula for
# non-functional operator" on an op with a mutable argument (conv_state). Its Autograd kernel, in
# csrc/causal_conv1d/causal_conv1d.cpp, refuses inputs that require grad.
@torch.library.register_fake("mamba_ext::causal_conv1d_update")
def _causal_conv1d_update_fake(x, conv_state, weight, bias, cache_seqlens, conv_state_indices,
                               silu):
    return x.new_empty(x.shape)


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, _, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu


def _fwd_backward(ctx, dout, dfinal_states):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    # final_states is (0,) when it was not asked for; its gradient then carries nothing.
    if dfinal_states is not None and dfinal_states.numel() == 0:
        dfinal_states = None
    dx, dweight, dbias, dinitial_states = torch.ops.mamba_ext.causal_conv1d_bwd(
        dout, dfinal_states, x, weight, bias, seq_idx, initial_states, ctx.silu)
    return (dx, dweight, dbias if bias is not None else None, None,
            dinitial_states if initial_states is not None else None, None, None)


torch.library.register_autograd(
    "mamba_ext::causal_conv1d_fwd", _fwd_backward, setup_context=_fwd_setup_context)
