"""The layout the planner recommends: the highest planned MFU among the layouts that fit memory,
over images per rank, ZeRO stage, EP size (inside a node), gradient dtype and bucket size, with
the gradient reduction overlapped with backward."""

from __future__ import annotations

import copy

from diffmoe_dist.config import GRAD_REDUCE_DTYPES, ZERO_STAGES
from diffmoe_dist.plan.cluster import Cluster
from diffmoe_dist.plan.cost import plan


def candidates(cfg, cluster: Cluster, world: int, images: tuple[int, ...]) -> list[dict]:
    rpn = cluster.ranks_per_node(world)
    e = cfg.moe.num_experts if cfg.moe.router != "dense" else 1
    eps = [p for p in range(1, min(e, rpn) + 1) if e % p == 0 and world % p == 0]
    buckets = (25.0, 100.0, 400.0) if cluster.kind == "gpu" else (0.0,)
    return [
        {"images_per_rank": i, "zero": z, "ep": p, "grad_reduce_dtype": g, "grad_bucket_mb": b}
        for i in images
        for z in ZERO_STAGES
        for p in eps
        for g in GRAD_REDUCE_DTYPES
        for b in buckets
    ]


def recommend(cfg, cluster: Cluster, world: int, images=(8, 16, 32), **plan_kwargs) -> list[tuple[dict, dict]]:
    """(layout, plan) pairs that fit, best planned MFU first."""
    out = []
    for cand in candidates(cfg, cluster, world, tuple(images)):
        c = copy.deepcopy(cfg)
        c.data.global_batch_size = cand["images_per_rank"] * world * c.optim.grad_accum_steps
        c.parallel.grad_bucket_mb = cand["grad_bucket_mb"]
        p = plan(
            c,
            cluster,
            world,
            cand["ep"],
            cand["zero"],
            overlap=True,
            grad_dtype=cand["grad_reduce_dtype"],
            **plan_kwargs,
        )
        if not any(w.startswith("does not fit") for w in p["warnings"]):
            out.append((cand, p))
    return sorted(out, key=lambda cp: -cp[1]["throughput"]["mfu"])
