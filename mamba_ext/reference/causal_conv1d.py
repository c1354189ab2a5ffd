"""Causal depthwise conv1d in plain PyTorch, the oracle of the kernels' tests.

Written as the equations read (DESIGN.md section 3), with x' = concat(initial_states or 0, x)
and seq' = concat(seq_idx[:, :1] repeated width - 1 times, seq_idx) along time:
    out[b, d, t] = act(bias[d] + sum_k weight[d, k] x'[b, d, t + k] [seq'[b, t + k] == seq[b, t]])
for tokens with seq[b, t] >= 0, and 0 for padding tokens (seq[b, t] == -1). Arithmetic runs in
the promoted dtype of x and weight (float64 in, float64 out) and is differentiable.
"""
import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_ref", "causal_conv1d_update_ref"]


def _is_silu(activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def causal_conv1d_ref(x, weight, bias=None, seq_idx=None, initial_states=None,
                      return_final_states=False, final_states_out=None, activation=None):
    """Same signature and result as mamba_ext.ops.causal_conv1d_fn."""
    silu = _is_silu(activation)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if initial_states is None:
        initial_states = x.new_zeros(batch, dim, width - 1)
    x_padded = torch.cat([initial_states, x], dim=2).to(dtype)  # (batch, dim, seqlen + width - 1)
    if seq_idx is None:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32, device=x.device)
    seq_padded = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=1)

    z = torch.zeros(batch, dim, seqlen, dtype=dtype, device=x.device)
    for k in range(width):
        same = (seq_padded[:, k:k + seqlen] == seq_idx).unsqueeze(1)  # (batch, 1, seqlen)
        z = z + weight[:, k, None].to(dtype) * x_padded[:, :, k:k + seqlen] * same
    if bias is not None:
        z = z + bias[:, None].to(dtype)
    if silu:
        z = F.silu(z)
    out = torch.where((seq_idx >= 0).unsqueeze(1), z, torch.zeros_like(z)).to(x.dtype)
    if not return_final_states:
        return out

    last = seq_idx[:, -1:]  # (batch, 1)
    kept = (seq_padded[:, seqlen:] == last) & (last >= 0)  # (batch, width - 1)
    final_states = (x_padded[:, :, seqlen:] * kept.unsqueeze(1)).to(x.dtype)
    if final_states_out is not None:
        final_states_out.copy_(final_states)
        final_states = final_states_out
    return out, final_states


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None,
                             cache_seqlens=None, conv_state_indices=None):
    """Same signature and result as mamba_ext.ops.causal_conv1d_update, token by token;
    updates conv_state in place."""
    silu = _is_silu(activation)
    squeeze = x.dim() == 2
    x = x.unsqueeze(2) if squeeze else x  # (batch, dim, seqlen)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[2]
    dtype = torch.promote_types(x.dtype, weight.dtype)
    rows = (torch.arange(batch, device=x.device) if conv_state_indices is None
            else conv_state_indices.long())
    state = conv_state[rows]  # (batch, dim, state_len), a copy
    batch_range = torch.arange(batch, device=x.device)

    outs = []
    for j in range(seqlen):
        token = x[:, :, j]  # (batch, dim)
        if cache_seqlens is None:
            window = torch.cat([state[:, :, state_len - (width - 1):], token[:, :, None]], dim=2)
            state = torch.cat([state[:, :, 1:], token[:, :, None]], dim=2)
        else:
            slot = cache_seqlens.long() + j  # (batch,)
            before = torch.remainder(slot[:, None] + torch.arange(-(width - 1), 0, device=x.device),
                                     state_len)  # (batch, width - 1)
            window = torch.cat([state[batch_range[:, None], :, before].transpose(1, 2),
                                token[:, :, None]], dim=2)
            state = state.clone()
            state[batch_range, :, torch.remainder(slot, state_len)] = token
        z = (window.to(dtype) * weight.to(dtype)).sum(dim=2)  # (batch, dim)
        if bias is not None:
            z = z + bias.to(dtype)
        outs.append(F.silu(z) if silu else z)
    conv_state[rows] = state
    out = torch.stack(outs, dim=2).to(x.dtype)
    return out.squeeze(2) if squeeze else out
