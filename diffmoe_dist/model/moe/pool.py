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
        # Threshold, not sort: a stable sort of the N x E scores cost ~8x a top-k at N = 16K.
        # Each column takes the rows strictly above its k-th largest score, then the first
        # (k_e - #above) rows equal to it in index order: the tie rule the distributed radix
        # select reproduces (torch.topk alone gives no tie guarantee).
        n, e = scores_NE.shape
        k_E = k_E.to(device=scores_NE.device, dtype=torch.long)
        mask_NE = torch.zeros(n, e, dtype=torch.bool, device=scores_NE.device)
        if n == 0 or e == 0 or int(k_E.max()) == 0:
            return mask_NE
        kth_E = _kth_largest_per_column(scores_NE, k_E.clamp(1, n))
        above_NE = scores_NE > kth_E
        tied_NE = scores_NE == kth_E
        need_E = k_E - above_NE.sum(0)  # tied rows still to take, >= 1 where k_e >= 1
        if not torch.equal(tied_NE.sum(0), need_E):  # ties beyond the k-th: lowest index wins
            tied_NE &= tied_NE.cumsum(0) <= need_E
        torch.logical_or(above_NE, tied_NE, out=mask_NE)
        mask_NE &= (k_E > 0).view(1, e)
        return mask_NE

    def kth_largest(self, values_NE: Tensor, k: int) -> Tensor:
        if not 1 <= k <= values_NE.shape[0]:
            raise ValueError(f"kth_largest: k={k} outside [1, N_pool={values_NE.shape[0]}]")
        return _kth_largest_per_column(values_NE, torch.full((values_NE.shape[1],), k, dtype=torch.long))

    def replica_mean(self, t: Tensor) -> Tensor:
        return t


def _kth_largest_per_column(values_NE: Tensor, k_E: Tensor) -> Tensor:
    """The ``k_E[e]``-th largest value of each column (``1 <= k_E <= N``), shape ``[E]``."""
    k_max = int(k_E.max())
    if int(k_E.min()) == k_max:  # one k (training): the smallest of an unsorted top-k
        return torch.topk(values_NE, k_max, dim=0, sorted=False).values.amin(dim=0)
    top_KE = torch.topk(values_NE, k_max, dim=0, sorted=True).values
    return top_KE.gather(0, (k_E - 1).to(values_NE.device).view(1, -1)).view(-1)
