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


def seq_idx_from_cu_seqlens(cu_seqlens, seqlen):
    """seq_idx (1, seqlen) int32 of cumulative sequence lengths (N + 1,): token t belongs to the
    sequence s with cu_seqlens[s] <= t < cu_seqlens[s + 1], -1 (padding) when there is none."""
    cu = [int(c) for c in cu_seqlens]
    seq_idx = [-1] * seqlen
    for s in range(len(cu) - 1):
        for t in range(max(cu[s], 0), min(cu[s + 1], seqlen)):
            seq_idx[t] = s
    return torch.tensor([seq_idx], dtype=torch.int32)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, seq_idx=None,
                       cu_seqlens=None, num_sequences=0):
    """The arguments and results of mamba_ext.ops.selective_scan_fn, and num_sequences as the
    selective_scan_fwd op takes it (per-sequence states for a seq_idx of any batch).

    Computes in float64 when u is float64 and in float32 otherwise; returns out in u's dtype and
    last_state in the computing dtype: (batch, dim, dstate), or (N, dim, dstate) with cu_seqlens.

    With seq_idx (batch, seqlen) a sequence starts at t = 0 or where seq_idx changes, and ends
    where it changes next or at the row's end. At each start the state h_{t-1} is reset to the
    sequence's start state: initial_state[b] (or 0) for the sequence at t = 0 of row b and 0 for
    later ones, or with cu_seqlens (per-sequence states) initial_state[s] (or 0) for sequence s.
    A token with seq_idx -1 is padding: its out is 0 and the state is 0 through it. last_state is
    per row the state after the row's last token; per sequence, the state after the sequence's
    last token (initial_state[s], or 0, for a sequence without tokens).
    """
    input_dtype = u.dtype
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if cu_seqlens is not None:
        assert seq_idx is None and batch == 1, "cu_seqlens: batch 1, without seq_idx"
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)
        num_sequences = len(cu_seqlens) - 1
    per_sequence = num_sequences > 0
    # The sequence of every token as lists; a row without seq_idx is one sequence.
    ids = seq_idx.tolist() if seq_idx is not None else [[0] * seqlen for _ in range(batch)]

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
    zero = u.new_zeros(grouped[1:] + (dstate,))                        # one row's state
    if initial_state is not None:
        initial_state = initial_state.to(dtype).reshape(-1, *grouped[1:], dstate)

    def start_state(b, t):
        """The state h_{t-1} of a sequence that starts at step t of row b."""
        if initial_state is None:
            return zero
        if per_sequence:
            return initial_state[ids[b][t]]
        return initial_state[b] if t == 0 else zero

    # Per sequence: the last states, each sequence's start state until it is seen.
    if per_sequence:
        last_states = (list(initial_state) if initial_state is not None
                       else [zero] * num_sequences)
    h = (initial_state if initial_state is not None and not per_sequence
         else u.new_zeros((*grouped, dstate)))
    ys = []
    for t in range(seqlen):
        if seq_idx is not None:
            h = torch.stack([start_state(b, t) if t == 0 or ids[b][t] != ids[b][t - 1] else h[b]
                             for b in range(batch)])
        h = torch.exp(dt_steps[t] * A) * h + dt_steps[t] * B_steps[t] * u_steps[t]
        if seq_idx is not None:  # padding: the state stays 0
            h = torch.stack([zero if ids[b][t] == -1 else h[b] for b in range(batch)])
        ys.append((h * C_steps[t]).sum(-1))                            # grouped
        if per_sequence:
            for b in range(batch):
                ends = t == seqlen - 1 or ids[b][t + 1] != ids[b][t]
                if ends and ids[b][t] != -1:
                    last_states[ids[b][t]] = h[b]
    y = torch.stack(ys, dim=-1).reshape(batch, dim, seqlen) if ys else u.new_zeros(u.shape)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    if seq_idx is not None:
        padding = (seq_idx == -1).to(y.device)[:, None, :]            # (batch, 1, seqlen)
        y = torch.where(padding, torch.zeros_like(y), y)
    out = y.to(input_dtype)
    if per_sequence:
        last_state = torch.stack(list(last_states)).reshape(-1, dim, dstate)
    else:
        last_state = h.reshape(batch, dim, dstate)
    return (out, last_state) if return_last_state else out
