"""TC-DiT: each token goes to its ``top_k`` highest-scoring experts, with the Switch balance loss."""

from __future__ import annotations

import torch
from torch import Tensor

from diffmoe_dist.model.moe import routers
from diffmoe_dist.model.moe.routing.base import RouteInputs, Router, Selection


class TokenChoice(Router):
    name = "token_choice"
    loss_names = ("aux_loss",)

    @classmethod
    def active_experts(cls, moe_cfg) -> float:
        return float(moe_cfg.top_k)

    @classmethod
    def expert_rows(cls, moe_cfg, images: int, seq: int, pool_ranks: int) -> float:
        return float(moe_cfg.top_k * images * seq)

    def select(self, scores_NE: Tensor, inp: RouteInputs) -> Selection:
        mask_NE = routers.token_choice(scores_NE, self.top_k)
        n_pool = torch.full((), scores_NE.shape[0], dtype=torch.long, device=scores_NE.device)
        sel = Selection(mask_NE, mask_NE.sum(0), n_pool)
        aux = scores_NE.new_zeros(())
        if inp.training:
            aux = routers.load_balancing_loss(scores_NE, mask_NE, self.aux_loss_weight)
            sel.loss = aux
        sel.losses["aux_loss"] = aux
        return sel
