"""DiffMoE's capacity predictor and its per-expert thresholds (docs/design.md section 1)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from diffmoe_dist.model.moe import invariant

# tau starts at 0.5, the decision boundary of a BCE classifier ("more likely selected than not")
# and where sigmoid of an untrained predictor's near-zero logits sits, so dynamic inference
# without training still routes a non-trivial share of tokens. With momentum 0.95 the EMA forgets
# this start within ~100 steps, long before the predictor is worth using.
THRESHOLD_INIT = 0.5


class CapacityPredictor(nn.Module):
    """``Linear(D, D) -> SiLU -> Linear(D, E)`` on the detached layer input, trained with BCE to
    predict which experts the global router selects for each token."""

    def __init__(self, dim: int, num_experts: int, momentum: float = 0.95):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, num_experts))
        self.momentum = momentum
        # A buffer, so it is in checkpoints and in the weight+buffer EMA model; it must stay
        # identical on every rank (the step's update averages over replicas where pools differ).
        self.register_buffer("threshold_E", torch.full((num_experts,), THRESHOLD_INIT))

    def forward(self, x_ND: Tensor) -> Tensor:
        """Logits ``pred_NE`` in fp32. The input is detached: the predictor's loss must never
        reach the backbone or the router (it "never affects the diffusion loss").

        Batch invariant, as the router's scores: a token's logits, and so its `probability`, have
        the same bits in any batch, alone or on any rank (model/moe/invariant.py: both linears over
        fixed-size row blocks, SiLU from ``exp``), so dynamic inference's ``k_e`` and the threshold
        EMA's quantile equal one process on the concatenated batch even at one ulp from ``tau_e``.
        ``net`` keeps its ``nn.Sequential`` for the parameter names (checkpoints) and counts."""
        first, _, last = self.net
        x_GBD = invariant.blocks(x_ND.detach())
        h_GBD = invariant.blocked_linear(x_GBD, first.weight, first.bias)
        h_GBD = invariant.silu(h_GBD.float()).to(h_GBD.dtype)  # bf16 (autocast, a bf16 model) as torch's SiLU: via fp32
        pred_GBE = invariant.blocked_linear(h_GBD, last.weight, last.bias)
        return invariant.rows(pred_GBE, x_ND.shape[0]).float()

    @staticmethod
    def probability(pred_NE: Tensor) -> Tensor:
        """``sigmoid(pred)`` of detached logits, batch invariant (`forward`); what a threshold meets."""
        return invariant.sigmoid(pred_NE.detach().float())

    @staticmethod
    def loss(pred_NE: Tensor, mask_NE: Tensor) -> Tensor:
        """BCE-with-logits against the 0/1 selection mask, mean over this layer's local entries."""
        return F.binary_cross_entropy_with_logits(pred_NE.float(), mask_NE.detach().float())

    @torch.no_grad()
    def update_threshold(self, q_E: Tensor, valid_E: Tensor) -> None:
        """``tau_e <- m tau_e + (1 - m) q_e`` where ``valid_E`` (the pool selected something, so
        ``q_e`` exists). ``q_e`` is the predicted probability of the last token expert e selected
        over the step's pool; `MoECollector.update_thresholds` computes it once per optimizer step
        and calls this, never ``forward``."""
        new_E = self.threshold_E.mul(self.momentum).add_(q_E.to(self.threshold_E), alpha=1.0 - self.momentum)
        self.threshold_E.copy_(torch.where(valid_E.to(new_E.device), new_E, self.threshold_E))
