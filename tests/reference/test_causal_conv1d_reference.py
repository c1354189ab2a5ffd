"""The causal_conv1d oracles against independent formulations: torch.nn.functional.conv1d with
groups=dim and left padding, each packed sequence convolved on its own, and the linear decode
state as a rotated ring buffer."""
import pytest
import torch
import torch.nn.functional as F

from mamba_ext.reference import causal_conv1d_ref, causal_conv1d_update_ref

F64 = dict(dtype=torch.float64)


def conv1d_depthwise(x_padded, weight, bias, silu):
    """F.conv1d over x that already carries its width - 1 tokens of left context."""
    out = F.conv1d(x_padded, weight[:, None, :], bias, groups=weight.shape[0])
    return F.silu(out) if silu else out


@pytest.mark.parametrize("seqlen", [1, 2, 3, 129])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("initial", [False, True])
def test_ref_is_left_padded_depthwise_conv1d(initial, width, seqlen):
    batch, dim = 2, 5
    x = torch.randn(batch, dim, seqlen, **F64)
    weight = torch.randn(dim, width, **F64)
    bias = torch.randn(dim, **F64)
    initial_states = torch.randn(batch, dim, width - 1, **F64) if initial else None
    out, final_states = causal_conv1d_ref(x, weight, bias, initial_states=initial_states,
                                          return_final_states=True, activation="silu")
    context = initial_states if initial else torch.zeros(batch, dim, width - 1, **F64)
    x_padded = torch.cat([context, x], dim=2)
    torch.testing.assert_close(out, conv1d_depthwise(x_padded, weight, bias, silu=True))
    torch.testing.assert_close(final_states, x_padded[:, :, -(width - 1):])


@pytest.mark.parametrize("width", [2, 4])
def test_ref_with_seq_idx_is_each_sequence_alone(width):
    batch, dim, seqlen = 2, 3, 23
    x = torch.randn(batch, dim, seqlen, **F64)
    weight = torch.randn(dim, width, **F64)
    bias = torch.randn(dim, **F64)
    initial_states = torch.randn(batch, dim, width - 1, **F64)
    # Row 0: sequences of 1, 7 and 10 tokens, then 5 padding; row 1: 20 tokens then 3 of a
    # sequence that starts at the end.
    seq_idx = torch.tensor([[0] + [1] * 7 + [2] * 10 + [-1] * 5, [0] * 20 + [1] * 3],
                           dtype=torch.int32)
    out, final_states = causal_conv1d_ref(x, weight, bias, seq_idx, initial_states,
                                          return_final_states=True)

    expected = torch.zeros_like(out)
    expected_final = torch.zeros_like(final_states)
    for b in range(batch):
        for seq in seq_idx[b].unique().tolist():
            if seq < 0:
                continue
            tokens = (seq_idx[b] == seq).nonzero().flatten()
            first, last = tokens[0].item(), tokens[-1].item() + 1
            context = (initial_states[b] if first == 0
                       else torch.zeros(dim, width - 1, **F64))  # (dim, width - 1)
            x_padded = torch.cat([context, x[b, :, first:last]], dim=1)[None]
            expected[b, :, first:last] = conv1d_depthwise(x_padded, weight, bias, silu=False)[0]
            if last == seqlen:
                expected_final[b] = x_padded[0, :, -(width - 1):]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(final_states, expected_final)


@pytest.mark.parametrize("width", [2, 3, 4])
def test_update_ref_token_by_token_continues_the_conv(width):
    batch, dim, seqlen, prefix = 2, 4, 12, 5
    x = torch.randn(batch, dim, seqlen, **F64)
    weight = torch.randn(dim, width, **F64)
    bias = torch.randn(dim, **F64)
    full = causal_conv1d_ref(x, weight, bias, activation="silu")
    _, conv_state = causal_conv1d_ref(x[:, :, :prefix], weight, bias, return_final_states=True)
    steps = [causal_conv1d_update_ref(x[:, :, t], conv_state, weight, bias, activation="silu")
             for t in range(prefix, seqlen)]
    torch.testing.assert_close(torch.stack(steps, dim=2), full[:, :, prefix:])


@pytest.mark.parametrize("seqlen", [1, 3, 8])
def test_update_ref_ring_buffer_is_rotated_linear_state(seqlen):
    batch, dim, width, state_len = 3, 4, 4, 6
    x = torch.randn(batch, dim, seqlen, **F64)
    weight = torch.randn(dim, width, **F64)
    linear = torch.randn(batch, dim, state_len, **F64)
    cache_seqlens = torch.tensor([0, 4, 17], dtype=torch.int32)
    # Slot (cache_seqlens + i) % state_len of the ring holds entry i of the linear state, whose
    # newest entry is last: the next token goes to slot cache_seqlens % state_len.
    ring = torch.stack([torch.roll(linear[b], int(cache_seqlens[b]), dims=1)
                        for b in range(batch)])
    out_linear = causal_conv1d_update_ref(x, linear, weight)
    out_ring = causal_conv1d_update_ref(x, ring, weight, cache_seqlens=cache_seqlens)
    torch.testing.assert_close(out_ring, out_linear)
    for b in range(batch):
        shift = int(cache_seqlens[b]) + seqlen
        torch.testing.assert_close(ring[b], torch.roll(linear[b], shift, dims=1))


def test_update_ref_touches_only_the_indexed_rows():
    batch, dim, width, state_batch = 2, 3, 3, 5
    x = torch.randn(batch, dim, **F64)
    weight = torch.randn(dim, width, **F64)
    conv_state = torch.randn(state_batch, dim, width - 1, **F64)
    indices = torch.tensor([3, 1], dtype=torch.int32)
    gathered = conv_state[indices.long()].clone()
    before = conv_state.clone()
    out = causal_conv1d_update_ref(x, conv_state, weight, conv_state_indices=indices)
    torch.testing.assert_close(out, causal_conv1d_update_ref(x, gathered, weight))
    torch.testing.assert_close(conv_state[indices.long()], gathered)
    untouched = [r for r in range(state_batch) if r not in indices.tolist()]
    assert torch.equal(conv_state[untouched], before[untouched])
