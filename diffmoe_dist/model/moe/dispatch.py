"""Dispatch: send each (token, expert) assignment to its expert and combine the results.

`Dispatcher` is the interface the MoE layer calls and telemetry reads; `LocalDispatcher` (all
experts local) and ``AllToAllDispatcher`` (parallel/all_to_all.py: rows go to the owners of the
experts, expert parallelism) implement it and share `combine`.

The layer runs it as three steps (torchtitan's MoE): ``dispatch`` returns the rows grouped by
local expert and a `Dispatched` (what undoes the permutation), the layer calls the experts, and
``combine`` takes the outputs and the `Dispatched` back.

Sizes come first, so that a forward reads the host once: ``plan(counts_E, experts)``
turns the per-expert row counts of the local mask (a device tensor) into a `DispatchPlan` with one
host read (the all-to-all dispatcher first exchanges them with its peers and reads send and
receive counts together); the layer builds the assignment at the plan's known size, and
``dispatcher(..., plan=plan)`` reuses it for the split sizes and the expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.routers import Assignment


@dataclass
class DispatchPlan:
    """Host-side sizes of one dispatch, from one host read."""

    rows: int  # local (token, expert) assignments, M
    expert_rows: list[int]  # rows each local expert computes (forward_grouped's groups)
    send_splits: list[int] = field(default_factory=list)  # all-to-all only: rows to each EP peer
    recv_splits: list[int] = field(default_factory=list)  # rows from each EP peer
    recv_counts_PL: Tensor | None = None  # (source, local expert) counts, on the device


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
    inverse_R: Tensor | None = None  # all-to-all: received rows back from expert-grouped order


class Dispatcher(Protocol):
    """``y_t = sum_{m: token_idx[m] = t} weight[m] * Expert_{expert_idx[m]}(x_t)``.

    ``timings``: set to a dict to accumulate seconds per phase (``dispatch``, ``combine``; the
    experts run in the layer); ``phase_bytes``: set to a dict to accumulate payload bytes sent to
    other ranks per phase; ``bytes_sent``: total payload bytes sent to other ranks. A local
    dispatcher sends none."""

    timings: dict[str, float] | None
    phase_bytes: dict[str, int] | None
    bytes_sent: int

    def plan(self, counts_E: Tensor, experts: StackedExperts) -> DispatchPlan: ...

    def dispatch(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan
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
    dispatcher: Dispatcher, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan
) -> Tensor:
    """The three steps in a row (dispatchers' ``__call__``, benchmarks and tests)."""
    rows, dispatched = dispatcher.dispatch(x_ND, assignment, experts, plan)
    return dispatcher.combine(experts.forward_grouped(rows, plan.expert_rows), dispatched)


def combine(y_MD: Tensor, weight_M: Tensor, token_idx_M: Tensor, n_tokens: int, out_dtype: torch.dtype) -> Tensor:
    """``y_ND[t] = sum_m weight[m] y_MD[m]`` over the rows of token t, zero for tokens with no row
    (docs/design.md section 1: the residual carries them). In the router's fp32: the weights are softmax
    scores, and index_add_ of several experts' outputs for one token accumulates better in fp32
    than in bf16. A bf16 y_MD times fp32 weights promotes to fp32 in one pass."""
    y_MD = y_MD * weight_M.float().unsqueeze(1)
    y_ND = torch.zeros(n_tokens, y_MD.shape[1], dtype=y_MD.dtype, device=y_MD.device)
    y_ND.index_add_(0, token_idx_M, y_MD)
    return y_ND.to(out_dtype)


class LocalDispatcher:
    """All experts on this rank: gather the rows, one grouped expert call, `combine`."""

    def __init__(self):
        self.timings: dict[str, float] | None = None
        self.phase_bytes: dict[str, int] | None = None
        self.bytes_sent = 0

    def plan(self, counts_E: Tensor, experts: StackedExperts) -> DispatchPlan:
        expert_rows = [int(c) for c in counts_E.tolist()]  # the forward's one host read
        return DispatchPlan(rows=sum(expert_rows), expert_rows=expert_rows)

    def dispatch(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan
    ) -> tuple[Tensor, Dispatched]:
        """Assignments must be sorted by (global) expert index, so that each expert's rows are one
        contiguous block for ``experts.forward_grouped``."""
        if experts.num_local != experts.num_experts:
            raise ValueError(
                f"LocalDispatcher needs all {experts.num_experts} experts local, got {experts.num_local} "
                f"(sharded for expert parallelism: use the all-to-all dispatcher)"
            )
        token_idx_M = assignment.token_idx_M
        # index_select, not x_ND[idx]: its backward is one index_add_ where advanced indexing's
        # is an accumulating index_put_, slower on CPU.
        rows_MD = x_ND.index_select(0, token_idx_M)
        return rows_MD, Dispatched(token_idx_M, assignment.weight_M, x_ND.shape[0], x_ND.dtype, plan)

    def combine(self, y_MD: Tensor, dispatched: Dispatched) -> Tensor:
        d = dispatched
        return combine(y_MD, d.weight_M, d.token_idx_M, d.n_tokens, d.out_dtype)

    def __call__(
        self, x_ND: Tensor, assignment: Assignment, experts: StackedExperts, plan: DispatchPlan | None = None
    ) -> Tensor:
        if plan is None:
            counts_E = torch.bincount(assignment.expert_idx_M - experts.offset, minlength=experts.num_local)
            plan = self.plan(counts_E, experts)
        return dispatch_experts_combine(self, x_ND, assignment, experts, plan)
