"""Radix select as pure functions: W virtual ranks run in threads of one process, joined by a fake
all-reduce and rank prefix, and select exactly what a sort of the concatenation selects."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import HANG_TIMEOUT

from diffmoe_dist.parallel.radix_select import (
    bit_widths,
    capacity_k,
    radix_select,
    signed_order_key,
    tie_take_mask,
)


class FakeGroup:
    """Collectives between threads: each rank posts its tensor, waits for all, reads the result."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.calls = 0

    def _exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()  # nobody posts the next round before all have read this one
        if rank == 0:
            self.calls += 1
        return everyone

    def all_reduce(self, rank: int):
        return lambda t: torch.stack(self._exchange(rank, t)).sum(0)

    def rank_prefix(self, rank: int):
        return lambda t: sum(self._exchange(rank, t)[:rank], torch.zeros_like(t))


def _reference_mask(values_NC: torch.Tensor, k_C: list[int]) -> torch.Tensor:
    """Per column, the k largest by (value descending, index ascending): a plain stable sort."""
    mask = torch.zeros_like(values_NC, dtype=torch.bool)
    for c, k in enumerate(k_C):
        order = sorted(range(values_NC.shape[0]), key=lambda t: (-float(values_NC[t, c]), t))
        mask[order[:k], c] = True
    return mask


def _run_ranks(parts: list[torch.Tensor], k_of, widths, extra=None) -> tuple[list, FakeGroup]:
    group = FakeGroup(len(parts))
    out: list = [None] * len(parts)
    errors: list = []

    def rank_fn(r: int) -> None:
        try:
            keys = signed_order_key(parts[r])
            sel = radix_select(keys, k_of, group.all_reduce(r), widths, None if extra is None else extra[r])
            out[r] = (sel, tie_take_mask(keys, sel, group.rank_prefix(r)))
        except BaseException as exc:  # noqa: B036 - reported in the main thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_fn, args=(r,)) for r in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_TIMEOUT)
    if errors:
        raise errors[0]
    return out, group


@pytest.mark.parametrize("bits", [11, 8, 5])
def test_fake_ranks_select_the_concatenations_top_k_with_ties_to_the_lower_index(bits):
    g = torch.Generator().manual_seed(bits)
    for trial in range(6):
        sizes = torch.randint(0, 30, (3,), generator=g).tolist()
        if trial == 1:
            sizes[1] = 0
        n, c = sum(sizes), 5
        if trial % 2:  # few distinct values: ties straddle the ranks
            values = torch.randint(-2, 3, (n, c), generator=g).float() / 4
        else:
            values = torch.randn(n, c, generator=g)
        k_list = [int(v) for v in torch.randint(0, n + 1, (c,), generator=g)]
        parts = list(values.split(sizes))
        results, group = _run_ranks(parts, lambda n_pool, _, k=k_list: torch.tensor(k), bit_widths(bits))
        got = torch.cat([mask for _, mask in results])
        assert torch.equal(got, _reference_mask(values, k_list)), (bits, trial, sizes, k_list)
        assert group.calls == len(bit_widths(bits)) + 1  # the passes, then one tie exchange
        assert all(int(sel.n_pool) == n for sel, _ in results)


def test_pool_size_and_capacity_k_come_from_the_first_histogram():
    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(n, 4, generator=g) for n in (7, 0, 13)]  # unequal shares, one empty
    values = torch.cat(parts)
    results, _ = _run_ranks(parts, lambda n, _: capacity_k(n, 1.5, 4), bit_widths())
    k = int(1.5 * 20 / 4)
    assert all(int(sel.n_pool) == 20 and sel.k_C.tolist() == [k] * 4 for sel, _ in results)
    assert torch.equal(torch.cat([m for _, m in results]), _reference_mask(values, [k] * 4))
    kth = results[0][0].kth_C
    assert torch.equal(kth, signed_order_key(values.topk(k, dim=0).values[-1]))


def test_extra_counts_ride_along_with_the_first_pass():
    g = torch.Generator().manual_seed(1)
    parts = [torch.rand(n, 3, generator=g) for n in (5, 9)]
    extra = [(p > 0.5).sum(0, dtype=torch.int32) for p in parts]
    results, group = _run_ranks(parts, lambda n, count: count, bit_widths(), extra)
    expected_k = (torch.cat(parts) > 0.5).sum(0).tolist()
    assert all(sel.k_C.tolist() == expected_k for sel, _ in results)
    assert torch.equal(torch.cat([m for _, m in results]), _reference_mask(torch.cat(parts), expected_k))
    assert group.calls == 3 + 1


def test_capacity_k_equals_the_host_floor():
    from diffmoe_dist.model.moe.pool import expert_capacity

    for capacity, n, e in ((1.0, 256, 16), (1.2, 10, 12), (0.1, 3, 4), (2.5, 1001, 8), (1.0, 0, 4)):
        assert int(capacity_k(torch.tensor(n), capacity, e)) == expert_capacity(capacity, n, e)
