"""Pure-PyTorch oracles, float64-capable, written as the equations of DESIGN.md read.

They exist to test the kernels against, never to run in their place.
"""
from mamba_ext.reference.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from mamba_ext.reference.selective_scan import selective_scan_ref
from mamba_ext.reference.state_update import selective_state_update_ref

__all__ = [
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "selective_scan_ref",
    "selective_state_update_ref",
]
