"""Selective scan benchmark.

CPU: the kernel against the pure-PyTorch reference at b2 d256 l4096 n16, float32, with variable
B and C, D, z, delta_bias and softplus: forward, and forward + backward through autograd. The
reference's loop over time is timed at a shorter length and scaled linearly (its cost per step
does not depend on the length). Kernel and reference are timed in interleaved rounds, keeping the
best of each, as the machine these run on is shared.
CUDA (when the op has a CUDA kernel): the anchors.md shapes in bfloat16 with the anchors' options,
with the bytes each must move, achieved GB/s, fraction of the copy-bandwidth floor and ratio to
mamba-ssm's time.

Run from the repository root: python benchmarks/bench_selective_scan.py
"""
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mamba_ext.ops import selective_scan_fn  # noqa: E402
from mamba_ext.reference import selective_scan_ref  # noqa: E402

CPU_SHAPE = dict(batch=2, dim=256, seqlen=4096, dstate=16)
REFERENCE_SEQLEN = 512
CPU_ROUNDS = 3

# anchors.md: mamba-ssm on an H100, bf16, variable B / C, one group, softplus and z on.
ANCHORS = [  # (batch, dim, seqlen, dstate, fwd ms, fwd+bwd ms)
    (8, 4096, 4096, 16, 2.30, 11.9),
    (8, 4096, 2048, 16, 1.17, 5.94),
    (1, 4096, 65536, 16, 5.97, 27.1),
    (8, 2048, 4096, 64, 3.94, 22.3),
]


def make_inputs(batch, dim, seqlen, dstate, device, dtype):
    """Mamba's arguments: delta before softplus, A = -(1..dstate), one group of B and C."""
    def activation(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    A = -torch.arange(1, dstate + 1, device=device, dtype=torch.float32).repeat(dim, 1)
    return dict(u=activation(batch, dim, seqlen), delta=activation(batch, dim, seqlen) - 2.0,
                A=A, B=activation(batch, 1, dstate, seqlen), C=activation(batch, 1, dstate, seqlen),
                D=torch.randn(dim, device=device), z=activation(batch, dim, seqlen),
                delta_bias=0.1 * torch.rand(dim, device=device))


def forward(fn, inputs):
    return lambda: fn(**inputs, delta_softplus=True)


def forward_backward(fn, inputs, **options):
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    dout = torch.randn_like(inputs["u"])

    def run():
        out = fn(**leaves, delta_softplus=True, **options)
        torch.autograd.grad(out, list(leaves.values()), dout)
    return run


def deterministic(make):
    """The same run with torch.use_deterministic_algorithms(True) (ordered sums, no atomics)."""
    def wrapped(fn, inputs):
        run = make(fn, inputs)

        def run_deterministic():
            torch.use_deterministic_algorithms(True)
            try:
                run()
            finally:
                torch.use_deterministic_algorithms(False)
        return run_deterministic
    return wrapped


def bench_cpu():
    device = torch.device("cpu")
    shape = CPU_SHAPE
    inputs = make_inputs(**shape, device=device, dtype=torch.float32)
    short = dict(shape, seqlen=REFERENCE_SEQLEN)
    short_inputs = make_inputs(**short, device=device, dtype=torch.float32)
    scale = shape["seqlen"] / REFERENCE_SEQLEN
    label = "b{batch} d{dim} l{seqlen} n{dstate}".format(**shape)
    rows = []
    for mode, make in (("fwd", forward), ("fwd+bwd", forward_backward)):
        kernel, reference = make(selective_scan_fn, inputs), make(selective_scan_ref, short_inputs)
        # Interleaved rounds, the best of each kept: on a machine shared with other jobs a
        # single median swings by 2-3x, and not equally for both.
        kernel_ms, reference_ms = float("inf"), float("inf")
        for _ in range(CPU_ROUNDS):
            kernel_ms = min(kernel_ms, harness.time_ms(kernel, device))
            reference_ms = min(reference_ms,
                               scale * harness.time_ms(reference, device, warmup=1, rep=3))
        rows.append(dict(shape=label, dtype="float32", mode=mode, threads=torch.get_num_threads(),
                         kernel_ms=kernel_ms, reference_ms=reference_ms,
                         speedup=reference_ms / kernel_ms,
                         note=f"best of {CPU_ROUNDS} interleaved rounds; reference timed at "
                              f"l{REFERENCE_SEQLEN}, scaled x{scale:g}"))
    harness.write_results("selective_scan", rows, device,
                          ["shape", "dtype", "mode", "threads", "kernel_ms", "reference_ms",
                           "speedup", "note"])


def scan_bytes(batch, dim, seqlen, dstate, mode, element=2):
    """Bytes the op must move: fwd reads u, delta, z, B, C and writes out; the backward also
    reads dout and writes du, ddelta, dz, dB, dC (DESIGN.md section 5)."""
    activations, states = batch * dim * seqlen, batch * dstate * seqlen
    fwd = (4 * activations + 2 * states) * element
    bwd = (7 * activations + 4 * states) * element
    return fwd if mode == "fwd" else fwd + bwd


def bench_cuda():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mamba_ext::selective_scan_fwd", "CUDA"):
        print("skipping the CUDA shapes: selective_scan has no CUDA kernel yet")
        return
    device = torch.device("cuda")
    rows = []
    for batch, dim, seqlen, dstate, anchor_fwd, anchor_fwd_bwd in ANCHORS:
        inputs = make_inputs(batch, dim, seqlen, dstate, device, torch.bfloat16)
        recompute = functools.partial(forward_backward, keep_checkpoints=False)
        for mode, make, anchor in (("fwd", forward, anchor_fwd),
                                   ("fwd+bwd", forward_backward, anchor_fwd_bwd),
                                   ("fwd+bwd recomputed checkpoints", recompute, anchor_fwd_bwd),
                                   ("fwd+bwd deterministic", deterministic(forward_backward),
                                    anchor_fwd_bwd)):
            run = make(selective_scan_fn, inputs)
            ms = harness.time_ms(run, device)
            nbytes = scan_bytes(batch, dim, seqlen, dstate, mode.split()[0])
            floor_ms = nbytes / (harness.H100_COPY_GBPS * 1e9) * 1e3
            rows.append(dict(shape=f"b{batch} d{dim} l{seqlen} n{dstate}", dtype="bfloat16",
                             mode=mode, ms=ms, GB=nbytes / 1e9, GBps=nbytes / (ms * 1e6),
                             floor_fraction=floor_ms / ms, anchor_ms=anchor,
                             anchor_ratio=anchor / ms, extra_peak_MB=extra_peak_mb(run)))
    harness.write_results("selective_scan", rows, device,
                          ["shape", "dtype", "mode", "ms", "GB", "GBps", "floor_fraction",
                           "anchor_ms", "anchor_ratio", "extra_peak_MB"])
    sweep_segments(device)


def extra_peak_mb(run):
    """Peak memory one call allocates beyond what was live before it (MB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


TUNE_VARIABLE = "MAMBA_EXT_SCAN_TUNE"


# (anchors row, mode, MAMBA_EXT_SCAN_TUNE settings): around each pass's heuristic ("").
SEGMENT_SWEEP = [
    (0, "fwd+bwd", ["", "reverse_segments=1", "reverse_segments=2", "reverse_segments=4"]),
    (1, "fwd+bwd", ["", "reverse_segments=1"]),
    (2, "fwd+bwd", ["", "reverse_segments=16", "reverse_segments=32", "reverse_segments=48"]),
    (2, "fwd", ["", "forward_segments=16", "forward_segments=24", "forward_segments=32"]),
]


def sweep_segments(device):
    """Times with the passes' segments as asked (MAMBA_EXT_SCAN_TUNE; "heuristic": the choice
    of selective_scan.h) at the n16 shapes of anchors.md."""
    rows = []
    for row, mode, tunes in SEGMENT_SWEEP:
        batch, dim, seqlen, dstate, anchor_fwd, anchor_fwd_bwd = ANCHORS[row]
        inputs = make_inputs(batch, dim, seqlen, dstate, device, torch.bfloat16)
        make, anchor = ((forward, anchor_fwd) if mode == "fwd"
                        else (forward_backward, anchor_fwd_bwd))
        for tune in tunes:
            os.environ[TUNE_VARIABLE] = tune
            ms = harness.time_ms(make(selective_scan_fn, inputs), device)
            rows.append(dict(shape=f"b{batch} d{dim} l{seqlen} n{dstate}", mode=mode,
                             tune=tune or "heuristic", ms=ms, anchor_ms=anchor,
                             anchor_ratio=anchor / ms))
    os.environ.pop(TUNE_VARIABLE, None)
    harness.write_results("selective_scan_segment_sweep", rows, device,
                          ["shape", "mode", "tune", "ms", "anchor_ms", "anchor_ratio"])


if __name__ == "__main__":
    # On a GPU machine the CUDA shapes; the CPU comparison with the reference is for CPU hosts.
    if torch.cuda.is_available():
        bench_cuda()
    else:
        bench_cpu()
