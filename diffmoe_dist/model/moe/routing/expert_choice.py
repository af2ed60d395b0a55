"""Expert choice: DiffMoE's global pool (``expert_choice_global``) and EC-DiT's intra-sample
choice (``expert_choice_local``). Both train a capacity predictor on their own masks and infer
``dynamic`` (per-expert counts from the predictor and thresholds), ``static`` (the training
capacity) or ``interval`` (one constant threshold gamma); DiffMoE counts over the pool, EC-DiT
inside each sample ("Local Dynamic Intra-sample Routing", the paper's Table 3 row 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffmoe_dist.model.moe import routers
from diffmoe_dist.model.moe.pool import expert_capacity
from diffmoe_dist.model.moe.routing.base import RouteInputs, Router, Selection


class GlobalExpertChoice(Router):
    """DiffMoE: each expert takes its ``k = floor(C N_pool / E)`` best tokens of the whole pool."""

    name = "expert_choice_global"
    uses_predictor = True
    pool_selection = True
    loss_names = ("predictor_bce",)

    def select(self, scores_NE: Tensor, inp: RouteInputs) -> Selection:
        if inp.training or inp.inference == "static":
            mask_NE, k_E, n_pool = inp.pool.capacity_topk_mask(scores_NE, self.capacity)
        else:
            mask_NE, k_E, n_pool = inp.pool.count_topk_mask(scores_NE, self.predicted_counts(inp))
        return self._with_predictor(Selection(mask_NE, k_E, n_pool), inp)

    def padded_rows(self, n_local: int, inp: RouteInputs) -> int | None:
        """Expert e takes k = floor(C N_pool / E) of the pool, so at most min(k, n_local) of one
        rank's tokens (pool ``rank``: exactly k, no padding)."""
        if not inp.training:
            return None
        return min(expert_capacity(self.capacity, n_local * inp.pool.ranks, self.num_experts), n_local)


class LocalExpertChoice(Router):
    """EC-DiT: each expert takes ``k = floor(C L / E)`` tokens inside each sample's L tokens."""

    name = "expert_choice_local"
    uses_predictor = True
    loss_names = ("predictor_bce",)

    @classmethod
    def expert_rows(cls, moe_cfg, images: int, seq: int, pool_ranks: int) -> float:
        e = moe_cfg.num_experts
        return float(images * e * expert_capacity(moe_cfg.capacity, seq, e))

    def select(self, scores_NE: Tensor, inp: RouteInputs) -> Selection:
        n, e = scores_NE.shape
        scores_BLE = scores_NE.view(n // max(inp.seq, 1), inp.seq, e) if n else scores_NE.view(0, inp.seq, e)
        if inp.training or inp.inference == "static":
            mask_NE = routers.expert_choice_local(scores_BLE, self.capacity)
        else:  # per sample: k_{b,e} = #{t in sample b: sigmoid(pred[t, e]) > tau_e}
            counted_BLE = self.predicted_counts(inp).view_as(scores_BLE)
            mask_NE = routers.expert_choice_local(scores_BLE, self.capacity, counted_BLE.sum(1))
        k_E = mask_NE.sum(0)
        n_pool = torch.full((), n, dtype=torch.long, device=scores_NE.device)
        return self._with_predictor(Selection(mask_NE, k_E, n_pool), inp)

    def padded_rows(self, n_local: int, inp: RouteInputs) -> int | None:
        """Exactly k = floor(C L / E) tokens of each of the rank's samples: no padding at all."""
        if not inp.training:
            return None
        return n_local // max(inp.seq, 1) * expert_capacity(self.capacity, inp.seq, self.num_experts)
