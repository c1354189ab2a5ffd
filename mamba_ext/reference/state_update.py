"""Reference selective_state_update: the recurrence token by token, as DESIGN.md's equations read."""
import torch
import torch.nn.functional as F


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False, state_batch_indices=None, *,
                               intermediate_states_buffer=None, intermediate_state_indices=None,
                               disable_state_update=False):
    """Updates `state` (and the intermediate states) in place and returns out, like
    mamba_ext.ops.selective_state_update.

    Shapes and dtypes as there. Computes in float32, or float64 when any tensor is float64; the
    state stays in that precision between the tokens of one call.
    """
    has_seq = x.dim() == state.dim()
    if not has_seq:  # one token: a draft of length 1
        x, dt = x.unsqueeze(1), dt.unsqueeze(1)
        z = None if z is None else z.unsqueeze(1)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    if state.dim() == 3:
        # The Mamba-1 form is the Mamba-2 one with dim split into (ngroups heads, dim / ngroups).
        ngroups = B.shape[2] if B.dim() == 4 else 1
        heads = (ngroups, state.shape[1] // ngroups)

        def split(t, channel_dim):
            return None if t is None else t.unflatten(channel_dim, heads)

        out = selective_state_update_ref(
            split(state, 1), split(x, 2), split(dt, 2), split(A, 0),
            B.reshape(*B.shape[:2], ngroups, -1), C.reshape(*C.shape[:2], ngroups, -1),
            split(D, 0), split(z, 2), split(dt_bias, 0), dt_softplus, state_batch_indices,
            intermediate_states_buffer=split(intermediate_states_buffer, 2),
            intermediate_state_indices=intermediate_state_indices,
            disable_state_update=disable_state_update)
        out = out.flatten(2)
        return out if has_seq else out.squeeze(1)

    tensors = [t for t in (state, x, dt, A, B, C, D, z, dt_bias) if t is not None]
    compute = torch.float64 if torch.float64 in [t.dtype for t in tensors] else torch.float32
    batch, seqlen, nheads = x.shape[:3]
    rows = (torch.arange(batch, device=x.device) if state_batch_indices is None
            else state_batch_indices.long())
    inter_rows = (torch.arange(batch, device=x.device) if intermediate_state_indices is None
                  else intermediate_state_indices.long())
    heads_per_group = nheads // B.shape[2]

    h = state[rows].to(compute)  # (batch, nheads, headdim, dstate)
    A = A.to(compute)
    outs = []
    for t in range(seqlen):
        x_t, dt_t = x[:, t].to(compute), dt[:, t].to(compute)  # (batch, nheads, headdim)
        B_t = B[:, t].to(compute).repeat_interleave(heads_per_group, dim=1)  # (batch, nheads, dstate)
        C_t = C[:, t].to(compute).repeat_interleave(heads_per_group, dim=1)  # (batch, nheads, dstate)
        if dt_bias is not None:
            dt_t = dt_t + dt_bias.to(compute)
        if dt_softplus:
            dt_t = F.softplus(dt_t)
        dA = torch.exp(A * dt_t[..., None])  # (batch, nheads, headdim, dstate)
        h = h * dA + (B_t[:, :, None, :] * dt_t[..., None]) * x_t[..., None]
        if intermediate_states_buffer is not None:
            intermediate_states_buffer[inter_rows, t] = h.to(intermediate_states_buffer.dtype)
        out = (h * C_t[:, :, None, :]).sum(-1)  # (batch, nheads, headdim)
        if D is not None:
            out = out + D.to(compute) * x_t
        if z is not None:
            out = out * F.silu(z[:, t].to(compute))
        outs.append(out.to(x.dtype))
    if not disable_state_update:
        state[rows] = h.to(state.dtype)
    out = torch.stack(outs, dim=1)  # (batch, seqlen, nheads, headdim)
    return out if has_seq else out.squeeze(1)
