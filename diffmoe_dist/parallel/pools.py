"""Token pools across ranks (`TokenPool`, model/moe/pool.py), for ``moe.pool: rank | ep | dp``.

- `ReplicatedLocalPool` (``rank``): the pool is this rank's own batch, as `LocalPool`; only the
  predictor thresholds, a buffer every replica must hold identically, are averaged over DP.
- `DistributedPool` (``ep``, ``dp``): the pool is the rank-major concatenation of the local batches
  of ``group``; returns exactly what `LocalPool` returns on that concatenation, tie rule included,
  by radix select (parallel/radix_select.py): ``len(widths)`` histogram all-reduces plus one
  all-gather of tie counts per selection, no size collective, no host read.

``bytes_sent`` / ``collectives`` count what this rank handed to collectives (benchmarks and
tests/test_parallel_selection.py, which asserts the bytes are flat from 1K to 64K tokens).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from diffmoe_dist.model.moe.pool import LocalPool
from diffmoe_dist.parallel.groups import comm_device
from diffmoe_dist.parallel.radix_select import (
    DEFAULT_BITS,
    bit_widths,
    capacity_k,
    radix_select,
    signed_key_to_float,
    signed_order_key,
    tie_take_mask,
)


class ReplicatedLocalPool(LocalPool):
    """The pool is this rank's own batch (``moe.pool: rank``); the thresholds, computed from each
    rank's own pool, are averaged over ``dp_group`` so that every replica keeps the same buffer."""

    thresholds_global = False

    def __init__(self, dp_group=None):
        self.dp_group = dp_group
        self.bytes_sent = 0  # payload bytes this rank handed to collectives
        self.collectives = 0

    @property
    def batch_key(self) -> tuple:
        return (type(self).__name__, id(self.dp_group))

    def replica_sum(self, t: Tensor) -> Tensor:
        if self.dp_group is None:
            return t
        out = t.detach().to(comm_device(self.dp_group), copy=True)
        return self._all_reduce(out, self.dp_group).to(t.device)

    def _all_reduce(self, t: Tensor, group) -> Tensor:
        self.bytes_sent += t.numel() * t.element_size()
        self.collectives += 1
        dist.all_reduce(t, group=group)
        return t

    def reset_stats(self) -> None:
        self.bytes_sent = 0
        self.collectives = 0


class DistributedPool(ReplicatedLocalPool):
    """The pool is the rank-major concatenation of the local batches of ``group`` (the EP group
    for ``moe.pool: ep``, the whole DP world for ``moe.pool: dp``). When ``group`` spans all of
    ``dp_group`` the quantiles are already global: the thresholds need no replica mean."""

    def __init__(self, group, dp_group=None, bits_per_pass: int = DEFAULT_BITS):
        super().__init__(dp_group)
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.widths = bit_widths(bits_per_pass)
        world = dist.group.WORLD
        self.thresholds_global = dp_group is None or (
            dist.get_process_group_ranks(group or world) == dist.get_process_group_ranks(dp_group or world)
        )

    @property
    def batch_key(self) -> tuple:
        return (type(self).__name__, id(self.group), id(self.dp_group), tuple(self.widths))

    # ---- the collectives radix select needs -------------------------------------------------
    def _sum(self, t: Tensor) -> Tensor:
        device = t.device
        return self._all_reduce(t.to(comm_device(self.group)), self.group).to(device)

    def _rank_prefix(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the ranks of ``group`` before this one (one all-gather into one
        tensor: the list form costs a copy kernel per rank, 256 at W=256; gloo has both)."""
        device, t = t.device, t.to(comm_device(self.group)).contiguous()
        flat = t.new_empty(dist.get_world_size(self.group) * t.numel())  # gloo wants it flat
        self.bytes_sent += t.numel() * t.element_size()
        self.collectives += 1
        getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(flat, t, group=self.group)  # torch 2.13 name
        return flat.view(-1, *t.shape)[: dist.get_rank(self.group)].sum(0).to(device)

    def _select(self, values_NC: Tensor, k_of, extra: Tensor | None = None):
        keys_NC = signed_order_key(values_NC)
        return keys_NC, radix_select(keys_NC, k_of, self._sum, self.widths, extra)

    # ---- TokenPool ----------------------------------------------------------------------------
    def count(self, mask_NE: Tensor) -> Tensor:
        return self._sum(mask_NE.sum(dim=0, dtype=torch.long))

    @torch.no_grad()
    def topk_mask(self, scores_NE: Tensor, k_E: Tensor) -> Tensor:
        k_E = k_E.to(device=scores_NE.device, dtype=torch.int64)
        keys_NE, sel = self._select(scores_NE, lambda n, _: k_E)
        return tie_take_mask(keys_NE, sel, self._rank_prefix)

    @torch.no_grad()
    def capacity_topk_mask(self, scores_NE: Tensor, capacity: float) -> tuple[Tensor, Tensor, Tensor]:
        num_experts = scores_NE.shape[1]
        keys_NE, sel = self._select(scores_NE, lambda n, _: capacity_k(n, capacity, num_experts))
        return tie_take_mask(keys_NE, sel, self._rank_prefix), sel.k_C, sel.n_pool

    @torch.no_grad()
    def count_topk_mask(self, scores_NE: Tensor, counted_NE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # k_e = #{pool rows with counted[:, e]}: the counts ride along with the first histogram.
        local_E = counted_NE.sum(0, dtype=torch.int32)
        keys_NE, sel = self._select(scores_NE, lambda n, count_E: count_E, extra=local_E)
        return tie_take_mask(keys_NE, sel, self._rank_prefix), sel.k_C, sel.n_pool

    @torch.no_grad()
    def kth_largest(self, values_NE: Tensor, k: int) -> Tensor:
        k_t = torch.tensor(k, dtype=torch.int64, device=values_NE.device)
        _, sel = self._select(values_NE, lambda n, _: k_t)
        n_pool = int(sel.n_pool)  # the same on every rank: all raise together
        if not 1 <= k <= n_pool:
            raise ValueError(f"kth_largest: k={k} outside [1, N_pool={n_pool}]")
        return signed_key_to_float(sel.kth_C).to(values_NE.dtype)

    @torch.no_grad()
    def capacity_kth_largest(self, values_NC: Tensor, capacity: float, num_experts: int) -> tuple[Tensor, Tensor]:
        _, sel = self._select(values_NC, lambda n, _: capacity_k(n, capacity, num_experts))
        return signed_key_to_float(sel.kth_C).to(values_NC.dtype), sel.k_C
