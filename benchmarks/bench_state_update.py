"""Benchmark of selective_state_update, the decode step, on the device present (CUDA when there).

Shapes: Mamba-2 decode at b1 / b64 / b256, h80 p64 n128 with a float32 state (shared/anchors.md),
a Mamba-2 speculative draft of 4 tokens at b64 writing its intermediate states, and Mamba-1 at
b1 / b64, d4096 n16. On CUDA a second table sweeps the kernels' launch shapes
(MAMBA_EXT_STATE_UPDATE_TUNE: blocks per SM of the single-token kernel, or the general kernel's
lanes per row and rows per thread) at the Mamba-2 shapes. Activations bf16, A / D / dt_bias fp32,
one group, z gating and dt_softplus on, as the anchors were measured; Mamba-2's A, dt, dt_bias and
D are per head, expanded with stride 0 as Mamba2 passes them.

The op is memory-bound: the floor is the bytes it must move (the state read and written dominates)
at the bandwidth of an in-place elementwise update measured here on the same device.
"""
import argparse
import os

import torch

import harness
from mamba_ext.ops import selective_state_update

# The CUDA kernel's launch-shape override, "lanes,rows" (state_update_kernel.cuh).
TUNE_VARIABLE = "MAMBA_EXT_STATE_UPDATE_TUNE"

# mamba-ssm's Triton kernel on an H100 (shared/anchors.md), in ms.
MAMBA2_ANCHOR_MS = {1: 0.019, 64: 0.14, 256: 0.58}


def update_gbps(device, nbytes=256 * 2**20):
    """Bytes read plus written per second by an in-place elementwise update of one buffer: the
    bandwidth ceiling for an op whose traffic is a state read and written back in place. (On a
    CPU a copy is slower: its stores to a second buffer first read the lines they overwrite.)"""
    buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    return 2 * nbytes / harness.time_ms(lambda: buf.add_(1.0), device) / 1e6


def mamba2_inputs(batch, device, nheads=80, headdim=64, dstate=128, seqlen=None):
    """seqlen: None for one token, else a draft of seqlen tokens with intermediate states."""
    bf16 = torch.bfloat16
    lead = (batch,) if seqlen is None else (batch, seqlen)
    A = -torch.rand(nheads, device=device) - 0.5
    dt = torch.rand(*lead, nheads, device=device, dtype=bf16)
    D, dt_bias = torch.randn(nheads, device=device), torch.rand(nheads, device=device)
    inputs = dict(
        state=torch.randn(batch, nheads, headdim, dstate, device=device),
        x=torch.randn(*lead, nheads, headdim, device=device, dtype=bf16),
        dt=dt[..., None].expand(*lead, nheads, headdim),
        A=A[:, None, None].expand(nheads, headdim, dstate),
        B=torch.randn(*lead, 1, dstate, device=device, dtype=bf16),
        C=torch.randn(*lead, 1, dstate, device=device, dtype=bf16),
        D=D[:, None].expand(nheads, headdim),
        z=torch.randn(*lead, nheads, headdim, device=device, dtype=bf16),
        dt_bias=dt_bias[:, None].expand(nheads, headdim), dt_softplus=True)
    if seqlen is not None:
        inputs["intermediate_states_buffer"] = torch.empty(
            batch, seqlen, nheads, headdim, dstate, device=device)
    return inputs


def mamba1_inputs(batch, device, dim=4096, dstate=16):
    bf16 = torch.bfloat16
    return dict(
        state=torch.randn(batch, dim, dstate, device=device),
        x=torch.randn(batch, dim, device=device, dtype=bf16),
        dt=torch.rand(batch, dim, device=device, dtype=bf16),
        A=-torch.rand(dim, dstate, device=device) - 0.5,
        B=torch.randn(batch, dstate, device=device, dtype=bf16),
        C=torch.randn(batch, dstate, device=device, dtype=bf16),
        D=torch.randn(dim, device=device), z=torch.randn(batch, dim, device=device, dtype=bf16),
        dt_bias=torch.rand(dim, device=device), dt_softplus=True)


def bytes_moved(inputs):
    """Every tensor read once in its distinct elements (stride-0 broadcasts count once), the state
    written back, and out written."""
    def distinct_bytes(t):
        elements = 1
        for size, stride in zip(t.shape, t.stride()):
            elements *= size if stride else 1
        return elements * t.element_size()

    # The intermediate states are only written: counted once, as the tensors read are.
    tensors = [v for v in inputs.values() if torch.is_tensor(v)]
    return (sum(distinct_bytes(t) for t in tensors) + distinct_bytes(inputs["state"])
            + distinct_bytes(inputs["x"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    ceiling = update_gbps(device)
    print(f"in-place update bandwidth on {harness.device_name(device)}: {ceiling:.1f} GB/s")

    shapes = [("mamba2", b, f"b{b} h80 p64 n128", mamba2_inputs) for b in (1, 64, 256)]
    shapes += [("mamba2-draft4", 64, "b64 s4 h80 p64 n128 + intermediate states",
                lambda batch, dev: mamba2_inputs(batch, dev, seqlen=4))]
    shapes += [("mamba1", b, f"b{b} d4096 n16", mamba1_inputs) for b in (1, 64)]
    rows = []
    for form, batch, shape, make_inputs in shapes:
        inputs = make_inputs(batch, device)
        ms = harness.time_ms(lambda: selective_state_update(**inputs), device)
        nbytes = bytes_moved(inputs)
        floor_ms = nbytes / ceiling / 1e6
        row = dict(op="selective_state_update", form=form, shape=shape, time_ms=ms,
                   MB=nbytes / 1e6, GBps=nbytes / ms / 1e6, floor_ms=floor_ms,
                   fraction_of_floor=floor_ms / ms, ceiling_GBps=ceiling)
        if form == "mamba2" and device.type == "cuda":
            anchor_ms = MAMBA2_ANCHOR_MS[batch]
            row.update(anchor_ms=anchor_ms, ratio_to_anchor=ms / anchor_ms)
        rows.append(row)
    harness.write_results("state_update", rows, device,
                          ["form", "shape", "time_ms", "MB", "GBps", "floor_ms",
                           "fraction_of_floor", "anchor_ms", "ratio_to_anchor"])
    if device.type == "cuda":
        sweep_launch_shapes(device, ceiling)


def sweep_launch_shapes(device, ceiling):
    """The Mamba-2 shapes under each launch shape the kernels take: the single-token kernel with
    K blocks per SM ("blocks=K"; the heuristic takes as many as are resident), and the general
    (draft-capable) kernel with its heuristic ("general") or lanes per row and rows per thread
    ("lanes,rows"), to see what the heuristic leaves on the table."""
    rows = []
    for batch in (1, 64, 256):
        inputs = mamba2_inputs(batch, device)
        nbytes = bytes_moved(inputs)
        for tune in ("heuristic", "blocks=1", "blocks=2", "blocks=3", "blocks=4", "general",
                     "16,2", "16,4"):
            if tune == "heuristic":
                os.environ.pop(TUNE_VARIABLE, None)
            else:
                os.environ[TUNE_VARIABLE] = tune
            ms = harness.time_ms(lambda: selective_state_update(**inputs), device)
            rows.append(dict(op="selective_state_update", shape=f"b{batch} h80 p64 n128",
                             launch=tune, time_ms=ms, GBps=nbytes / ms / 1e6,
                             fraction_of_floor=nbytes / ceiling / 1e6 / ms))
        # The state only read (disable_state_update): the read half of the traffic alone.
        os.environ.pop(TUNE_VARIABLE, None)
        ms = harness.time_ms(
            lambda: selective_state_update(**inputs, disable_state_update=True), device)
        read_bytes = nbytes - inputs["state"].numel() * inputs["state"].element_size()
        rows.append(dict(op="selective_state_update", shape=f"b{batch} h80 p64 n128",
                         launch="heuristic, state read only", time_ms=ms,
                         GBps=read_bytes / ms / 1e6,
                         fraction_of_floor=read_bytes / ceiling / 1e6 / ms))
    os.environ.pop(TUNE_VARIABLE, None)
    harness.write_results("state_update_launch_sweep", rows, device,
                          ["shape", "launch", "time_ms", "GBps", "fraction_of_floor"])


if __name__ == "__main__":
    main()
