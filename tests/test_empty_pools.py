"""Ranks and pools without a token (real gloo, W=4, P=2): no NaN threshold, no IndexError and no hang
for any router, pool and inference mode, and the thresholds stay identical on every rank."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.config.schema import MoEConfig
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.model.moe.layer import MoEFeedForward
from diffmoe_dist.parallel import build_parallel_dims, parallelize

DIM, HIDDEN, EXPERTS, SEQ = 8, 16, 4, 5
ROUTERS = ("expert_choice_global", "expert_choice_local", "token_choice")


def _layer(router: str, pool: str, dims) -> MoEFeedForward:
    torch.manual_seed(0)
    cfg = MoEConfig(router=router, num_experts=EXPERTS, pool=pool)
    layer = MoEFeedForward(DIM, HIDDEN, cfg)
    parallelize(layer, dims, cfg)
    return layer


def _empty_ranks(rank: int, world_size: int) -> list[str]:
    dims = build_parallel_dims(2, EXPERTS)
    problems = []
    x = torch.randn(1 if rank == 2 else 0, SEQ, DIM)  # tokens [0, 0, 5, 0]: EP group {0, 1} holds none
    for router in ROUTERS:
        for pool in ("rank", "ep", "dp"):
            layer = _layer(router, pool, dims)
            collector = MoECollector()
            with collector.collect(layer):
                y = layer(x.clone().requires_grad_(True))
            y.sum().backward()
            collector.update_thresholds()
            if layer.capacity_predictor is not None:
                tau = layer.capacity_predictor.threshold_E
                everyone = [torch.empty_like(tau) for _ in range(world_size)]
                torch.distributed.all_gather(everyone, tau)
                if not torch.isfinite(tau).all() or any(not torch.equal(t, tau) for t in everyone):
                    problems.append(f"{router} pool={pool}: thresholds {[t.tolist() for t in everyone]}")
            layer.eval()
            modes = ("static", "dynamic", "interval") if router == "expert_choice_global" else ("eval",)
            for mode in modes:
                layer.inference = mode if mode != "eval" else layer.inference
                with torch.no_grad():
                    y = layer(x)
                if y.shape != x.shape or not torch.isfinite(y).all():
                    problems.append(f"{router} pool={pool} {mode}: output {y.shape}")
    return problems


@pytest.mark.slow
def test_ranks_and_groups_without_tokens_give_finite_thresholds_and_outputs():
    per_rank = run_distributed(_empty_ranks, 4)
    assert per_rank == [[], [], [], []]
