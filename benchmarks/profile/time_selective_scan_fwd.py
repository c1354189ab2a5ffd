"""Forward times of the selective scan at the four anchors.md shapes (bf16), one line each, for a
quick look after a change (the full table is bench_selective_scan.py's):
python benchmarks/profile/time_selective_scan_fwd.py [label]"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import harness  # noqa: E402
from bench_selective_scan import ANCHORS, forward, make_inputs  # noqa: E402

from mamba_ext.ops import selective_scan_fn  # noqa: E402

label = sys.argv[1] if len(sys.argv) > 1 else ""
device = torch.device("cuda")
for batch, dim, seqlen, dstate, _, _ in ANCHORS:
    inputs = make_inputs(batch, dim, seqlen, dstate, device, torch.bfloat16)
    ms = harness.time_ms(forward(selective_scan_fn, inputs), device)
    print(f"{label} fwd b{batch} d{dim} l{seqlen} n{dstate}: {ms:.4f} ms", flush=True)
