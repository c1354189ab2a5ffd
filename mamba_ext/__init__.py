"""mamba_ext: selective state space model ops for PyTorch, on CPU and CUDA.

`mamba_ext.ops` holds the mamba-ssm / causal-conv1d compatible functions; each one calls a
torch custom op (`torch.ops.mamba_ext.*`) with CPU and CUDA kernels, a fake kernel and autograd.
`mamba_ext.reference` holds the pure-PyTorch oracles the tests compare against.
"""
from mamba_ext._version import __version__
from mamba_ext import _library  # noqa: F401  (registers torch.ops.mamba_ext before ops/ uses them)
from mamba_ext import ops, reference

__all__ = ["__version__", "ops", "reference"]
