"""Dispatch: send each (token, expert) assignment to its expert and combine the results.

`Dispatcher` is the interface the MoE layer calls; `LocalDispatcher` (all
experts local) and ``AllToAllDispatcher`` (parallel/all_to_all.py: rows go to the owners of the
experts, expert parallelism) implement it and share `combine`.

The layer runs it as three steps (torchtitan's MoE): ``dispatch`` returns the rows grouped by
local expert and a `Dispatched` (what undoes the permutation), the layer calls the experts, and
``combine`` takes the outputs and the `Dispatched` back.

Sizes come first. ``moe.dispatch: exact`` (``plan(counts_E, experts)``): the per-expert row counts
of the local mask (a device tensor) become a `DispatchPlan` with one host read (the all-to-all
dispatcher first exchanges them with its peers and reads send and receive counts together); the
layer builds the assignment at the plan's known size. ``moe.dispatch: padded``
(``padded_plan(block_rows, experts)``): the router bounds the rows one rank hands one expert by a
number known on the host (its capacity k, routing/base.py), every (rank, expert) block travels
padded to that many rows, and no size is read from the device: no host read, no count exchange.
Padding rows carry token index N (one past the last) and weight 0: `combine` adds them into a
row it then drops.

Telemetry reads what a dispatch sent and how long its phases took from the `DispatchStats` in the
`Dispatched` record (the layer hands it to its `LayerRecord`), never from the dispatcher: a
dispatcher holds no per-call state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.routers import Assignment


@dataclass
class DispatchPlan:
    """Host-side sizes of one dispatch: from one host read (exact), or from the router's bound (padded)."""

    rows: int  # local (token, expert) assignments, M (padded: E x block_rows, padding included)
    expert_rows: list[int]  # rows each local expert computes (forward_grouped's groups)
    send_splits: list[int] = field(default_factory=list)  # all-to-all only: rows to each EP peer
    recv_splits: list[int] = field(default_factory=list)  # rows from each EP peer
    recv_counts_PL: Tensor | None = None  # exact all-to-all: (source, local expert) counts, on the device
    block_rows: int | None = None  # padded: rows of every (rank, expert) block; None: exact
    count_bytes: int = 0  # what the count exchange sent to other ranks
    seconds: float = 0.0  # time the plan took (timed dispatches only)


@dataclass
class DispatchStats:
    """What one layer's dispatch sent to other ranks and how long its phases took (seconds only when
    ``timed``: a logged telemetry step, which synchronises CUDA around each phase). Payload bytes:
    rows for this rank's own experts never leave it; the backward all-to-alls mirror both phases."""

    timed: bool = False
    dispatch_bytes: int = 0  # rows out
    combine_bytes: int = 0  # outputs back
    count_bytes: int = 0  # the exact plan's count exchange (padded: none)
    dispatch_s: float = 0.0  # the plan and the dispatch
    combine_s: float = 0.0


@dataclass
class Dispatched:
    """What `Dispatcher.dispatch` returns beside the rows it permuted: what `combine` needs to
    undo the permutation and weight the outputs back into the tokens (torchtitan's split of an
    MoE layer into dispatch, experts, combine: the layer calls the experts in between)."""

    token_idx_M: Tensor  # local token of each assignment (the combine's index_add target)
    weight_M: Tensor  # fp32 combine weight of each assignment
    n_tokens: int
    out_dtype: torch.dtype
    plan: DispatchPlan
    inverse_R: Tensor | None = None  # exact all-to-all: received rows back from expert-grouped order
    stats: DispatchStats = field(default_factory=DispatchStats)  # combine adds its phase


class Dispatcher(Protocol):
    """``y_t = sum_{m: token_idx[m] = t} weight[m] * Expert_{expert_idx[m]}(x_t)``. Stateless
    between calls: what a call sent and took comes back in ``Dispatched.stats``. ``timed``
    measures the phases' seconds (synchronising CUDA around each). A local dispatcher sends none."""

    def plan(self, counts_E: Tensor, experts: StackedExperts, timed: bool = False) -> DispatchPlan: ...

    def padded_plan(self, block_rows: int, experts: StackedExperts) -> DispatchPlan:
        """Every (rank, expert) block ``block_rows`` rows: sizes known on the host, nothing exchanged."""
        ...

    def dispatch(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan, timed: bool = False
    ) -> tuple[Tensor, Dispatched]:
        """The rows each local expert computes, grouped by local expert (``plan.expert_rows``)."""
        ...

    def combine(self, y_grouped: Tensor, dispatched: Dispatched) -> Tensor:
        """``y_ND`` from the experts' outputs of `dispatch`'s rows."""
        ...

    def __call__(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan | None = None
    ) -> Tensor: ...


def dispatch_experts_combine(
    dispatcher: Dispatcher,
    x_ND: Tensor,
    assignment: Assignment,
    experts: StackedExperts,
    plan: DispatchPlan,
    timed: bool = False,
) -> tuple[Tensor, Dispatched]:
    """The three steps in a row (the MoE layer, dispatchers' ``__call__``, benchmarks and tests)."""
    rows, dispatched = dispatcher.dispatch(x_ND, assignment, experts, plan, timed)
    return dispatcher.combine(experts.forward_grouped(rows, plan.expert_rows), dispatched), dispatched


def combine(
    y_MD: Tensor, weight_M: Tensor, token_idx_M: Tensor, n_tokens: int, out_dtype: torch.dtype, padded: bool = False
) -> Tensor:
    """``y_ND[t] = sum_m weight[m] y_MD[m]`` over the rows of token t, zero for tokens with no row
    (docs/design.md section 1: the residual carries them). In the router's fp32: the weights are softmax
    scores, and index_add_ of several experts' outputs for one token accumulates better in fp32
    than in bf16. A bf16 y_MD times fp32 weights promotes to fp32 in one pass. ``padded``: padding
    rows (token index ``n_tokens``, weight 0) land in one extra row, dropped: a token's sum adds
    the same terms in the same (expert) order as the exact dispatch."""
    y_MD = y_MD * weight_M.float().unsqueeze(1)
    y_ND = torch.zeros(n_tokens + int(padded), y_MD.shape[1], dtype=y_MD.dtype, device=y_MD.device)
    y_ND.index_add_(0, token_idx_M, y_MD)
    return y_ND[:n_tokens].to(out_dtype)


class Timer:
    """Seconds of the phases of a timed dispatch (untimed: nothing, no CUDA sync)."""

    def __init__(self, timed: bool):
        self.timed, self.seconds, self._start = timed, 0.0, 0.0

    def __enter__(self) -> Timer:
        if self.timed:
            _sync_cuda()  # kernels are asynchronous: time what ran, not what launched
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.timed:
            _sync_cuda()
            self.seconds += time.perf_counter() - self._start


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def padded_token_rows(token_idx_M: Tensor, n_tokens: int) -> Tensor:
    """The rows a padded dispatch gathers: padding (token ``n_tokens``) reads the last token instead,
    whose outputs `combine` drops and whose gradients are zeros (weight 0)."""
    return token_idx_M.clamp(max=max(n_tokens - 1, 0))


class LocalDispatcher:
    """All experts on this rank: gather the rows, one grouped expert call, `combine`."""

    def plan(self, counts_E: Tensor, experts: StackedExperts, timed: bool = False) -> DispatchPlan:
        expert_rows = [int(c) for c in counts_E.tolist()]  # the forward's one host read
        return DispatchPlan(rows=sum(expert_rows), expert_rows=expert_rows)

    def padded_plan(self, block_rows: int, experts: StackedExperts) -> DispatchPlan:
        n = experts.num_local
        return DispatchPlan(rows=n * block_rows, expert_rows=[block_rows] * n, block_rows=block_rows)

    def dispatch(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan, timed: bool = False
    ) -> tuple[Tensor, Dispatched]:
        """Assignments must be sorted by (global) expert index, so that each expert's rows are one
        contiguous block for ``experts.forward_grouped``."""
        if experts.num_local != experts.num_experts:
            raise ValueError(
                f"LocalDispatcher needs all {experts.num_experts} experts local, got {experts.num_local} "
                f"(sharded for expert parallelism: use the all-to-all dispatcher)"
            )
        token_idx_M, n = assignment.token_idx_M, x_ND.shape[0]
        # index_select, not x_ND[idx]: its backward is one index_add_ where advanced indexing's
        # is an accumulating index_put_, slower on CPU.
        rows_MD = x_ND.index_select(0, token_idx_M if plan.block_rows is None else padded_token_rows(token_idx_M, n))
        stats = DispatchStats(timed=timed)
        return rows_MD, Dispatched(token_idx_M, assignment.weight_M, n, x_ND.dtype, plan, stats=stats)

    def combine(self, y_MD: Tensor, dispatched: Dispatched) -> Tensor:
        d = dispatched
        return combine(y_MD, d.weight_M, d.token_idx_M, d.n_tokens, d.out_dtype, d.plan.block_rows is not None)

    def __call__(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan | None = None
    ) -> Tensor:
        if plan is None:
            counts_E = torch.bincount(assignment.expert_idx_M - experts.offset, minlength=experts.num_local)
            plan = self.plan(counts_E, experts)
        return dispatch_experts_combine(self, x_ND, assignment, experts, plan)[0]
