"""Expert-parallel dispatch: send each chosen (token, expert) row to the rank that owns the expert.

Drop-in for ``LocalDispatcher`` (same call, same result) when ``experts`` holds only this rank's
``E/P`` experts (DESIGN.md section 2, Megatron layout). Per call, inside the sender's EP group:

1. counts: an ``all_to_all_single`` of the (destination, local expert) row counts;
2. dispatch: the rows, already sorted by global expert and hence by destination, go out with one
   ``all_to_all_single`` with uneven splits; the receiver regroups them from (source, local expert)
   order to (local expert, source) order for ``forward_grouped``;
3. combine: the outputs go back to (source, local expert) order and return by the reverse
   all-to-all; the sender weights them and ``index_add``s them into its tokens.

Backward of each all-to-all is the reverse all-to-all, so gradients of expert weights gather the
contributions of every token of the EP group. gloo has only the ``_single`` form with uneven
splits (the list form fails, DESIGN.md section 4).

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

from diffmoe_dist.model.moe.experts import StackedExperts


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


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


def _block_permutation(counts_SL: Tensor) -> Tensor:
    """Row order that reads (source, local expert)-ordered blocks in (local expert, source) order:
    ``x[perm]`` is grouped by local expert."""
    sizes = counts_SL.flatten()
    starts_SL = (torch.cumsum(sizes, 0) - sizes).view_as(counts_SL)
    sizes_LS, starts_LS = counts_SL.T.flatten(), starts_SL.T.flatten()
    total = int(sizes.sum())
    block_start = torch.repeat_interleave(torch.cumsum(sizes_LS, 0) - sizes_LS, sizes_LS, output_size=total)
    offset_in_block = torch.arange(total, device=counts_SL.device) - block_start
    return torch.repeat_interleave(starts_LS, sizes_LS, output_size=total) + offset_in_block


class AllToAllDispatcher:
    """``y_ND`` as ``LocalDispatcher`` computes it, with experts sharded over ``ep_group``.

    ``timings``: set to a dict to accumulate seconds per phase (``dispatch``, ``experts``,
    ``combine``) for benchmarks; ``bytes_sent`` counts the row and count payloads this rank sent to
    other ranks.
    """

    def __init__(self, ep_group=None):
        self.group = ep_group
        self.timings: dict[str, float] | None = None
        self.bytes_sent = 0
        # Telemetry (diffmoe_dist/train/telemetry.py): set to a dict to accumulate the payload bytes
        # sent to other ranks per phase (``dispatch``, ``combine``), each at its own dtype.
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

    def __call__(
        self,
        x_ND: Tensor,
        token_idx_M: Tensor,
        expert_idx_M: Tensor,
        weight_M: Tensor,
        experts: StackedExperts,
    ) -> Tensor:
        ep_size = dist.get_world_size(self.group)
        ep_rank = dist.get_rank(self.group)
        per_rank = experts.num_local
        if per_rank * ep_size != experts.num_experts or experts.offset != ep_rank * per_rank:
            raise ValueError(
                f"AllToAllDispatcher: experts hold {per_rank} of {experts.num_experts} from offset "
                f"{experts.offset}; EP rank {ep_rank} of {ep_size} needs experts.shard({ep_rank}, {ep_size})"
            )
        with self._phase("dispatch"):
            # Rows sorted by global expert are sorted by owner, and by local expert within an owner.
            send_counts_PL = torch.bincount(expert_idx_M, minlength=experts.num_experts).view(
                ep_size, per_rank
            )
            recv_counts_PL = torch.empty_like(send_counts_PL)
            dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.group)
            send_splits = send_counts_PL.sum(1).tolist()
            recv_splits = recv_counts_PL.sum(1).tolist()
            x_MD = x_ND.index_select(0, token_idx_M)  # backward: one index_add_
            recv_RD = AllToAll.apply(x_MD, recv_splits, send_splits, self.group)
            perm_R = _block_permutation(recv_counts_PL)
            grouped_RD = recv_RD.index_select(0, perm_R)
        with self._phase("experts"):
            y_grouped_RD = experts.forward_grouped(grouped_RD, recv_counts_PL.sum(0))
        with self._phase("combine"):
            inverse_R = torch.empty_like(perm_R)
            inverse_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
            y_recv_RD = y_grouped_RD.index_select(0, inverse_R)
            y_MD = AllToAll.apply(y_recv_RD, send_splits, recv_splits, self.group)
            # Same fp32 combine as LocalDispatcher (bf16 rows times fp32 weights promote to fp32),
            # so the two agree to rounding.
            y_MD = y_MD * weight_M.float().unsqueeze(1)
            y_ND = torch.zeros(x_ND.shape[0], y_MD.shape[1], dtype=y_MD.dtype, device=x_ND.device)
            y_ND.index_add_(0, token_idx_M, y_MD)
        # Off-rank payload only: rows for this rank's own experts never leave it.
        off_rank_rows = sum(send_splits) - send_splits[ep_rank] + sum(recv_splits) - recv_splits[ep_rank]
        self.bytes_sent += (ep_size - 1) * per_rank * 8 + off_rank_rows * x_ND.shape[1] * x_ND.element_size()
        if self.phase_bytes is not None:
            dim = x_ND.shape[1]
            sent = sum(send_splits) - send_splits[ep_rank]
            returned = sum(recv_splits) - recv_splits[ep_rank]
            self.phase_bytes["dispatch"] = (
                self.phase_bytes.get("dispatch", 0) + sent * dim * x_MD.element_size()
            )
            self.phase_bytes["combine"] = (
                self.phase_bytes.get("combine", 0) + returned * dim * y_recv_RD.element_size()
            )
        return y_ND.to(x_ND.dtype)
