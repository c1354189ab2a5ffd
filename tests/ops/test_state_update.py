"""selective_state_update (one decode step, in place on the state) against the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICES, assert_close, strided
from mamba_ext.ops import selective_state_update
from mamba_ext.reference import selective_state_update_ref

OP = torch.ops.mamba_ext.selective_state_update.default
OPTIONALS = ("D", "z", "dt_bias")


def make_case(device, *, nheads=None, dim=37, dstate=16, ngroups=1, batch=3, dtype=torch.float32,
              state_dtype=None, optionals=OPTIONALS, dt_softplus=True, broadcast=False,
              dt_dtype=None, state_pool=None, seqlen=None):
    """The keyword arguments of one call, on random data.

    Mamba-2 form when `nheads` is given (`dim` is then headdim), Mamba-1 form otherwise (2-D B
    and C when ngroups is 1). `broadcast` passes A, dt, dt_bias and D as Mamba2 does: per-head
    values expanded with stride 0. `state_pool` > batch adds state_batch_indices into a larger
    state. `seqlen` gives x, dt, z, B and C a token dimension after batch (a draft of seqlen
    tokens); None is the single-token form.
    """
    weight = torch.float64 if dtype == torch.float64 else torch.float32
    channels = (nheads, dim) if nheads else (dim,)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt, device=device)

    def rand(*shape, dt=weight):
        return torch.rand(*shape, dtype=dt, device=device)

    pool = state_pool or batch
    lead = (batch,) if seqlen is None else (batch, seqlen)
    if broadcast:
        assert nheads, "Mamba2's broadcast is over headdim"
        A_head = -(rand(nheads) + 0.5)
        A = A_head[:, None, None].expand(nheads, dim, dstate)
        dt = (0.5 * rand(*lead, nheads, dt=dt_dtype or dtype) + 0.05)[..., None].expand(
            *lead, nheads, dim)
        D = randn(nheads, dt=weight)[:, None].expand(nheads, dim)
        dt_bias = (0.5 * rand(nheads))[:, None].expand(nheads, dim)
    else:
        A = -(rand(*channels, dstate) + 0.5)
        dt = 0.5 * rand(*lead, *channels, dt=dt_dtype or dtype) + 0.05
        D = randn(*channels, dt=weight)
        dt_bias = 0.5 * rand(*channels)
    B_shape = (*lead, ngroups, dstate) if nheads or ngroups > 1 else (*lead, dstate)
    case = dict(
        state=randn(pool, *channels, dstate, dt=state_dtype or weight),
        x=randn(*lead, *channels), dt=dt, A=A, B=randn(*B_shape), C=randn(*B_shape),
        D=D, z=randn(*lead, *channels), dt_bias=dt_bias, dt_softplus=dt_softplus,
        state_batch_indices=None)
    if state_pool:
        case["state_batch_indices"] = torch.randperm(pool, device=device)[:batch].to(torch.int32)
    for name in OPTIONALS:
        if name not in optionals:
            case[name] = None
    return case


def as_float64(case):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in case.items()}


def check_against_reference(case):
    """Runs the op on a copy of the state (and of the intermediate states) and the reference in
    float64; compares out, state and intermediate states."""
    inter = case.get("intermediate_states_buffer")
    state = case["state"].clone()
    mine = {**case, "state": state}
    if inter is not None:
        mine["intermediate_states_buffer"] = inter.clone()
    out = selective_state_update(**mine)
    ref_case = as_float64(case)
    out_ref = selective_state_update_ref(**ref_case)
    assert_close(out, out_ref, case["x"].dtype, "out")
    assert out.dtype == case["x"].dtype and out.is_contiguous()
    assert_close(state, ref_case["state"], case["state"].dtype, "state")
    if inter is not None:
        assert_close(mine["intermediate_states_buffer"], ref_case["intermediate_states_buffer"],
                     inter.dtype, "intermediate_states_buffer")
    return state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dstate", [1, 16, 64, 256])
@pytest.mark.parametrize("nheads", [None, 5], ids=["mamba1", "mamba2"])
def test_matches_reference(device, nheads, dstate, dtype):
    # Odd dim (Mamba-1) and headdim (Mamba-2).
    check_against_reference(make_case(device, nheads=nheads, dim=37 if nheads is None else 7,
                                      dstate=dstate, dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt_softplus", [False, True])
@pytest.mark.parametrize("optionals", [(), ("D",), ("z",), ("dt_bias",), OPTIONALS],
                         ids=["none", "D", "z", "dt_bias", "all"])
@pytest.mark.parametrize("nheads", [None, 4], ids=["mamba1", "mamba2"])
def test_optionals(device, nheads, optionals, dt_softplus):
    check_against_reference(make_case(device, nheads=nheads, dim=9, optionals=optionals,
                                      dt_softplus=dt_softplus))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nheads, dim, ngroups", [(6, 5, 2), (6, 5, 3), (6, 5, 6), (None, 12, 3)],
                         ids=["mamba2-g2", "mamba2-g3", "mamba2-g6", "mamba1-g3"])
def test_groups(device, nheads, dim, ngroups):
    check_against_reference(make_case(device, nheads=nheads, dim=dim, ngroups=ngroups, dstate=32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba2_broadcast_weights(device, dtype):
    case = make_case(device, nheads=4, dim=8, dstate=64, dtype=dtype, broadcast=True)
    assert case["A"].stride() == (1, 0, 0) and case["dt"].stride()[-1] == 0
    check_against_reference(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, state_dtype, dt_dtype", [
    (torch.bfloat16, torch.bfloat16, None),  # mamba-ssm allows a state in x's dtype
    (torch.float16, torch.float16, None),
    (torch.bfloat16, torch.float32, torch.float32),  # dt kept in float32 with bf16 x
    (torch.float64, torch.float64, None),
    (torch.float64, torch.float64, torch.float32),
])
def test_dtypes(device, dtype, state_dtype, dt_dtype):
    check_against_reference(make_case(device, nheads=3, dim=8, dtype=dtype,
                                      state_dtype=state_dtype, dt_dtype=dt_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nheads", [None, 3], ids=["mamba1", "mamba2"])
def test_strided_inputs(device, nheads):
    case = make_case(device, nheads=nheads, dim=9, dstate=32, ngroups=1)
    for name in ("x", "z", "B", "C", "dt"):
        case[name] = strided(case[name])
    check_against_reference(case)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_state(device):
    """A state that is a slice of a wider pool, and one whose dstate is not the unit stride."""
    case = make_case(device, nheads=3, dim=8, dstate=16)
    case["state"] = strided(case["state"], dim=2)
    check_against_reference(case)
    transposed = case["state"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert transposed.stride(-1) != 1
    check_against_reference({**case, "state": transposed})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nheads", [None, 4], ids=["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_batch_indices(device, nheads, dtype):
    case = make_case(device, nheads=nheads, dim=6, dtype=dtype, batch=3, state_pool=8)
    state = check_against_reference(case)
    untouched = torch.ones(8, dtype=torch.bool, device=device)
    untouched[case["state_batch_indices"].long()] = False
    assert torch.equal(state[untouched], case["state"][untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nheads", [None, 4], ids=["mamba1", "mamba2"])
def test_token_by_token_matches_sequential_scan(device, nheads):
    """seqlen decode steps equal one sequential scan over the sequence, written out here."""
    seqlen, batch = 9, 2
    steps = [make_case(device, nheads=nheads, dim=5, dstate=8, batch=batch, ngroups=1)
             for _ in range(seqlen)]
    weights = {k: steps[0][k] for k in ("A", "D", "dt_bias")}  # shared by every token
    state = steps[0]["state"].clone()
    h = state.double()
    outs, outs_ref = [], []
    for step in steps:
        step.update(weights)
        outs.append(selective_state_update(**{**step, "state": state}))
        s = as_float64(step)
        dt = F.softplus(s["dt"] + s["dt_bias"])
        # B, C: (batch, dstate) or (batch, 1, dstate), broadcast over dim or (nheads, headdim).
        B, C = s["B"][..., None, :], s["C"][..., None, :]
        h = torch.exp(s["A"] * dt[..., None]) * h + (dt * s["x"])[..., None] * B
        y = (h * C).sum(-1) + s["D"] * s["x"]
        outs_ref.append(y * F.silu(s["z"]))
    assert_close(torch.stack(outs), torch.stack(outs_ref), torch.float32, "out")
    assert_close(state, h, torch.float32, "state")


def with_intermediate(case, rows=None, dtype=None):
    """Adds an intermediate_states_buffer (rows, seqlen, ...state dims) of random values, with
    intermediate_state_indices into it when rows > batch."""
    batch, seqlen = case["x"].shape[:2]
    state = case["state"]
    rows = rows or batch
    buffer = torch.randn(rows, seqlen, *state.shape[1:], device=state.device,
                         dtype=dtype or state.dtype)
    case = {**case, "intermediate_states_buffer": buffer}
    if rows > batch:
        case["intermediate_state_indices"] = torch.randperm(rows, device=state.device)[
            :batch].to(torch.int32)
    return case


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.bfloat16, torch.bfloat16),
                                                (torch.float16, None), (torch.float64, None)])
@pytest.mark.parametrize("seqlen", [1, 4, 7])
@pytest.mark.parametrize("nheads", [None, 3], ids=["mamba1", "mamba2"])
def test_multi_token_matches_reference(device, nheads, seqlen, dtype, state_dtype):
    """A draft of seqlen tokens, with the state after each one kept for a rollback."""
    case = make_case(device, nheads=nheads, dim=5 if nheads else 21, dstate=32, seqlen=seqlen,
                     dtype=dtype, state_dtype=state_dtype, ngroups=3 if nheads else 1,
                     broadcast=nheads is not None, state_pool=6)
    check_against_reference(case)
    check_against_reference(with_intermediate(case, rows=5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nheads, dstate, ngroups", [(None, 16, 1), (None, 64, 2), (4, 128, 2)],
                         ids=["mamba1", "mamba1-g2", "mamba2"])
def test_multi_token_equals_single_token_calls(device, nheads, dstate, ngroups):
    """One call over seqlen tokens = seqlen single-token calls (the state float32 either way),
    and its intermediate states are the states those calls leave."""
    seqlen, batch = 5, 3
    case = make_case(device, nheads=nheads, dim=8 if nheads else 24, dstate=dstate,
                     ngroups=ngroups, batch=batch, seqlen=seqlen, state_pool=7)
    case = with_intermediate(case, rows=4)
    state = case["state"].clone()
    out = selective_state_update(**{**case, "state": state})

    state_steps = case["state"].clone()
    rows = case["state_batch_indices"].long()
    for t in range(seqlen):
        step = {**case, "state": state_steps, "intermediate_states_buffer": None,
                "intermediate_state_indices": None}
        for name in ("x", "dt", "z", "B", "C"):
            step[name] = case[name][:, t]
        out_t = selective_state_update(**step)
        torch.testing.assert_close(out[:, t], out_t, rtol=1e-5, atol=1e-5)
        inter_rows = case["intermediate_state_indices"].long()
        torch.testing.assert_close(case["intermediate_states_buffer"][inter_rows, t],
                                   state_steps[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_steps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_intermediate_states_rows_and_disable_state_update(device):
    """Verify then commit, as a speculative decoder does: the verify pass leaves the state alone
    (disable_state_update) and writes only the rows of intermediate_state_indices; restoring
    buffer[row, k - 1] then equals running the k accepted tokens."""
    seqlen, batch = 4, 3
    case = make_case(device, nheads=2, dim=8, dstate=16, batch=batch, seqlen=seqlen, state_pool=5)
    case = with_intermediate(case, rows=6)
    buffer_before = case["intermediate_states_buffer"].clone()
    state = case["state"].clone()
    selective_state_update(**{**case, "state": state, "disable_state_update": True})
    assert torch.equal(state, case["state"])
    written = case["intermediate_state_indices"].long()
    untouched = torch.ones(6, dtype=torch.bool, device=device)
    untouched[written] = False
    assert torch.equal(case["intermediate_states_buffer"][untouched], buffer_before[untouched])

    accepted = 2
    committed = case["state"].clone()
    rows = case["state_batch_indices"].long()
    committed[rows] = case["intermediate_states_buffer"][written, accepted - 1]
    expected = case["state"].clone()
    prefix = {**case, "state": expected, "intermediate_states_buffer": None,
              "intermediate_state_indices": None}
    for name in ("x", "dt", "z", "B", "C"):
        prefix[name] = case[name][:, :accepted]
    selective_state_update(**prefix)
    torch.testing.assert_close(committed, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    case = make_case(device, nheads=2, dim=4, seqlen=0)
    state = case["state"].clone()
    out = selective_state_update(**{**case, "state": state})
    assert out.shape == case["x"].shape
    assert torch.equal(state, case["state"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nheads, optionals, state_pool, seqlen", [
    (None, (), None, None), (None, OPTIONALS, None, None), (4, OPTIONALS, 6, None),
    (None, OPTIONALS, None, 3), (4, OPTIONALS, 6, 3)],
    ids=["mamba1-bare", "mamba1-all", "mamba2-all-indices", "mamba1-draft",
         "mamba2-draft-intermediate"])
def test_opcheck(device, nheads, optionals, state_pool, seqlen):
    case = make_case(device, nheads=nheads, dim=6, optionals=optionals, state_pool=state_pool,
                     seqlen=seqlen)
    args = tuple(case[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias",
                                   "state_batch_indices", "dt_softplus"))
    if state_pool and seqlen:
        case = with_intermediate(case, rows=5)
        args += (case["intermediate_states_buffer"], case["intermediate_state_indices"], False)
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_matches_eager(device):
    """Two decode steps in one fullgraph-compiled function, the state mutation included."""
    case = make_case(device, nheads=4, dim=8, dstate=16, broadcast=True)

    def two_steps(state, x, dt, A, B, C, D, z, dt_bias):
        y1 = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
        y2 = selective_state_update(state, y1, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
        return y1 + y2

    args = [case[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    state_eager, state_compiled = case["state"].clone(), case["state"].clone()
    out_eager = two_steps(state_eager, *args)
    out_compiled = torch.compile(two_steps, fullgraph=True)(state_compiled, *args)
    torch.testing.assert_close(out_compiled, out_eager)
    torch.testing.assert_close(state_compiled, state_eager)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_draft_with_intermediate_states(device):
    """A draft of 3 tokens with its intermediate states under fullgraph torch.compile."""
    case = with_intermediate(make_case(device, nheads=4, dim=8, dstate=16, broadcast=True,
                                       seqlen=3))

    def draft(state, inter, x, dt, A, B, C, D, z, dt_bias):
        return selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True,
                                      intermediate_states_buffer=inter)

    args = [case[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    inter = case["intermediate_states_buffer"]
    state_eager, state_compiled = case["state"].clone(), case["state"].clone()
    inter_eager, inter_compiled = inter.clone(), inter.clone()
    out_eager = draft(state_eager, inter_eager, *args)
    out_compiled = torch.compile(draft, fullgraph=True)(state_compiled, inter_compiled, *args)
    torch.testing.assert_close(out_compiled, out_eager)
    torch.testing.assert_close(state_compiled, state_eager)
    torch.testing.assert_close(inter_compiled, inter_eager)


@pytest.mark.parametrize("device", DEVICES)
def test_autograd(device):
    """No backward: under grad mode an input that requires grad is refused (the output would
    otherwise silently cut the graph); under no_grad the same call runs. The state's version
    counter records the update, so a backward that saved the old state refuses to run."""
    case = make_case(device, nheads=2, dim=4)
    A_log = torch.randn(2, 4, 16, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="selective_state_update: A must not require grad"):
        selective_state_update(**{**case, "A": -torch.exp(A_log)})
    with pytest.raises(ValueError, match="selective_state_update: state must not require grad"):
        selective_state_update(**{**case, "state": case["state"].clone().requires_grad_()})
    draft = with_intermediate(make_case(device, nheads=2, dim=4, seqlen=2))
    draft["intermediate_states_buffer"].requires_grad_()
    with pytest.raises(ValueError, match="selective_state_update: intermediate_states_buffer "
                                         "must not require grad"):
        selective_state_update(**draft)
    with torch.no_grad():
        out = selective_state_update(**{**case, "A": -torch.exp(A_log), "state": case["state"].clone()})
    assert not out.requires_grad

    scale = torch.randn(case["state"].shape, device=device, requires_grad=True)
    loss = (scale * case["state"]).sum()  # saves the state for its backward
    version = case["state"]._version
    selective_state_update(**case)
    assert case["state"]._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _without(name):
    return lambda case: {**case, name: None}


def _replace(name, make):
    return lambda case: {**case, name: make(case)}


# (id, Mamba-2 form?, change to a valid case, exception type, message pattern): one per check.
BAD_INPUTS = [
    ("state-rank", True, _replace("state", lambda c: c["state"][0, 0]), ValueError,
     "state must have 3 dimensions"),
    ("dstate-too-large", False,
     lambda c: {**c, "state": torch.randn(3, 37, 300), "A": -torch.rand(37, 300),
                "B": torch.randn(3, 300), "C": torch.randn(3, 300)},
     ValueError, r"state must have dstate \(its last dimension\) in \[1, 256\], got 300"),
    ("x-rank", False, _replace("x", lambda c: c["x"][..., None, None]), ValueError,
     r"x must have 2 dimensions \(batch, dim\) or 3 \(batch, seqlen, dim\), got 4"),
    ("x-shape", True, _replace("x", lambda c: c["x"][:, :, :-1]), ValueError,
     r"x must have shape \(batch, nheads, headdim\) = \(3, 4, 6\), got \(3, 4, 5\)"),
    ("dt-shape", True, _replace("dt", lambda c: c["dt"][:2]), ValueError, "dt must have shape"),
    ("A-shape", True, _replace("A", lambda c: c["A"][:, :, :8]), ValueError,
     r"A must have shape \(nheads, headdim, dstate\) = \(4, 6, 16\), got \(4, 6, 8\)"),
    ("B-rank-mamba2", True, _replace("B", lambda c: c["B"][:, 0]), ValueError,
     "B must have 3 dimensions"),
    ("B-rank-mamba1", False, _replace("B", lambda c: c["B"][None, None]), ValueError,
     r"B must have 2 dimensions \(batch, dstate\) or 3"),
    ("ngroups", True, _replace("B", lambda c: torch.randn(3, 3, 16)), ValueError,
     "B must have ngroups dividing nheads = 4, got ngroups = 3"),
    ("B-shape", True, _replace("B", lambda c: c["B"][:, :, :8]), ValueError, "B must have shape"),
    ("C-shape", True, _replace("C", lambda c: c["C"][:, :, :8]), ValueError, "C must have shape"),
    ("D-shape", True, _replace("D", lambda c: c["D"][0]), ValueError,
     r"D must have shape \(nheads, headdim\)"),
    ("z-shape", True, _replace("z", lambda c: c["z"][:, :2]), ValueError, "z must have shape"),
    ("dt_bias-shape", False, _replace("dt_bias", lambda c: c["dt_bias"][:5]), ValueError,
     r"dt_bias must have shape \(dim,\)"),
    ("state_batch-without-indices", True, _replace("state", lambda c: c["state"][:2]), ValueError,
     "state must have state_batch = batch = 3 rows when state_batch_indices is absent, got 2"),
    ("state-overlap", True,
     _replace("state", lambda c: c["state"][:1].expand(3, -1, -1, -1)), ValueError,
     "state must not have overlapping memory"),
    ("indices-shape", True,
     _replace("state_batch_indices", lambda c: torch.arange(4, dtype=torch.int32)), ValueError,
     r"state_batch_indices must have shape \(batch,\) = \(3,\)"),
    ("indices-out-of-range", True,
     _replace("state_batch_indices", lambda c: torch.tensor([0, 3, 1], dtype=torch.int32)),
     ValueError, r"state_batch_indices must hold rows of state in \[0, 3\), got 3 at position 1"),
    ("indices-negative", True,
     _replace("state_batch_indices", lambda c: torch.tensor([0, -1, 1], dtype=torch.int32)),
     ValueError, "state_batch_indices must hold rows of state in"),
    ("indices-repeated", True,
     _replace("state_batch_indices", lambda c: torch.tensor([2, 0, 2], dtype=torch.int32)),
     ValueError, "state_batch_indices must not repeat a row .* got row 2 at positions 0 and 2"),
    ("x-dtype", True, _replace("x", lambda c: c["x"].int()), TypeError,
     "x must have dtype in"),
    ("state-dtype", True, _replace("state", lambda c: c["state"].half()), TypeError,
     "state must have dtype Float"),
    ("dt-dtype", True, _replace("dt", lambda c: c["dt"].double()), TypeError, "dt must have dtype"),
    ("A-dtype", True, _replace("A", lambda c: c["A"].double()), TypeError,
     r"A must have dtype Float \(float32, float64 for float64 x\), got Double"),
    ("B-dtype", True, _replace("B", lambda c: c["B"].bfloat16()), TypeError,
     r"B must have dtype Float \(like x\)"),
    ("C-dtype", True, _replace("C", lambda c: c["C"].bfloat16()), TypeError, "C must have dtype"),
    ("D-dtype", True, _replace("D", lambda c: c["D"].double()), TypeError, "D must have dtype"),
    ("z-dtype", True, _replace("z", lambda c: c["z"].double()), TypeError, "z must have dtype"),
    ("dt_bias-dtype", True, _replace("dt_bias", lambda c: c["dt_bias"].half()), TypeError,
     "dt_bias must have dtype"),
    ("indices-dtype", True,
     _replace("state_batch_indices", lambda c: torch.arange(3)), TypeError,
     "state_batch_indices must have dtype Int"),
]


@pytest.mark.parametrize("name, has_heads, change, error, match", BAD_INPUTS,
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input(name, has_heads, change, error, match):
    case = make_case("cpu", nheads=4 if has_heads else None, dim=6 if has_heads else 37)
    if name.startswith("indices-"):
        case["state_batch_indices"] = torch.arange(3, dtype=torch.int32)
    with pytest.raises(error, match=f"^selective_state_update: {match}"):
        selective_state_update(**change(case))


_INTER = "intermediate_states_buffer"
_INTER_INDICES = "intermediate_state_indices"

# The same for a draft of 3 tokens (batch 3, nheads 4, headdim 6, dstate 16, or dim 37) with an
# intermediate_states_buffer of 5 rows and intermediate_state_indices into it.
BAD_DRAFT_INPUTS = [
    ("x-rank-mamba2", True, _replace("x", lambda c: c["x"][None]), ValueError,
     r"x must have 3 dimensions \(batch, nheads, headdim\) or 4 \(batch, seqlen, nheads, "
     r"headdim\), got 5"),
    ("dt-seqlen", True, _replace("dt", lambda c: c["dt"][:, :2]), ValueError,
     r"dt must have shape \(batch, seqlen, nheads, headdim\) = \(3, 3, 4, 6\), got "
     r"\(3, 2, 4, 6\)"),
    ("z-seqlen", False, _replace("z", lambda c: c["z"][:, :2]), ValueError,
     r"z must have shape \(batch, seqlen, dim\) = \(3, 3, 37\), got \(3, 2, 37\)"),
    ("B-rank-mamba2", True, _replace("B", lambda c: c["B"][:, :, 0]), ValueError,
     r"B must have 4 dimensions \(batch, seqlen, ngroups, dstate\), got 3"),
    ("B-rank-mamba1", False, _replace("B", lambda c: c["B"][:, 0]), ValueError,
     r"B must have 3 dimensions \(batch, seqlen, dstate\) or 4 \(batch, seqlen, ngroups, "
     r"dstate\), got 2"),
    ("C-seqlen", True, _replace("C", lambda c: c["C"][:, :1]), ValueError,
     r"C must have shape \(batch, seqlen, ngroups, dstate\) = \(3, 3, 1, 16\), got "
     r"\(3, 1, 1, 16\)"),
    ("inter-rank", True, _replace(_INTER, lambda c: c[_INTER][0]), ValueError,
     r"intermediate_states_buffer must have 5 dimensions \(rows, seqlen, nheads, headdim, "
     r"dstate\), got 4"),
    ("inter-shape", True, _replace(_INTER, lambda c: c[_INTER][:, :2]), ValueError,
     r"intermediate_states_buffer must have shape \(rows, seqlen, nheads, headdim, dstate\) = "
     r"\(5, 3, 4, 6, 16\), got \(5, 2, 4, 6, 16\)"),
    ("inter-rows-without-indices", False, _replace(_INTER_INDICES, lambda c: None), ValueError,
     r"intermediate_states_buffer must have shape \(batch, seqlen, dim, dstate\) = "
     r"\(3, 3, 37, 16\), got \(5, 3, 37, 16\)"),
    ("inter-dtype", True, _replace(_INTER, lambda c: c[_INTER].double()), TypeError,
     r"intermediate_states_buffer must have dtype Float \(like state\), got Double"),
    ("inter-overlap", True,
     _replace(_INTER, lambda c: c[_INTER][:, :1].expand(-1, 3, -1, -1, -1)), ValueError,
     "intermediate_states_buffer must not have overlapping memory"),
    ("inter-indices-alone", True, _replace(_INTER, lambda c: None), ValueError,
     "intermediate_state_indices must come with intermediate_states_buffer, got "
     "intermediate_state_indices alone"),
    ("inter-indices-shape", True,
     _replace(_INTER_INDICES, lambda c: torch.arange(4, dtype=torch.int32)), ValueError,
     r"intermediate_state_indices must have shape \(batch,\) = \(3,\), got \(4,\)"),
    ("inter-indices-dtype", True, _replace(_INTER_INDICES, lambda c: torch.arange(3)), TypeError,
     r"intermediate_state_indices must have dtype Int \(row indices\), got Long"),
    ("inter-indices-out-of-range", True,
     _replace(_INTER_INDICES, lambda c: torch.tensor([0, 5, 1], dtype=torch.int32)), ValueError,
     r"intermediate_state_indices must hold rows of intermediate_states_buffer in \[0, 5\), "
     r"got 5 at position 1"),
    ("inter-indices-repeated", True,
     _replace(_INTER_INDICES, lambda c: torch.tensor([4, 0, 4], dtype=torch.int32)), ValueError,
     "intermediate_state_indices must not repeat a row .* got row 4 at positions 0 and 2"),
]


@pytest.mark.parametrize("name, has_heads, change, error, match", BAD_DRAFT_INPUTS,
                         ids=[row[0] for row in BAD_DRAFT_INPUTS])
def test_bad_draft_input(name, has_heads, change, error, match):
    case = make_case("cpu", nheads=4 if has_heads else None, dim=6 if has_heads else 37,
                     seqlen=3)
    case = with_intermediate(case, rows=5)
    with pytest.raises(error, match=f"^selective_state_update: {match}"):
        selective_state_update(**change(case))


@pytest.mark.parametrize("name", ["B", "intermediate_states_buffer"])
def test_bad_device(name):
    """The CPU kernel called with a tensor elsewhere (meta: this machine may have no GPU)."""
    case = with_intermediate(make_case("cpu", nheads=4, dim=6, seqlen=2))
    names = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_batch_indices",
             "dt_softplus", "intermediate_states_buffer", "intermediate_state_indices")
    args = [case.get(k) for k in names] + [False]
    args[names.index(name)] = args[names.index(name)].to("meta")
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match=rf"{name} must be on cpu \(like x\), got meta"):
        OP.redispatch(cpu_only, *args)


def _assert_rel(actual, expected, tol, name):
    actual, expected = actual.cpu().double(), expected.cpu().double()
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


@pytest.mark.cuda
@pytest.mark.parametrize("tune", [None, "32,4", "32,1", "general", "blocks=1"],
                         ids=["heuristic", "lanes32-rows4", "lanes32-rows1", "general",
                              "single-token-blocks1"])
@pytest.mark.parametrize("seqlen", [None, 4], ids=["token", "draft4"])
@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("dstate", [16, 128, 256])
def test_cuda_matches_cpu_kernel(dtype, state_dtype, dstate, seqlen, tune, monkeypatch):
    """The CUDA kernel against the CPU one at a Mamba-2 decode size, Mamba2's broadcast weights;
    drafts with their intermediate states; the launch shapes the tuning knob forces (4 rows a
    thread is what large batches get; "general" puts a single token through the draft-capable
    kernel; "blocks=1" gives the single-token kernel one block per SM, so that each warp goes
    round its ring of staged units several times)."""
    if tune:
        monkeypatch.setenv("MAMBA_EXT_STATE_UPDATE_TUNE", tune)
    case = make_case("cuda", nheads=24, dim=64, dstate=dstate, ngroups=2, batch=5, dtype=dtype,
                     state_dtype=state_dtype, broadcast=True, state_pool=9, seqlen=seqlen)
    if seqlen:
        case = with_intermediate(case, rows=7)
    cpu_case = {k: v.cpu() if torch.is_tensor(v) else v for k, v in case.items()}
    state_cuda, state_cpu = case["state"].clone(), cpu_case["state"].clone()
    extra_cuda, extra_cpu = {}, {}
    if seqlen:
        extra_cuda = {"intermediate_states_buffer": case["intermediate_states_buffer"].clone()}
        extra_cpu = {"intermediate_states_buffer": cpu_case["intermediate_states_buffer"].clone()}
    out_cuda = selective_state_update(**{**case, "state": state_cuda, **extra_cuda})
    out_cpu = selective_state_update(**{**cpu_case, "state": state_cpu, **extra_cpu})
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_rel(out_cuda, out_cpu, tol, "out")
    _assert_rel(state_cuda, state_cpu, tol, "state")
    if seqlen:
        _assert_rel(extra_cuda["intermediate_states_buffer"],
                    extra_cpu["intermediate_states_buffer"], tol, "intermediate_states_buffer")


@pytest.mark.cuda
@pytest.mark.parametrize("nheads, dim, dstate", [(None, 4096, 16), (80, 64, 128)],
                         ids=["mamba1-d4096", "mamba2-h80"])
def test_cuda_large_batch_against_reference(nheads, dim, dstate):
    """The benchmark's shapes at a batch where the heuristic gives 4 rows a thread."""
    case = make_case("cuda", nheads=nheads, dim=dim, dstate=dstate, batch=16,
                     dtype=torch.bfloat16, broadcast=nheads is not None)
    check_against_reference(case)
    draft = with_intermediate(make_case("cuda", nheads=nheads, dim=dim, dstate=dstate, batch=8,
                                        seqlen=3, dtype=torch.bfloat16,
                                        broadcast=nheads is not None))
    check_against_reference(draft)


@pytest.mark.cuda
@pytest.mark.parametrize("tune", [None, "blocks=1"], ids=["heuristic", "blocks1"])
@pytest.mark.parametrize("nheads, dim, dstate", [(None, 4096, 16), (80, 64, 128), (3, 40, 256)],
                         ids=["mamba1-d4096", "mamba2-h80", "mamba2-n256"])
def test_cuda_single_token_disable_state_update(nheads, dim, dstate, tune, monkeypatch):
    """The single-token kernel with disable_state_update: out as with the update, the state
    untouched; state_batch_indices into a larger pool."""
    if tune:
        monkeypatch.setenv("MAMBA_EXT_STATE_UPDATE_TUNE", tune)
    case = make_case("cuda", nheads=nheads, dim=dim, dstate=dstate, batch=12, state_pool=20,
                     dtype=torch.bfloat16, broadcast=nheads is not None)
    updated = check_against_reference(case)
    state = case["state"].clone()
    out = selective_state_update(**{**case, "state": state, "disable_state_update": True})
    assert torch.equal(state, case["state"])
    expected = selective_state_update(**{**case, "state": case["state"].clone()})
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    rows = case["state_batch_indices"].long()
    untouched = torch.ones(20, dtype=torch.bool, device="cuda")
    untouched[rows] = False
    assert torch.equal(updated[untouched], case["state"][untouched])


@pytest.mark.cuda
def test_cuda_padding_slot_skips_the_row():
    """On CUDA an index outside [0, state_batch) cannot be checked without a device sync: the
    row is skipped (state untouched, out = 0), as vLLM's padding slot -1 expects."""
    case = make_case("cuda", nheads=4, dim=6, batch=3, state_pool=5)
    case["state_batch_indices"] = torch.tensor([3, -1, 7], dtype=torch.int32, device="cuda")
    state = case["state"].clone()
    out = selective_state_update(**{**case, "state": state})
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    untouched = torch.ones(5, dtype=torch.bool, device="cuda")
    untouched[3] = False
    assert torch.equal(state[untouched], case["state"][untouched])
    valid = {**case, "x": case["x"][:1], "dt": case["dt"][:1], "B": case["B"][:1],
             "C": case["C"][:1], "z": case["z"][:1], "state_batch_indices": None,
             "state": case["state"][3:4].clone()}
    out_valid = selective_state_update(**valid)
    torch.testing.assert_close(out[:1], out_valid)
    torch.testing.assert_close(state[3:4], valid["state"])


@pytest.mark.cuda
def test_cuda_padding_slots_in_a_draft():
    """A padding slot (-1) in state_batch_indices skips the whole row in a draft; one in
    intermediate_state_indices skips only its intermediate states."""
    case = make_case("cuda", nheads=4, dim=6, batch=3, state_pool=5, seqlen=3)
    case = with_intermediate(case, rows=4)
    case["state_batch_indices"] = torch.tensor([3, -1, 0], dtype=torch.int32, device="cuda")
    case["intermediate_state_indices"] = torch.tensor([2, 0, -1], dtype=torch.int32,
                                                      device="cuda")
    buffer_before = case["intermediate_states_buffer"].clone()
    state = case["state"].clone()
    out = selective_state_update(**{**case, "state": state})
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    buffer = case["intermediate_states_buffer"]
    for row in (0, 1, 3):  # 0: the padding row's slot, 1 and 3: not indexed
        assert torch.equal(buffer[row], buffer_before[row])
    single = {k: v[2:3] if torch.is_tensor(v) and k in ("x", "dt", "z", "B", "C") else v
              for k, v in case.items()}
    single.update(state=case["state"][0:1].clone(), state_batch_indices=None,
                  intermediate_states_buffer=None, intermediate_state_indices=None)
    out_valid = selective_state_update(**single)
    torch.testing.assert_close(out[2:3], out_valid)
    torch.testing.assert_close(state[0:1], single["state"])


@pytest.mark.cuda
def test_cuda_bad_device():
    case = make_case("cuda", nheads=4, dim=6)
    case["B"] = case["B"].cpu()
    with pytest.raises(ValueError, match=r"B must be on cuda:0 \(like x\), got cpu"):
        selective_state_update(**case)


@pytest.mark.cuda
def test_cuda_non_default_stream():
    case = make_case("cuda", nheads=4, dim=64, dstate=128, batch=8)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        state = check_against_reference(case)
    stream.synchronize()
    assert state.is_cuda
