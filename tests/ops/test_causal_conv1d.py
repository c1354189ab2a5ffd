"""causal_conv1d family: forward, backward and decode update against the float64 reference,
gradcheck, opcheck, torch.compile, and one bad-input test per check of the host code."""
import pytest
import torch

import helpers
from mamba_ext.ops import causal_conv1d_fn, causal_conv1d_update
from mamba_ext.reference import causal_conv1d_ref, causal_conv1d_update_ref

LAYOUTS = ("contiguous", "channel_last", "strided")
requires_cuda_kernels = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("mamba_ext::causal_conv1d_fwd", "CUDA"),
    reason="needs the CUDA kernels of causal_conv1d")


def in_layout(x, layout):
    """x (batch, dim, seqlen) with the same values, laid out as `layout` says."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channel_last":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "channel_last_wide":  # the first dim channels of 16-byte aligned wider rows
        batch, dim, seqlen = x.shape
        wide = torch.zeros(batch, seqlen, (dim + 15) // 8 * 8, dtype=x.dtype, device=x.device)
        return wide[:, :, :dim].copy_(x.transpose(1, 2)).transpose(1, 2)
    return helpers.strided(x, dim=2)


def make_seq_idx(batch, seqlen, device):
    """(batch, seqlen) int32: sorted sequence ids from 0, with -1 padding at the end of row 0."""
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    for b in range(batch):
        for start in torch.randint(1, max(seqlen, 2), (3,)).tolist():
            seq_idx[b, start:] += 1
    seq_idx[0, seqlen - max(1, seqlen // 5):] = -1
    return seq_idx.to(device)


def make_conv_inputs(case, dtype, weight_dtype, device, batch=2):
    """The keyword arguments of causal_conv1d_fn for one case of FWD_CASES or BWD_CASES; the
    "strided" layout makes seq_idx and initial_states slices of wider buffers too."""
    seqlen, dim, width, layout, bias, silu, initial_states, seq_idx = case[:8]
    x = torch.randn(batch, dim, seqlen, device=device, dtype=dtype)
    inputs = dict(
        x=in_layout(x, layout),
        weight=torch.randn(dim, width, device=device, dtype=weight_dtype),
        bias=torch.randn(dim, device=device, dtype=weight_dtype) if bias else None,
        seq_idx=make_seq_idx(batch, seqlen, device) if seq_idx else None,
        initial_states=(torch.randn(batch, dim, width - 1, device=device, dtype=dtype)
                        if initial_states else None),
        activation="silu" if silu else None,
    )
    if layout == "strided" and seq_idx:
        wide = torch.zeros(batch, 2 * seqlen, dtype=torch.int32, device=device)
        inputs["seq_idx"] = wide[:, ::2].copy_(inputs["seq_idx"])
    if layout == "strided" and initial_states:
        inputs["initial_states"] = helpers.strided(inputs["initial_states"], dim=1)
    return inputs


def cast_floats(kwargs, dtype):
    """kwargs with every floating tensor cast to dtype (seq_idx and flags unchanged)."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in kwargs.items()}


def as_float64(kwargs):
    return cast_floats(kwargs, torch.float64)


# Pairwise-ish combinations: every value of every option appears with several others.
FWD_CASES = [
    # (seqlen, dim, width, layout, bias, silu, initial_states, seq_idx, return_final_states)
    (1, 5, 2, "contiguous", True, False, False, False, True),
    (1, 33, 4, "channel_last", False, True, True, True, True),
    (1, 64, 3, "strided", True, True, False, True, False),
    (3, 5, 3, "channel_last", True, True, True, False, True),
    (3, 33, 2, "strided", False, False, True, True, True),
    (3, 64, 4, "contiguous", True, False, False, True, False),
    (129, 5, 4, "strided", True, True, True, True, True),
    (129, 33, 3, "contiguous", False, True, True, True, True),
    (129, 64, 2, "channel_last", True, False, False, False, True),
    (300, 17, 4, "channel_last", True, True, True, True, True),
    (1000, 5, 3, "contiguous", True, True, False, True, True),
    (1000, 33, 4, "channel_last", True, True, True, True, False),
    (1000, 64, 2, "strided", False, True, True, False, True),
    (1000, 33, 4, "contiguous", False, False, False, False, False),
]
# (x dtype, weight and bias dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]


def case_id(case):
    return "-".join(str(v) for v in case)


def dtype_id(dtypes):
    return "x_{}-w_{}".format(*(str(d).replace("torch.", "") for d in dtypes))


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FWD_CASES, ids=case_id)
def test_fwd_matches_reference(case, dtypes, device):
    dtype, weight_dtype = dtypes
    return_final_states = case[8]
    inputs = make_conv_inputs(case, dtype, weight_dtype, device)
    result = causal_conv1d_fn(**inputs, return_final_states=return_final_states)
    ref = causal_conv1d_ref(**as_float64(inputs), return_final_states=return_final_states)
    # The same computation done by PyTorch in the low precision, for flash-attention's rule.
    lowp_out = (causal_conv1d_ref(**cast_floats(inputs, dtype))
                if dtype != torch.float32 else None)
    out, ref_out = (result[0], ref[0]) if return_final_states else (result, ref)
    assert out.dtype == dtype
    helpers.assert_close(out, ref_out, dtype, lowp=lowp_out)
    if return_final_states:
        # final_states are copies of inputs: exact.
        assert torch.equal(result[1], ref[1].to(dtype))


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("seqlen", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_layout_follows_x(layout, seqlen, device):
    x = in_layout(torch.randn(2, 8, seqlen, device=device), layout)
    weight = torch.randn(8, 4, device=device)
    out = causal_conv1d_fn(x, weight)
    channel_last = x.stride(1) == 1 and x.stride(2) != 1
    expected = (torch.empty(2, seqlen, 8).transpose(1, 2) if channel_last
                else torch.empty(2, 8, seqlen)).stride()
    assert out.stride() == expected
    assert channel_last == (layout == "channel_last" and seqlen > 1)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_out = causal_conv1d_fn(mode.from_tensor(x), mode.from_tensor(weight))
    assert fake_out.stride() == out.stride()


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_final_states_out_is_filled_and_returned(device):
    x = torch.randn(2, 8, 5, device=device)
    weight = torch.randn(8, 3, device=device)
    final_states_out = torch.empty(2, 8, 2, device=device)
    out, final_states = causal_conv1d_fn(x, weight, return_final_states=True,
                                         final_states_out=final_states_out)
    assert final_states is final_states_out
    assert torch.equal(final_states_out, x[:, :, -2:])


BWD_CASES = [
    # (seqlen, dim, width, layout, bias, silu, initial_states, seq_idx)
    (1, 5, 4, "contiguous", True, True, True, True),
    (3, 33, 2, "channel_last", True, False, True, False),
    (129, 33, 3, "strided", False, True, False, True),
    (300, 17, 4, "contiguous", True, True, True, True),
    (1000, 5, 4, "channel_last", True, True, True, True),
]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtypes", DTYPES[:3], ids=dtype_id)
@pytest.mark.parametrize("case", BWD_CASES, ids=case_id)
def test_bwd_matches_reference_autograd(case, dtypes, device):
    dtype, weight_dtype = dtypes
    inputs = make_conv_inputs(case, dtype, weight_dtype, device)
    names = [k for k in ("x", "weight", "bias", "initial_states") if inputs[k] is not None]
    for k in names:
        inputs[k].requires_grad_()
    out, final_states = causal_conv1d_fn(**inputs, return_final_states=True)
    dout = torch.randn_like(out)
    dfinal_states = torch.randn_like(final_states)
    grads = torch.autograd.grad((out, final_states), [inputs[k] for k in names],
                                (dout, dfinal_states))

    ref_inputs = {k: v.detach().double().requires_grad_() if k in names else v
                  for k, v in as_float64(inputs).items()}
    ref_out, ref_final_states = causal_conv1d_ref(**ref_inputs, return_final_states=True)
    ref_grads = torch.autograd.grad((ref_out, ref_final_states), [ref_inputs[k] for k in names],
                                    (dout.double(), dfinal_states.double()))
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert grad.dtype == inputs[name].dtype, name
        helpers.assert_close(grad, ref_grad, dtype, name=f"d{name}")


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("outputs", ["out_and_final_states", "final_states_only"])
@pytest.mark.parametrize("width, seq_idx", [(2, False), (3, True), (4, True)])
def test_gradcheck(width, seq_idx, outputs, device):
    batch, dim, seqlen = 2, 3, 7
    opts = dict(device=device, dtype=torch.float64, requires_grad=True)
    x = torch.randn(batch, dim, seqlen, **opts)
    weight = torch.randn(dim, width, **opts)
    bias = torch.randn(dim, **opts)
    initial_states = torch.randn(batch, dim, width - 1, **opts)
    seq = make_seq_idx(batch, seqlen, device) if seq_idx else None

    def conv(x, weight, bias, initial_states):
        out, final_states = causal_conv1d_fn(x, weight, bias, seq, initial_states,
                                             return_final_states=True, activation="silu")
        return (out, final_states) if outputs == "out_and_final_states" else final_states

    assert torch.autograd.gradcheck(conv, (x, weight, bias, initial_states))


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_bwd_is_deterministic_and_stride_blind(device):
    inputs = make_conv_inputs((600, 40, 4, "contiguous", True, True, True, True),
                              torch.float32, torch.float32, device, batch=3)
    dout = torch.randn(inputs["x"].shape, device=device)

    def bwd(dout):
        return torch.ops.mamba_ext.causal_conv1d_bwd(
            dout, None, inputs["x"], inputs["weight"], inputs["bias"], inputs["seq_idx"],
            inputs["initial_states"], True)

    first = bwd(dout)
    for again in [bwd(dout), bwd(dout), bwd(in_layout(dout, "channel_last")),
                  bwd(in_layout(dout, "strided"))]:
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def fwd_op_samples(device):
    full = make_conv_inputs((9, 6, 4, "channel_last", True, True, True, True),
                            torch.float32, torch.float32, device)
    bare = make_conv_inputs((9, 6, 3, "contiguous", False, False, False, False),
                            torch.float32, torch.float32, device)
    for t in (full["x"], full["weight"], full["bias"], full["initial_states"], bare["x"],
              bare["weight"]):
        t.requires_grad_()
    return [
        (full["x"], full["weight"], full["bias"], full["seq_idx"], full["initial_states"], True,
         True),
        (bare["x"], bare["weight"], None, None, None, False, False),
    ]


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_opcheck_fwd(device):
    for args in fwd_op_samples(device):
        torch.library.opcheck(torch.ops.mamba_ext.causal_conv1d_fwd.default, args)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_opcheck_bwd(device):
    for x, weight, bias, seq_idx, initial_states, _, silu in fwd_op_samples(device):
        x, weight = x.detach(), weight.detach()
        dout = torch.randn(x.shape, device=device)
        dfinal_states = (torch.randn(x.shape[0], x.shape[1], weight.shape[1] - 1, device=device)
                         if initial_states is not None else None)
        bias = bias.detach() if bias is not None else None
        initial_states = initial_states.detach() if initial_states is not None else None
        torch.library.opcheck(torch.ops.mamba_ext.causal_conv1d_bwd.default,
                              (dout, dfinal_states, x, weight, bias, seq_idx, initial_states, silu))


def make_update_inputs(case, dtype, weight_dtype, device, batch=3, dim=10):
    """The arguments of causal_conv1d_update for one case of UPDATE_CASES."""
    seqlen, width, extra_state, circular, indexed, layout = case
    state_batch = batch + 2 if indexed else batch
    state_len = width - 1 + extra_state
    x_shape = (batch, dim) if seqlen is None else (batch, dim, seqlen)
    x = torch.randn(x_shape, device=device, dtype=dtype)
    conv_state = torch.randn(state_batch, dim, state_len, device=device, dtype=dtype)
    if layout == "strided":
        x, conv_state = helpers.strided(x, dim=1), helpers.strided(conv_state, dim=1)
    return dict(
        x=x,
        conv_state=conv_state,
        weight=torch.randn(dim, width, device=device, dtype=weight_dtype),
        bias=torch.randn(dim, device=device, dtype=weight_dtype),
        activation="silu",
        cache_seqlens=(torch.randint(0, 3 * state_len + 2, (batch,), device=device,
                                     dtype=torch.int32) if circular else None),
        conv_state_indices=(torch.randperm(state_batch, device=device)[:batch].int()
                            if indexed else None),
    )


UPDATE_CASES = [
    # (seqlen (None: x is (batch, dim)), width, state_len - (width - 1), circular,
    #  conv_state_indices, layout)
    (None, 4, 0, False, False, "contiguous"),
    (None, 2, 3, True, False, "strided"),
    (None, 3, 0, False, True, "contiguous"),
    (None, 4, 2, True, True, "contiguous"),
    (1, 3, 1, True, False, "contiguous"),
    (3, 4, 0, False, False, "strided"),
    (3, 3, 2, True, True, "contiguous"),
    (5, 2, 1, False, True, "contiguous"),
    (5, 4, 5, True, False, "contiguous"),
    (9, 4, 0, True, False, "contiguous"),  # more tokens than state: the ring wraps in one call
]


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dtypes", DTYPES[:2] + DTYPES[3:], ids=dtype_id)
@pytest.mark.parametrize("case", UPDATE_CASES, ids=case_id)
def test_update_matches_reference(case, dtypes, device):
    dtype, weight_dtype = dtypes
    inputs = make_update_inputs(case, dtype, weight_dtype, device)
    ref_inputs = as_float64(inputs)
    ref_inputs["conv_state"] = ref_inputs["conv_state"].clone()
    out = causal_conv1d_update(**inputs)
    ref_out = causal_conv1d_update_ref(**ref_inputs)
    assert out.shape == inputs["x"].shape and out.dtype == dtype
    helpers.assert_close(out, ref_out, dtype)
    # The state holds copies of tokens: exact.
    assert torch.equal(inputs["conv_state"], ref_inputs["conv_state"].to(dtype))


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("cache_seqlens", [None, torch.tensor([1, 5], dtype=torch.int32)])
def test_update_without_tokens_keeps_state(cache_seqlens, device):
    conv_state = torch.randn(2, 8, 3, device=device)
    state_before = conv_state.clone()
    seqlens = cache_seqlens.to(device) if cache_seqlens is not None else None
    out = causal_conv1d_update(torch.randn(2, 8, 0, device=device), conv_state,
                               torch.randn(8, 4, device=device), cache_seqlens=seqlens)
    assert out.shape == (2, 8, 0)
    assert torch.equal(conv_state, state_before)


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("prefix", [1, 7])  # 1: final_states are partly initial_states
@pytest.mark.parametrize("tokens_per_call", [1, 4])
@pytest.mark.parametrize("width", [2, 3, 4])
def test_fwd_then_update_equals_fwd(width, tokens_per_call, prefix, device):
    batch, dim, seqlen = 2, 33, 19
    x = torch.randn(batch, dim, seqlen, device=device)
    weight = torch.randn(dim, width, device=device)
    bias = torch.randn(dim, device=device)
    initial_states = torch.randn(batch, dim, width - 1, device=device)
    full = causal_conv1d_fn(x, weight, bias, initial_states=initial_states, activation="silu")
    _, conv_state = causal_conv1d_fn(x[:, :, :prefix], weight, bias,
                                     initial_states=initial_states, return_final_states=True,
                                     activation="silu")
    steps = [causal_conv1d_update(x[:, :, t:t + tokens_per_call], conv_state, weight, bias,
                                  activation="silu")
             for t in range(prefix, seqlen, tokens_per_call)]
    helpers.assert_close(torch.cat(steps, dim=2), full[:, :, prefix:], torch.float32)


def update_op_samples(device):
    for case in [(None, 4, 0, False, False, "contiguous"), (3, 3, 2, True, True, "strided")]:
        inputs = make_update_inputs(case, torch.float32, torch.float32, device)
        yield (inputs["x"], inputs["conv_state"], inputs["weight"], inputs["bias"],
               inputs["cache_seqlens"], inputs["conv_state_indices"], True)


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_opcheck_update(device):
    for args in update_op_samples(device):
        torch.library.opcheck(torch.ops.mamba_ext.causal_conv1d_update.default, args)


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("name", ["x", "conv_state", "weight", "bias"])
def test_update_refuses_inputs_that_require_grad(name, device):
    """No backward: under grad mode an input that requires grad is refused (PyTorch's default for
    a custom op would warn and return None gradients); under no_grad the same call runs. The
    state's version counter records the update, so a backward that saved the old state refuses
    to run."""
    inputs = make_update_inputs((None, 4, 0, False, False, "contiguous"), torch.float32,
                                torch.float32, device)
    with_grad = {**inputs, name: inputs[name].clone().requires_grad_()}
    with pytest.raises(ValueError,
                       match=f"causal_conv1d_update: {name} must not require grad"):
        causal_conv1d_update(**with_grad)
    with torch.no_grad():
        out = causal_conv1d_update(**{**with_grad, "conv_state": inputs["conv_state"].clone()})
    assert not out.requires_grad
    # A tensor computed from one that requires grad is refused too.
    scale = torch.ones((), device=device, requires_grad=True)
    with pytest.raises(ValueError,
                       match=f"causal_conv1d_update: {name} must not require grad"):
        causal_conv1d_update(**{**inputs, name: inputs[name] * scale})

    conv_state = inputs["conv_state"]
    loss = (scale * conv_state).sum()  # saves the state for its backward
    version = conv_state._version
    causal_conv1d_update(**inputs)
    assert conv_state._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def conv_then_decode(x, weight, bias, token, conv_state):
    out, final_states = causal_conv1d_fn(x, weight, bias, return_final_states=True,
                                         activation="silu")
    # Decoding needs no gradient (the update op has no autograd): detach its weights.
    step = causal_conv1d_update(token, conv_state, weight.detach(), bias.detach(),
                                activation="silu")
    return out, final_states, step


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    x = torch.randn(2, 16, 37, device=device, requires_grad=True)
    weight = torch.randn(16, 4, device=device, requires_grad=True)
    bias = torch.randn(16, device=device, requires_grad=True)
    token = torch.randn(2, 16, device=device)
    conv_state = torch.randn(2, 16, 3, device=device)
    compiled = torch.compile(conv_then_decode, fullgraph=True, backend=backend)

    eager_state, compiled_state = conv_state.clone(), conv_state.clone()
    eager = conv_then_decode(x, weight, bias, token, eager_state)
    result = compiled(x, weight, bias, token, compiled_state)
    for got, expected in zip(result, eager):
        torch.testing.assert_close(got, expected)
    assert torch.equal(compiled_state, eager_state)

    grads = torch.autograd.grad(result[0].square().sum() + result[1].sum(), (x, weight, bias))
    eager_grads = torch.autograd.grad(eager[0].square().sum() + eager[1].sum(), (x, weight, bias))
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected)


# Bad inputs. Each case changes one argument of valid inputs and names the error it expects.
def valid_conv_args(device):
    return dict(x=torch.randn(2, 8, 6, device=device), weight=torch.randn(8, 4, device=device),
                bias=torch.randn(8, device=device),
                seq_idx=torch.zeros(2, 6, dtype=torch.int32, device=device),
                initial_states=torch.randn(2, 8, 3, device=device))


BAD_CONV_ARGS = [
    # (argument: replacement, exception, message after "<op>: ")
    ("x", lambda a: a["x"][0], ValueError,
     r"x must have 3 dimensions \(batch, dim, seqlen\), got 2"),
    ("x", lambda a: a["x"].int(), TypeError,
     r"x must have dtype in \{Float, Double, Half, BFloat16\}"),
    ("x", lambda a: a["x"][:, :, :0], ValueError, r"x must have seqlen >= 1"),
    ("weight", lambda a: a["weight"][None], ValueError, r"weight must have 2 dimensions"),
    ("weight", lambda a: torch.randn(8, 5), ValueError,
     r"weight must have a width .* in \[2, 4\], got 5"),
    ("weight", lambda a: torch.randn(8, 1), ValueError, r"weight must have a width .* got 1"),
    ("weight", lambda a: a["weight"][:7], ValueError,
     r"weight must have shape \(dim, width\) = \(8, 4\), got \(7, 4\)"),
    ("weight", lambda a: a["weight"].double(), TypeError, r"weight must have dtype Float"),
    ("bias", lambda a: a["bias"][:7], ValueError,
     r"bias must have shape \(dim,\) = \(8,\), got \(7,\)"),
    ("bias", lambda a: a["bias"].half(), TypeError, r"bias must have dtype Float"),
    ("seq_idx", lambda a: a["seq_idx"][:, :5], ValueError,
     r"seq_idx must have shape \(batch, seqlen\)"),
    ("seq_idx", lambda a: a["seq_idx"].long(), TypeError, r"seq_idx must have dtype Int"),
    ("initial_states", lambda a: a["initial_states"][:, :, :2], ValueError,
     r"initial_states must have shape \(batch, dim, width - 1\) = \(2, 8, 3\), got \(2, 8, 2\)"),
    ("initial_states", lambda a: a["initial_states"].double(), TypeError,
     r"initial_states must have dtype Float"),
]


def bad_id(case):
    return f"{case[0]}-{case[3][:40]}"


def call_fwd(args):
    return torch.ops.mamba_ext.causal_conv1d_fwd(args["x"], args["weight"], args["bias"],
                                                 args["seq_idx"], args["initial_states"], True,
                                                 True)


def call_bwd(args):
    x = args["x"]
    dout = args.get("dout", torch.randn(x.shape, device=x.device) if x.dim() == 3 else x)
    return torch.ops.mamba_ext.causal_conv1d_bwd(dout, args.get("dfinal_states"), x,
                                                 args["weight"], args["bias"], args["seq_idx"],
                                                 args["initial_states"], True)


BAD_BWD_ARGS = [
    ("dout", lambda a: a["x"][:, :, :5], ValueError,
     r"dout must have shape \(batch, dim, seqlen\) = \(2, 8, 6\), got \(2, 8, 5\)"),
    ("dout", lambda a: a["x"].double(), TypeError, r"dout must have dtype Float"),
    ("dfinal_states", lambda a: a["initial_states"][:, :4], ValueError,
     r"dfinal_states must have shape \(batch, dim, width - 1\) = \(2, 8, 3\), got \(2, 4, 3\)"),
    ("dfinal_states", lambda a: a["initial_states"].half(), TypeError,
     r"dfinal_states must have dtype Float"),
]


def valid_update_args(device):
    return dict(x=torch.randn(3, 8, device=device),
                conv_state=torch.randn(5, 8, 4, device=device),
                weight=torch.randn(8, 4, device=device), bias=torch.randn(8, device=device),
                cache_seqlens=torch.zeros(3, dtype=torch.int32, device=device),
                conv_state_indices=torch.tensor([4, 0, 2], dtype=torch.int32, device=device))


def without_indices(a):
    a["conv_state_indices"] = None
    return a["conv_state"]


BAD_UPDATE_ARGS = [
    ("x", lambda a: a["x"][0], ValueError,
     r"x must have 2 dimensions \(batch, dim\) or 3 \(batch, dim, seqlen\), got 1"),
    ("x", lambda a: a["x"][:, :, None, None], ValueError, r"x must have 2 dimensions .* got 4"),
    ("x", lambda a: a["x"].int(), TypeError, r"x must have dtype in"),
    ("weight", lambda a: torch.randn(8, 5), ValueError, r"weight must have a width"),
    ("conv_state", lambda a: a["conv_state"][0], ValueError,
     r"conv_state must have 3 dimensions \(state_batch, dim, state_len\), got 2"),
    ("conv_state", lambda a: a["conv_state"][:, :7], ValueError,
     r"conv_state must have shape \(state_batch, dim, state_len\) = \(5, 8, 4\), got \(5, 7, 4\)"),
    ("conv_state", without_indices, ValueError,
     r"conv_state must have shape \(batch, dim, state_len\) without conv_state_indices = "
     r"\(3, 8, 4\), got \(5, 8, 4\)"),
    ("conv_state", lambda a: a["conv_state"][:, :, :2], ValueError,
     r"conv_state must have state_len >= width - 1 = 3, got shape \(5, 8, 2\)"),
    ("conv_state", lambda a: a["conv_state"].double(), TypeError,
     r"conv_state must have dtype Float"),
    ("cache_seqlens", lambda a: a["cache_seqlens"][:2], ValueError,
     r"cache_seqlens must have shape \(batch,\) = \(3,\), got \(2,\)"),
    ("cache_seqlens", lambda a: a["cache_seqlens"].long(), TypeError,
     r"cache_seqlens must have dtype Int"),
    ("conv_state_indices", lambda a: a["conv_state_indices"][None], ValueError,
     r"conv_state_indices must have shape \(batch,\)"),
    ("conv_state_indices", lambda a: a["conv_state_indices"].long(), TypeError,
     r"conv_state_indices must have dtype Int"),
    ("conv_state_indices", lambda a: torch.tensor([4, 5, 2], dtype=torch.int32), ValueError,
     r"conv_state_indices must be in \[0, state_batch\) = \[0, 5\), got 5 at batch entry 1"),
    ("conv_state_indices", lambda a: torch.tensor([0, 1, -1], dtype=torch.int32), ValueError,
     r"conv_state_indices must be in \[0, state_batch\) = \[0, 5\), got -1 at batch entry 2"),
]


# op: (valid arguments, call, bad arguments)
BAD_INPUT_OPS = {
    "causal_conv1d_fwd": (valid_conv_args, call_fwd, BAD_CONV_ARGS),
    "causal_conv1d_bwd": (valid_conv_args, call_bwd, BAD_CONV_ARGS + BAD_BWD_ARGS),
    "causal_conv1d_update": (valid_update_args, lambda args: causal_conv1d_update(**args),
                             BAD_UPDATE_ARGS),
}
BAD_INPUTS = [(op, case) for op, (_, _, cases) in BAD_INPUT_OPS.items() for case in cases]


def _bad_input_params():
    """(device, op, case) for every bad input on each device, but the range check of
    conv_state_indices on CUDA: reading the values would take a device sync, so the CUDA update
    skips such rows instead (test_update_skips_out_of_range_rows_on_cuda)."""
    params = []
    for device in helpers.DEVICES:
        name = device if isinstance(device, str) else device.values[0]
        marks = () if isinstance(device, str) else device.marks
        for op, case in BAD_INPUTS:
            if name == "cuda" and case[3].startswith(r"conv_state_indices must be in"):
                continue
            params.append(pytest.param(name, op, case, marks=marks,
                                       id=f"{op}-{bad_id(case)}-{name}"))
    return params


@pytest.mark.parametrize("device, op, case", _bad_input_params())
def test_bad_input_is_refused(op, case, device):
    valid_args, call, _ = BAD_INPUT_OPS[op]
    name, replace, error, message = case
    args = valid_args(device)
    args[name] = replace(args).to(device)
    before = {k: v.clone() for k, v in args.items() if torch.is_tensor(v)}
    with pytest.raises(error, match=f"{op}: {message}"):
        call(args)
    assert all(torch.equal(args[k], v) for k, v in before.items()), "an input was written"


@pytest.mark.parametrize("fn", [causal_conv1d_fn, causal_conv1d_update])
def test_unknown_activation_is_refused(fn):
    x = torch.randn(2, 8, 6)
    args = (x, torch.randn(8, 4)) if fn is causal_conv1d_fn else (x, torch.randn(2, 8, 3),
                                                                  torch.randn(8, 4))
    with pytest.raises(ValueError, match=rf"{fn.__name__}: activation must be None, 'silu' or "
                                         rf"'swish', got 'relu'"):
        fn(*args, activation="relu")


@pytest.mark.cuda
@requires_cuda_kernels
@pytest.mark.parametrize("name", ["weight", "bias", "seq_idx", "initial_states"])
def test_input_on_another_device_is_refused(name):
    args = valid_conv_args("cuda")
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=f"causal_conv1d_fwd: {name} must be on cuda"):
        call_fwd(args)


# CUDA only: the CUDA kernels against the CPU kernels and the reference at sizes that span
# several tiles, warps and blocks, on the edges of their fast paths, on a side stream.
def on_device(t, device):
    """t on device with the same sizes and strides (a slice keeps its gaps)."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)


def misaligned(t):
    """The same values and strides as t (contiguous or channel-last), in a storage that starts
    one element late, so that no row is 16-byte aligned."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].as_strided(t.shape, t.stride())
    return view.copy_(t)


def poison_cuda_cache():
    """Fills the blocks the caching allocator hands out next with NaN: an output element that a
    kernel leaves unwritten then fails the comparison."""
    torch.full((1 << 26,), float("nan"), device="cuda")


def conv_grads(inputs, dout, dfinal_states):
    """out, final_states and the gradients of every floating input, by autograd."""
    inputs = {k: v.detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point()
              else v for k, v in inputs.items()}
    out, final_states = causal_conv1d_fn(**inputs, return_final_states=True)
    names = [k for k in ("x", "weight", "bias", "initial_states") if inputs[k] is not None]
    grads = torch.autograd.grad((out, final_states), [inputs[k] for k in names],
                                (dout, dfinal_states))
    return {"out": out, "final_states": final_states,
            **{f"d{k}": g for k, g in zip(names, grads)}}


def reference_grads(inputs, dout, dfinal_states):
    """conv_grads of the float64 reference."""
    ref_inputs = {k: v.detach().double().requires_grad_()
                  if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in inputs.items()}
    out, final_states = causal_conv1d_ref(**ref_inputs, return_final_states=True)
    names = [k for k in ("x", "weight", "bias", "initial_states") if ref_inputs[k] is not None]
    grads = torch.autograd.grad((out, final_states), [ref_inputs[k] for k in names],
                                (dout.double(), dfinal_states.double()))
    return {"out": out, "final_states": final_states,
            **{f"d{k}": g for k, g in zip(names, grads)}}


CUDA_CASES = [
    # (batch, dim, seqlen, width, layout, seq_idx, initial_states, misaligned)
    (2, 300, 1000, 4, "contiguous", True, True, False),
    (2, 300, 1000, 4, "channel_last", True, True, False),
    (2, 304, 2049, 3, "contiguous", False, True, False),  # a tile and one token
    (1, 64, 4100, 2, "channel_last", True, False, False),  # tiles of 512, and 4 more tokens
    (3, 7, 4096, 4, "contiguous", True, True, False),  # odd dim: no channel-last vectors
    (3, 7, 1000, 4, "channel_last", False, True, False),
    (2, 40, 1000, 4, "contiguous", True, True, True),
    (2, 40, 1000, 4, "channel_last", True, True, True),
    (2, 16, 1, 4, "contiguous", False, True, False),
    (2, 16, 3, 3, "channel_last", True, True, False),
    (2, 33, 1000, 4, "strided", True, True, False),
    (2, 40000, 8, 4, "contiguous", False, False, False),  # more rows than gridDim.y allows
    # The contiguous kernels' tiles (2048 16-bit or 1024 fp32 tokens) and steps (256 / 128):
    # a last tile of 7 (6) steps and an empty one; of 8 steps, the last partial, with and
    # without vectors; dfinal_states' positions across a tile's end.
    (2, 24, 3840, 4, "contiguous", False, True, False),
    (2, 24, 4000, 3, "contiguous", True, False, False),
    (2, 40, 4000, 4, "contiguous", True, True, True),
    (1, 8, 2050, 4, "contiguous", False, True, False),
    # A last tile of one whole step (fp32: of 2); final_states taken
    # from a tile's last step.
    (2, 8, 2304, 4, "contiguous", True, True, False),
    (2, 8, 2304, 2, "contiguous", False, False, True),
    # The channel-last forward's runs (32 tokens), ring (8 tokens) and warps (256 16-bit or 128
    # fp32 channels): a last run shorter than the ring; a last warp of 1 (2) lanes; vectorized
    # rows whose last lane has 4 of its 8 channels (16-bit).
    (2, 264, 37, 4, "channel_last", True, True, False),
    (1, 264, 1000, 3, "channel_last", False, True, False),
    (2, 300, 70, 4, "channel_last_wide", True, True, False),
]


def cuda_case_id(case):
    return "-".join(str(v) for v in case)


@pytest.mark.parametrize("dtypes", DTYPES[:2], ids=dtype_id)
@pytest.mark.parametrize("case", CUDA_CASES, ids=cuda_case_id)
@pytest.mark.cuda
@requires_cuda_kernels
def test_cuda_matches_cpu_and_reference(case, dtypes):
    batch, dim, seqlen, width, layout, seq_idx, initial_states, shift = case
    dtype, weight_dtype = dtypes
    cpu_inputs = make_conv_inputs((seqlen, dim, width, layout, True, True, initial_states,
                                   seq_idx), dtype, weight_dtype, "cpu", batch=batch)
    cuda_inputs = {k: on_device(v, "cuda") if torch.is_tensor(v) else v
                   for k, v in cpu_inputs.items()}
    if shift:
        cuda_inputs["x"] = misaligned(cuda_inputs["x"])
    # dout in out's layout, as autograd brings it.
    dout = in_layout(torch.randn(batch, dim, seqlen, dtype=dtype),
                     "channel_last" if layout.startswith("channel_last") else "contiguous")
    dfinal_states = torch.randn(batch, dim, width - 1, dtype=dtype)

    poison_cuda_cache()
    got = conv_grads(cuda_inputs, on_device(dout, "cuda"), dfinal_states.cuda())
    cpu = conv_grads(cpu_inputs, dout, dfinal_states)
    ref = reference_grads(cpu_inputs, dout, dfinal_states)
    assert got["out"].stride() == cpu["out"].stride()
    for name, value in got.items():
        value = value.cpu()
        if name == "final_states":  # copies of inputs: exact
            assert torch.equal(value, cpu[name]), name
            continue
        helpers.assert_close(value, ref[name], dtype, name=name)
        helpers.assert_close(value, cpu[name].double(), dtype, name=f"{name} against the CPU")


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.cuda
@requires_cuda_kernels
def test_cuda_gradcheck_across_tiles(width, layout):
    """gradcheck in float64 where tokens cross warps, blocks and tiles (a thread's halos)."""
    batch, dim, seqlen = 1, 2, 600
    opts = dict(device="cuda", dtype=torch.float64)
    x = in_layout(torch.randn(batch, dim, seqlen, **opts), layout).requires_grad_()
    weight = torch.randn(dim, width, **opts, requires_grad=True)
    bias = torch.randn(dim, **opts, requires_grad=True)
    initial_states = torch.randn(batch, dim, width - 1, **opts, requires_grad=True)
    seq = make_seq_idx(batch, seqlen, "cuda")

    def conv(x, weight, bias, initial_states):
        return causal_conv1d_fn(x, weight, bias, seq, initial_states, return_final_states=True,
                                activation="silu")

    assert torch.autograd.gradcheck(conv, (x, weight, bias, initial_states), fast_mode=True)


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
@pytest.mark.cuda
@requires_cuda_kernels
def test_cuda_dweight_is_run_to_run_identical(layout):
    inputs = make_conv_inputs((5000, 512, 4, layout, True, True, True, True), torch.bfloat16,
                              torch.float32, "cuda", batch=4)
    dout = torch.randn(inputs["x"].shape, dtype=torch.bfloat16, device="cuda")

    def bwd():
        return torch.ops.mamba_ext.causal_conv1d_bwd(
            dout, None, inputs["x"], inputs["weight"], inputs["bias"], inputs["seq_idx"],
            inputs["initial_states"], True)

    first = bwd()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, bwd()))


@pytest.mark.cuda
@requires_cuda_kernels
def test_cuda_ops_follow_the_current_stream():
    inputs = make_conv_inputs((3000, 64, 4, "contiguous", True, True, True, True), torch.float32,
                              torch.float32, "cuda")
    dout = torch.randn(inputs["x"].shape, device="cuda")
    dfinal_states = torch.randn(2, 64, 3, device="cuda")
    state = torch.randn(2, 64, 3, device="cuda")
    expected = conv_grads(inputs, dout, dfinal_states)
    expected_state = state.clone()
    expected["update"] = causal_conv1d_update(inputs["x"][:, :, 0], expected_state,
                                              inputs["weight"])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Inputs made on the side stream just before: a kernel on another stream would race them.
        side_inputs = {k: v * 1 if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in inputs.items()}
        got = conv_grads(side_inputs, dout * 1, dfinal_states * 1)
        side_state = state * 1
        got["update"] = causal_conv1d_update(side_inputs["x"][:, :, 0], side_state,
                                             side_inputs["weight"])
    side.synchronize()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert torch.equal(side_state, expected_state)


@pytest.mark.cuda
@requires_cuda_kernels
@pytest.mark.parametrize("seqlen", [None, 3])  # the vectorized kernel, the general one
def test_update_skips_out_of_range_rows_on_cuda(seqlen):
    """conv_state_indices outside [0, state_batch), vLLM's padding slot -1 among them: the row's
    state is left alone and its output is 0; the other rows are updated as usual."""
    inputs = make_update_inputs((seqlen, 4, 0, False, True, "contiguous"), torch.float32,
                                torch.float32, "cuda", batch=4, dim=16)
    inputs["conv_state_indices"] = torch.tensor([2, -1, 6, 0], dtype=torch.int32, device="cuda")
    state_before = inputs["conv_state"].clone()
    out = causal_conv1d_update(**inputs)
    kept = [0, 3]
    ref_inputs = as_float64({**inputs, "x": inputs["x"][kept], "conv_state": state_before.clone(),
                             "conv_state_indices": inputs["conv_state_indices"][kept]})
    ref_out = causal_conv1d_update_ref(**ref_inputs)
    helpers.assert_close(out[kept], ref_out, torch.float32)
    assert torch.equal(out[[1, 2]], torch.zeros_like(out[[1, 2]]))
    assert torch.equal(inputs["conv_state"], ref_inputs["conv_state"].float())


@pytest.mark.cuda
@requires_cuda_kernels
@pytest.mark.parametrize("dtypes", DTYPES[:2], ids=dtype_id)
@pytest.mark.parametrize("width, extra_state", [(4, 0), (3, 2), (2, 0)])
@pytest.mark.parametrize("batch", [100, 259])
def test_cuda_update_at_large_batch(batch, width, extra_state, dtypes):
    """At large batches a thread of the vectorized one-token update takes several batch entries
    (two at 100 x 4096 bf16, four at 259): batches that are no multiple of them, with rows to
    skip; state_len 4 + 1 takes the general kernel."""
    dtype, weight_dtype = dtypes
    dim = 4096
    inputs = make_update_inputs((None, width, extra_state, False, True, "contiguous"), dtype,
                                weight_dtype, "cuda", batch=batch, dim=dim)
    indices = inputs["conv_state_indices"]
    skipped = [5, batch // 2 + 1, batch - 1]  # padding, past the end, negative
    indices[skipped] = torch.tensor([-1, batch + 2, -7], dtype=torch.int32, device="cuda")
    state_before = inputs["conv_state"].clone()
    out = causal_conv1d_update(**inputs)
    kept = [b for b in range(batch) if b not in skipped]
    ref_inputs = as_float64({**inputs, "x": inputs["x"][kept], "conv_state": state_before,
                             "conv_state_indices": indices[kept]})
    ref_out = causal_conv1d_update_ref(**ref_inputs)
    helpers.assert_close(out[kept], ref_out, dtype)
    assert torch.equal(out[skipped], torch.zeros_like(out[skipped]))
    assert torch.equal(inputs["conv_state"], ref_inputs["conv_state"].to(dtype))


def slice_of_wider(t, start, extra):
    """t's values in a view of channels [start, start + dim) of a buffer `extra` channels wider
    (dim 1), so that its batch stride is not its size."""
    shape = list(t.shape)
    shape[1] += extra
    view = torch.randn(shape, dtype=t.dtype, device=t.device)[:, start:start + t.shape[1]]
    view.copy_(t)
    return view


VECTORIZED_UPDATE_CASES = [
    # (seqlen (None: x is (batch, dim)), width, state_len - (width - 1), conv_state_indices,
    #  dim, layout, bias, silu). The vectorized kernel takes one token, state_len <= 4, a dim
    # of whole groups of 16 bytes of x (8 16-bit channels, 4 floats, 2 doubles) and 16-byte
    # aligned rows: "padded" x and conv_state are aligned slices of wider buffers; "offset" ones
    # start one channel in, and take the general kernel, as do a state_len of 5 and, for 16-bit
    # types, a dim of 36.
    (None, 4, 0, False, 64, "contiguous", True, True),
    (1, 4, 1, True, 32, "contiguous", True, True),  # mamba-ssm's state of width entries
    (None, 3, 0, True, 24, "padded", False, True),
    (None, 2, 0, False, 16, "contiguous", True, False),
    (None, 2, 1, True, 8, "padded", True, True),
    (None, 3, 1, False, 40, "contiguous", False, False),
    (None, 4, 0, True, 36, "contiguous", True, True),
    (None, 4, 0, True, 32, "offset", True, True),
    (1, 4, 2, False, 32, "contiguous", True, True),
]


@pytest.mark.cuda
@requires_cuda_kernels
@pytest.mark.parametrize("dtypes", DTYPES + [(torch.float64, torch.float64)], ids=dtype_id)
@pytest.mark.parametrize("case", VECTORIZED_UPDATE_CASES, ids=case_id)
def test_cuda_update_vectorized(case, dtypes):
    """The one-token update of kGroup channels a thread against the reference, at each state
    length and width it takes and at the layouts it leaves to the general kernel; a padding index
    (-1) leaves its state alone and gets out = 0."""
    seqlen, width, extra_state, indexed, dim, layout, bias, silu = case
    dtype, weight_dtype = dtypes
    batch = 5
    inputs = make_update_inputs((seqlen, width, extra_state, False, indexed, "contiguous"), dtype,
                                weight_dtype, "cuda", batch=batch, dim=dim)
    if layout != "contiguous":
        start, extra = (0, 8) if layout == "padded" else (1, 1)
        inputs["x"] = slice_of_wider(inputs["x"], start, extra)
        inputs["conv_state"] = slice_of_wider(inputs["conv_state"], start, extra)
    inputs["bias"] = inputs["bias"] if bias else None
    inputs["activation"] = "silu" if silu else None
    skipped = [1] if indexed else []
    if indexed:
        inputs["conv_state_indices"][skipped] = -1
    kept = [b for b in range(batch) if b not in skipped]
    state_before = inputs["conv_state"].clone()
    out = causal_conv1d_update(**inputs)
    ref_inputs = as_float64({**inputs, "x": inputs["x"][kept], "conv_state": state_before,
                             "conv_state_indices": (inputs["conv_state_indices"][kept]
                                                    if indexed else None)})
    ref_out = causal_conv1d_update_ref(**ref_inputs)
    helpers.assert_close(out[kept], ref_out, dtype)
    assert torch.equal(out[skipped], torch.zeros_like(out[skipped]))
    assert torch.equal(inputs["conv_state"], ref_inputs["conv_state"].to(dtype))
