"""Expert-parallel DiffMoE layer step on CPU (gloo): time per phase and bytes sent per rank.

Spawns W processes (W = 2 and 4 by default) on 127.0.0.1 and, for each expert-parallel size P,
runs one DiffMoE layer with the global pool ``dp`` (every rank's tokens compete):

- step table: seconds per phase (route = router softmax, select = distributed top-k, dispatch /
  experts / combine = the all-to-all dispatcher's phases, backward), the maximum over ranks, mean
  over timed steps; bytes each rank sent for selection and for dispatch + combine;
- selection table: bytes and seconds of the radix select per layer call at N = 1K, 16K, 64K tokens
  per rank, next to what an all-gather of the fp32 scores would send and take. The radix select
  must stay flat in N; the all-gather grows linearly;
- overlap table: a whole DiffMoE-DiT training step (forward, backward, gradient reduction) with
  the `GradReducer` launching buckets during backward against the same step reducing after it,
  steps interleaved on one model with a step that reduces nothing (side by side, rotated, medians
  over repeats; every time the max over ranks). ``hidden`` is the share of what the serial
  reduction costs the step that overlap removes:
  ``hidden = (t_serial - t_overlap) / (t_serial - t_none)``, where the no-reduction step ends in a
  barrier, so the ranks' backward skew is in all three and the denominator is the reduction's own
  cost. Also printed: the serial reduction alone (after a barrier), the overlapped step's tail
  (from the end of its backward to the last bucket done) and ``hidden_tail = 1 - tail / reduce``,
  which ignores how much the concurrent reduction slows backward down but is far less noisy on
  a shared machine (two short intervals instead of a difference of two whole steps).

    python benchmarks/ep_step.py --out benchmarks/results/ep_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist


@dataclass
class Args:
    worlds: tuple[int, ...] = (2, 4)
    dim: int = 192
    experts: int = 16
    capacity: float = 1.0
    tokens: int = 4096  # per rank, step table
    pool: str = "dp"  # step table: moe.pool
    dispatches: tuple[str, ...] = ("exact",)  # step table: moe.dispatch rows, side by side
    selection_tokens: tuple[int, ...] = (1024, 16384, 65536)
    tables: tuple[str, ...] = ("step", "selection", "overlap")
    steps: int = 5
    warmup: int = 2
    # overlap table: a DiT whose dense part (attention, adaLN, every other FFN) dominates the gradient
    overlap_depth: int = 12
    overlap_dim: int = 288
    overlap_batch: int = 4  # images (16x16, patch 2: 64 tokens each) per rank
    overlap_ep: int = 2
    overlap_repeats: int = 8
    overlap_bucket_mb: float = 0.0  # 0: the reducer's default for the device
    overlap_dtype: str = "fp32"  # parallel.grad_reduce_dtype


def _max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _step_rows(args: Args, rank: int, world_size: int) -> list[dict]:
    from diffmoe_dist.config import MoEConfig
    from diffmoe_dist.model.moe.layer import MoEFeedForward
    from diffmoe_dist.model.moe.routers import router_scores
    from diffmoe_dist.model.moe.routing import RouteInputs
    from diffmoe_dist.parallel import build_parallel_dims, parallelize

    rows = []
    for ep_size in [p for p in (1, 2, 4) if world_size % p == 0 and args.experts % p == 0]:
        for dispatch in args.dispatches:
            dims = build_parallel_dims(ep_size, args.experts)
            torch.manual_seed(0)
            cfg = MoEConfig(
                router="expert_choice_global",
                num_experts=args.experts,
                capacity=args.capacity,
                pool=args.pool,
                dispatch=dispatch,
            )
            layer = MoEFeedForward(args.dim, 4 * args.dim, cfg)
            parallelize(layer, dims, cfg)
            pool = layer.pool
            x_ND = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
            phases = ("route", "select", "dispatch", "experts", "combine", "backward")
            samples: dict[str, list[float]] = {p: [] for p in phases}
            select_bytes = dispatch_bytes = 0
            for step in range(args.warmup + args.steps):
                layer.zero_grad(set_to_none=True)
                pool.reset_stats()
                x = x_ND.clone().requires_grad_(True)
                dist.barrier()
                t0 = time.perf_counter()
                scores_NE = router_scores(x, layer.router_weight_ED)
                t1 = time.perf_counter()
                inputs = RouteInputs(x, args.tokens, pool, None, True, "static", 0.5)
                mask_NE = layer.router.select(scores_NE, inputs).mask_NE
                t2 = time.perf_counter()
                y, dispatched = layer.dispatch_experts_combine(x, mask_NE, scores_NE, inputs, timed=True)
                t3 = time.perf_counter()
                y.square().mean().backward()
                t4 = time.perf_counter()
                stats = dispatched.stats
                experts = t3 - t2 - stats.dispatch_s - stats.combine_s  # LocalDispatcher (P = 1): all of it
                measured = {"route": t1 - t0, "select": t2 - t1, "dispatch": stats.dispatch_s, "experts": experts}
                measured.update(combine=stats.combine_s, backward=t4 - t3)
                for name in phases:
                    value = _max_over_ranks(measured[name])
                    if step >= args.warmup:
                        samples[name].append(value)
                select_bytes = pool.bytes_sent
                dispatch_bytes = stats.dispatch_bytes + stats.combine_bytes
            row = {"world_size": world_size, "ep_size": ep_size, "dispatch": dispatch, "tokens_per_rank": args.tokens}
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
        scores = torch.softmax(torch.randn(n, args.experts, generator=torch.Generator().manual_seed(rank)), -1)
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


def _overlap_rows(args: Args, rank: int, world_size: int) -> list[dict]:
    from diffmoe_dist.config import ModelConfig, MoEConfig
    from diffmoe_dist.model.build import build_model
    from diffmoe_dist.model.moe.collector import MoECollector
    from diffmoe_dist.model.moe.experts import expert_shard
    from diffmoe_dist.parallel import build_parallel_dims, parallelize
    from diffmoe_dist.parallel.grads import GradReducer, split_params

    ep = args.overlap_ep if world_size % args.overlap_ep == 0 else 1
    dims = build_parallel_dims(ep, 4)
    torch.manual_seed(0)
    moe = MoEConfig(router="expert_choice_global", num_experts=4, pool="dp")
    model_cfg = ModelConfig(depth=args.overlap_depth, hidden_size=args.overlap_dim, num_heads=6, class_dropout=0.0)
    with expert_shard(dims.ep_rank, dims.ep_size):
        dit = build_model(model_cfg, moe)
        parallelize(dit, dims, moe)
    bucket = int(args.overlap_bucket_mb * 2**20)
    overlapped = GradReducer(dit, dims, dtype=args.overlap_dtype, bucket_bytes=bucket, overlap=True)
    serial = GradReducer(dit, dims, dtype=args.overlap_dtype, bucket_bytes=bucket, overlap=False)
    g = torch.Generator().manual_seed(rank)
    b = args.overlap_batch
    x, t = torch.randn(b, 1, 16, 16, generator=g), torch.rand(b, generator=g)
    y, target = torch.randint(0, 10, (b,), generator=g), torch.randn(b, 1, 16, 16, generator=g)

    collector = MoECollector()

    def step(mode: str) -> dict[str, float]:
        dit.zero_grad(set_to_none=True)
        collector.clear()
        dist.barrier()
        t0 = time.perf_counter()
        with collector.collect(dit):
            out = dit(x, t, y)
        loss = ((out - target) ** 2).mean() + collector.losses()["loss"]
        with contextlib.nullcontext() if mode == "overlap" else overlapped.no_sync():
            loss.backward()
        if mode == "serial":
            dist.barrier()  # the reduction alone, ranks in step (their backward skew is not its cost)
        t2 = time.perf_counter()
        if mode == "none":
            dist.barrier()  # ends like a reducing step: the slowest rank's backward counts
        else:
            (overlapped if mode == "overlap" else serial).finish()
        t3 = time.perf_counter()
        return {mode: _max_over_ranks(t3 - t0), f"{mode}_after_backward": _max_over_ranks(t3 - t2)}

    samples: dict[str, list[float]] = {}
    modes = ("none", "serial", "overlap")
    for i in range(args.warmup + args.overlap_repeats):
        for mode in modes[i % 3 :] + modes[: i % 3]:  # rotated: no variant always runs first
            for key, value in step(mode).items():
                if i >= args.warmup:
                    samples.setdefault(key, []).append(value)
    med = {k: statistics.median(v) for k, v in samples.items()}
    cost = med["serial"] - med["none"]  # what the serial reduction adds to the step
    dense, expert = (sum(p.numel() for p in ps) for ps in split_params(dit))
    return [
        {
            "world_size": world_size,
            "ep_size": ep,
            "tokens_per_rank": b * 64,
            "dense_params": dense,
            "expert_params_local": expert,
            "buckets": sum(len(bs) for bs in serial.buckets),
            "reduce_bytes": sum(k.flat.numel() * k.flat.element_size() for bs in serial.buckets for k in bs if k.group),
            "no_reduce_s": med["none"],
            "serial_s": med["serial"],
            "overlap_s": med["overlap"],
            "reduce_alone_s": med["serial_after_backward"],
            "overlap_tail_s": med["overlap_after_backward"],
            "hidden": (med["serial"] - med["overlap"]) / cost if cost > 0 else float("nan"),
            "hidden_tail": 1 - med["overlap_after_backward"] / med["serial_after_backward"],
            "samples": samples,
        }
    ]


def _tables(rank: int, world_size: int, args: Args) -> dict:
    result = {"step": [], "selection": [], "overlap": []}
    if "step" in args.tables:
        result["step"] = _step_rows(args, rank, world_size)
    if "selection" in args.tables:
        result["selection"] = _selection_rows(args, rank, world_size)
    if "overlap" in args.tables:
        result["overlap"] = _overlap_rows(args, rank, world_size)
    return result


def run(args: Args) -> dict:
    from diffmoe_dist.parallel.spawn import run_ranks

    out = {"config": asdict(args), "step": [], "selection": [], "overlap": []}
    for world_size in args.worlds:
        result = run_ranks(_tables, world_size, args)[0]  # rank 0's rows: each figure is already over ranks
        out["step"] += result["step"]
        out["selection"] += result["selection"]
        out["overlap"] += result["overlap"]
    return out


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def print_tables(result: dict) -> None:
    cfg = result["config"]
    if result["step"]:
        print(
            f"\nDiffMoE layer step, pool={cfg.get('pool', 'dp')}, D={cfg['dim']}, E={cfg['experts']}, "
            f"C={cfg['capacity']}, {cfg['tokens']} tokens/rank, fp32, gloo on CPU; seconds (max over ranks)"
        )
        head = (
            "W",
            "P",
            "dispatch",
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
            cells = [r["world_size"], r["ep_size"], r.get("dispatch", "exact")] + [
                f"{r[p + '_s']:.4f}" for p in ("route", "select", "dispatch", "experts", "combine", "backward", "total")
            ]
            cells += [_kib(r["selection_bytes"]), _kib(r["dispatch_bytes"])]
            print(" ".join(f"{c:>9}" for c in cells))
    if result["selection"]:
        print(f"\nSelection per layer call (E={cfg['experts']}): bytes sent per rank and seconds")
        head = ("W", "N/rank", "radix KiB", "calls", "radix s", "gather KiB", "gather s", "bytes x")
        print(" ".join(f"{h:>10}" for h in head))
        for r in result["selection"]:
            cells = [r["world_size"], r["tokens_per_rank"], _kib(r["radix_bytes"]), r["radix_collectives"]]
            cells += [f"{r['radix_s']:.4f}", _kib(r["allgather_bytes"]), f"{r['allgather_s']:.4f}"]
            cells += [f"{r['allgather_bytes'] / r['radix_bytes']:.1f}"]
            print(" ".join(f"{c:>10}" for c in cells))


def print_overlap(result: dict) -> None:
    if not result["overlap"]:
        return
    cfg = result["config"]
    print(
        f"\nGradient reduction overlapped with backward: DiffMoE-DiT depth {cfg['overlap_depth']}, "
        f"D={cfg['overlap_dim']}, E=4, {cfg['overlap_dtype']} reduction, gloo on CPU; "
        "median seconds per step (max over ranks)"
    )
    head = ("W", "P", "MB", "buckets", "no reduce", "serial", "overlap", "reduce", "tail", "hidden", "hid tail")
    print(" ".join(f"{h:>9}" for h in head))
    for r in result["overlap"]:
        cells = [r["world_size"], r["ep_size"], f"{r['reduce_bytes'] / 2**20:.1f}", r["buckets"]]
        keys = ("no_reduce_s", "serial_s", "overlap_s", "reduce_alone_s", "overlap_tail_s")
        cells += [f"{r[k]:.4f}" for k in keys]
        cells += [f"{100 * r['hidden']:.0f}%", f"{100 * r['hidden_tail']:.0f}%"]
        print(" ".join(f"{c:>9}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    parser.add_argument("--tokens", type=int, default=Args.tokens)
    parser.add_argument("--pool", default=Args.pool, choices=("rank", "ep", "dp"), help="step table: moe.pool")
    parser.add_argument("--dispatch", default="exact", help="step table: moe.dispatch list, e.g. exact,padded")
    parser.add_argument("--dim", type=int, default=Args.dim)
    parser.add_argument("--experts", type=int, default=Args.experts)
    parser.add_argument("--steps", type=int, default=Args.steps)
    parser.add_argument("--selection-tokens", default="1024,16384,65536")
    parser.add_argument("--tables", default="step,selection,overlap", help="comma-separated: step,selection,overlap")
    parser.add_argument("--overlap-repeats", type=int, default=Args.overlap_repeats)
    parser.add_argument("--overlap-dim", type=int, default=Args.overlap_dim)
    parser.add_argument("--overlap-depth", type=int, default=Args.overlap_depth)
    parser.add_argument("--overlap-batch", type=int, default=Args.overlap_batch)
    parser.add_argument("--overlap-bucket-mb", type=float, default=Args.overlap_bucket_mb)
    parser.add_argument("--overlap-dtype", default=Args.overlap_dtype, choices=("fp32", "bf16"))
    ns = parser.parse_args()
    args = Args(
        worlds=tuple(int(w) for w in ns.worlds.split(",")),
        dim=ns.dim,
        experts=ns.experts,
        tokens=ns.tokens,
        pool=ns.pool,
        dispatches=tuple(ns.dispatch.split(",")),
        steps=ns.steps,
        selection_tokens=tuple(int(n) for n in ns.selection_tokens.split(",")),
        tables=tuple(ns.tables.split(",")),
        overlap_repeats=ns.overlap_repeats,
        overlap_dim=ns.overlap_dim,
        overlap_depth=ns.overlap_depth,
        overlap_batch=ns.overlap_batch,
        overlap_bucket_mb=ns.overlap_bucket_mb,
        overlap_dtype=ns.overlap_dtype,
    )
    result = run(args)
    print_tables(result)
    print_overlap(result)
    # flat selection traffic is the point: fail loudly if it ever grows with N
    for w in args.worlds:
        sizes = {r["radix_bytes"] for r in result["selection"] if r["world_size"] == w}
        assert len(sizes) <= 1, f"selection bytes vary with tokens at W={w}: {sorted(sizes)}"
    if ns.out:
        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        with open(ns.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {ns.out}")


if __name__ == "__main__":
    main()
