"""Loads the compiled library, which registers every torch.ops.mamba_ext op with the dispatcher."""
import importlib.util

import torch


def _load():
    spec = importlib.util.find_spec("mamba_ext._C")
    if spec is None or spec.origin is None:
        raise ImportError(
            "mamba_ext: the compiled library mamba_ext._C was not found; build it with "
            "`pip install --no-build-isolation -e .` from the source tree (see README.md)"
        )
    # The library has no Python module init: it only registers ops, so load it as torch does.
    torch.ops.load_library(spec.origin)


_load()
