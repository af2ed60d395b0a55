"""The error of a bf16 gradient all-reduce against fp32, at 32 and 256 contributions (issue 23).

``parallel.grad_reduce_dtype: bf16`` (parallel/grads.py) divides each rank's fp32 gradient by W,
rounds it to bf16 and sums W of them in bf16; a ring all-reduce adds them one hop at a time, each
partial sum rounded to bf16 (simulated here as a sequential sum over ranks, the ring's order for
one chunk). fp32 sums in fp32 and divides. Reference: the same sum in float64. Per-rank gradients
are ``mu + noise * z`` (a shared signal plus per-rank noise of ``noise`` times its size: a
mini-batch gradient is mostly noise at 32 images per rank). Reported: the relative L2 error of the
mean gradient, and the same for an Adam-like update direction ``sign(g)`` (the fraction of
elements whose sign flips), per W, for 256 (the dense parameters' DP group of the 256-GPU config)
and 32 (its experts' EDP group).

    python benchmarks/grad_reduce_error.py --out benchmarks/results/grad_reduce_error.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def reduce_error(world: int, numel: int, noise: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(numel, generator=g, dtype=torch.float64) * 1e-3
    ref = torch.zeros(numel, dtype=torch.float64)
    s32 = torch.zeros(numel, dtype=torch.float32)
    s16 = torch.zeros(numel, dtype=torch.bfloat16)
    for _ in range(world):
        grad = (mu + noise * 1e-3 * torch.randn(numel, generator=g, dtype=torch.float64)).float()
        ref += grad.double()
        s32 += grad
        s16 += (grad / world).to(torch.bfloat16)  # rounded after every add, as a ring's hops
    ref /= world
    out = {}
    for name, got in (("fp32", s32 / world), ("bf16", s16.float())):
        err = (got.double() - ref).norm() / ref.norm()
        flips = (torch.sign(got.double()) != torch.sign(ref)).double().mean()
        out[name] = {"rel_l2": float(err), "sign_flips": float(flips)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=1 << 20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    print(f"{'W':>4} {'noise':>6} {'fp32 rel':>10} {'bf16 rel':>10} {'bf16 flips':>11}")
    for world in (32, 256):
        for noise in (0.0, 1.0, 10.0):
            r = reduce_error(world, args.numel, noise)
            rows.append({"world": world, "noise": noise, **r})
            print(
                f"{world:4d} {noise:6.1f} {r['fp32']['rel_l2']:10.2e} {r['bf16']['rel_l2']:10.2e} "
                f"{r['bf16']['sign_flips']:11.2e}"
            )
    if args.out:
        Path(args.out).write_text(json.dumps({"numel": args.numel, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
