"""All-to-all bandwidth and latency over this job's ranks, per message size and expert-parallel size.

Runs under whatever launched it (the launch env of `diffmoe_dist.parallel.launch`):

    torchrun --nproc-per-node 8 tools/a2a_bench.py --out runs/a2a
    srun --ntasks-per-node 8 python tools/a2a_bench.py --out runs/a2a
    mpirun -np 4 python tools/a2a_bench.py --out runs/a2a

For each EP size P (divisors of the world size; groups of consecutive ranks as the trainer's EP
groups, all groups active at once as in training) and each message size S (the bytes one rank
hands to ``all_to_all_single``, split evenly over the P ranks of its group), it times the
collective (median over iterations, max over ranks) and reports:
- ``time_s``: seconds per call;
- ``algbw``: S / time;
- ``busbw``: the off-rank part S (P - 1) / P over time, the bytes that actually cross links (as
  nccl-tests reports it); this is the bandwidth the planner's alpha-beta model takes;
and per P a least-squares fit ``time = alpha + offrank_bytes / bandwidth``. Nothing reads the JSON
automatically: copy a fit into a cluster file by hand (``intra_node`` for P inside a node,
``inter_node`` for a group that spans nodes; docs/tuning.md step 2), then re-run `tools/plan.py`.
Rank 0 prints the table and writes ``a2a_bench.json`` and ``a2a_bench.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SIZES = "4K,64K,1M,4M,16M,64M"


def parse_size(text: str) -> int:
    """``4K``, ``1M``, ``2G`` or plain bytes -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human_bytes(n: float) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{int(n)}"


def fit_alpha_beta(rows: list[dict]) -> tuple[float, float]:
    """Least squares ``time = alpha + x / bandwidth`` over (x = off-rank bytes, time); alpha >= 0."""
    xs = [r["offrank_bytes"] for r in rows]
    ts = [r["time_s"] for r in rows]
    n = len(xs)
    mx, mt = sum(xs) / n, sum(ts) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / var if var > 0 else 0.0
    if slope <= 0:  # latency-bound over the whole range: bandwidth from the largest message
        big = max(rows, key=lambda r: r["offrank_bytes"])
        return min(ts), big["offrank_bytes"] / big["time_s"] if big["time_s"] > 0 else float("inf")
    alpha = max(0.0, mt - slope * mx)
    return alpha, 1.0 / slope


def _time_alltoall(size: int, dtype, group, group_size: int, device, warmup: int, iters: int) -> float:
    elem = torch.tensor([], dtype=dtype).element_size()
    numel = max(group_size, size // elem // group_size * group_size)
    src = torch.ones(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    from diffmoe_dist.train.flops import time_op

    times = time_op(lambda: dist.all_to_all_single(dst, src, group=group), device, warmup, iters, before=dist.barrier)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank is what a training step waits for
    return float(t)


def run(args, env, device) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = DTYPES[args.dtype]
    elem = torch.tensor([], dtype=dtype).element_size()
    ep_sizes = [int(p) for p in args.ep_sizes.split(",")] if args.ep_sizes else None
    if ep_sizes is None:
        ep_sizes = [p for p in range(2, world + 1) if world % p == 0] or [1]
    bad = [p for p in ep_sizes if p < 1 or world % p]
    if bad:
        raise SystemExit(f"a2a_bench: --ep-sizes {bad} must divide the world size {world}")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows, fits = [], []
    for p in ep_sizes:
        group = None
        # new_group is collective: every rank creates every group of this size, in the same order.
        for start in range(0, world, p):
            g = dist.new_group(list(range(start, start + p)))
            if start <= rank < start + p:
                group = g
        mine = []
        for size in sizes:
            numel = max(p, size // elem // p * p)
            nbytes = numel * elem
            t = _time_alltoall(size, dtype, group, p, device, args.warmup, args.iters)
            offrank = nbytes * (p - 1) / p
            row = {
                "ep_size": p,
                "bytes": nbytes,
                "offrank_bytes": offrank,
                "time_s": t,
                "algbw": nbytes / t if t > 0 else 0.0,
                "busbw": offrank / t if t > 0 else 0.0,
                "intra_node": p <= env.local_world_size,
            }
            mine.append(row)
            if rank == 0:
                print(
                    f"{p:>4} {human_bytes(nbytes):>8} {t * 1e6:>12.1f} {row['algbw'] / 1e9:>10.3f} "
                    f"{row['busbw'] / 1e9:>10.3f}",
                    flush=True,
                )
        rows += mine
        if p > 1 and len(mine) >= 2:
            alpha, bandwidth = fit_alpha_beta(mine)
            fits.append(
                {"ep_size": p, "alpha_s": alpha, "bandwidth": bandwidth, "intra_node": p <= env.local_world_size}
            )
    return {
        "world_size": world,
        "local_world_size": env.local_world_size,
        "nodes": max(1, world // max(1, env.local_world_size)),
        "launcher": env.launcher,
        "backend": dist.get_backend(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "iters": args.iters,
        "rows": rows,
        "fits": fits,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bw, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for p in sorted({r["ep_size"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["ep_size"] == p]
        xs = [r["bytes"] for r in rows]
        label = f"P={p}" + ("" if rows[0]["intra_node"] else " (inter-node)")
        ax_bw.plot(xs, [r["busbw"] / 1e9 for r in rows], marker="o", label=label)
        ax_t.plot(xs, [r["time_s"] * 1e6 for r in rows], marker="o", label=label)
    for ax in (ax_bw, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per rank per all_to_all_single")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_bw.set_ylabel("bus bandwidth (GB/s, off-rank bytes / time)")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time per call (us)")
    fig.suptitle(
        f"all_to_all_single, {result['world_size']} ranks ({result['backend']}, {result['dtype']}, {result['device']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"bytes per rank, comma-separated (default {DEFAULT_SIZES})")
    p.add_argument("--ep-sizes", default=None, help="EP group sizes (default: every divisor of the world size > 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="runs/a2a_bench", help="directory for a2a_bench.json and a2a_bench.png")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from diffmoe_dist.parallel.launch import destroy_distributed, init_distributed, rank_device, read_launch_env

    env = read_launch_env()
    device = rank_device(args.device, env)  # one GPU per rank under any binding, as the trainer
    init_distributed(env, 1, device, use_megatron=False)
    try:
        if env.rank == 0:
            print(f"all_to_all_single over {env.world_size} ranks ({env.launcher}, {dist.get_backend()})")
            print(f"{'P':>4} {'bytes':>8} {'time (us)':>12} {'algbw GB/s':>10} {'busbw GB/s':>10}", flush=True)
        result = run(args, env, device)
        if env.rank == 0:
            for fit in result["fits"]:
                print(
                    f"P={fit['ep_size']}: alpha {fit['alpha_s'] * 1e6:.1f} us, "
                    f"bandwidth {fit['bandwidth'] / 1e9:.3f} GB/s per rank"
                )
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "a2a_bench.json"), "w") as f:
                json.dump(result, f, indent=2)
            plot(result, os.path.join(args.out, "a2a_bench.png"))
            print(f"wrote {args.out}/a2a_bench.json and a2a_bench.png")
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
