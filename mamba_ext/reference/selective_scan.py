"""The selective scan (Mamba-1) as DESIGN.md writes it: the sequential recurrence, one step at a
time. Plain PyTorch, float64-capable, differentiable by autograd; the oracle of the tests."""
import torch
import torch.nn.functional as F


def _ngroups(X):
    """The groups of a variable B or C: (batch, ngroups, dstate, seqlen), or 1 for
    (batch, dstate, seqlen); None for a constant one (dim, dstate)."""
    return None if X.dim() == 2 else (1 if X.dim() == 3 else X.shape[1])


def _steps(X, ngroups, dim, seqlen):
    """B or C time first, in the grouped layout of the state: (seqlen, batch, ngroups, 1, dstate)
    for a variable one (shared by the channels of a group), (seqlen, 1, ngroups,
    dim / ngroups, dstate) for a constant one (the same at every step)."""
    if X.dim() == 2:
        return X.reshape(1, 1, ngroups, dim // ngroups, -1).expand(seqlen, -1, -1, -1, -1)
    if X.dim() == 3:
        X = X.unsqueeze(1)
    return X.permute(3, 0, 1, 2).unsqueeze(3).contiguous()


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """The arguments and results of mamba_ext.ops.selective_scan_fn.

    Computes in float64 when u is float64 and in float32 otherwise; returns out in u's dtype and
    last_state (batch, dim, dstate) in the computing dtype.
    """
    input_dtype = u.dtype
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))

    dt = delta if delta_bias is None else delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)

    # The state is kept grouped, (batch, ngroups, dim / ngroups, dstate), so that a variable B or
    # C broadcasts over the channels of its group; time goes first so each step reads one slice.
    ngroups = _ngroups(B) or _ngroups(C) or 1
    grouped = (batch, ngroups, dim // ngroups)
    B_steps, C_steps = _steps(B, ngroups, dim, seqlen), _steps(C, ngroups, dim, seqlen)
    dt_steps = dt.permute(2, 0, 1).reshape(seqlen, *grouped, 1)      # (seqlen, *grouped, 1)
    u_steps = u.permute(2, 0, 1).reshape(seqlen, *grouped, 1)
    A = A.reshape(ngroups, dim // ngroups, dstate)
    h = (initial_state.to(dtype).reshape(*grouped, dstate) if initial_state is not None
         else u.new_zeros((*grouped, dstate)))

    ys = []
    for t in range(seqlen):
        h = torch.exp(dt_steps[t] * A) * h + dt_steps[t] * B_steps[t] * u_steps[t]
        ys.append((h * C_steps[t]).sum(-1))                            # grouped
    y = torch.stack(ys, dim=-1).reshape(batch, dim, seqlen) if ys else u.new_zeros(u.shape)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    out = y.to(input_dtype)
    return (out, h.reshape(batch, dim, dstate)) if return_last_state else out
