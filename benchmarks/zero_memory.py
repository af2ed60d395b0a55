"""Optimizer-state bytes per rank: plain data parallelism against DeepSpeed ZeRO-1 / ZeRO-2.

Spawns W gloo processes (W = 4 by default) that build the same DiffMoE-DiT, apply expert
parallelism P, wrap it in the trainer's engine (`train/engine.py`) and take a few AdamW steps on
random data. Per rank it reports:

- ``adam``: bytes of AdamW state (``exp_avg``, ``exp_avg_sq``, step counts): replicated under plain
  data parallelism, partitioned under ZeRO (non-expert tensors over all W ranks, experts over their
  EDP group of W / P ranks);
- ``master``: ZeRO's own fp32 copy of this rank's partition (plain DP steps the fp32 parameters
  themselves, so 0 there);
- ``s/step``: wall time per training step (max over ranks, mean over timed steps).

The ratio that matters: ZeRO-1 ``adam`` bytes over plain, at P = 1 (pure data parallelism,
expected about 1/W) and at the expert-parallel size we train with (experts only shrink by W / P).

    .venv/bin/python benchmarks/zero_memory.py --out benchmarks/results/zero_memory.json
    .venv/bin/python benchmarks/zero_memory.py --depth 12 --width 384 --experts 16   # S-E16
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def _max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state (Adam moments and step counts) this rank holds."""
    total = 0
    for state in engine.base_optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def _measure(args, world_size: int, ep_size: int, stage: int) -> dict:
    from diffmoe_dist.config import load_config
    from diffmoe_dist.model.build import build_model
    from diffmoe_dist.model.moe.collector import MoECollector
    from diffmoe_dist.parallel import build_parallel_dims, parallelize
    from diffmoe_dist.train.engine import build_engine, uses_deepspeed

    cfg = load_config(
        None,
        [
            f"model.depth={args.depth}",
            f"model.hidden_size={args.width}",
            f"model.num_heads={args.heads}",
            "moe.router=expert_choice_global",
            f"moe.num_experts={args.experts}",
            f"parallel.expert_parallel_size={ep_size}",
            f"data.global_batch_size={args.batch}",
            f"train.zero_stage={stage}",
        ],
    ).validate(world_size=world_size)
    torch.manual_seed(0)
    dims = build_parallel_dims(ep_size, args.experts)
    model = build_model(cfg.model, cfg.moe)
    reducer = parallelize(model, dims, cfg.moe, grad_reduce=None if uses_deepspeed(cfg, dims) else cfg.parallel)
    engine = build_engine(model, cfg, dims, reducer, log=lambda _: None)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(dims.rank)
    local = args.batch // world_size
    times = []
    for i in range(args.warmup + args.steps):
        x = torch.randn(local, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, generator=g)
        t, y = torch.rand(local, generator=g), torch.randint(0, cfg.model.num_classes, (local,), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        engine.zero_grad()
        with (moe := MoECollector()).collect(model):
            out = engine.forward(x, t, y)
        loss = out.square().mean() + moe.losses()["loss"]
        engine.backward(loss)
        engine.step()
        if i >= args.warmup:
            times.append(_max(time.perf_counter() - t0))
    master = 0
    if stage > 0:
        master = sum(p.numel() * p.element_size() for p in engine.optimizer.single_partition_of_fp32_groups)
    return {
        "world_size": world_size,
        "ep_size": ep_size,
        "zero_stage": stage,
        "rank": dims.rank,
        "local_params": params,
        "adam_bytes": optimizer_state_bytes(engine),
        "master_bytes": master,
        "s_per_step": sum(times) / len(times),
    }


def _rows(rank: int, world_size: int, args) -> list[dict]:
    return [_measure(args, world_size, ep, stage) for ep in args.ep_sizes for stage in (0, 1, 2)]


def run(args) -> dict:
    from diffmoe_dist.parallel.spawn import run_ranks

    per_rank = run_ranks(_rows, args.world_size, args)
    rows = []
    for i, row in enumerate(per_rank[0]):
        ranks = [per_rank[r][i] for r in range(args.world_size)]
        rows.append(
            {
                **{k: row[k] for k in ("world_size", "ep_size", "zero_stage", "s_per_step")},
                "local_params_max": max(r["local_params"] for r in ranks),
                "adam_bytes_max": max(r["adam_bytes"] for r in ranks),
                "master_bytes_max": max(r["master_bytes"] for r in ranks),
            }
        )
    return {"args": vars(args), "rows": rows}


def print_table(result: dict) -> None:
    def mib(n: int) -> str:
        return f"{n / 2**20:9.2f}"

    a = result["args"]
    print(
        f"optimizer state per rank (max over {a['world_size']} ranks): depth {a['depth']}, width {a['width']}, "
        f"{a['experts']} experts, batch {a['batch']}"
    )
    print(
        f"{'P':>2} {'engine':>7} {'params/rank':>12} {'adam MiB':>9} {'master MiB':>10} {'adam vs plain':>13} "
        f"{'adam+master vs plain':>20} {'s/step':>7}"
    )
    plain = {}
    for r in result["rows"]:
        if r["zero_stage"] == 0:
            plain[r["ep_size"]] = r["adam_bytes_max"]
        base = plain[r["ep_size"]]
        name = "plain" if r["zero_stage"] == 0 else f"ZeRO-{r['zero_stage']}"
        print(
            f"{r['ep_size']:>2} {name:>7} {r['local_params_max']:>12,} {mib(r['adam_bytes_max'])} "
            f"{mib(r['master_bytes_max']):>10} {r['adam_bytes_max'] / base:>13.3f} "
            f"{(r['adam_bytes_max'] + r['master_bytes_max']) / base:>20.3f} {r['s_per_step']:>7.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--ep-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args()
    result = run(args)
    print_table(result)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
