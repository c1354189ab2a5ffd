"""Selective scan kernels against the float64 reference: forward, backward, gradcheck, opcheck,
torch.compile, determinism and one test per argument check."""
import dataclasses

import pytest
import torch

from helpers import DEVICES, assert_close, strided
from mamba_ext.ops import selective_scan_fn
from mamba_ext.reference import selective_scan_ref


def needs_kernel(device):
    if device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "mamba_ext::selective_scan_fwd", "CUDA"):
        pytest.skip("selective_scan has no CUDA kernel yet")


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    dim: int = 5
    seqlen: int = 3
    dstate: int = 16
    B: str = "variable"  # "variable" (batch, ngroups, dstate, seqlen), "variable3d", "constant"
    C: str = "variable"
    ngroups: int = 1
    D: bool = True
    z: bool = True
    delta_bias: bool = True
    initial_state: bool = False
    delta_softplus: bool = True
    strided: bool = False

    def __str__(self):
        fields = [f"b{self.batch}d{self.dim}l{self.seqlen}n{self.dstate}g{self.ngroups}",
                  f"B{self.B[:3]}", f"C{self.C[:3]}"]
        fields += [name for name in ("D", "z", "delta_bias", "initial_state", "delta_softplus",
                                     "strided") if getattr(self, name)]
        return "-".join(fields)


# A pairwise-style cover of the sweep: every seqlen, dim, dstate, form of B and C, group count
# and optional input appears, each with several partners, in few cases.
FORWARD_CASES = [
    Case(seqlen=1, dstate=1),
    Case(seqlen=3, dim=33, B="variable3d", C="constant", D=False, initial_state=True),
    Case(seqlen=129, dim=6, ngroups=2, dstate=64, z=False, delta_softplus=False, strided=True),
    Case(seqlen=1000, dim=4, dstate=16, B="constant", C="variable3d", delta_bias=False),
    Case(seqlen=129, dim=5, dstate=256, B="constant", C="constant", z=False, initial_state=True,
         strided=True),
    Case(seqlen=3, dim=34, ngroups=2, dstate=1, B="constant", D=False, delta_bias=False,
         delta_softplus=False),
    Case(seqlen=1, dim=5, dstate=64, C="constant", strided=True, initial_state=True),
    Case(seqlen=1000, dim=2, ngroups=2, dstate=3, D=False, z=False, delta_bias=False,
         initial_state=True, delta_softplus=False, batch=1),
    Case(seqlen=129, dim=33, dstate=16, B="variable3d", C="variable3d", batch=3),
    Case(seqlen=70, dim=40, ngroups=2, dstate=256, B="variable", C="constant", batch=1,
         initial_state=True, strided=True),
]

BACKWARD_CASES = [
    Case(seqlen=7, dim=3, dstate=4, initial_state=True),
    Case(seqlen=129, dim=33, dstate=16, B="variable3d", C="constant", strided=True),
    Case(seqlen=300, dim=6, ngroups=2, dstate=64, B="constant", C="variable", z=False,
         delta_softplus=False, initial_state=True),
    Case(seqlen=1, dim=5, dstate=1, D=False, delta_bias=False),
    Case(seqlen=40, dim=40, ngroups=2, dstate=256, batch=1, initial_state=True, strided=True),
    Case(seqlen=65, dim=4, dstate=16, B="constant", C="constant", D=False, z=False,
         delta_bias=False, delta_softplus=False),
    # Few channels, long: the CUDA backward's reverse pass runs in 23 segments, the last short.
    Case(batch=1, seqlen=3001, dim=8, dstate=16, initial_state=True),
    # Two segments and a slow decay: dlast_state's share reaches the first segment.
    Case(batch=1, seqlen=260, dim=4, dstate=16, delta_softplus=False, initial_state=True),
]


def make_inputs(case, device="cpu", dtype=torch.float32):
    """The op's tensor arguments as a dict: activations and a variable B / C in dtype, weights in
    float32 (float64 when dtype is float64); absent optional inputs are None."""
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    b, d, l, n, g = case.batch, case.dim, case.seqlen, case.dstate, case.ngroups

    def activation(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype)

    def weight(*shape):
        return torch.randn(*shape, device=device, dtype=weight_dtype)

    def state_input(form):
        if form == "constant":
            return weight(d, n)
        if form == "variable3d":
            return activation(b, n, l)
        return activation(b, g, n, l)

    # delta is the pre-activation of softplus, or a positive step when there is no softplus.
    delta = (activation(b, d, l, scale=0.5, shift=-1.0) if case.delta_softplus
             else (0.02 + 0.3 * torch.rand(b, d, l, device=device)).to(dtype))
    inputs = dict(
        u=activation(b, d, l),
        delta=delta,
        A=-(0.25 + 2 * torch.rand(d, n, device=device, dtype=weight_dtype)),
        B=state_input(case.B),
        C=state_input(case.C),
        D=weight(d) if case.D else None,
        z=activation(b, d, l) if case.z else None,
        delta_bias=(0.1 * torch.rand(d, device=device, dtype=weight_dtype)
                    if case.delta_bias else None),
        initial_state=weight(b, d, n) if case.initial_state else None,
    )
    if case.strided:
        inputs = {k: None if v is None else strided(v, dim=0 if v.dim() == 1 else -1)
                  for k, v in inputs.items()}
        inputs["A"] = strided(inputs["A"].contiguous(), dim=0)
    return inputs


def as_reference(inputs):
    """The same values in float64, for the reference."""
    return {k: None if v is None else v.detach().double() for k, v in inputs.items()}


def run_op(inputs, case):
    return selective_scan_fn(**inputs, delta_softplus=case.delta_softplus, return_last_state=True)


def run_reference(inputs, case):
    return selective_scan_ref(**inputs, delta_softplus=case.delta_softplus,
                              return_last_state=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_forward_matches_reference(case, dtype, device):
    needs_kernel(device)
    inputs = make_inputs(case, device, dtype)
    out, last_state = run_op(inputs, case)
    out_ref, last_ref = run_reference(as_reference(inputs), case)
    assert out.dtype == dtype and out.is_contiguous()
    assert last_state.dtype == inputs["A"].dtype
    assert_close(out, out_ref, dtype, "out")
    # The state never leaves float32, so it is held to the float32 bound.
    assert_close(last_state, last_ref, torch.float32, "last_state")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [7, 8, 9, 31, 32, 33, 65])
def test_forward_at_vector_and_chunk_ends(seqlen, dtype, device):
    # The CUDA forward runs whole vectors of tokens (8 in 16-bit types, 4 in float32) without a
    # mask and the segment's last partial vector with one; chunks are 32 tokens.
    needs_kernel(device)
    case = Case(batch=2, dim=20, dstate=16, seqlen=seqlen, initial_state=True)
    inputs = make_inputs(case, device, dtype)
    out, last_state = run_op(inputs, case)
    out_ref, last_ref = run_reference(as_reference(inputs), case)
    assert_close(out, out_ref, dtype, "out")
    assert_close(last_state, last_ref, torch.float32, "last_state")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dstate", [16, 12])
@pytest.mark.parametrize("tune", ["", "forward_segments=2"])
def test_forward_of_whole_chunks_matches_reference(tune, dstate, dtype, device, monkeypatch):
    # The CUDA forward copies a chunk without bounds when it is in bounds: the 32 tokens inside
    # the segment, every channel of the 64-channel block (dim 128 fills both), every state of the
    # 16-state slice (dstate 12 does not). 100 tokens: 3 whole chunks and 4 tokens, asked in 2
    # segments of 64 and 36 tokens. delta spans softplus's range (a polynomial in exp(-|x|)).
    needs_kernel(device)
    if tune:
        monkeypatch.setenv("MAMBA_EXT_SCAN_TUNE", tune)
    case = Case(batch=2, dim=128, dstate=dstate, seqlen=100, initial_state=True)
    inputs = make_inputs(case, device, dtype)
    inputs["delta"] = (6 * torch.randn(2, 128, 100, device=device) - 2).to(dtype)
    out, last_state = run_op(inputs, case)
    out_ref, last_ref = run_reference(as_reference(inputs), case)
    assert_close(out, out_ref, dtype, "out")
    assert_close(last_state, last_ref, torch.float32, "last_state")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_backward_matches_reference(case, dtype, device):
    check_backward(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen,dstate,z", [(1, 16, True), (15, 16, False), (16, 16, True),
                                             (17, 32, True), (33, 16, False)])
def test_backward_at_chunk_ends(seqlen, dstate, z, dtype, device):
    # The CUDA backward runs chunks of 16 tokens: pass A keeps each token's dt for pass B (0 past
    # the sequence's end), whose gy there is 0 from the zero-filled tiles; dstate 32 takes two
    # slices, whose lanes hand their tokens' sums over in shared memory.
    check_backward(Case(batch=2, dim=20, dstate=dstate, seqlen=seqlen, z=z, initial_state=True),
                   dtype, device)


def check_backward(case, dtype, device):
    """Gradients of every input against the float64 reference's."""
    needs_kernel(device)
    inputs = make_inputs(case, device, dtype)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    ref_leaves = {k: v.requires_grad_() for k, v in as_reference(leaves).items()}
    out, last_state = run_op({**inputs, **leaves}, case)
    # A loss that reaches every input through out and last_state.
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last_state)
    grads = torch.autograd.grad((out.float() * dout.float()).sum() + (last_state * dlast).sum(),
                                list(leaves.values()))
    out_ref, last_ref = run_reference({**as_reference(inputs), **ref_leaves}, case)
    ref_grads = torch.autograd.grad(
        (out_ref * dout.double()).sum() + (last_ref * dlast.double()).sum(),
        list(ref_leaves.values()))
    for name, grad, ref_grad in zip(leaves, grads, ref_grads):
        assert grad.dtype == leaves[name].dtype and grad.shape == leaves[name].shape
        assert_close(grad, ref_grad, dtype if grad.dtype == dtype else torch.float32, f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B_form,C_form", [("variable", "variable"), ("constant", "variable3d"),
                                           ("variable3d", "constant")])
def test_gradcheck(B_form, C_form, device):
    needs_kernel(device)
    case = Case(batch=2, dim=3, dstate=4, seqlen=7, B=B_form, C=C_form, initial_state=True)
    inputs = {k: v.requires_grad_() for k, v in make_inputs(case, device, torch.float64).items()}

    def fn(*args):
        return run_op(dict(zip(inputs, args)), case)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


def test_gradients_of_absent_inputs_are_none():
    case = Case(D=False, z=False, delta_bias=False, initial_state=False)
    inputs = make_inputs(case)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    out = selective_scan_fn(**inputs, delta_softplus=True)
    out.sum().backward()
    assert all(v.grad is not None for v in leaves.values())
    raw = torch.ops.mamba_ext.selective_scan_bwd(
        torch.ones_like(out), None, inputs["u"], inputs["delta"], inputs["A"], inputs["B"],
        inputs["C"], None, None, None, None, None, 0, True)
    assert [t.numel() for t in raw[5:]] == [0, 0, 0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optionals", [False, True])
def test_opcheck(optionals, device):
    needs_kernel(device)
    case = Case(batch=2, dim=3, dstate=4, seqlen=7, D=optionals, z=optionals,
                delta_bias=optionals, initial_state=optionals)
    inputs = make_inputs(case, device)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    grad_args = [None if t is None else t.detach().requires_grad_() for t in args]
    for keep_checkpoints in (False, True):
        torch.library.opcheck(torch.ops.mamba_ext.selective_scan_fwd.default,
                              (*grad_args, None, 0, True, keep_checkpoints))
    checkpoints = torch.ops.mamba_ext.selective_scan_fwd(*args, None, 0, True, True)[2]
    dout = torch.randn(2, 3, 7, device=device)
    dlast = torch.randn(2, 3, 4, device=device) if optionals else None
    for given in (None, checkpoints):
        torch.library.opcheck(torch.ops.mamba_ext.selective_scan_bwd.default,
                              (dout, dlast, *args, None, 0, True, given))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_from_the_forward_checkpoints_matches_its_own(device):
    # The forward keeps the checkpoints on CUDA (empty on the CPU, which needs none); the
    # backward given them skips its checkpoint pass and gives the same gradients, bit for bit
    # in deterministic mode.
    needs_kernel(device)
    case = Case(batch=2, dim=40, dstate=16, seqlen=301, initial_state=True)
    inputs = make_inputs(case, device)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    out, last, checkpoints = torch.ops.mamba_ext.selective_scan_fwd(*args, None, 0, True, True)
    plain_out, plain_last, none = torch.ops.mamba_ext.selective_scan_fwd(*args, None, 0, True)
    assert torch.equal(out, plain_out) and torch.equal(last, plain_last)
    assert none.numel() == 0
    expected = (2, 40, 19, 16) if device == "cuda" else (0,)
    assert tuple(checkpoints.shape) == expected and checkpoints.dtype == torch.float32
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        own = torch.ops.mamba_ext.selective_scan_bwd(dout, dlast, *args, None, 0, True)
        given = torch.ops.mamba_ext.selective_scan_bwd(dout, dlast, *args, None, 0, True,
                                                       checkpoints)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(own, given):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_keep_checkpoints_false_gives_the_same_gradients(device):
    # keep_checkpoints=False only moves the checkpoint pass from the forward into the backward.
    needs_kernel(device)
    case = Case(batch=2, dim=24, dstate=16, seqlen=77, initial_state=True)
    inputs = make_inputs(case, device)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    dout = None
    grads = []
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for keep in (True, False):
            out = selective_scan_fn(**leaves, delta_softplus=True, keep_checkpoints=keep)
            dout = torch.randn_like(out) if dout is None else dout
            grads.append(torch.autograd.grad(out, list(leaves.values()), dout))
    finally:
        torch.use_deterministic_algorithms(was)
    for kept, recomputed in zip(*grads):
        assert torch.equal(kept, recomputed)


@pytest.mark.cuda
def test_cuda_backward_rejects_checkpoints_of_another_shape():
    needs_kernel("cuda")
    case = Case(batch=2, dim=4, dstate=16, seqlen=40)
    inputs = make_inputs(case, "cuda")
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    checkpoints = torch.ops.mamba_ext.selective_scan_fwd(*args, None, 0, True, True)[2]
    dout = torch.randn(2, 4, 40, device="cuda")
    for bad in (checkpoints[:, :, :2], checkpoints.double(), checkpoints.transpose(0, 1)):
        with pytest.raises(RuntimeError, match="selective_scan_bwd: checkpoints must be"):
            torch.ops.mamba_ext.selective_scan_bwd(dout, None, *args, None, 0, True, bad)


def assert_compiled_matches_eager(loss_fn, inputs):
    """loss_fn(**inputs) and its gradients, through torch.compile(fullgraph=True) and eagerly."""
    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_grads = torch.autograd.grad(loss_fn(**inputs), list(inputs.values()))
    compiled_loss = compiled(**inputs)
    torch.testing.assert_close(compiled_loss, loss_fn(**inputs))
    compiled_grads = torch.autograd.grad(compiled_loss, list(inputs.values()))
    for eager, comp in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_matches_eager(device):
    needs_kernel(device)
    case = Case(batch=2, dim=6, dstate=8, seqlen=33, ngroups=2, initial_state=True)
    inputs = {k: v.requires_grad_() for k, v in make_inputs(case, device).items()}

    def scan_loss(**kwargs):
        out, last_state = selective_scan_fn(**kwargs, delta_softplus=True, return_last_state=True)
        return (out * out).sum() + last_state.sum()

    assert_compiled_matches_eager(scan_loss, inputs)


def assert_backward_does_not_depend_on_thread_count(*args):
    """selective_scan_bwd(*args) gives the same bits on one thread and on several."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.mamba_ext.selective_scan_bwd(*args)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.mamba_ext.selective_scan_bwd(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_backward_does_not_depend_on_thread_count():
    # Several blocks per group, so dB and dC are reduced over blocks.
    case = Case(batch=2, dim=80, dstate=16, seqlen=300, C="variable3d", B="variable3d",
                initial_state=True)
    inputs = make_inputs(case)
    dout = torch.randn(2, 80, 300)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    assert_backward_does_not_depend_on_thread_count(dout, None, *args, None, 0, True)


def test_long_sequence_matches_chained_halves():
    # Beyond 128 chunks of 64 steps the backward lengthens its chunks to bound its checkpoints;
    # each half stays below that and is chained to the other through the state.
    case = Case(batch=1, dim=3, dstate=4, seqlen=9000, initial_state=True)
    inputs = make_inputs(case)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    dout = torch.randn(1, 3, case.seqlen)

    def grads(out, last_state):
        return torch.autograd.grad((out * dout).sum() + last_state.sum(), list(leaves.values()))

    full = grads(*run_op(inputs, case))
    half = case.seqlen // 2
    halves = (slice(None, half), slice(half, None))
    first, second = ({k: v[..., part] if k in ("u", "delta", "z", "B", "C") else v
                      for k, v in inputs.items()} for part in halves)
    out_first, state = run_op(first, case)
    out_second, last_state = run_op(dict(second, initial_state=state), case)
    chained = grads(torch.cat([out_first, out_second], dim=-1), last_state)
    for name, grad, chained_grad in zip(leaves, full, chained):
        assert_close(grad, chained_grad, torch.float32, f"d{name}")


def test_inputs_broadcast_over_time():
    # Stride 0 along seqlen, as expand() makes them and autograd passes the gradient of a sum.
    case = Case(batch=2, dim=9, dstate=8, seqlen=70, initial_state=True)
    inputs = make_inputs(case)
    inputs["delta"] = inputs["delta"][..., :1].expand(-1, -1, case.seqlen)
    inputs["z"] = inputs["z"][..., :1].expand(-1, -1, case.seqlen)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    out, last_state = run_op(leaves, case)
    grads = torch.autograd.grad(out.sum() + last_state.sum(), list(leaves.values()))
    ref_leaves = {k: v.requires_grad_() for k, v in as_reference(leaves).items()}
    out_ref, last_ref = run_reference(ref_leaves, case)
    ref_grads = torch.autograd.grad(out_ref.sum() + last_ref.sum(), list(ref_leaves.values()))
    assert_close(out, out_ref, torch.float32, "out")
    for name, grad, ref_grad in zip(leaves, grads, ref_grads):
        assert_close(grad, ref_grad, torch.float32, f"d{name}")


@pytest.mark.parametrize("batch,seqlen", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence(batch, seqlen):
    case = Case(batch=batch, seqlen=seqlen, initial_state=True)
    inputs = {k: v.requires_grad_() for k, v in make_inputs(case).items()}
    out, last_state = run_op(inputs, case)
    assert out.shape == (batch, 5, seqlen) and last_state.shape == (batch, 5, 16)
    torch.testing.assert_close(last_state, inputs["initial_state"].detach() if seqlen == 0
                               else last_state)
    (out.sum() + last_state.sum()).backward()
    assert inputs["A"].grad.abs().sum() == 0 and inputs["u"].grad.shape == (batch, 5, seqlen)


# --- argument checks: each raises naming the op, the argument, the expectation and the value.

BAD_INPUTS = [
    # (argument, replacement given the good inputs, exception, message)
    ("u", lambda i: i["u"][0], ValueError, r"u must have 3 dimensions \(batch, dim, seqlen\)"),
    ("u", lambda i: i["u"].to(torch.int32), TypeError, r"u must have dtype in"),
    ("delta", lambda i: i["delta"][:, :, :2], ValueError,
     r"delta must have shape \(batch, dim, seqlen\) = \(2, 5, 3\), got \(2, 5, 2\)"),
    ("delta", lambda i: i["delta"].double(), TypeError, r"delta must have dtype Float"),
    ("z", lambda i: i["z"][:1], ValueError, r"z must have shape \(batch, dim, seqlen\)"),
    ("z", lambda i: i["z"].half(), TypeError, r"z must have dtype Float"),
    ("A", lambda i: i["A"][0], ValueError, r"A must have 2 dimensions \(dim, dstate\)"),
    ("A", lambda i: torch.zeros(5, 257), ValueError,
     r"A must have dstate \(its size 1\) between 1 and 256, got 257"),
    ("A", lambda i: i["A"][:4], ValueError,
     r"A must have shape \(dim, dstate\) = \(5, 16\), got \(4, 16\)"),
    ("A", lambda i: i["A"].double(), TypeError, r"A must have dtype Float"),
    ("B", lambda i: i["B"][0, 0, 0], ValueError, r"B must have 2 dimensions \(dim, dstate\), 3"),
    ("B", lambda i: torch.randn(4, 16), ValueError,
     r"B must have shape \(dim, dstate\) = \(5, 16\), got \(4, 16\)"),
    ("B", lambda i: torch.randn(5, 16, dtype=torch.float64), TypeError,
     r"B must have dtype Float \(a constant B or C is a weight"),
    ("B", lambda i: i["B"][:, 0, :, :2], ValueError,
     r"B must have shape \(batch, dstate, seqlen\) = \(2, 16, 3\), got \(2, 16, 2\)"),
    ("B", lambda i: i["B"].double(), TypeError,
     r"B must have dtype Float \(a variable B or C is an activation"),
    ("B", lambda i: torch.randn(2, 2, 16, 3), ValueError,
     r"B must have a number of groups \(its size 1\) that divides dim = 5, got 2"),
    ("B", lambda i: i["B"][:1], ValueError,
     r"B must have shape \(batch, ngroups, dstate, seqlen\) = \(2, 1, 16, 3\), "
     r"got \(1, 1, 16, 3\)"),
    ("C", lambda i: i["C"][:, :, :8], ValueError,
     r"C must have shape \(batch, ngroups, dstate, seqlen\)"),
    ("D", lambda i: i["D"][:4], ValueError, r"D must have shape \(dim,\) = \(5,\), got \(4,\)"),
    ("D", lambda i: i["D"].half(), TypeError, r"D must have dtype Float"),
    ("delta_bias", lambda i: i["delta_bias"][None], ValueError, r"delta_bias must have shape"),
    ("delta_bias", lambda i: i["delta_bias"].double(), TypeError, r"delta_bias must have dtype"),
    ("initial_state", lambda i: i["initial_state"][:, :, :8], ValueError,
     r"initial_state must have shape \(batch, dim, dstate\) = \(2, 5, 16\), got \(2, 5, 8\)"),
    ("initial_state", lambda i: i["initial_state"].double(), TypeError,
     r"initial_state must have dtype Float"),
]


def _good_inputs(device="cpu"):
    return make_inputs(Case(initial_state=True), device)


@pytest.mark.parametrize("op", ["selective_scan_fwd", "selective_scan_bwd"])
@pytest.mark.parametrize("name,replace,error,message", BAD_INPUTS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused(name, replace, error, message, op):
    inputs = _good_inputs()
    inputs[name] = replace(inputs)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    with pytest.raises(error, match=f"{op}: {message}"):
        if op == "selective_scan_fwd":
            torch.ops.mamba_ext.selective_scan_fwd(*args, None, 0, True)
        else:
            dout = torch.zeros(2, 5, 3)
            torch.ops.mamba_ext.selective_scan_bwd(dout, None, *args, None, 0, True)


def test_mismatched_groups_of_B_and_C_are_refused():
    inputs = make_inputs(Case(dim=6, ngroups=2, C="variable3d"))
    with pytest.raises(ValueError, match=r"selective_scan_fwd: C must have as many groups as B, 2"):
        selective_scan_fn(**inputs)


@pytest.mark.parametrize("name,value,error,message", [
    ("dout", torch.zeros(2, 5, 4), ValueError,
     r"dout must have shape \(batch, dim, seqlen\) = \(2, 5, 3\), got \(2, 5, 4\)"),
    ("dout", torch.zeros(2, 5, 3, dtype=torch.bfloat16), TypeError, r"dout must have dtype Float"),
    ("dlast_state", torch.zeros(2, 5, 15), ValueError,
     r"dlast_state must have shape \(batch, dim, dstate\) = \(2, 5, 16\), got \(2, 5, 15\)"),
    ("dlast_state", torch.zeros(2, 5, 16, dtype=torch.float64), TypeError,
     r"dlast_state must have dtype Float"),
])
def test_bad_gradient_is_refused(name, value, error, message):
    inputs = _good_inputs()
    grads = {"dout": torch.zeros(2, 5, 3), "dlast_state": torch.zeros(2, 5, 16), name: value}
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    with pytest.raises(error, match=f"selective_scan_bwd: {message}"):
        torch.ops.mamba_ext.selective_scan_bwd(grads["dout"], grads["dlast_state"], *args, None, 0,
                                               True)


@pytest.mark.cuda
def test_inputs_on_another_device_are_refused():
    needs_kernel("cuda")
    inputs = _good_inputs("cuda")
    inputs["delta"] = inputs["delta"].cpu()
    with pytest.raises(ValueError, match=r"selective_scan_fwd: delta must be on cuda"):
        selective_scan_fn(**inputs)


# CUDA: several channel blocks and groups, both thread layouts of the forward (4 and 16 states a
# thread), and the backward's state slices within one block and across blocks (dstate > 32).
CUDA_AGREEMENT_CASES = [
    Case(batch=2, dim=200, ngroups=2, dstate=16, seqlen=300, initial_state=True),
    Case(batch=1, dim=70, dstate=64, seqlen=100, B="constant", C="variable3d", z=False),
    Case(batch=2, dim=40, dstate=256, seqlen=77, B="variable3d", C="constant",
         initial_state=True, strided=True),
    Case(batch=3, dim=33, dstate=5, seqlen=33, delta_softplus=False, D=False),
]


def _scan_grads(inputs, case, dout, dlast):
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    out, last_state = run_op({**inputs, **leaves}, case)
    grads = torch.autograd.grad((out * dout).sum() + (last_state * dlast).sum(),
                                list(leaves.values()))
    return out, last_state, dict(zip(leaves, grads))


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_AGREEMENT_CASES, ids=str)
def test_cuda_matches_cpu_kernel(case):
    needs_kernel("cuda")
    inputs = make_inputs(case, "cuda")
    dout = torch.randn(case.batch, case.dim, case.seqlen, device="cuda")
    dlast = torch.randn(case.batch, case.dim, case.dstate, device="cuda")
    out, last, grads = _scan_grads(inputs, case, dout, dlast)
    cpu_inputs = {k: None if v is None else v.cpu() for k, v in inputs.items()}
    out_cpu, last_cpu, grads_cpu = _scan_grads(cpu_inputs, case, dout.cpu(), dlast.cpu())
    assert_close(out.cpu(), out_cpu.double(), torch.float32, "out")
    assert_close(last.cpu(), last_cpu.double(), torch.float32, "last_state")
    for name in grads:
        assert_close(grads[name].cpu(), grads_cpu[name].double(), torch.float32, f"d{name}")


@pytest.mark.cuda
def test_cuda_backward_is_deterministic_when_asked():
    needs_kernel("cuda")
    case = Case(batch=2, dim=300, ngroups=3, dstate=16, seqlen=500, B="variable",
                C="variable", initial_state=True)
    inputs = make_inputs(case, "cuda")
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    dout = torch.randn(2, 300, 500, device="cuda")
    dlast = torch.randn(2, 300, 16, device="cuda")
    fast = torch.ops.mamba_ext.selective_scan_bwd(dout, dlast, *args, None, 0, True)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = torch.ops.mamba_ext.selective_scan_bwd(dout, dlast, *args, None, 0, True)
        second = torch.ops.mamba_ext.selective_scan_bwd(dout, dlast, *args, None, 0, True)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b, c in zip(first, second, fast):
        assert torch.equal(a, b)
        if a.numel():
            assert_close(c, a.double(), torch.float32)


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    needs_kernel("cuda")
    case = Case(batch=2, dim=64, dstate=16, seqlen=200)
    inputs = make_inputs(case, "cuda")
    expected, _ = run_op(inputs, case)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, _ = run_op(inputs, case)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.cuda
def test_cuda_more_than_2_31_elements(monkeypatch):
    """u, delta, out and their gradients hold more than 2^31 elements: offsets must be 64-bit
    (mamba-ssm's int32 offsets corrupt gradients there). The last channels must match a run of
    those channels alone."""
    needs_kernel("cuda")
    # Both forwards in the same segments (the heuristic would cut the 3-channel run finer), so
    # that a channel's arithmetic, and so its output, is the same bit for bit.
    monkeypatch.setenv("MAMBA_EXT_SCAN_TUNE", "forward_segments=16")
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs a GPU with 60 GiB")
    batch, dim, seqlen, dstate = 1, 4160, 2**19, 16
    assert batch * dim * seqlen > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=gen, dtype=dtype)

    u, delta = randn(batch, dim, seqlen), randn(batch, dim, seqlen) * 0.5 - 1
    A = -(0.25 + torch.rand(dim, dstate, device="cuda", generator=gen))
    B, C = randn(batch, dstate, seqlen), randn(batch, dstate, seqlen)
    D, delta_bias = randn(dim, dtype=torch.float32), randn(dim, dtype=torch.float32) * 0.1
    dout = randn(batch, dim, seqlen)
    tail = slice(dim - 3, dim)
    full = [u, delta, A, B, C, D, None, delta_bias, None]
    part = [u[:, tail].contiguous(), delta[:, tail].contiguous(), A[tail], B, C, D[tail], None,
            delta_bias[tail], None]
    out, last, _ = torch.ops.mamba_ext.selective_scan_fwd(*full, None, 0, True)
    out_part, last_part, _ = torch.ops.mamba_ext.selective_scan_fwd(*part, None, 0, True)
    torch.testing.assert_close(out[:, tail], out_part, rtol=0, atol=0)
    torch.testing.assert_close(last[:, tail], last_part, rtol=0, atol=0)
    del out
    grads = torch.ops.mamba_ext.selective_scan_bwd(dout, None, *full, None, 0, True)
    # du, ddelta, dA, dD, ddelta_bias of a channel depend on that channel only: the tail's
    # against the CPU kernel in float64 on those channels (the two runs cut the reverse pass
    # into different segments, so they need not agree bit for bit).
    as_double = [None if t is None else t.double().cpu() for t in part]
    grads_ref = torch.ops.mamba_ext.selective_scan_bwd(dout[:, tail].double().cpu(), None,
                                                       *as_double, None, 0, True)
    for index, name in ((0, "du"), (1, "ddelta")):
        assert_close(grads[index][:, tail].cpu(), grads_ref[index], torch.bfloat16, name)
    for index, name in ((2, "dA"), (5, "dD"), (7, "ddelta_bias")):
        assert_close(grads[index][tail].cpu(), grads_ref[index], torch.float32, name)


# --- packed variable-length batches: seq_idx (per-row states) and num_sequences / cu_seqlens
# (per-sequence states).

def make_seq_idx(batch, seqlen, per_sequence, padding, device="cpu"):
    """seq_idx (batch, seqlen) int32 of random runs (some of a single token, some crossing the
    CPU kernels' chunks) and its num_sequences. Per row the ids increase from 0 (per-row mode);
    in per-sequence mode every run has its own id, shuffled, with two ids left absent. With
    padding, runs of -1 appear, among them at the first token of row 0 and the last of the last
    row."""
    rows, runs = [], 0
    for b in range(batch):
        row = []
        while len(row) < seqlen:
            length = int(torch.randint(1, max(2, seqlen // 3) + 1, ()))
            first_of_all, last_of_all = b == 0 and not row, b == batch - 1
            pad = padding and (first_of_all or bool(torch.rand(()) < 0.25)
                               or (last_of_all and len(row) + length >= seqlen))
            if pad:
                row += [-1] * length
            else:
                row += [runs] * length
                runs += 1
        rows.append(row[:seqlen])
    ids = torch.tensor(rows, dtype=torch.int64).reshape(batch, seqlen)
    num_sequences = 0
    if per_sequence:
        num_sequences = runs + 2
        shuffle = torch.randperm(num_sequences)
        ids = torch.where(ids >= 0, shuffle[ids.clamp(min=0)], ids)
    else:
        # Per row from 0: the first real run of each row is 0, then 1, ...
        first = torch.tensor([min([i for i in r if i >= 0], default=0) for r in rows])
        ids = torch.where(ids >= 0, ids - first[:, None], ids)
    return ids.to(device=device, dtype=torch.int32), num_sequences


def make_varlen_inputs(case, per_sequence, padding, device="cpu", dtype=torch.float32):
    """make_inputs plus seq_idx and num_sequences; initial_state is (num_sequences, dim, dstate)
    in per-sequence mode. A strided case has a seq_idx with stride 2 over seqlen too."""
    inputs = make_inputs(case, device, dtype)
    seq_idx, num_sequences = make_seq_idx(case.batch, case.seqlen, per_sequence, padding, device)
    if case.strided:
        wide = torch.full((case.batch, 2 * case.seqlen), 12345, dtype=torch.int32, device=device)
        wide[:, ::2] = seq_idx
        seq_idx = wide[:, ::2]
    if per_sequence and case.initial_state:
        weight_dtype = inputs["A"].dtype
        state = torch.randn(num_sequences, case.dim, case.dstate, device=device,
                            dtype=weight_dtype)
        inputs["initial_state"] = strided(state) if case.strided else state
    return inputs, seq_idx, num_sequences


def run_varlen_op(inputs, case, seq_idx, num_sequences):
    """(out, last_state) of the op itself: selective_scan_fn reaches per-sequence mode through
    cu_seqlens only, with batch 1."""
    args = [inputs.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                    "initial_state")]
    return torch.ops.mamba_ext.selective_scan_fwd(*args, seq_idx, num_sequences,
                                                  case.delta_softplus)[:2]


def run_varlen_reference(inputs, case, seq_idx, num_sequences):
    return selective_scan_ref(**inputs, delta_softplus=case.delta_softplus,
                              return_last_state=True, seq_idx=seq_idx,
                              num_sequences=num_sequences)


VARLEN_CASES = [
    Case(batch=2, seqlen=9, dim=5, dstate=4, initial_state=True),
    Case(batch=3, seqlen=300, dim=33, dstate=16, B="variable3d", C="constant", strided=True,
         initial_state=True),
    Case(batch=2, seqlen=129, dim=6, ngroups=2, dstate=64, B="constant", C="variable", z=False,
         delta_softplus=False),
    # Long runs over few channels: the CUDA backward's reverse pass in 7 segments, sequences
    # crossing several.
    Case(batch=1, seqlen=1000, dim=4, dstate=16, initial_state=True, D=False),
]
VARLEN_MODES = [pytest.param(False, id="per_row"), pytest.param(True, id="per_sequence")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", [False, True], ids=["no_padding", "padding"])
@pytest.mark.parametrize("per_sequence", VARLEN_MODES)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_varlen_forward_matches_reference(case, per_sequence, padding, dtype, device):
    needs_kernel(device)
    inputs, seq_idx, num_sequences = make_varlen_inputs(case, per_sequence, padding, device,
                                                        dtype)
    out, last_state = run_varlen_op(inputs, case, seq_idx, num_sequences)
    out_ref, last_ref = run_varlen_reference(as_reference(inputs), case, seq_idx, num_sequences)
    assert out.dtype == dtype
    assert last_state.shape == (num_sequences or case.batch, case.dim, case.dstate)
    assert_close(out, out_ref, dtype, "out")
    assert_close(last_state, last_ref, torch.float32, "last_state")
    assert (out[(seq_idx == -1)[:, None, :].expand_as(out)] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", [False, True], ids=["no_padding", "padding"])
@pytest.mark.parametrize("per_sequence", VARLEN_MODES)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_varlen_backward_matches_reference(case, per_sequence, padding, dtype, device):
    check_varlen_backward(case, per_sequence, padding, dtype, device)


def check_varlen_backward(case, per_sequence, padding, dtype, device):
    """Gradients of every input of a packed batch against the float64 reference's."""
    needs_kernel(device)
    inputs, seq_idx, num_sequences = make_varlen_inputs(case, per_sequence, padding, device,
                                                        dtype)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    ref_leaves = {k: v.requires_grad_() for k, v in as_reference(leaves).items()}
    out, last_state = run_varlen_op({**inputs, **leaves}, case, seq_idx, num_sequences)
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last_state)
    grads = torch.autograd.grad((out.float() * dout.float()).sum() + (last_state * dlast).sum(),
                                list(leaves.values()))
    out_ref, last_ref = run_varlen_reference({**as_reference(inputs), **ref_leaves}, case,
                                             seq_idx, num_sequences)
    # initial_state is unused when every row starts with padding.
    ref_grads = torch.autograd.grad(
        (out_ref * dout.double()).sum() + (last_ref * dlast.double()).sum(),
        list(ref_leaves.values()), allow_unused=True, materialize_grads=True)
    for name, grad, ref_grad in zip(leaves, grads, ref_grads):
        assert grad.dtype == leaves[name].dtype and grad.shape == leaves[name].shape
        assert_close(grad, ref_grad, dtype if grad.dtype == dtype else torch.float32, f"d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize("tune", ["reverse_segments=1", "reverse_segments=3", "reverse_segments=40",
                                  "forward_segments=5,reverse_segments=2"])
@pytest.mark.parametrize("packing", ["none", "per_row", "per_sequence"])
def test_cuda_backward_in_asked_segments_matches_reference(packing, tune, monkeypatch):
    # MAMBA_EXT_SCAN_TUNE asks the passes for K segments (the heuristic takes 2 in each here):
    # 1 runs none, 40 reverse segments give 21 of one 16-token chunk, the last of 13 tokens; 5
    # forward segments (the backward's checkpoint pass too) give 4 of three 32-token chunks.
    monkeypatch.setenv("MAMBA_EXT_SCAN_TUNE", tune)
    case = Case(batch=2, dim=70, dstate=16, seqlen=333, initial_state=True)
    if packing == "none":
        check_backward(case, torch.float32, "cuda")
    else:
        check_varlen_backward(case, packing == "per_sequence", True, torch.float32, "cuda")


# Few channels and a long sequence: the CUDA forward cuts the sequence into segments run in two
# passes (selective_scan.h, segment_len), so states must cross segment boundaries, or restart
# inside a segment (packed batches). The CPU kernel runs them whole.
LENGTH_PARALLEL_CASES = [
    Case(batch=1, dim=8, dstate=16, seqlen=3001, initial_state=True),
    Case(batch=2, dim=20, ngroups=2, dstate=40, seqlen=2048, B="constant", C="variable3d",
         initial_state=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packing", ["none", "per_row", "per_sequence"])
@pytest.mark.parametrize("case", LENGTH_PARALLEL_CASES, ids=str)
def test_long_sequences_of_few_channels_match_reference(case, packing, device):
    needs_kernel(device)
    if packing == "none":
        inputs, seq_idx, num_sequences = make_inputs(case, device), None, 0
    else:
        inputs, seq_idx, num_sequences = make_varlen_inputs(case, packing == "per_sequence",
                                                            True, device)
    out, last_state = run_varlen_op(inputs, case, seq_idx, num_sequences)
    out_ref, last_ref = run_varlen_reference(as_reference(inputs), case, seq_idx, num_sequences)
    assert_close(out, out_ref, torch.float32, "out")
    assert_close(last_state, last_ref, torch.float32, "last_state")


def _time_slice(inputs, begin, end):
    """The inputs of tokens [begin, end) of a batch-1 packed input."""
    return {k: v[..., begin:end] if k in ("u", "delta", "z") or
            (k in ("B", "C") and v is not None and v.dim() > 2) else v
            for k, v in inputs.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("initial_state", [False, True])
def test_packed_matches_separate_sequences(initial_state, device):
    # cu_seqlens with an empty sequence and padding after the last: each sequence alone, from
    # its initial state, gives the same out, last state and gradients.
    needs_kernel(device)
    lengths = [37, 1, 0, 150, 64]
    case = Case(batch=1, seqlen=sum(lengths) + 5, dim=9, dstate=16, initial_state=False)
    inputs = make_inputs(case, device)
    if initial_state:
        inputs["initial_state"] = torch.randn(len(lengths), 9, 16, device=device)
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    out, last_state = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True,
                                        cu_seqlens=cu_seqlens)
    dout, dlast = torch.randn_like(out), torch.randn_like(last_state)
    grads = torch.autograd.grad((out * dout).sum() + (last_state * dlast).sum(),
                                list(leaves.values()))

    outs, lasts = [], []
    for s, (begin, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        part = _time_slice(leaves, begin, end)
        part["initial_state"] = leaves["initial_state"][s:s + 1] if initial_state else None
        out_s, last_s = selective_scan_fn(**part, delta_softplus=True, return_last_state=True)
        outs.append(out_s)
        lasts.append(last_s)
    padding = torch.zeros_like(out[..., cu_seqlens[-1]:])
    separate_out = torch.cat(outs + [padding], dim=-1)
    separate_last = torch.cat(lasts)
    separate_grads = torch.autograd.grad(
        (separate_out * dout).sum() + (separate_last * dlast).sum(), list(leaves.values()))
    assert_close(out, separate_out, torch.float32, "out")
    assert_close(last_state, separate_last, torch.float32, "last_state")
    for name, grad, separate in zip(leaves, grads, separate_grads):
        assert_close(grad, separate, torch.float32, f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_padding_tokens_have_no_effect(device):
    # Per-row mode: row 0 starts with padding (initial_state[0] is unused), row 1 ends with it
    # (its last state is 0); what the padding tokens hold changes nothing, and they get no
    # gradient.
    needs_kernel(device)
    case = Case(batch=2, seqlen=40, dim=6, dstate=8, initial_state=True)
    inputs = make_inputs(case, device)
    seq_idx = torch.zeros(2, 40, dtype=torch.int32, device=device)
    seq_idx[0, :7] = -1
    seq_idx[0, 20:] = 1
    seq_idx[1, 25:] = -1
    padding = (seq_idx == -1)[:, None, :]                              # (batch, 1, seqlen)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    out, last_state = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True,
                                        seq_idx=seq_idx)
    grads = dict(zip(leaves, torch.autograd.grad(out.sum() + last_state.sum(),
                                                 list(leaves.values()))))
    assert (out.masked_select(padding) == 0).all()
    assert (last_state[1] == 0).all()
    assert (grads["initial_state"][0] == 0).all() and (grads["initial_state"][1] != 0).any()
    for name in ("u", "delta", "z"):
        assert (grads[name].masked_select(padding) == 0).all(), name
    for name in ("B", "C"):                                            # (batch, 1, dstate, seqlen)
        assert (grads[name].masked_select(padding[:, :, None]) == 0).all(), name

    noisy = dict(inputs)
    for name in ("u", "delta", "z"):
        noisy[name] = torch.where(padding, 100 * torch.randn_like(inputs[name]), inputs[name])
    for name in ("B", "C"):
        noisy[name] = torch.where(padding[:, :, None], 100 * torch.randn_like(inputs[name]),
                                  inputs[name])
    out_noisy, last_noisy = selective_scan_fn(**noisy, delta_softplus=True,
                                              return_last_state=True, seq_idx=seq_idx)
    torch.testing.assert_close(out_noisy, out, rtol=0, atol=0)
    torch.testing.assert_close(last_noisy, last_state, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("initial_state", [False, True])
def test_per_sequence_states_of_absent_sequences(initial_state, device):
    # Sequences 1 and 3 have no tokens: their last state is their initial state (or 0) and
    # their initial state's gradient is their last state's.
    needs_kernel(device)
    case = Case(batch=2, seqlen=10, dim=5, dstate=4)
    inputs = make_inputs(case, device)
    inputs["initial_state"] = (torch.randn(5, 5, 4, device=device).requires_grad_()
                               if initial_state else None)
    seq_idx = torch.tensor([[0, 0, 0, 0, -1, 4, 4, 4, 4, 4], [2] * 10], dtype=torch.int32,
                           device=device)
    out, last_state = run_varlen_op(inputs, case, seq_idx, 5)
    out_ref, last_ref = run_varlen_reference(as_reference(inputs), case, seq_idx, 5)
    assert_close(out, out_ref, torch.float32)
    assert_close(last_state, last_ref, torch.float32)
    for s in (1, 3):
        expected = inputs["initial_state"][s] if initial_state else torch.zeros(5, 4)
        torch.testing.assert_close(last_state[s], expected.to(device), rtol=0, atol=0)
    if initial_state:
        dlast = torch.randn_like(last_state)
        (dinitial,) = torch.autograd.grad((last_state * dlast).sum(), [inputs["initial_state"]])
        for s in (1, 3):
            torch.testing.assert_close(dinitial[s], dlast[s], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_mode_takes_any_ids(device):
    # Per-row mode: ids need not lie in a range, and an id may come back in a later run (a new
    # sequence, since the state restarts wherever seq_idx changes).
    needs_kernel(device)
    case = Case(batch=2, seqlen=12, dim=5, dstate=4, initial_state=True)
    inputs = make_inputs(case, device)
    seq_idx = torch.tensor([[7, 7, -5, -5, -5, 7, 7, 7, 2**31 - 1, 2**31 - 1, -1, 7],
                            [-(2**31)] * 6 + [3] * 6], dtype=torch.int32, device=device)
    out, last_state = run_varlen_op(inputs, case, seq_idx, 0)
    out_ref, last_ref = run_varlen_reference(as_reference(inputs), case, seq_idx, 0)
    assert_close(out, out_ref, torch.float32)
    assert_close(last_state, last_ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sequence", VARLEN_MODES)
def test_varlen_gradcheck(per_sequence, device):
    needs_kernel(device)
    case = Case(batch=2, dim=3, dstate=4, seqlen=11, C="variable3d", initial_state=True)
    inputs, seq_idx, num_sequences = make_varlen_inputs(case, per_sequence, True, device,
                                                        torch.float64)
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}

    def fn(*args):
        return run_varlen_op(dict(zip(inputs, args)), case, seq_idx, num_sequences)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sequence", VARLEN_MODES)
def test_varlen_opcheck(per_sequence, device):
    needs_kernel(device)
    case = Case(batch=2, dim=3, dstate=4, seqlen=11, initial_state=True)
    inputs, seq_idx, num_sequences = make_varlen_inputs(case, per_sequence, True, device)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    grad_args = [t.detach().requires_grad_() for t in args]
    torch.library.opcheck(torch.ops.mamba_ext.selective_scan_fwd.default,
                          (*grad_args, seq_idx, num_sequences, True))
    dout = torch.randn(2, 3, 11, device=device)
    dlast = torch.randn_like(inputs["initial_state"])
    torch.library.opcheck(torch.ops.mamba_ext.selective_scan_bwd.default,
                          (dout, dlast, *args, seq_idx, num_sequences, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packing", ["seq_idx", "cu_seqlens"])
def test_varlen_torch_compile_matches_eager(packing, device):
    needs_kernel(device)
    case = Case(batch=1 if packing == "cu_seqlens" else 2, dim=6, dstate=8, seqlen=33,
                ngroups=2)
    inputs = {k: v.requires_grad_() for k, v in make_inputs(case, device).items()
              if v is not None}
    if packing == "cu_seqlens":
        packed = dict(cu_seqlens=torch.tensor([0, 5, 5, 20, 30], dtype=torch.int32,
                                              device=device))
        inputs["initial_state"] = torch.randn(4, 6, 8, device=device, requires_grad=True)
    else:
        packed = dict(seq_idx=make_seq_idx(2, 33, False, True, device)[0])
        inputs["initial_state"] = torch.randn(2, 6, 8, device=device, requires_grad=True)

    def scan_loss(**kwargs):
        out, last_state = selective_scan_fn(**kwargs, **packed, delta_softplus=True,
                                            return_last_state=True)
        return (out * out).sum() + (last_state * last_state).sum()

    assert_compiled_matches_eager(scan_loss, inputs)


def test_varlen_backward_does_not_depend_on_thread_count():
    case = Case(batch=2, dim=80, dstate=16, seqlen=300, C="variable3d", B="variable3d",
                initial_state=True)
    inputs, seq_idx, num_sequences = make_varlen_inputs(case, True, True)
    dout = torch.randn(2, 80, 300)
    dlast = torch.randn_like(inputs["initial_state"])
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    assert_backward_does_not_depend_on_thread_count(dout, dlast, *args, seq_idx, num_sequences,
                                                    True)


def test_per_sequence_mode_with_no_tokens():
    case = Case(batch=2, seqlen=0)
    inputs = make_inputs(case)
    inputs["initial_state"] = torch.randn(3, 5, 16)
    out, last_state = run_varlen_op(inputs, case, torch.zeros(2, 0, dtype=torch.int32), 3)
    assert out.shape == (2, 5, 0)
    torch.testing.assert_close(last_state, inputs["initial_state"], rtol=0, atol=0)


# Bad packing arguments: (seq_idx, num_sequences, initial_state given the good inputs,
# exception, message). The good inputs have batch 2, dim 5, seqlen 3, dstate 16.
BAD_PACKING = [
    ("dtype", lambda: torch.zeros(2, 3, dtype=torch.int64), 0, None, TypeError,
     r"seq_idx must have dtype Int \(sequence indices\), got Long"),
    ("shape", lambda: torch.zeros(2, 4, dtype=torch.int32), 0, None, ValueError,
     r"seq_idx must have shape \(batch, seqlen\) = \(2, 3\), got \(2, 4\)"),
    ("rank", lambda: torch.zeros(6, dtype=torch.int32), 0, None, ValueError,
     r"seq_idx must have shape \(batch, seqlen\) = \(2, 3\), got \(6,\)"),
    ("negative_num_sequences", lambda: torch.zeros(2, 3, dtype=torch.int32), -1, None,
     ValueError, r"num_sequences must be >= 0 \(0: per-row states\), got -1"),
    ("num_sequences_without_seq_idx", lambda: None, 2, None, ValueError,
     r"seq_idx must be given when num_sequences > 0 \(per-sequence states\), got None with "
     r"num_sequences = 2"),
    ("per_row_initial_state_in_per_sequence_mode",
     lambda: torch.tensor([[0, 0, 1], [2, 2, 2]], dtype=torch.int32), 3, lambda i: i["initial_state"], ValueError,
     r"initial_state must have shape \(num_sequences, dim, dstate\) = \(3, 5, 16\), "
     r"got \(2, 5, 16\)"),
    ("value_above_range", lambda: torch.tensor([[0, 1, 2], [3, 3, 4]], dtype=torch.int32), 4,
     None, ValueError, r"seq_idx must have values in \[-1, num_sequences\) = \[-1, 4\), "
     r"got 4 at \(1, 2\)"),
    ("value_below_range", lambda: torch.tensor([[0, -2, 1], [2, 2, 2]], dtype=torch.int32), 4,
     None, ValueError, r"seq_idx must have values in \[-1, num_sequences\) = \[-1, 4\), "
     r"got -2 at \(0, 1\)"),
    ("second_run_in_a_row", lambda: torch.tensor([[0, 1, 0], [2, 2, 2]], dtype=torch.int32), 3,
     None, ValueError, r"seq_idx must give each sequence one run of tokens in per-sequence mode "
     r"\(num_sequences > 0\), got a second run of sequence 0 starting at \(0, 2\)"),
    ("second_run_in_another_row",
     lambda: torch.tensor([[0, 0, 1], [1, 2, 2]], dtype=torch.int32), 3, None, ValueError,
     r"seq_idx must give each sequence one run of tokens .*, got a second run of sequence 1 "
     r"starting at \(1, 0\)"),
]


@pytest.mark.parametrize("op", ["selective_scan_fwd", "selective_scan_bwd"])
@pytest.mark.parametrize("seq_idx,num_sequences,initial_state,error,message", [
    b[1:] for b in BAD_PACKING], ids=[b[0] for b in BAD_PACKING])
def test_bad_packing_is_refused(seq_idx, num_sequences, initial_state, error, message, op):
    inputs = _good_inputs()
    inputs["initial_state"] = initial_state(inputs) if initial_state else None
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                "initial_state")]
    with pytest.raises(error, match=f"{op}: {message}"):
        if op == "selective_scan_fwd":
            torch.ops.mamba_ext.selective_scan_fwd(*args, seq_idx(), num_sequences, True)
        else:
            torch.ops.mamba_ext.selective_scan_bwd(torch.zeros(2, 5, 3), None, *args, seq_idx(),
                                                   num_sequences, True)


def test_bad_dlast_state_in_per_sequence_mode_is_refused():
    inputs = _good_inputs()
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    seq_idx = torch.tensor([[0, 0, 1], [2, 2, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"selective_scan_bwd: dlast_state must have shape "
                       r"\(num_sequences, dim, dstate\) = \(4, 5, 16\), got \(2, 5, 16\)"):
        torch.ops.mamba_ext.selective_scan_bwd(torch.zeros(2, 5, 3), torch.zeros(2, 5, 16),
                                               *args, None, seq_idx, 4, True)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(seq_idx=torch.zeros(1, 3, dtype=torch.int32), cu_seqlens=torch.tensor([0, 3])),
     ValueError, r"cu_seqlens must not be given together with seq_idx, got both"),
    (dict(cu_seqlens=torch.tensor([0.0, 3.0])), TypeError,
     r"cu_seqlens must have dtype int32 or int64, got torch.float32"),
    (dict(cu_seqlens=torch.tensor([[0, 3]])), ValueError,
     r"cu_seqlens must have shape \(num_sequences \+ 1,\), got \(1, 2\)"),
])
def test_bad_cu_seqlens_is_refused(kwargs, error, message):
    inputs = make_inputs(Case(batch=1))
    with pytest.raises(error, match=f"selective_scan_fn: {message}"):
        selective_scan_fn(**inputs, **kwargs)


def test_cu_seqlens_needs_batch_1():
    inputs = make_inputs(Case(batch=2))
    with pytest.raises(ValueError, match=r"selective_scan_fn: u must have batch 1 with "
                       r"cu_seqlens \(sequences packed along seqlen\), got shape \(2, 5, 3\)"):
        selective_scan_fn(**inputs, cu_seqlens=torch.tensor([0, 3]))


@pytest.mark.cuda
def test_seq_idx_on_another_device_is_refused():
    needs_kernel("cuda")
    inputs = _good_inputs("cuda")
    with pytest.raises(ValueError, match=r"selective_scan_fwd: seq_idx must be on cuda"):
        selective_scan_fn(**inputs, seq_idx=torch.zeros(2, 3, dtype=torch.int32))
