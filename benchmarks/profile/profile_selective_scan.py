"""One forward and one backward of the selective scan at b8 d4096 l4096 n16 bf16, for Nsight
Compute (scripts/device_profile_scan.sh): python benchmarks/profile/profile_selective_scan.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_selective_scan import make_inputs  # noqa: E402

import mamba_ext  # noqa: E402,F401

inputs = make_inputs(8, 4096, 4096, 16, torch.device("cuda"), torch.bfloat16)
args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")] + [None]
out = torch.ops.mamba_ext.selective_scan_fwd(*args, None, 0, True)[0]
torch.ops.mamba_ext.selective_scan_bwd(torch.randn_like(out), None, *args, None, 0, True)
torch.cuda.synchronize()
