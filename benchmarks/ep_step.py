"""Expert-parallel DiffMoE layer step on CPU (gloo): time per phase and bytes sent per rank.

Spawns W processes (W = 2 and 4 by default) on 127.0.0.1 and, for each expert-parallel size P,
runs one DiffMoE layer with the global pool ``dp`` (every rank's tokens compete):

- step table: seconds per phase (route = router softmax, select = distributed top-k, dispatch /
  experts / combine = the all-to-all dispatcher's phases, backward), the maximum over ranks, mean
  over timed steps; bytes each rank sent for selection and for dispatch + combine;
- selection table: bytes and seconds of the radix select per layer call at N = 1K, 16K, 64K tokens
  per rank, next to what an all-gather of the fp32 scores would send and take. The radix select
  must stay flat in N; the all-gather grows linearly.

    python benchmarks/ep_step.py --out runs/bench/ep_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class Args:
    worlds: tuple[int, ...] = (2, 4)
    dim: int = 192
    experts: int = 16
    capacity: float = 1.0
    tokens: int = 4096  # per rank, step table
    selection_tokens: tuple[int, ...] = (1024, 16384, 65536)
    steps: int = 5
    warmup: int = 2


def _max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _step_rows(args: Args, rank: int, world_size: int) -> list[dict]:
    from diffmoe_dist.config import MoEConfig
    from diffmoe_dist.model.moe.layer import MoEFeedForward
    from diffmoe_dist.model.moe.routers import assignment_from_mask, expert_choice_global, router_scores
    from diffmoe_dist.parallel import build_parallel_dims, parallelize

    rows = []
    for ep_size in [p for p in (1, 2, 4) if world_size % p == 0 and args.experts % p == 0]:
        dims = build_parallel_dims(ep_size, args.experts)
        torch.manual_seed(0)
        cfg = MoEConfig(
            router="expert_choice_global", num_experts=args.experts, capacity=args.capacity, pool="dp"
        )
        layer = parallelize(MoEFeedForward(args.dim, 4 * args.dim, cfg), dims, cfg)
        dispatcher, pool = layer.dispatcher, layer.pool
        x_ND = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
        phases = ("route", "select", "dispatch", "experts", "combine", "backward")
        samples: dict[str, list[float]] = {p: [] for p in phases}
        select_bytes = dispatch_bytes = 0
        for step in range(args.warmup + args.steps):
            layer.zero_grad(set_to_none=True)
            timings: dict[str, float] = {}
            dispatcher.timings = timings
            pool.reset_stats()
            dispatcher.bytes_sent = 0
            x = x_ND.clone().requires_grad_(True)
            dist.barrier()
            t0 = time.perf_counter()
            scores_NE = router_scores(x, layer.router_weight_ED)
            t1 = time.perf_counter()
            mask_NE, _ = expert_choice_global(scores_NE, layer.capacity, pool)
            a = assignment_from_mask(mask_NE, scores_NE)
            t2 = time.perf_counter()
            y = dispatcher(x, a.token_idx_M, a.expert_idx_M, a.weight_M, layer.experts)
            t3 = time.perf_counter()
            y.square().mean().backward()
            t4 = time.perf_counter()
            if ep_size == 1:  # LocalDispatcher: all of it is expert compute
                timings = {"dispatch": 0.0, "experts": t3 - t2, "combine": 0.0}
            measured = {"route": t1 - t0, "select": t2 - t1, **timings, "backward": t4 - t3}
            for name in phases:
                value = _max_over_ranks(measured[name])
                if step >= args.warmup:
                    samples[name].append(value)
            select_bytes = pool.bytes_sent
            dispatch_bytes = getattr(dispatcher, "bytes_sent", 0)
        row = {"world_size": world_size, "ep_size": ep_size, "tokens_per_rank": args.tokens}
        row.update({f"{p}_s": statistics.mean(samples[p]) for p in phases})
        row["total_s"] = sum(row[f"{p}_s"] for p in phases)
        row.update(selection_bytes=select_bytes, dispatch_bytes=dispatch_bytes)
        rows.append(row)
    return rows


def _selection_rows(args: Args, rank: int, world_size: int) -> list[dict]:
    from diffmoe_dist.model.moe.pool import LocalPool
    from diffmoe_dist.parallel import DistributedPool

    pool = DistributedPool(dist.group.WORLD, dist.group.WORLD)
    rows = []
    for n in args.selection_tokens:
        scores = torch.softmax(
            torch.randn(n, args.experts, generator=torch.Generator().manual_seed(rank)), -1
        )
        k_E = torch.full((args.experts,), int(args.capacity * n * world_size / args.experts))
        radix, gather = [], []
        for step in range(args.warmup + args.steps):
            pool.reset_stats()
            dist.barrier()
            t0 = time.perf_counter()
            mask = pool.topk_mask(scores, k_E)
            t1 = time.perf_counter()
            # the alternative: every rank gathers all scores and selects locally
            everyone = [torch.empty_like(scores) for _ in range(world_size)]
            dist.all_gather(everyone, scores)
            full = LocalPool().topk_mask(torch.cat(everyone), k_E)
            t2 = time.perf_counter()
            assert torch.equal(full[rank * n : (rank + 1) * n], mask)
            if step >= args.warmup:
                radix.append(_max_over_ranks(t1 - t0))
                gather.append(_max_over_ranks(t2 - t1))
        rows.append(
            {
                "world_size": world_size,
                "tokens_per_rank": n,
                "radix_bytes": pool.bytes_sent,
                "radix_collectives": pool.collectives,
                "radix_s": statistics.mean(radix),
                "allgather_bytes": scores.numel() * scores.element_size(),
                "allgather_s": statistics.mean(gather),
            }
        )
    return rows


def _worker(rank: int, world_size: int, port: int, args: Args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = {
            "step": _step_rows(args, rank, world_size),
            "selection": _selection_rows(args, rank, world_size),
        }
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run(args: Args) -> dict:
    from diffmoe_dist.parallel.launch import free_port

    out = {"config": asdict(args), "step": [], "selection": []}
    ctx = mp.get_context("spawn")
    for world_size in args.worlds:
        queue = ctx.SimpleQueue()
        mp.start_processes(
            _worker, (world_size, free_port(), args, queue), nprocs=world_size, start_method="spawn"
        )
        result = queue.get()
        out["step"] += result["step"]
        out["selection"] += result["selection"]
    return out


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def print_tables(result: dict) -> None:
    cfg = result["config"]
    print(
        f"\nDiffMoE layer step, pool=dp, D={cfg['dim']}, E={cfg['experts']}, C={cfg['capacity']}, "
        f"{cfg['tokens']} tokens/rank, fp32, gloo on CPU; seconds (max over ranks)"
    )
    head = (
        "W",
        "P",
        "route",
        "select",
        "dispatch",
        "experts",
        "combine",
        "backward",
        "total",
        "sel KiB",
        "a2a KiB",
    )
    print(" ".join(f"{h:>9}" for h in head))
    for r in result["step"]:
        cells = [r["world_size"], r["ep_size"]] + [
            f"{r[p + '_s']:.4f}"
            for p in ("route", "select", "dispatch", "experts", "combine", "backward", "total")
        ]
        cells += [_kib(r["selection_bytes"]), _kib(r["dispatch_bytes"])]
        print(" ".join(f"{c:>9}" for c in cells))
    print(f"\nSelection per layer call (E={cfg['experts']}): bytes sent per rank and seconds")
    head = ("W", "N/rank", "radix KiB", "calls", "radix s", "gather KiB", "gather s", "bytes x")
    print(" ".join(f"{h:>10}" for h in head))
    for r in result["selection"]:
        cells = [r["world_size"], r["tokens_per_rank"], _kib(r["radix_bytes"]), r["radix_collectives"]]
        cells += [f"{r['radix_s']:.4f}", _kib(r["allgather_bytes"]), f"{r['allgather_s']:.4f}"]
        cells += [f"{r['allgather_bytes'] / r['radix_bytes']:.1f}"]
        print(" ".join(f"{c:>10}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    parser.add_argument("--tokens", type=int, default=Args.tokens)
    parser.add_argument("--dim", type=int, default=Args.dim)
    parser.add_argument("--experts", type=int, default=Args.experts)
    parser.add_argument("--steps", type=int, default=Args.steps)
    parser.add_argument("--selection-tokens", default="1024,16384,65536")
    ns = parser.parse_args()
    args = Args(
        worlds=tuple(int(w) for w in ns.worlds.split(",")),
        dim=ns.dim,
        experts=ns.experts,
        tokens=ns.tokens,
        steps=ns.steps,
        selection_tokens=tuple(int(n) for n in ns.selection_tokens.split(",")),
    )
    result = run(args)
    print_tables(result)
    # flat selection traffic is the point: fail loudly if it ever grows with N
    for w in args.worlds:
        sizes = {r["radix_bytes"] for r in result["selection"] if r["world_size"] == w}
        assert len(sizes) == 1, f"selection bytes vary with tokens at W={w}: {sorted(sizes)}"
    if ns.out:
        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        with open(ns.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {ns.out}")


if __name__ == "__main__":
    main()
