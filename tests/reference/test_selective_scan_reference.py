"""The selective scan reference against a second opinion: the closed form of the recurrence,
h_t = exp(S_t A) h_{-1} + sum_{s <= t} exp((S_t - S_s) A) dt_s B_s u_s with S_t = sum_{r <= t} dt_r,
computed all at once in float64 (no loop over time), at small sizes."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from mamba_ext.reference import selective_scan_ref


def _per_channel(X, batch, dim, seqlen):
    """B or C as (batch, dim, dstate, seqlen), whatever its form."""
    if X.dim() == 2:
        return X[None, :, :, None].expand(batch, dim, X.shape[1], seqlen)
    if X.dim() == 3:
        X = X.unsqueeze(1)
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def closed_form(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                initial_state=None):
    """(out, last_state) of the selective scan, float64, from the closed form."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, seqlen = u.shape
    dt = delta if delta_bias is None else delta + delta_bias.double()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    S = dt.cumsum(-1)                                                   # (batch, dim, seqlen)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()       # (t, s): s <= t
    gap = (S[..., :, None] - S[..., None, :]).masked_fill(~causal, 0)  # (batch, dim, t, s)
    decay = torch.exp(gap[:, :, None] * A[None, :, :, None, None]) * causal  # (b, d, n, t, s)
    Bc = _per_channel(B, batch, dim, seqlen)                            # (batch, dim, n, seqlen)
    Cc = _per_channel(C, batch, dim, seqlen)
    h = torch.einsum("bdnts,bdns,bds->bdnt", decay, Bc, dt * u)        # (batch, dim, n, seqlen)
    if initial_state is not None:
        decay_from_start = torch.exp(S[:, :, None, :] * A[None, :, :, None])  # (b, d, n, seqlen)
        h = h + decay_from_start * initial_state.double()[..., None]
    y = torch.einsum("bdnt,bdnt->bdt", h, Cc)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h[..., -1]


def make_inputs(batch=2, dim=4, seqlen=9, dstate=3, B_form="variable", C_form="variable",
                ngroups=1, dtype=torch.float64):
    def state_input(form):
        if form == "constant":
            return torch.randn(dim, dstate, dtype=dtype)
        if form == "variable3d":
            return torch.randn(batch, dstate, seqlen, dtype=dtype)
        return torch.randn(batch, ngroups, dstate, seqlen, dtype=dtype)

    return dict(
        u=torch.randn(batch, dim, seqlen, dtype=dtype),
        delta=torch.rand(batch, dim, seqlen, dtype=dtype) * 0.5,
        A=-(0.25 + 2 * torch.rand(dim, dstate, dtype=dtype)),
        B=state_input(B_form),
        C=state_input(C_form),
        D=torch.randn(dim, dtype=dtype),
        z=torch.randn(batch, dim, seqlen, dtype=dtype),
        delta_bias=0.1 * torch.rand(dim, dtype=dtype),
        initial_state=torch.randn(batch, dim, dstate, dtype=dtype),
    )


OPTIONALS = ("D", "z", "delta_bias", "initial_state")


@pytest.mark.parametrize("B_form,C_form,ngroups", [
    ("variable", "variable", 1), ("variable", "variable", 2), ("variable3d", "constant", 1),
    ("constant", "variable", 2), ("constant", "constant", 1),
])
@pytest.mark.parametrize("with_optionals", [False, True])
@pytest.mark.parametrize("delta_softplus", [False, True])
def test_reference_matches_closed_form(B_form, C_form, ngroups, with_optionals, delta_softplus):
    inputs = make_inputs(B_form=B_form, C_form=C_form, ngroups=ngroups)
    if not with_optionals:
        for name in OPTIONALS:
            inputs[name] = None
    out, last_state = selective_scan_ref(**inputs, delta_softplus=delta_softplus,
                                         return_last_state=True)
    out_closed, last_closed = closed_form(**inputs, delta_softplus=delta_softplus)
    assert out.dtype == torch.float64 and last_state.shape == (2, 4, 3)
    torch.testing.assert_close(out, out_closed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(last_state, last_closed, rtol=1e-10, atol=1e-12)


def test_reference_forms_of_B_and_C_agree():
    # (batch, dstate, seqlen) is (batch, 1, dstate, seqlen).
    inputs = make_inputs(B_form="variable3d", C_form="variable3d")
    out = selective_scan_ref(**inputs)
    grouped = dict(inputs, B=inputs["B"].unsqueeze(1), C=inputs["C"].unsqueeze(1))
    torch.testing.assert_close(selective_scan_ref(**grouped), out, rtol=1e-12, atol=1e-12)
    # A constant (dim, dstate) is a variable one with a group per channel, the same at every step.
    inputs = make_inputs(B_form="constant", C_form="constant")
    out = selective_scan_ref(**inputs)
    batch, dim, seqlen = inputs["u"].shape
    per_step = dict(inputs, **{name: inputs[name][None, :, :, None].expand(batch, -1, -1, seqlen)
                               for name in ("B", "C")})
    torch.testing.assert_close(selective_scan_ref(**per_step), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seqlen", [0, 1])
def test_reference_short_sequences(seqlen):
    inputs = make_inputs(seqlen=seqlen)
    out, last_state = selective_scan_ref(**inputs, return_last_state=True)
    assert out.shape == (2, 4, seqlen)
    if seqlen == 0:
        torch.testing.assert_close(last_state, inputs["initial_state"])
    else:
        out_closed, last_closed = closed_form(**inputs)
        torch.testing.assert_close(out, out_closed)
        torch.testing.assert_close(last_state, last_closed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_low_precision_inputs(dtype):
    # In float32 arithmetic, with out in the inputs' dtype.
    inputs = make_inputs(seqlen=50, dtype=torch.float64)
    low = {k: (v.to(dtype) if k in ("u", "delta", "z", "B", "C") else v.float())
           for k, v in inputs.items()}
    out = selective_scan_ref(**low, delta_softplus=True)
    assert out.dtype == dtype
    exact = {k: v.double() for k, v in low.items()}
    assert_close(out, selective_scan_ref(**exact, delta_softplus=True), dtype)


def test_reference_is_differentiable():
    inputs = make_inputs(batch=1, dim=2, seqlen=4, dstate=2, C_form="constant")
    tensors = {k: v.requires_grad_() for k, v in inputs.items()}

    def fn(*args):
        return selective_scan_ref(**dict(zip(tensors, args)), delta_softplus=True,
                                  return_last_state=True)

    assert torch.autograd.gradcheck(fn, tuple(tensors.values()))


# --- packed variable-length batches: the same as running each sequence on its own.

def _tokens(inputs, begin, end, row=slice(None)):
    """The inputs of tokens [begin, end) of the rows `row` (a slice, to keep the batch dim)."""
    sliced = {}
    for name, value in inputs.items():
        if value is None or name in ("A", "D", "delta_bias", "initial_state"):
            sliced[name] = value
        elif name in ("B", "C") and value.dim() == 2:
            sliced[name] = value
        else:
            sliced[name] = value[row][..., begin:end]
    return sliced


def _runs(row):
    """(begin, end, id) of each run of equal values of a list."""
    runs, begin = [], 0
    for t in range(1, len(row) + 1):
        if t == len(row) or row[t] != row[begin]:
            runs.append((begin, t, row[begin]))
            begin = t
    return runs


@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("B_form,C_form", [("variable", "variable"), ("constant", "variable3d")])
def test_reference_cu_seqlens_matches_separate_sequences(with_initial_state, B_form, C_form):
    # Padding before the first sequence and after the last, and an empty sequence.
    cu_seqlens = torch.tensor([2, 6, 6, 7, 12])
    inputs = make_inputs(batch=1, seqlen=14, B_form=B_form, C_form=C_form)
    inputs["initial_state"] = torch.randn(4, 4, 3, dtype=torch.float64) if with_initial_state \
        else None
    out, last_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True,
                                         cu_seqlens=cu_seqlens)
    assert last_state.shape == (4, 4, 3)
    expected_out = torch.zeros_like(out)
    for s in range(4):
        begin, end = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
        alone = _tokens(inputs, begin, end)
        alone["initial_state"] = inputs["initial_state"][s:s + 1] if with_initial_state else None
        out_s, last_s = selective_scan_ref(**alone, delta_softplus=True, return_last_state=True)
        expected_out[..., begin:end] = out_s
        torch.testing.assert_close(last_state[s], last_s[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    # The empty sequence keeps its initial state.
    expected_empty = inputs["initial_state"][1] if with_initial_state else torch.zeros(4, 3)
    torch.testing.assert_close(last_state[1], expected_empty.double())


def test_reference_seq_idx_matches_separate_sequences():
    # Per-row states: the first sequence of a row starts from initial_state[b], later ones from
    # 0; padding (-1) gives 0 and a row ending in padding has last state 0. Ids may repeat in a
    # row: each run is its own sequence.
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, -1, -1, 0, 0, 4, 4],
                            [-1, -1, 3, 3, 3, 3, 7, 7, -1, 2, -1]], dtype=torch.int32)
    inputs = make_inputs(batch=2, seqlen=11, ngroups=2)
    out, last_state = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True,
                                         seq_idx=seq_idx)
    expected_out = torch.zeros_like(out)
    for b in range(2):
        h = torch.zeros(1, 4, 3, dtype=torch.float64)
        for begin, end, id in _runs(seq_idx[b].tolist()):
            if id == -1:
                h = torch.zeros(1, 4, 3, dtype=torch.float64)
                continue
            alone = _tokens(inputs, begin, end, row=slice(b, b + 1))
            alone["initial_state"] = inputs["initial_state"][b:b + 1] if begin == 0 else None
            expected_out[b:b + 1, :, begin:end], h = selective_scan_ref(
                **alone, delta_softplus=True, return_last_state=True)
        torch.testing.assert_close(last_state[b], h[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    assert (last_state[1] == 0).all()


def test_reference_constant_seq_idx_is_one_sequence():
    inputs = make_inputs()
    out, last_state = selective_scan_ref(**inputs, return_last_state=True)
    seq_idx = torch.full((2, 9), 5, dtype=torch.int32)
    out_packed, last_packed = selective_scan_ref(**inputs, return_last_state=True,
                                                 seq_idx=seq_idx)
    torch.testing.assert_close(out_packed, out, rtol=0, atol=0)
    torch.testing.assert_close(last_packed, last_state, rtol=0, atol=0)


def test_reference_seq_idx_from_cu_seqlens():
    from mamba_ext.reference.selective_scan import seq_idx_from_cu_seqlens
    seq_idx = seq_idx_from_cu_seqlens(torch.tensor([1, 3, 3, 4]), 6)
    assert seq_idx.tolist() == [[-1, 0, 0, 2, -1, -1]]


def test_reference_packed_is_differentiable():
    inputs = make_inputs(batch=1, dim=2, seqlen=7, dstate=2, C_form="constant")
    inputs["initial_state"] = torch.randn(3, 2, 2, dtype=torch.float64)
    tensors = {k: v.requires_grad_() for k, v in inputs.items()}
    cu_seqlens = torch.tensor([0, 3, 3, 6])

    def fn(*args):
        return selective_scan_ref(**dict(zip(tensors, args)), delta_softplus=True,
                                  return_last_state=True, cu_seqlens=cu_seqlens)

    assert torch.autograd.gradcheck(fn, tuple(tensors.values()))
