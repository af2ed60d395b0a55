"""Token pools: the set of tokens over which an expert-choice router picks its top-k.

DiffMoE (docs/design.md section 1) flattens the whole batch into one pool and lets every expert take its
``k = floor(C * N_pool / E)`` best tokens. The router code only ever sees the *local* rows of the
pool; every question that needs the whole pool (its size, column counts, column top-k, column
quantiles) goes through a ``TokenPool``. ``LocalPool`` answers them for a single process;
``diffmoe_dist/parallel/pools.py`` answers them across data-parallel ranks (radix select,
docs/design.md section 2) and must return exactly what ``LocalPool`` returns on the rank-major
concatenation of the local batches, including the tie rule.

Contract for distributed implementations: every method is a collective, so all ranks of the pool
call the same methods in the same order with the same ``E`` (and the same ``k``), but each with
its own number of local rows ``N``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expert_capacity(capacity: float, n_tokens: int, num_experts: int) -> int:
    """``k = floor(C * N / E)``, clamped to ``[0, N]``. The 1e-9 guards against float products
    such as ``1.2 * 10 / 12 = 0.9999999999999999`` flooring one token short."""
    k = math.floor(capacity * n_tokens / num_experts + 1e-9)
    return max(0, min(k, n_tokens))


class TokenPool:
    """Interface of a token pool. Inputs and outputs are the caller's local rows only; counts and
    sizes come back as device tensors (no host read in a training forward)."""

    # True when the pool's quantiles are the same on every replica (one process, or a pool over
    # all DP ranks): the thresholds then need no replica mean.
    thresholds_global = True
    # Ranks whose local batches make up the pool (in training each holds the same number of tokens:
    # a router's padded-dispatch bound reads it).
    ranks = 1

    @property
    def batch_key(self) -> tuple:
        """Layers whose pools have equal keys may batch their step selections into one call."""
        return (type(self).__name__,)

    def count(self, mask_NE: Tensor) -> Tensor:
        """Column sums of a bool ``mask_NE`` over the whole pool: LongTensor[E]."""
        raise NotImplementedError

    def topk_mask(self, scores_NE: Tensor, k_E: Tensor) -> Tensor:
        """BoolTensor[N, E]: for each column e, which local rows are among the ``k_E[e]`` largest
        scores of the whole pool.

        Ties are broken towards the lower pool index (rank-major global token index), so the
        result is exact and deterministic. ``k_E`` may differ per expert (dynamic inference) and
        lies in ``[0, N_pool]``.
        """
        raise NotImplementedError

    def capacity_topk_mask(self, scores_NE: Tensor, capacity: float) -> tuple[Tensor, Tensor, Tensor]:
        """DiffMoE training: `topk_mask` with ``k = floor(C N_pool / E)`` for every expert.
        Returns ``(mask_NE, k_E, n_pool)`` (LongTensor[E] and a 0-dim LongTensor)."""
        raise NotImplementedError

    def count_topk_mask(self, scores_NE: Tensor, counted_NE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Dynamic inference: `topk_mask` with ``k_e = #{pool rows t: counted[t, e]}``.
        Returns ``(mask_NE, k_E, n_pool)``."""
        raise NotImplementedError

    def kth_largest(self, values_NE: Tensor, k: int) -> Tensor:
        """Tensor[E]: the ``k``-th largest value of each column over the whole pool (1-based,
        ``1 <= k <= N_pool``)."""
        raise NotImplementedError

    def capacity_kth_largest(self, values_NC: Tensor, capacity: float, num_experts: int) -> tuple[Tensor, Tensor]:
        """The capacity predictor's quantiles: per column the ``k``-th largest value over the
        pool, ``k = floor(capacity N_pool / num_experts)``. Returns ``(kth_C, k_C)``; where
        ``k_C = 0`` the value is arbitrary (nothing selected: no quantile)."""
        raise NotImplementedError

    def replica_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the replicas that must hold identical copies of a buffer (the
        predictor thresholds). Identity in one process; an all-reduce across ranks."""
        raise NotImplementedError


class LocalPool(TokenPool):
    """The pool is exactly the local batch (one process, or docs/design.md's ``pool: rank``)."""

    def count(self, mask_NE: Tensor) -> Tensor:
        return mask_NE.sum(dim=0, dtype=torch.long)

    def topk_mask(self, scores_NE: Tensor, k_E: Tensor) -> Tensor:
        n, e = scores_NE.shape
        k_E = k_E.to(device=scores_NE.device, dtype=torch.long)
        if n == 0 or e == 0:
            return torch.zeros(n, e, dtype=torch.bool, device=scores_NE.device)
        return _take_top(scores_NE, _kth_largest_per_column(scores_NE, k_E.clamp(1, n)), k_E)

    def capacity_topk_mask(self, scores_NE: Tensor, capacity: float) -> tuple[Tensor, Tensor, Tensor]:
        n, e = scores_NE.shape
        k = expert_capacity(capacity, n, e)  # the pool size is local: known on the host
        device = scores_NE.device
        k_E = torch.full((e,), k, dtype=torch.long, device=device)
        n_pool = torch.full((), n, dtype=torch.long, device=device)
        if k == 0:
            return torch.zeros(n, e, dtype=torch.bool, device=device), k_E, n_pool
        # one k: the smallest of an unsorted top-k is the k-th largest, no host read
        kth_E = torch.topk(scores_NE, k, dim=0, sorted=False).values.amin(dim=0)
        return _take_top(scores_NE, kth_E, k_E), k_E, n_pool

    def count_topk_mask(self, scores_NE: Tensor, counted_NE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k_E = counted_NE.sum(0, dtype=torch.long)
        n_pool = torch.full((), scores_NE.shape[0], dtype=torch.long, device=scores_NE.device)
        return self.topk_mask(scores_NE, k_E), k_E, n_pool

    def kth_largest(self, values_NE: Tensor, k: int) -> Tensor:
        if not 1 <= k <= values_NE.shape[0]:
            raise ValueError(f"kth_largest: k={k} outside [1, N_pool={values_NE.shape[0]}]")
        return torch.topk(values_NE, k, dim=0, sorted=False).values.amin(dim=0)

    def capacity_kth_largest(self, values_NC: Tensor, capacity: float, num_experts: int) -> tuple[Tensor, Tensor]:
        n, c = values_NC.shape
        k = expert_capacity(capacity, n, num_experts)
        k_C = torch.full((c,), k, dtype=torch.long, device=values_NC.device)
        if k == 0:
            return values_NC.new_zeros(c), k_C
        return self.kth_largest(values_NC, k), k_C

    def replica_sum(self, t: Tensor) -> Tensor:
        return t


def _take_top(scores_NE: Tensor, kth_E: Tensor, k_E: Tensor) -> Tensor:
    """Threshold, not sort (a stable sort of the N x E scores cost ~8x a top-k at N = 16K): each
    column takes the rows strictly above its k-th largest score, then the first (k_e - #above)
    rows equal to it in index order (a cumsum): the tie rule the distributed radix select
    reproduces (torch.topk alone gives no tie guarantee)."""
    above_NE = scores_NE > kth_E
    tied_NE = scores_NE == kth_E
    need_E = k_E - above_NE.sum(0)  # tied rows still to take, >= 1 where k_e >= 1
    mask_NE = above_NE | (tied_NE & (tied_NE.cumsum(0) <= need_E))
    return mask_NE & (k_E > 0).view(1, -1)


def _kth_largest_per_column(values_NE: Tensor, k_E: Tensor) -> Tensor:
    """The ``k_E[e]``-th largest value of each column (``1 <= k_E <= N``), shape ``[E]``."""
    k_max = int(k_E.max())  # explicit per-expert k (inference): one host read for the top-k size
    top_KE = torch.topk(values_NE, k_max, dim=0, sorted=True).values
    return top_KE.gather(0, (k_E - 1).to(values_NE.device).view(1, -1)).view(-1)
