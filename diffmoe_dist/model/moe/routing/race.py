"""Expert Race (Race-DiT, Yuan et al., ICML 2025, arXiv 2503.16057): tokens and experts compete at
once. The pool's whole token x expert score matrix is one list of ``N_pool E`` entries, and the top
``K = floor(C N_pool)`` of them are computed (``k E`` with ``k = C N_pool / E``, the work of expert
choice at capacity C): a token may visit any number of experts, an expert take any number of tokens.

Across the ``dp`` pool this is one radix select over a single column of ``N E`` keys (the local
rows flattened row-major: the rank-major concatenation of those lists is the flattened
concatenated batch, so the tie rule, towards the lower ``t E + e``, is one process's). Nothing new
in the pools: ``capacity_topk_mask`` on the flattened column with capacity ``C / E``.

Balance: the paper's router similarity loss (its section 5), over the pool. With ``P`` the scores
and ``M`` the selection, ``P' = P^T P / N`` (token mean of score products) and ``M' = M^T M``
(how often experts i and j were chosen for one token, counted over the pool), weights
``w_ii = E M'_ii / sum_k M'_kk`` and ``w_ij = E (E - 1) M'_ij / sum_{k != l} M'_kl`` (i != j), and
``L = aux_loss_weight / E * sum_ij w_ij P'_ij``: pairs of experts chosen together are pushed to
score tokens differently (no mode collapse into fixed combinations), the diagonal keeps load even.
The weights are counts (no gradient); ``P'`` is the local token mean, so the gradient averaged over
DP ranks equals one process on the concatenated batch.

Inference takes the same top ``K`` of the pool (no capacity predictor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffmoe_dist.model.moe.pool import expert_capacity
from diffmoe_dist.model.moe.routing.base import RouteInputs, Router, Selection


class ExpertRace(Router):
    name = "expert_race"
    pool_selection = True
    loss_names = ("aux_loss",)

    @classmethod
    def expert_rows(cls, moe_cfg, images: int, seq: int, pool_ranks: int) -> float:
        n_pool = images * seq * pool_ranks
        return expert_capacity(moe_cfg.capacity / moe_cfg.num_experts, n_pool * moe_cfg.num_experts, 1) / pool_ranks

    @classmethod
    def selection_calls(cls, moe_cfg, widths: list[int]) -> list[tuple[str, int]]:
        e = moe_cfg.num_experts
        # one column of N E keys, then the pair counts M' (E x E int64, one all-reduce)
        return [("all_reduce", (1 << w) * 4) for w in widths] + [("all_gather", 8), ("all_reduce", e * e * 8)]

    def select(self, scores_NE: Tensor, inp: RouteInputs) -> Selection:
        n, e = scores_NE.shape
        flat_mask, _, n_keys = inp.pool.capacity_topk_mask(scores_NE.reshape(n * e, 1), self.capacity / e)
        mask_NE = flat_mask.view(n, e)
        # M' over the pool: column sums of the per-token pair mask (its diagonal is k_E)
        pairs_EE = inp.pool.count((mask_NE.unsqueeze(2) & mask_NE.unsqueeze(1)).reshape(n, e * e)).view(e, e)
        sel = Selection(mask_NE, pairs_EE.diagonal().clone(), n_keys // e)
        aux = scores_NE.new_zeros(())
        if inp.training and n:
            aux = self.aux_loss_weight * similarity_loss(scores_NE, pairs_EE)
        if inp.training:
            sel.loss = aux
        sel.losses["aux_loss"] = aux
        return sel


def similarity_loss(scores_NE: Tensor, pairs_EE: Tensor) -> Tensor:
    """Race-DiT's router similarity loss (module docstring), unweighted."""
    n, e = scores_NE.shape
    p = scores_NE.float()
    # elementwise, not a matmul: MFU counts the model's matmul FLOPs (train/flops.py), not a loss's
    p_EE = (p.unsqueeze(2) * p.unsqueeze(1)).mean(0)
    m = pairs_EE.to(p.dtype)
    eye = torch.eye(e, dtype=torch.bool, device=p.device)
    diag_total = m.diagonal().sum().clamp(min=1.0)
    off_total = m.masked_fill(eye, 0).sum().clamp(min=1.0)
    w_EE = torch.where(eye, e * m / diag_total, e * (e - 1) * m / off_total)
    return (w_EE * p_EE).sum() / e
