"""Expert-parallel dispatch: send each chosen (token, expert) row to the rank that owns the expert.

A `Dispatcher` (model/moe/dispatch.py): the same result as ``LocalDispatcher`` when ``experts``
holds only this rank's ``E/P`` experts (docs/design.md section 2, Megatron layout). Per call, inside
the sender's EP group:

1. counts (``plan``): an ``all_to_all_single`` of the (destination, local expert) row counts, then
   one host read of the send and receive counts together, reused for the split sizes, the
   expert groups and the block permutation (built on the device at a known size);
2. dispatch: the rows, already sorted by global expert and hence by destination, go out with one
   ``all_to_all_single`` with uneven splits; the receiver regroups them from (source, local expert)
   order to (local expert, source) order for ``forward_grouped``;
3. combine: the outputs go back to (source, local expert) order and return by the reverse
   all-to-all; the sender weights them and ``index_add``s them into its tokens.

``moe.dispatch: padded`` (a `padded_plan`) skips step 1: every (source, expert) block has the
router's host-known bound of rows (routing/base.py ``padded_rows``), so the splits are fixed
(``E/P x block`` rows per peer), nothing is counted, exchanged or read on the host, and the
receiver regroups by a reshape. Its price is the padding on the wire and in the expert GEMMs
(docs/design.md section 8 gives the factor per router and pool).

Backward of each all-to-all is the reverse all-to-all, so gradients of expert weights gather the
contributions of every token of the EP group. gloo has only the ``_single`` form with uneven
splits (the list form fails, docs/design.md section 4).

Ranks that send or receive nothing take part with (0, D) tensors and never reshape to an assumed
size: Megatron-LM issue 1877 was a ``view`` of an empty receive buffer, and its fix (PR 3626) had
to keep zero-token ranks in the autograd graph, since a rank that skips the backward all-to-all
hangs its peers. Here both all-to-alls always sit in the graph, and ``forward_grouped`` runs
every expert even on zero rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from diffmoe_dist.model.moe.dispatch import (
    Dispatched,
    DispatchPlan,
    DispatchStats,
    Timer,
    combine,
    dispatch_experts_combine,
    padded_token_rows,
)
from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.routers import Assignment


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _wire_dtype(x: Tensor) -> Tensor:
    """Rows travel in the autocast dtype under autocast (bf16: half the bytes of fp32): the
    experts' matmuls cast them to it anyway, so the expert sees the same bits either way; the
    combine multiplies by the fp32 weights, so it promotes back in one pass. Backward casts the
    gradient back (the all-to-all's backward then also sends bf16)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(device))
    return x


class AllToAll(torch.autograd.Function):
    """Rows ``x`` (``in_splits[j]`` of them for peer j) -> ``out_splits[j]`` rows from each peer;
    backward sends the gradients the opposite way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _block_permutation(counts_SL: Tensor, total: int | None = None) -> Tensor:
    """Row order that reads (source, local expert)-ordered blocks in (local expert, source) order:
    ``x[perm]`` is grouped by local expert. ``total`` = ``counts_SL.sum()`` (the plan knows it):
    output row j finds its block by a searchsorted on the blocks' ends, no data-dependent size."""
    sizes_SL = counts_SL.long()
    starts_SL = (torch.cumsum(sizes_SL.flatten(), 0) - sizes_SL.flatten()).view_as(sizes_SL)
    sizes_LS, starts_LS = sizes_SL.T.flatten(), starts_SL.T.flatten()
    ends_LS = torch.cumsum(sizes_LS, 0)
    total = int(sizes_LS.sum()) if total is None else total
    rows_R = torch.arange(total, device=counts_SL.device)
    block_R = torch.searchsorted(ends_LS, rows_R, right=True)
    return starts_LS[block_R] + rows_R - (ends_LS - sizes_LS)[block_R]


class AllToAllDispatcher:
    """``y_ND`` as ``LocalDispatcher`` computes it, with experts sharded over ``ep_group``. Holds
    the group only: what a call sent and took comes back in ``Dispatched.stats``."""

    def __init__(self, ep_group=None):
        self.group = ep_group

    def _check(self, experts: StackedExperts) -> tuple[int, int]:
        ep_size = dist.get_world_size(self.group)
        ep_rank = dist.get_rank(self.group)
        per_rank = experts.num_local
        if per_rank * ep_size != experts.num_experts or experts.offset != ep_rank * per_rank:
            raise ValueError(
                f"AllToAllDispatcher: experts hold {per_rank} of {experts.num_experts} from offset "
                f"{experts.offset}; EP rank {ep_rank} of {ep_size} needs experts.shard({ep_rank}, {ep_size})"
            )
        return ep_size, ep_rank

    def plan(self, counts_E: Tensor, experts: StackedExperts, timed: bool = False) -> DispatchPlan:
        """Exchanges the per-expert row counts (global expert order = owner order) and reads send
        and receive counts on the host in one go."""
        ep_size, _ = self._check(experts)
        per_rank = experts.num_local
        with Timer(timed) as timer:
            send_counts_PL = counts_E.to(torch.int64).reshape(ep_size, per_rank).contiguous()
            recv_counts_PL = torch.empty_like(send_counts_PL)
            dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.group)
            both = torch.cat([send_counts_PL, recv_counts_PL]).tolist()  # the forward's one host read
        send_PL, recv_PL = both[:ep_size], both[ep_size:]
        return DispatchPlan(
            rows=sum(map(sum, send_PL)),
            expert_rows=[sum(col) for col in zip(*recv_PL, strict=True)] if recv_PL else [0] * per_rank,
            send_splits=[sum(r) for r in send_PL],
            recv_splits=[sum(r) for r in recv_PL],
            recv_counts_PL=recv_counts_PL,
            count_bytes=(ep_size - 1) * per_rank * 8,
            seconds=timer.seconds,
        )

    def padded_plan(self, block_rows: int, experts: StackedExperts) -> DispatchPlan:
        """``block_rows`` rows per (source, expert): every EP rank hands the same block size (the
        router's bound from host values equal on all ranks), so the splits need no exchange."""
        ep_size, _ = self._check(experts)
        per_peer = experts.num_local * block_rows
        return DispatchPlan(
            rows=ep_size * per_peer,
            expert_rows=[ep_size * block_rows] * experts.num_local,
            send_splits=[per_peer] * ep_size,
            recv_splits=[per_peer] * ep_size,
            block_rows=block_rows,
        )

    def dispatch(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan, timed: bool = False
    ) -> tuple[Tensor, Dispatched]:
        """Rows out to the owners of their experts, regrouped by local expert on arrival."""
        ep_size, ep_rank = self._check(experts)
        send_splits, recv_splits = plan.send_splits, plan.recv_splits
        padded = plan.block_rows is not None
        n, d = x_ND.shape
        inverse_R = None
        with Timer(timed) as timer:
            token_rows_M = padded_token_rows(assignment.token_idx_M, n) if padded else assignment.token_idx_M
            x_MD = _wire_dtype(x_ND.index_select(0, token_rows_M))  # backward: one index_add_
            recv_RD = AllToAll.apply(x_MD, recv_splits, send_splits, self.group)
            if padded:  # (source, local expert, block) -> (local expert, source, block): a reshape
                grouped_RD = recv_RD.view(ep_size, experts.num_local, plan.block_rows, d).transpose(0, 1).reshape(-1, d)
            else:
                perm_R = _block_permutation(plan.recv_counts_PL, sum(recv_splits))
                grouped_RD = recv_RD.index_select(0, perm_R)
                inverse_R = torch.empty_like(perm_R)
                inverse_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
        # Off-rank payload only: rows for this rank's own experts never leave it.
        sent = (sum(send_splits) - send_splits[ep_rank]) * d * x_MD.element_size()
        stats = DispatchStats(timed, sent, count_bytes=plan.count_bytes, dispatch_s=plan.seconds + timer.seconds)
        dispatched = Dispatched(assignment.token_idx_M, assignment.weight_M, n, x_ND.dtype, plan, inverse_R, stats)
        return grouped_RD, dispatched

    def combine(self, y_grouped_RD: Tensor, dispatched: Dispatched) -> Tensor:
        """Outputs back to (source, local expert) order, home by the reverse all-to-all, weighted."""
        d, plan = dispatched, dispatched.plan
        ep_size, ep_rank = self._check_group()
        padded = plan.block_rows is not None
        with Timer(d.stats.timed) as timer:
            if padded:
                width = y_grouped_RD.shape[1]
                blocks = y_grouped_RD.view(len(plan.expert_rows), ep_size, plan.block_rows, width).transpose(0, 1)
                y_recv_RD = _wire_dtype(blocks.reshape(-1, width))
            else:
                y_recv_RD = _wire_dtype(y_grouped_RD.index_select(0, d.inverse_R))
            y_MD = AllToAll.apply(y_recv_RD, plan.send_splits, plan.recv_splits, self.group)
            y_ND = combine(y_MD, d.weight_M, d.token_idx_M, d.n_tokens, d.out_dtype, padded)
        returned = (sum(plan.recv_splits) - plan.recv_splits[ep_rank]) * y_recv_RD.shape[1] * y_recv_RD.element_size()
        d.stats.combine_bytes += returned
        d.stats.combine_s += timer.seconds
        return y_ND

    def _check_group(self) -> tuple[int, int]:
        return dist.get_world_size(self.group), dist.get_rank(self.group)

    def __call__(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan | None = None
    ) -> Tensor:
        if plan is None:  # rows sorted by global expert are sorted by owner, and by local expert within one
            plan = self.plan(torch.bincount(assignment.expert_idx_M, minlength=experts.num_experts), experts)
        return dispatch_experts_combine(self, x_ND, assignment, experts, plan)[0]
