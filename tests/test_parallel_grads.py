"""Gradient reduction over DP / EDP and clipping with a sharded model's global norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from distributed import run_distributed

from diffmoe_dist.parallel import build_parallel_dims, clip_grad_norm_, reduce_gradients, split_params
from diffmoe_dist.parallel.groups import ParallelDims


class Toy(nn.Module):
    """One replicated weight, one expert shard (rank-dependent), one weight used only on rank 0,
    one never used."""

    def __init__(self, ep_rank: int):
        super().__init__()
        self.dense = nn.Parameter(torch.zeros(3))
        self.expert = nn.Parameter(torch.zeros(2))
        self.expert.is_expert, self.expert.allreduce = True, False
        self.rank0_only = nn.Parameter(torch.zeros(2))
        self.unused = nn.Parameter(torch.zeros(1))
        self.ep_rank = ep_rank


def _reduce_and_clip(rank: int, world_size: int) -> None:
    dims = build_parallel_dims(ep_size=2)  # W=4: EP [0,1] [2,3], EDP [0,2] [1,3]
    model = Toy(dims.ep_rank)
    assert split_params(model) == ([model.dense, model.rank0_only, model.unused], [model.expert])
    model.dense.grad = torch.full((3,), float(rank))
    model.expert.grad = torch.full((2,), float(10 * rank))
    if rank == 0:
        model.rank0_only.grad = torch.ones(2)
    reduce_gradients(model, dims)
    mean_rank = sum(range(world_size)) / world_size
    assert torch.equal(model.dense.grad, torch.full((3,), mean_rank))
    edp_sum = sum(10.0 * r for r in dims.edp_ranks)
    assert torch.equal(model.expert.grad, torch.full((2,), edp_sum / world_size))
    assert torch.equal(model.rank0_only.grad, torch.full((2,), 1 / world_size))  # zeros joined elsewhere
    assert model.unused.grad is None
    # Global norm: dense parts once, every expert shard of the EP group once.
    other_expert = sum(10.0 * r for r in range(world_size) if r % 2 != dims.ep_rank) / world_size
    expected = (
        3 * mean_rank**2 + 2 * (1 / world_size) ** 2 + 2 * (edp_sum / world_size) ** 2 + 2 * other_expert**2
    ) ** 0.5
    norm = clip_grad_norm_(model, 1.0, dims)
    torch.testing.assert_close(norm, torch.tensor(expected))
    assert torch.allclose(model.dense.grad, torch.full((3,), mean_rank / (expected + 1e-6)))


@pytest.mark.slow
def test_reduce_gradients_averages_dense_over_dp_and_experts_over_edp():
    run_distributed(_reduce_and_clip, 4)


def test_one_process_reduction_is_identity_and_clip_matches_torch():
    model = Toy(0)
    model.dense.grad = torch.tensor([3.0, 4.0, 0.0])
    model.expert.grad = torch.tensor([12.0, 0.0])
    reduce_gradients(model, ParallelDims.single())
    assert torch.equal(model.dense.grad, torch.tensor([3.0, 4.0, 0.0]))
    ref = [p.grad.clone() for p in (model.dense, model.expert)]
    norm = clip_grad_norm_(model, 1.0, ParallelDims.single())
    ref_params = [nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p, g in zip(ref_params, ref):
        p.grad = g
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    torch.testing.assert_close(norm, ref_norm)
    torch.testing.assert_close(model.expert.grad, ref_params[1].grad)
