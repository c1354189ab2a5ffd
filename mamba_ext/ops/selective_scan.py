"""Selective scan (Mamba-1): mamba-ssm's selective_scan_fn over the selective_scan custom ops.

The fake kernels and the autograd formula live here, so torch.compile(fullgraph=True) and
torch.export pass through the op without graph breaks.
"""
import torch


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, initial_state=None):
    """The selective scan of mamba-ssm, plus an initial state.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate); B, C: (batch, ngroups, dstate, seqlen)
    or (batch, dstate, seqlen) when they vary per token, (dim, dstate) when constant;
    D, delta_bias: (dim,); initial_state: (batch, dim, dstate). A, D, delta_bias, initial_state
    and constant B / C are float32 (float64 when u is float64). Returns out (batch, dim, seqlen)
    in u's dtype, and last_state (batch, dim, dstate) when return_last_state. Unlike mamba-ssm,
    a gradient flows back from last_state.
    """
    out, last_state = torch.ops.mamba_ext.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    return (out, last_state) if return_last_state else out


@torch.library.register_fake("mamba_ext::selective_scan_fwd")
def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    batch, dim, seqlen = u.shape
    out = u.new_empty((batch, dim, seqlen))
    last_state = A.new_empty((batch, dim, A.shape[1]))
    return out, last_state


def _gradient_or_empty(input, absent_like):
    """The kernel's layout of an input's gradient: contiguous like the input, or empty."""
    return input.new_empty(input.shape) if input is not None else absent_like.new_empty((0,))


@torch.library.register_fake("mamba_ext::selective_scan_bwd")
def _selective_scan_bwd_fake(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
                             delta_softplus):
    return (u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape),
            B.new_empty(B.shape), C.new_empty(C.shape), _gradient_or_empty(D, A),
            _gradient_or_empty(z, u), _gradient_or_empty(delta_bias, A),
            _gradient_or_empty(initial_state, A))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dlast_state):
    u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = (
        torch.ops.mamba_ext.selective_scan_bwd(
            dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state,
            ctx.delta_softplus))
    # The op returns empty gradients for absent inputs; autograd wants None for them.
    return (du, ddelta, dA, dB, dC,
            dD if D is not None else None,
            dz if z is not None else None,
            ddelta_bias if delta_bias is not None else None,
            dinitial_state if initial_state is not None else None,
            None)


torch.library.register_autograd(
    "mamba_ext::selective_scan_fwd", _backward, setup_context=_setup_context)
