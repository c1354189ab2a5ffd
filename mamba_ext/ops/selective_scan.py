"""Selective scan (Mamba-1): mamba-ssm's selective_scan_fn over the selective_scan custom ops.

The fake kernels and the autograd formula live here, so torch.compile(fullgraph=True) and
torch.export pass through the op without graph breaks.
"""
import torch


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, initial_state=None, seq_idx=None, cu_seqlens=None,
                      keep_checkpoints=True):
    """The selective scan of mamba-ssm, plus an initial state and packed variable-length batches.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate); B, C: (batch, ngroups, dstate, seqlen)
    or (batch, dstate, seqlen) when they vary per token, (dim, dstate) when constant;
    D, delta_bias: (dim,); initial_state: (batch, dim, dstate). A, D, delta_bias, initial_state
    and constant B / C are float32 (float64 when u is float64). Returns out (batch, dim, seqlen)
    in u's dtype, and last_state (batch, dim, dstate) when return_last_state. Unlike mamba-ssm,
    a gradient flows back from last_state.

    Packed batches (neither is in mamba-ssm's selective_scan_fn):
    seq_idx: (batch, seqlen) int32, the sequence of each token. The state restarts (from 0)
        where seq_idx changes; -1 marks a padding token (out 0, no gradient, state 0 through it).
        States stay per row: initial_state[b] starts the sequence at token 0 of row b (later
        ones start from 0), last_state[b] is the state after the row's last token.
    cu_seqlens: (N + 1,) int32 or int64, cumulative sequence lengths with batch 1: sequence s is
        tokens [cu_seqlens[s], cu_seqlens[s + 1]), tokens outside [cu_seqlens[0],
        cu_seqlens[-1]) are padding. States are per sequence: initial_state and last_state are
        (N, dim, dstate); sequence s starts from initial_state[s] (or 0) and last_state[s] is
        its state after its last token (initial_state[s], or 0, for an empty one). Converted to
        seq_idx on u's device without a host sync. Not together with seq_idx.
    On the CPU a per-sequence seq_idx is checked to lie in [-1, N) with each sequence one run of
    tokens; on CUDA it is not (that would sync), and breaking it is undefined.

    keep_checkpoints: on CUDA, when autograd will differentiate, the forward keeps the states
        every 16 tokens (float32, 4 bytes a (token, channel) at dstate 16) for the backward.
        False trades that memory for a second forward pass inside the backward.
    """
    num_sequences = 0
    if cu_seqlens is not None:
        if seq_idx is not None:
            raise ValueError("selective_scan_fn: cu_seqlens must not be given together with "
                             "seq_idx, got both")
        seq_idx, num_sequences = _seq_idx_from_cu_seqlens(cu_seqlens, u)
    # A CUDA forward that autograd will differentiate keeps the backward's checkpoints, if asked.
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    keep_checkpoints = keep_checkpoints and u.is_cuda and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in inputs)
    out, last_state, _ = torch.ops.mamba_ext.selective_scan_fwd(
        *inputs, seq_idx, num_sequences, delta_softplus, keep_checkpoints)
    return (out, last_state) if return_last_state else out


def _seq_idx_from_cu_seqlens(cu_seqlens, u):
    """(seq_idx (1, seqlen) int32, N) from cu_seqlens (N + 1,): the sequence of each token, -1
    outside [cu_seqlens[0], cu_seqlens[-1]). Tensor ops only, so no host sync."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"selective_scan_fn: cu_seqlens must have shape (num_sequences + 1,), "
                         f"got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"selective_scan_fn: cu_seqlens must have dtype int32 or int64, "
                        f"got {cu_seqlens.dtype}")
    if u.dim() != 3 or u.shape[0] != 1:
        raise ValueError(f"selective_scan_fn: u must have batch 1 with cu_seqlens (sequences "
                         f"packed along seqlen), got shape {tuple(u.shape)}")
    num_sequences = cu_seqlens.shape[0] - 1
    cu_seqlens = cu_seqlens.to(device=u.device, dtype=torch.int64)
    tokens = torch.arange(u.shape[2], device=u.device)
    # The boundaries at or before each token, less one; on the whole of cu_seqlens, not a slice:
    # torch 2.11's inductor cannot lower searchsorted on a slice of a computed buffer.
    seq_idx = torch.searchsorted(cu_seqlens, tokens, right=True) - 1
    padding = (tokens < cu_seqlens[0]) | (seq_idx >= num_sequences)
    seq_idx = torch.where(padding, -1, seq_idx)
    return seq_idx.to(torch.int32).unsqueeze(0), num_sequences


# The CUDA forward's checkpoint interval (selective_scan_cuda_checkpoint_tokens).
_CHECKPOINT_TOKENS = 16


@torch.library.register_fake("mamba_ext::selective_scan_fwd")
def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
                             num_sequences, delta_softplus, return_checkpoints=False):
    batch, dim, seqlen = u.shape
    out = u.new_empty((batch, dim, seqlen))
    last_state = A.new_empty((num_sequences if num_sequences > 0 else batch, dim, A.shape[1]))
    if return_checkpoints and u.device.type == "cuda":
        checkpoints = A.new_empty((batch, dim, -(-seqlen // _CHECKPOINT_TOKENS), A.shape[1]))
    else:
        checkpoints = A.new_empty((0,))
    return out, last_state, checkpoints


def _gradient_or_empty(input, absent_like):
    """The kernel's layout of an input's gradient: contiguous like the input, or empty."""
    return input.new_empty(input.shape) if input is not None else absent_like.new_empty((0,))


@torch.library.register_fake("mamba_ext::selective_scan_bwd")
def _selective_scan_bwd_fake(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
                             seq_idx, num_sequences, delta_softplus, checkpoints=None):
    return (u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape),
            B.new_empty(B.shape), C.new_empty(C.shape), _gradient_or_empty(D, A),
            _gradient_or_empty(z, u), _gradient_or_empty(delta_bias, A),
            _gradient_or_empty(initial_state, A))


def _setup_context(ctx, inputs, output):
    (u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, num_sequences,
     delta_softplus) = inputs[:12]
    checkpoints = output[2]  # empty unless the forward kept them
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
                          checkpoints)
    ctx.num_sequences = num_sequences
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(checkpoints)


def _backward(ctx, dout, dlast_state, _dcheckpoints):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, checkpoints = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = (
        torch.ops.mamba_ext.selective_scan_bwd(
            dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx,
            ctx.num_sequences, ctx.delta_softplus, checkpoints))
    # The op returns empty gradients for absent inputs; autograd wants None for them.
    return (du, ddelta, dA, dB, dC,
            dD if D is not None else None,
            dz if z is not None else None,
            ddelta_bias if delta_bias is not None else None,
            dinitial_state if initial_state is not None else None,
            None, None, None, None)


torch.library.register_autograd(
    "mamba_ext::selective_scan_fwd", _backward, setup_context=_setup_context)
