"""DiffMoE's capacity predictor and its per-expert thresholds (docs/design.md section 1)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

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
        reach the backbone or the router (it "never affects the diffusion loss")."""
        return self.net(x_ND.detach()).float()

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
