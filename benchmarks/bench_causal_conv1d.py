"""Times the causal_conv1d ops (forward, forward + backward, decode update) on the device present
(CUDA when there), against the bandwidth ceiling, the anchors and the goals.

Shapes are shared/anchors.md's (width 4, silu, bf16 activations, fp32 weights): on a GPU the
anchors themselves; on the CPU the same kinds scaled down so that a run takes seconds. Bytes are
what each op must move at least: the forward reads x and writes out; forward + backward also
reads x and dout and writes dx; the update reads and writes the state, reads x and writes out;
each also reads the weights and bias. The ceiling is a device-to-device copy of the same bytes
(half read, half written), timed in the same run; on an H100 the anchors' copy measured
3020 GB/s. Anchors and goals are H100 times: they are left out on other devices.
Run from the repository root: python benchmarks/bench_causal_conv1d.py [--device cpu|cuda]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402
from mamba_ext.ops import causal_conv1d_fn, causal_conv1d_update  # noqa: E402
from mamba_ext.reference import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: E402

WIDTH = 4
# (batch, dim, seqlen, layout)
CONV_SHAPES = {
    "cuda": [(8, 4096, 4096, "contiguous"), (8, 4096, 4096, "channel_last"),
             (1, 4096, 65536, "contiguous")],
    "cpu": [(2, 1024, 4096, "contiguous"), (2, 1024, 4096, "channel_last"),
            (1, 1024, 16384, "contiguous")],
}
UPDATE_DIM = 4096
UPDATE_BATCHES = (1, 64, 256)
# shared/anchors.md on an H100, bf16: (op, shape, layout) -> (anchor ms, goal ms).
H100_ANCHORS_MS = {
    ("fwd", "b8 d4096 l4096 w4", "contiguous"): (0.190, 0.185),
    ("fwd+bwd", "b8 d4096 l4096 w4", "contiguous"): (0.474, 0.45),
    ("fwd", "b8 d4096 l4096 w4", "channel_last"): (0.210, 0.19),
    ("fwd", "b1 d4096 l65536 w4", "contiguous"): (0.386, 0.37),
    ("fwd+bwd", "b1 d4096 l65536 w4", "contiguous"): (0.968, 0.92),
    ("update", "b1 d4096 w4", "contiguous"): (0.0056, 0.004),
    ("update", "b64 d4096 w4", "contiguous"): (0.0095, 0.008),
    ("update", "b256 d4096 w4", "contiguous"): (0.021, 0.018),
}
COLUMNS = ["op", "shape", "layout", "dtype", "time_ms", "MB", "GBps", "copy_ms",
           "fraction_of_copy", "fraction_of_3020", "anchor_ms", "ratio_to_anchor", "goal_ms",
           "goal", "ref_ms"]


def has_kernels(device):
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"mamba_ext::{op}",
                                                              device.type.upper())
               for op in ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update"))


def copy_ms(nbytes, device):
    """A device-to-device copy of nbytes / 2 bytes: nbytes read plus written, the ceiling."""
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return harness.time_ms(lambda: dst.copy_(src), device)


def conv_inputs(batch, dim, seqlen, layout, dtype, device):
    shape = (batch, seqlen, dim) if layout == "channel_last" else (batch, dim, seqlen)
    x = torch.randn(shape, device=device, dtype=dtype)
    x = x.transpose(1, 2) if layout == "channel_last" else x
    weight = torch.randn(dim, WIDTH, device=device, dtype=torch.float32)
    bias = torch.randn(dim, device=device, dtype=torch.float32)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()


def fwd(conv, x, weight, bias):
    with torch.no_grad():
        return conv(x, weight, bias, activation="silu")


def fwd_bwd(conv, x, weight, bias, dout):
    out = conv(x, weight, bias, activation="silu")
    return torch.autograd.grad(out, (x, weight, bias), dout)


def row(op, shape, layout, dtype, ms, nbytes, ref_ms, device):
    ceiling_ms = copy_ms(nbytes, device)
    result = {"op": op, "shape": shape, "layout": layout,
              "dtype": str(dtype).replace("torch.", ""), "time_ms": ms, "MB": nbytes / 1e6,
              "GBps": nbytes / ms / 1e6, "copy_ms": ceiling_ms,
              "fraction_of_copy": ceiling_ms / ms, "ref_ms": ref_ms}
    if device.type == "cuda":
        result["fraction_of_3020"] = nbytes / ms / 1e6 / harness.H100_COPY_GBPS
    anchor = H100_ANCHORS_MS.get((op, shape, layout))
    if anchor and dtype == torch.bfloat16 and "H100" in harness.device_name(device):
        anchor_ms, goal_ms = anchor
        result.update(anchor_ms=anchor_ms, ratio_to_anchor=ms / anchor_ms, goal_ms=goal_ms,
                      goal="met" if ms <= goal_ms else f"missed by {ms / goal_ms - 1:.1%}")
    return result


def bench_conv(device, dtype):
    rows = []
    for batch, dim, seqlen, layout in CONV_SHAPES[device.type]:
        x, weight, bias = conv_inputs(batch, dim, seqlen, layout, dtype, device)
        dout = torch.randn_like(x)  # in out's layout
        shape = f"b{batch} d{dim} l{seqlen} w{WIDTH}"
        activation_bytes = batch * dim * seqlen * x.element_size()
        param_bytes = dim * (WIDTH + 1) * weight.element_size()
        for op, fn, moves in [("fwd", fwd, 2), ("fwd+bwd", fwd_bwd, 5)]:
            args = (x, weight, bias) + ((dout,) if fn is fwd_bwd else ())
            ms = harness.time_ms(lambda: fn(causal_conv1d_fn, *args), device)
            ref_ms = harness.time_ms(lambda: fn(causal_conv1d_ref, *args), device, warmup=1, rep=3)
            rows.append(row(op, shape, layout, dtype, ms, moves * activation_bytes + param_bytes,
                            ref_ms, device))
    return rows


def bench_update(device, dtype):
    rows = []
    for batch in UPDATE_BATCHES:
        x = torch.randn(batch, UPDATE_DIM, device=device, dtype=dtype)
        conv_state = torch.randn(batch, UPDATE_DIM, WIDTH - 1, device=device, dtype=dtype)
        weight = torch.randn(UPDATE_DIM, WIDTH, device=device)
        bias = torch.randn(UPDATE_DIM, device=device)
        ms = harness.time_ms(
            lambda: causal_conv1d_update(x, conv_state, weight, bias, activation="silu"), device)
        ref_ms = harness.time_ms(
            lambda: causal_conv1d_update_ref(x, conv_state, weight, bias, activation="silu"),
            device)
        nbytes = (2 * x.numel() + 2 * conv_state.numel()) * x.element_size()
        nbytes += UPDATE_DIM * (WIDTH + 1) * weight.element_size()
        rows.append(row("update", f"b{batch} d{UPDATE_DIM} w{WIDTH}", "contiguous", dtype, ms,
                        nbytes, ref_ms, device))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    if not has_kernels(device):
        sys.exit(f"causal_conv1d has no kernels for {device}")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        rows += bench_conv(device, dtype) + bench_update(device, dtype)
    harness.write_results("causal_conv1d", rows, device, COLUMNS)


if __name__ == "__main__":
    main()
