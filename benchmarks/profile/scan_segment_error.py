"""dA's error against the CPU kernel in float64, with the CUDA backward's reverse segments
(l 300: 2 segments) and without (l 255), over seeds: python benchmarks/profile/scan_segment_error.py"""
import torch

import mamba_ext  # noqa: F401


def dA_error(seqlen, seed):
    g = torch.Generator().manual_seed(seed)
    b, d, n, groups = 2, 6, 64, 2
    u = torch.randn(b, d, seqlen, generator=g)
    delta = 0.02 + 0.3 * torch.rand(b, d, seqlen, generator=g)
    A = -(0.25 + 2 * torch.rand(d, n, generator=g))
    B = torch.randn(d, n, generator=g)
    C = torch.randn(b, groups, n, seqlen, generator=g)
    D, bias = torch.randn(d, generator=g), 0.1 * torch.rand(d, generator=g)
    h0 = torch.randn(b, d, n, generator=g)
    dout, dlast = torch.randn(b, d, seqlen, generator=g), torch.randn(b, d, n, generator=g)
    args = [u, delta, A, B, C, D, None, bias, h0]
    cuda = torch.ops.mamba_ext.selective_scan_bwd(dout.cuda(), dlast.cuda(),
                                                  *[a if a is None else a.cuda() for a in args],
                                                  None, 0, False)
    ref = torch.ops.mamba_ext.selective_scan_bwd(dout.double(), dlast.double(),
                                                 *[a if a is None else a.double() for a in args],
                                                 None, 0, False)
    return [((c.cpu().double() - r).norm() / r.norm()).item() for c, r in zip(cuda, ref)
            if r.numel()]


for seqlen in (255, 300, 2000):
    errs = torch.tensor([dA_error(seqlen, s) for s in range(40)])
    print(f"l{seqlen}: max over 40 seeds of du ddelta dA dB dC dD ddelta_bias dh0:",
          " ".join(f"{e:.2e}" for e in errs.max(0).values.tolist()))
