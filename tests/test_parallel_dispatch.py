"""The all-to-all dispatcher returns what LocalDispatcher returns with all experts local, in fp32 and
bf16, forward and backward, also when a rank sends or receives nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.model.moe.dispatch import LocalDispatcher, dispatch_experts_combine
from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.routers import Assignment
from diffmoe_dist.parallel import AllToAllDispatcher, build_parallel_dims
from diffmoe_dist.parallel.all_to_all import _block_permutation

EXPERTS, DIM, HIDDEN, TOKENS = 4, 8, 12, 10


def test_block_permutation_groups_rows_by_local_expert():
    counts_SL = torch.tensor([[2, 1], [0, 3], [1, 0]])  # (source, local expert)
    # rows 0-1: s0e0, 2: s0e1, 3-5: s1e1, 6: s2e0
    assert _block_permutation(counts_SL).tolist() == [0, 1, 6, 2, 3, 4, 5]
    assert _block_permutation(torch.zeros(2, 3, dtype=torch.long)).tolist() == []


def _assignments(rank: int, case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    mask_NE = torch.rand(TOKENS, EXPERTS, generator=g) < 0.5
    if case == "rank1_sends_nothing" and rank == 1:
        mask_NE[:] = False
    if case == "owner1_receives_nothing":
        mask_NE[:, EXPERTS // 2 :] = False
    expert_idx, token_idx = mask_NE.T.nonzero(as_tuple=True)
    weight = torch.rand(expert_idx.numel(), generator=g)
    return token_idx, expert_idx, weight


def _matches_local(rank: int, world_size: int) -> None:
    dims = build_parallel_dims(world_size, EXPERTS)
    for dtype in (torch.float32, torch.bfloat16):
        _check_dtype(rank, dims, dtype)
    _check_bf16_wire_under_autocast(rank, dims)


def _check_bf16_wire_under_autocast(rank, dims) -> None:
    """fp32 rows under bf16 autocast travel as bf16 (half the bytes), and the result equals the
    local dispatch under the same autocast: the experts cast the rows to bf16 either way."""
    torch.manual_seed(0)
    full = StackedExperts(EXPERTS, DIM, HIDDEN)
    shard, ref = copy.deepcopy(full).shard(dims.ep_rank, dims.ep_size), copy.deepcopy(full)
    token_idx, expert_idx, weight = _assignments(rank, "random")
    x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(rank))
    x_ref, x = x.clone().requires_grad_(True), x.requires_grad_(True)
    sent = {}
    for autocast in (False, True):
        d = AllToAllDispatcher(dims.ep_group)
        a = Assignment(token_idx, expert_idx, weight)
        plan = d.plan(torch.bincount(expert_idx, minlength=EXPERTS), shard)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, dispatched = dispatch_experts_combine(d, x, a, shard, plan)
        sent[autocast] = dispatched.stats.dispatch_bytes + dispatched.stats.combine_bytes  # row payloads
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = LocalDispatcher()(x_ref, Assignment(token_idx, expert_idx, weight), ref)
    assert y.dtype == torch.float32 and 2 * sent[True] == sent[False] > 0
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)


def _check_dtype(rank, dims, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    full = StackedExperts(EXPERTS, DIM, HIDDEN).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for case in ("random", "rank1_sends_nothing", "owner1_receives_nothing"):
        shard = copy.deepcopy(full).shard(dims.ep_rank, dims.ep_size)
        ref = copy.deepcopy(full)
        x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(rank)).to(dtype)
        token_idx, expert_idx, weight = _assignments(rank, case)
        weight = weight.requires_grad_(True)
        x_ref, w_ref = x.clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
        y_ref = LocalDispatcher()(x_ref, Assignment(token_idx, expert_idx, w_ref), ref)
        x = x.requires_grad_(True)
        y = AllToAllDispatcher(dims.ep_group)(x, Assignment(token_idx, expert_idx, weight), shard)
        assert y.dtype == dtype
        torch.testing.assert_close(y, y_ref, **tol, msg=lambda m, c=case: f"{c} {dtype} output: {m}")
        target = torch.randn(y.shape, generator=torch.Generator().manual_seed(5 + rank)).to(dtype)
        (y * target).sum().backward()
        (y_ref * target).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, **tol, msg=lambda m, c=case: f"{c} dx: {m}")
        torch.testing.assert_close(weight.grad, w_ref.grad, **tol, msg=lambda m, c=case: f"{c} dweight: {m}")
        # Every rank's reference holds all experts but only this rank's tokens; the shard's grads
        # gather all ranks' tokens, so compare with the sum of the references over ranks.
        for name, p in shard.named_parameters():
            ref_grad = getattr(ref, name).grad.float().clone()
            torch.distributed.all_reduce(ref_grad)
            lo = shard.offset
            expected = ref_grad[lo : lo + shard.num_local].to(dtype)
            torch.testing.assert_close(p.grad, expected, **tol, msg=lambda m, c=case, n=name: f"{c} {n}: {m}")


@pytest.mark.slow
def test_all_to_all_dispatch_matches_local_dispatch_in_fp32_and_bf16_with_idle_ranks():
    run_distributed(_matches_local, 2)
