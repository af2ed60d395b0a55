"""Token pools: the set of tokens over which an expert-choice router picks its top-k.

DiffMoE (DESIGN.md section 1) flattens the whole batch into one pool and lets every expert take its
``k = floor(C * N_pool / E)`` best tokens. The router code only ever sees the *local* rows of the
pool; every question that needs the whole pool (its size, column counts, column top-k, column
quantiles) goes through a ``TokenPool``. ``LocalPool`` answers them for a single process;
``diffmoe_dist/parallel/selection.py`` answers them across data-parallel ranks (radix select,
DESIGN.md section 2) and must return exactly what ``LocalPool`` returns on the rank-major
concatenation of the local batches, including the tie rule.

Contract for distributed implementations: every method is a collective, so all ranks of the pool
call the same methods in the same order with the same ``E`` (and the same ``k``), but each with
its own number of local rows ``N``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class TokenPool:
    """Interface of a token pool. Inputs and outputs are the caller's local rows only."""

    def size(self, n_local: int) -> int:
        """Number of tokens in the whole pool, ``N_pool``, given this rank's ``n_local``."""
        raise NotImplementedError

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

    def kth_largest(self, values_NE: Tensor, k: int) -> Tensor:
        """Tensor[E]: the ``k``-th largest value of each column over the whole pool (1-based,
        ``1 <= k <= N_pool``). Used for the capacity predictor's quantile ``q_e``."""
        raise NotImplementedError

    def replica_mean(self, t: Tensor) -> Tensor:
        """Mean of ``t`` over the replicas that must hold identical copies of a buffer (the
        predictor thresholds). Identity in one process; an all-reduce across ranks."""
        raise NotImplementedError


class LocalPool(TokenPool):
    """The pool is exactly the local batch (one process, or DESIGN.md's ``pool: rank``)."""

    def size(self, n_local: int) -> int:
        return n_local

    def count(self, mask_NE: Tensor) -> Tensor:
        return mask_NE.sum(dim=0, dtype=torch.long)

    def topk_mask(self, scores_NE: Tensor, k_E: Tensor) -> Tensor:
        n, e = scores_NE.shape
        # A stable descending sort keeps equal scores in index order, which is the tie rule the
        # distributed radix select reproduces; torch.topk gives no such guarantee.
        order_NE = torch.sort(scores_NE, dim=0, descending=True, stable=True).indices
        rank_NE = torch.empty_like(order_NE)
        rank_NE.scatter_(0, order_NE, torch.arange(n, device=scores_NE.device).unsqueeze(1).expand(n, e))
        return rank_NE < k_E.to(scores_NE.device).view(1, e)

    def kth_largest(self, values_NE: Tensor, k: int) -> Tensor:
        if not 1 <= k <= values_NE.shape[0]:
            raise ValueError(f"kth_largest: k={k} outside [1, N_pool={values_NE.shape[0]}]")
        return torch.topk(values_NE, k, dim=0, sorted=True).values[k - 1]

    def replica_mean(self, t: Tensor) -> Tensor:
        return t
