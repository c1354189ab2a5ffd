"""Reference selective_state_update: one recurrent step, as DESIGN.md's equations read."""
import torch
import torch.nn.functional as F


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False, state_batch_indices=None):
    """Updates `state` in place and returns out, like mamba_ext.ops.selective_state_update.

    Shapes and dtypes as there. Computes in float32, or float64 when any tensor is float64.
    """
    if state.dim() == 3:
        # The Mamba-1 form is the Mamba-2 one with dim split into (ngroups heads, dim / ngroups).
        ngroups = B.shape[1] if B.dim() == 3 else 1
        heads = (ngroups, state.shape[1] // ngroups)

        def split(t, channel_dim):
            return None if t is None else t.unflatten(channel_dim, heads)

        out = selective_state_update_ref(
            split(state, 1), split(x, 1), split(dt, 1), split(A, 0),
            B.reshape(B.shape[0], ngroups, -1), C.reshape(C.shape[0], ngroups, -1),
            split(D, 0), split(z, 1), split(dt_bias, 0), dt_softplus, state_batch_indices)
        return out.flatten(1)

    tensors = [t for t in (state, x, dt, A, B, C, D, z, dt_bias) if t is not None]
    compute = torch.float64 if torch.float64 in [t.dtype for t in tensors] else torch.float32
    batch, nheads = x.shape[:2]
    rows = (torch.arange(batch, device=x.device) if state_batch_indices is None
            else state_batch_indices.long())
    heads_per_group = nheads // B.shape[1]
    out_dtype = x.dtype

    h = state[rows].to(compute)  # (batch, nheads, headdim, dstate)
    x, dt, A = x.to(compute), dt.to(compute), A.to(compute)
    B = B.to(compute).repeat_interleave(heads_per_group, dim=1)  # (batch, nheads, dstate)
    C = C.to(compute).repeat_interleave(heads_per_group, dim=1)  # (batch, nheads, dstate)
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute)
    if dt_softplus:
        dt = F.softplus(dt)

    dA = torch.exp(A * dt[..., None])  # (batch, nheads, headdim, dstate)
    h = h * dA + (B[:, :, None, :] * dt[..., None]) * x[..., None]
    state[rows] = h.to(state.dtype)

    out = (h * C[:, :, None, :]).sum(-1)  # (batch, nheads, headdim)
    if D is not None:
        out = out + D.to(compute) * x
    if z is not None:
        out = out * F.silu(z.to(compute))
    return out.to(out_dtype)
