"""mamba-ssm / causal-conv1d compatible functions over the torch.ops.mamba_ext custom ops.

Each module of this package is one op family: its public functions, the fake kernels
(torch.library.register_fake) and the autograd formulas (torch.library.register_autograd).
"""
from mamba_ext.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mamba_ext.ops.selective_scan import selective_scan_fn
from mamba_ext.ops.state_update import selective_state_update

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "selective_scan_fn",
    "selective_state_update",
]
