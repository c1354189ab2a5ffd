"""Shared test helpers: devices, tolerances and input makers."""
import pytest
import torch

# Every op test runs on both; the CUDA case skips where there is no GPU (see conftest.py).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# DESIGN.md section 4: relative error against a float64 reference.
REL_TOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_error(out, ref):
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN or Inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out, ref, dtype, name="out", lowp=None):
    """Checks out against the float64 reference ref.

    The bound is DESIGN.md's for `dtype`. When `lowp` is given (the same computation done by
    PyTorch in the low precision), out must also be no worse than twice its error plus a small
    floor: flash-attention's rule.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    bound = REL_TOL[dtype]
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:g} ({dtype})"
    if lowp is not None:
        lowp_err = rel_error(lowp, ref)
        assert err <= 2 * lowp_err + 1e-5, (
            f"{name}: relative error {err:.3g} > 2 x {lowp_err:.3g} (PyTorch in {dtype}) + 1e-5")


def strided(t, dim=-1, factor=2):
    """The same values as t in a tensor that is not contiguous: a slice of a wider buffer."""
    shape = list(t.shape)
    shape[dim] *= factor
    wide = torch.randn(shape, dtype=t.dtype, device=t.device)
    index = [slice(None)] * t.dim()
    index[dim] = slice(0, None, factor)
    view = wide[tuple(index)]
    view.copy_(t)
    assert not view.is_contiguous() or t.shape[dim] <= 1
    return view
