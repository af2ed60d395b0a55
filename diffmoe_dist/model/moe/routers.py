"""Routing as pure functions: scores, selection masks, and the assignments built from them.

Every router produces a bool ``mask_NE`` over the local tokens (``mask[t, e]``: expert e
computes token t); ``assignment_from_mask`` turns it into expert-sorted (token, expert, weight)
triples for the dispatcher, with weight ``S[t, e]``. No distributed code here: questions about
the whole pool go through a ``TokenPool`` (pool.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffmoe_dist.config import INFERENCE_MODES, ROUTERS  # noqa: F401 (the MoE layer reads routers.ROUTERS)
from diffmoe_dist.model.moe import invariant
from diffmoe_dist.model.moe.pool import TokenPool, expert_capacity


@dataclass
class Assignment:
    """Which expert computes which local token, sorted by expert then token index."""

    token_idx_M: Tensor  # long, local token row
    expert_idx_M: Tensor  # long, global expert index
    weight_M: Tensor  # fp32 router score S[t, e], the combine weight
    mask_NE: Tensor | None = None  # bool selection mask the triples came from

    def detach(self) -> Assignment:
        return Assignment(self.token_idx_M, self.expert_idx_M, self.weight_M.detach(), self.mask_NE)


def router_logits(x_ND: Tensor, weight_ED: Tensor) -> Tensor:
    """``x W_r^T``, batch invariant: row t's logits depend on row t alone, bit for bit, over fixed
    blocks of rows (model/moe/invariant.py). A plain ``x @ W^T`` of one row (a rank of the dp pool
    holding one token) rounds differently from the same row in a larger product: a tie that
    straddles ranks was then broken by one ulp instead of by index."""
    x_GBD = invariant.blocks(x_ND)
    # One launch (issue 23: the per-block loop was ~22% of a step's ops): a bmm over the (G, 128, D)
    # blocks with the weight broadcast, each batch entry the same fixed-shape product. Autograd's
    # (G, D, E) weight gradient is small here (E columns); the predictor's D x D uses blocked_linear.
    w_GDE = weight_ED.T.unsqueeze(0).expand(x_GBD.shape[0], -1, -1)
    return invariant.rows(torch.bmm(x_GBD, w_GDE), x_ND.shape[0])


def router_scores(x_ND: Tensor, weight_ED: Tensor) -> Tensor:
    """``S = softmax(x W_r^T)`` over experts, in fp32 even under bf16 autocast (docs/design.md
    section 1): selection compares scores across the whole pool, where bf16 would create ties.
    Batch invariant (`router_logits`), so a token's score does not depend on which rank holds it."""
    with torch.autocast(device_type=x_ND.device.type, enabled=False):
        return torch.softmax(router_logits(x_ND.float(), weight_ED.float()), dim=-1)


def assignment_from_mask(mask_NE: Tensor, scores_NE: Tensor, size: int | None = None) -> Assignment:
    """(token, expert, weight) triples of ``mask_NE``, sorted by expert then token: the
    contiguous-per-expert layout forward_grouped needs. ``size`` = ``mask_NE.sum()`` when the
    caller knows it (the dispatcher's one host read): then no op has a data-dependent size, the
    j-th selected entry is found by a searchsorted on the running count. Without it, nonzero."""
    n = mask_NE.shape[0]
    if size is None:
        # nonzero on the transposed mask enumerates (expert, token) in row-major order
        expert_idx_M, token_idx_M = mask_NE.T.nonzero(as_tuple=True)
    else:
        running_EN = mask_NE.T.reshape(-1).cumsum(0)
        flat_M = torch.searchsorted(running_EN, torch.arange(1, size + 1, device=mask_NE.device))
        expert_idx_M, token_idx_M = flat_M // n, flat_M % n
    return Assignment(token_idx_M, expert_idx_M, scores_NE[token_idx_M, expert_idx_M], mask_NE)


def padded_assignment(mask_NE: Tensor, scores_NE: Tensor, block_rows: int) -> Assignment:
    """``moe.dispatch: padded``: expert e's selected tokens in index order (as `assignment_from_mask`),
    then padding up to ``block_rows`` rows, E blocks in expert order. Padding rows carry token
    index N (one past the last) and weight 0. ``block_rows`` must bound every column of the mask
    (the router's ``padded_rows``): every size is known on the host, none is read from the device.
    The j-th row of block e is the first token where column e's running count reaches j + 1 (a
    batched searchsorted: N where the column has fewer)."""
    n, e = mask_NE.shape
    running_EN = mask_NE.T.cumsum(1)
    wanted_EB = torch.arange(1, block_rows + 1, device=mask_NE.device).expand(e, block_rows).contiguous()
    token_idx_M = torch.searchsorted(running_EN, wanted_EB).flatten()
    expert_idx_M = torch.arange(e, device=mask_NE.device).view(e, 1).expand(e, block_rows).reshape(-1)
    scores_pad = torch.cat([scores_NE, scores_NE.new_zeros(1, e)])  # row N: padding's weight 0
    return Assignment(token_idx_M, expert_idx_M, scores_pad[token_idx_M, expert_idx_M], mask_NE)


def expert_choice_global(
    scores_NE: Tensor, capacity: float, pool: TokenPool, n_pool: int | None = None
) -> tuple[Tensor, Tensor]:
    """DiffMoE training (and static inference): each expert takes its ``k = floor(C N_pool / E)``
    best tokens of the whole pool (``N_pool`` comes with the selection: no separate size
    collective; ``n_pool`` is ignored, kept for callers that pass it). Returns ``(mask_NE, k_E)``."""
    mask_NE, k_E, _ = pool.capacity_topk_mask(scores_NE, capacity)
    return mask_NE, k_E


def expert_choice_dynamic(scores_NE: Tensor, prob_NE: Tensor, threshold_E: Tensor, pool: TokenPool):
    """DiffMoE dynamic / interval inference: ``k_e = #{t in pool: sigmoid(pred[t, e]) > tau_e}``,
    then expert e takes its top-``k_e`` tokens of the pool *by router score*. ``k_e`` counts
    tokens, so it scales with the pool and stays meaningful at batch size 1 (paper Fig. 6).
    Pass a constant ``threshold_E = gamma`` for interval mode. Returns ``(mask_NE, k_E, n_pool)``
    with ``n_pool`` the pool's size (it comes with the selection's first histogram)."""
    return pool.count_topk_mask(scores_NE, prob_NE > threshold_E.to(prob_NE).view(1, -1))


def expert_choice_local(scores_BLE: Tensor, capacity: float, k_BE: Tensor | None = None) -> Tensor:
    """EC-DiT: each expert takes ``k = floor(C L / E)`` tokens inside each sample's L tokens
    (never across samples); ties towards the lower token index. ``k_BE``: a count per sample and
    expert instead (dynamic intra-sample inference). Returns ``mask_NE`` (N = B L)."""
    b, seq, num_experts = scores_BLE.shape
    k = expert_capacity(capacity, seq, num_experts) if k_BE is None else k_BE.view(b, 1, num_experts)
    order_BLE = torch.sort(scores_BLE, dim=1, descending=True, stable=True).indices
    rank_BLE = torch.empty_like(order_BLE)
    positions = torch.arange(seq, device=scores_BLE.device).view(1, seq, 1).expand(b, seq, num_experts)
    rank_BLE.scatter_(1, order_BLE, positions)
    return (rank_BLE < k).reshape(b * seq, num_experts)


def token_choice(scores_NE: Tensor, top_k: int) -> Tensor:
    """TC-DiT: each token goes to its ``top_k`` highest-scoring experts, dropless (no capacity
    limit); ties towards the lower expert index. The combine weight is the plain softmax
    probability, not renormalised over the chosen K (as in TC-DiT / DiT-MoE with K=1, where
    renormalising would make every weight 1 and cut the router's gradient). Returns ``mask_NE``."""
    n, num_experts = scores_NE.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moe.top_k={top_k} must lie in [1, num_experts={num_experts}]")
    top_NK = torch.sort(scores_NE, dim=1, descending=True, stable=True).indices[:, :top_k]
    mask_NE = torch.zeros_like(scores_NE, dtype=torch.bool)
    return mask_NE.scatter_(1, top_NK, True)


def load_balancing_loss(scores_NE: Tensor, mask_NE: Tensor, weight: float) -> Tensor:
    """Switch-style aux loss ``weight * E * sum_i P_i f_i`` over the local tokens: ``f_i`` is the
    fraction of token-slots (N K of them) routed to expert i, ``P_i`` the mean router probability.
    Gradient flows through ``P`` only (``f`` is a count)."""
    num_experts = scores_NE.shape[1]
    f_E = mask_NE.float().sum(0) / mask_NE.float().sum().clamp_min(1.0)
    p_E = scores_NE.float().mean(0)
    return weight * num_experts * (p_E * f_E).sum()


def capacity_avg(k_E: Tensor, n_pool: Tensor | int) -> Tensor:
    """``C_avg = mean_e(E * k_e / N_pool)`` (docs/design.md section 1), the achieved capacity, as a
    float64 device tensor (0 for an empty pool): read on the host once per step, with the losses.
    Also for L layers at once: ``k_LE`` and ``n_L`` give ``C_avg`` per layer (the same bits: integer sums)."""
    n = torch.as_tensor(n_pool, device=k_E.device).double()
    return torch.where(
        n > 0, k_E.double().sum(-1) / n.clamp(min=1), torch.zeros((), dtype=torch.float64, device=k_E.device)
    )
