"""Distributed top-k per expert (radix select) returns exactly what LocalPool returns on the
rank-major concatenation of the local batches, and its traffic does not grow with the tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from diffmoe_dist.model.moe.pool import LocalPool
from diffmoe_dist.parallel.groups import build_parallel_dims
from diffmoe_dist.parallel.pools import DistributedPool, ReplicatedLocalPool
from diffmoe_dist.parallel.radix_select import key_to_float, order_preserving_key


def test_order_preserving_key_sorts_like_floats_and_round_trips():
    x = torch.tensor([-math.inf, -3.5, -1.0, -1e-30, -0.0, 0.0, 1e-45, 1e-30, 0.0625, 0.0625, 1.0, 3.4e38, math.inf])
    x = torch.cat([x, torch.randn(1000), torch.rand(1000) * 1e-3])
    keys = order_preserving_key(x)
    assert keys.min() >= 0 and keys.max() < 2**32
    order = torch.argsort(x, stable=True)
    assert torch.equal(torch.argsort(keys, stable=True), order)
    assert order_preserving_key(torch.tensor([-0.0])) == order_preserving_key(torch.tensor([0.0]))
    back = key_to_float(keys)
    assert torch.equal(back, x + 0.0)


def _scores(generator: torch.Generator, n: int, num_experts: int, tied: bool) -> torch.Tensor:
    if tied:  # few distinct values: most of each column ties with the k-th score
        return torch.randint(0, 4, (n, num_experts), generator=generator).float() / 4
    return torch.softmax(torch.randn(n, num_experts, generator=generator), dim=-1)


def _check_against_concat(pool, local, sizes, rank_in_pool, num_experts, generator, tied) -> None:
    all_scores = _scores(generator, sum(sizes), num_experts, tied)
    lo = sum(sizes[:rank_in_pool])
    mine = all_scores[lo : lo + sizes[rank_in_pool]]
    n_pool = sum(sizes)
    k_choices = [0, 1, n_pool // 3, n_pool // 2, n_pool - 1, n_pool]
    k_E = torch.tensor([k_choices[int(i)] for i in torch.randint(0, 6, (num_experts,), generator=generator)])
    k_E = k_E.clamp(0, n_pool)
    expected_all = local.topk_mask(all_scores, k_E)
    expected = expected_all[lo : lo + mine.shape[0]]
    got = pool.topk_mask(mine, k_E)
    assert got.dtype == torch.bool and got.shape == mine.shape
    assert torch.equal(got, expected), f"topk_mask differs (sizes {sizes}, k {k_E.tolist()}, tied {tied})"
    assert torch.equal(pool.count(got), expected_all.sum(0))
    assert torch.equal(expected_all.sum(0), k_E)
    if n_pool:
        k = int(torch.randint(1, n_pool + 1, (1,), generator=generator))
        assert torch.equal(pool.kth_largest(mine, k), local.kth_largest(all_scores, k))
    # training: k = floor(C N_pool / E) from the selection itself (no size collective)
    for capacity in (1.0, 2.5):
        mask, k_E, n = pool.capacity_topk_mask(mine, capacity)
        ref_mask, ref_k, ref_n = local.capacity_topk_mask(all_scores, capacity)
        assert torch.equal(mask, ref_mask[lo : lo + mine.shape[0]]) and torch.equal(k_E, ref_k) and n == ref_n
        q, qk = pool.capacity_kth_largest(mine, capacity, num_experts)
        ref_q, ref_qk = local.capacity_kth_largest(all_scores, capacity, num_experts)
        assert torch.equal(qk, ref_qk) and torch.equal(q[qk > 0], ref_q[ref_qk > 0])
    # dynamic inference: k_e counted over the pool, in the same first all-reduce
    counted = mine > 0.3
    mask, k_E, _ = pool.count_topk_mask(mine, counted)
    ref_mask, ref_k, _ = local.count_topk_mask(all_scores, all_scores > 0.3)
    assert torch.equal(mask, ref_mask[lo : lo + mine.shape[0]]) and torch.equal(k_E, ref_k)


def _dp_and_ep_pools_match(rank: int, world_size: int, trials: int) -> None:
    dims = build_parallel_dims(ep_size=2)
    dp_pool = DistributedPool(dims.dp_group, dims.dp_group)
    ep_pool = DistributedPool(dims.ep_group, dims.dp_group, bits_per_pass=8)
    local = LocalPool()
    for trial in range(trials):
        # Same stream on the ranks of one pool; EP groups draw their own data.
        generator = torch.Generator().manual_seed(1000 + trial)
        num_experts = (4, 16, 3)[trial % 3]
        tied = trial % 2 == 1
        sizes = torch.randint(0, 40, (world_size,), generator=generator).tolist()
        if trial == 2:
            sizes[1] = 0  # a rank with no tokens at all
        _check_against_concat(dp_pool, local, sizes, rank, num_experts, generator, tied)
        group_sizes = [sizes[r] for r in dims.ep_ranks]
        generator = torch.Generator().manual_seed(2000 + trial)
        _check_against_concat(ep_pool, local, group_sizes, dims.ep_rank, num_experts, generator, tied)
    # replica_sum sums over DP for both pools; a dp pool's quantiles are global already
    total = dp_pool.replica_sum(torch.tensor([float(rank)]))
    assert torch.equal(total, torch.tensor([float(world_size * (world_size - 1) // 2)]))
    assert torch.equal(ReplicatedLocalPool(dims.dp_group).replica_sum(torch.tensor([float(rank)])), total)
    assert dp_pool.thresholds_global and not ep_pool.thresholds_global
    assert not ReplicatedLocalPool(dims.dp_group).thresholds_global


def test_dp_and_ep_pools_match_local_pool_on_concatenation_with_ties_and_empty_ranks():
    run_distributed(_dp_and_ep_pools_match, 4, 12)


def _selection_bytes(rank: int, world_size: int, sizes: list[int], num_experts: int) -> list[tuple[int, int]]:
    pool = DistributedPool(dist.group.WORLD, dist.group.WORLD)
    generator = torch.Generator().manual_seed(rank)
    traffic = []
    for n_local in sizes:
        scores = torch.softmax(torch.randn(n_local, num_experts, generator=generator), dim=-1)
        k_E = torch.full((num_experts,), n_local * world_size // num_experts)
        pool.reset_stats()
        pool.topk_mask(scores, k_E)
        traffic.append((pool.bytes_sent, pool.collectives))
    return traffic


@pytest.mark.slow
def test_selection_bytes_are_identical_at_1k_and_64k_tokens_per_rank():
    (small, large), _ = run_distributed(_selection_bytes, 2, [1024, 65536], 16)
    assert small == large
    # 3 histogram passes of E x 2^11, 2^11 and 2^10 int32 counts, then E int64 tie counts
    assert small == ((2 * 2048 + 1024) * 16 * 4 + 16 * 8, 4)
