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

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from diffmoe_dist.model.moe.dispatch import Dispatched, DispatchPlan, combine, dispatch_experts_combine
from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.routers import Assignment


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


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
    """``y_ND`` as ``LocalDispatcher`` computes it, with experts sharded over ``ep_group``.

    `Dispatcher` members: ``timings`` (seconds per phase, ``dispatch``, ``combine``),
    ``phase_bytes`` (payload per phase, telemetry) and ``bytes_sent`` (row and count payloads this
    rank sent to other ranks).
    """

    def __init__(self, ep_group=None):
        self.group = ep_group
        self.timings: dict[str, float] | None = None
        self.bytes_sent = 0
        self.phase_bytes: dict[str, int] | None = None

    @contextmanager
    def _phase(self, name: str):
        if self.timings is None:
            yield
            return
        _sync_cuda()  # timed phases only: kernels are asynchronous, time what ran, not what launched
        start = time.perf_counter()
        yield
        _sync_cuda()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

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

    def plan(self, counts_E: Tensor, experts: StackedExperts) -> DispatchPlan:
        """Exchanges the per-expert row counts (global expert order = owner order) and reads send
        and receive counts on the host in one go."""
        ep_size, _ = self._check(experts)
        per_rank = experts.num_local
        with self._phase("dispatch"):
            send_counts_PL = counts_E.to(torch.int64).reshape(ep_size, per_rank).contiguous()
            recv_counts_PL = torch.empty_like(send_counts_PL)
            dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.group)
            both = torch.cat([send_counts_PL, recv_counts_PL]).tolist()  # the forward's one host read
        send_PL, recv_PL = both[:ep_size], both[ep_size:]
        self.bytes_sent += (ep_size - 1) * per_rank * 8
        return DispatchPlan(
            rows=sum(map(sum, send_PL)),
            expert_rows=[sum(col) for col in zip(*recv_PL, strict=True)] if recv_PL else [0] * per_rank,
            send_splits=[sum(r) for r in send_PL],
            recv_splits=[sum(r) for r in recv_PL],
            recv_counts_PL=recv_counts_PL,
        )

    def dispatch(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan
    ) -> tuple[Tensor, Dispatched]:
        """Rows out to the owners of their experts, regrouped by local expert on arrival."""
        ep_size, ep_rank = self._check(experts)
        send_splits, recv_splits = plan.send_splits, plan.recv_splits
        with self._phase("dispatch"):
            x_MD = x_ND.index_select(0, assignment.token_idx_M)  # backward: one index_add_
            x_MD = _wire_dtype(x_MD)
            recv_RD = AllToAll.apply(x_MD, recv_splits, send_splits, self.group)
            perm_R = _block_permutation(plan.recv_counts_PL, sum(recv_splits))
            grouped_RD = recv_RD.index_select(0, perm_R)
            inverse_R = torch.empty_like(perm_R)
            inverse_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
        # Off-rank payload only: rows for this rank's own experts never leave it.
        sent = (sum(send_splits) - send_splits[ep_rank]) * x_ND.shape[1] * x_MD.element_size()
        self.bytes_sent += sent
        if self.phase_bytes is not None:
            self.phase_bytes["dispatch"] = self.phase_bytes.get("dispatch", 0) + sent
        dispatched = Dispatched(assignment.token_idx_M, assignment.weight_M, x_ND.shape[0], x_ND.dtype, plan, inverse_R)
        return grouped_RD, dispatched

    def combine(self, y_grouped_RD: Tensor, dispatched: Dispatched) -> Tensor:
        """Outputs back to (source, local expert) order, home by the reverse all-to-all, weighted."""
        d, plan = dispatched, dispatched.plan
        ep_rank = dist.get_rank(self.group)
        with self._phase("combine"):
            y_recv_RD = _wire_dtype(y_grouped_RD.index_select(0, d.inverse_R))
            y_MD = AllToAll.apply(y_recv_RD, plan.send_splits, plan.recv_splits, self.group)
            y_ND = combine(y_MD, d.weight_M, d.token_idx_M, d.n_tokens, d.out_dtype)
        returned = (sum(plan.recv_splits) - plan.recv_splits[ep_rank]) * y_recv_RD.shape[1] * y_recv_RD.element_size()
        self.bytes_sent += returned
        if self.phase_bytes is not None:
            self.phase_bytes["combine"] = self.phase_bytes.get("combine", 0) + returned
        return y_ND

    def __call__(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan | None = None
    ) -> Tensor:
        if plan is None:  # rows sorted by global expert are sorted by owner, and by local expert within one
            plan = self.plan(torch.bincount(assignment.expert_idx_M, minlength=experts.num_experts), experts)
        return dispatch_experts_combine(self, x_ND, assignment, experts, plan)
