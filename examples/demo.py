"""The main job until the layers exist: runs every op on random inputs against its float64
reference and prints the relative error and the time of the op and of the reference.

    python examples/demo.py            # on CUDA when there is a GPU, else on the CPU
"""
import argparse
import time

import torch

import mamba_ext
from mamba_ext import ops, reference


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def timed(fn, device, reps=3):
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def to64(*tensors):
    return [None if t is None else t.detach().double().cpu() for t in tensors]


def cases(device, dtype):
    """(name, op call, reference call on float64 copies) for each op."""
    b, d, l, n, w = 2, 256, 512, 16, 4
    f32 = dict(device=device, dtype=torch.float32)
    act = dict(device=device, dtype=dtype)

    u, delta, z = (torch.randn(b, d, l, **act) for _ in range(3))
    A = -torch.rand(d, n, **f32) - 0.5
    B, C = torch.randn(b, 1, n, l, **act), torch.randn(b, 1, n, l, **act)
    D, delta_bias = torch.randn(d, **f32), torch.rand(d, **f32)
    scan_args = (u, delta, A, B, C, D, z, delta_bias)
    yield ("selective_scan_fn  b2 d256 l512 n16",
           lambda: ops.selective_scan_fn(*scan_args, delta_softplus=True),
           lambda: reference.selective_scan_ref(*to64(*scan_args), delta_softplus=True))

    x = torch.randn(b, d, l, **act)
    weight, bias = torch.randn(d, w, **act), torch.randn(d, **act)
    yield ("causal_conv1d_fn   b2 d256 l512 w4",
           lambda: ops.causal_conv1d_fn(x, weight, bias, activation="silu"),
           lambda: reference.causal_conv1d_ref(*to64(x, weight, bias), activation="silu"))

    conv_state = torch.randn(b, d, w - 1, **act)
    x1 = torch.randn(b, d, **act)
    yield ("causal_conv1d_update b2 d256 w4",
           lambda: ops.causal_conv1d_update(x1, conv_state.clone(), weight, bias, "silu"),
           lambda: reference.causal_conv1d_update_ref(
               *to64(x1, conv_state, weight, bias), activation="silu"))

    h, p, n2 = 8, 64, 128
    state = torch.randn(b, h, p, n2, **f32)
    xs, dt, zs = (torch.randn(b, h, p, **act) for _ in range(3))
    A2 = (-torch.rand(h, **f32) - 0.5)[:, None, None].expand(h, p, n2)
    B2, C2 = torch.randn(b, 1, n2, **act), torch.randn(b, 1, n2, **act)
    D2 = torch.randn(h, **f32)[:, None].expand(h, p)
    dt_bias = torch.rand(h, **f32)[:, None].expand(h, p)
    su_args = (xs, dt, A2, B2, C2, D2, zs, dt_bias)
    yield ("selective_state_update b2 h8 p64 n128",
           lambda: ops.selective_state_update(state.clone(), *su_args, dt_softplus=True),
           lambda: reference.selective_state_update_ref(
               *to64(state, *su_args), dt_softplus=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"mamba_ext {mamba_ext.__version__}, torch {torch.__version__}, device {device}, "
          f"activations {args.dtype}, {torch.get_num_threads()} CPU threads")
    print(f"{'op':40s} {'rel. error':>11s} {'op ms':>9s} {'ref ms':>9s} {'speed-up':>9s}")
    for name, run_op, run_ref in cases(device, dtype):
        out, ref = run_op(), run_ref()
        err = rel_error(out, ref)
        t_op, t_ref = timed(run_op, device), timed(run_ref, torch.device("cpu"), reps=1)
        print(f"{name:40s} {err:11.2e} {t_op:9.3f} {t_ref:9.1f} {t_ref / t_op:8.0f}x")


if __name__ == "__main__":
    main()
