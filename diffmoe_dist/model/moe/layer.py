"""The MoE feed-forward layer: router, capacity predictor, experts, pool and dispatcher.

The parallel code replaces ``self.pool`` (pool across DP ranks), ``self.dispatcher`` (all-to-all
to expert owners) and shards ``self.experts``; the routing math here never changes. Losses and
per-step stats leave through an open `MoECollector` (collector.py), never module attributes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from diffmoe_dist.model.moe import collector, routers
from diffmoe_dist.model.moe.dispatch import Dispatcher, LocalDispatcher
from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.pool import LocalPool, TokenPool
from diffmoe_dist.model.moe.predictor import CapacityPredictor

ROUTER_INIT_STD = 0.006  # DiffMoE's router init N(0, 0.006)


class MoEFeedForward(nn.Module):
    """``y_t = sum over experts e that picked t of S[t, e] * Expert_e(x_t)`` (0 if none)."""

    def __init__(self, dim: int, hidden_dim: int, moe_cfg):
        super().__init__()
        if moe_cfg.router not in routers.ROUTERS:
            raise ValueError(f"moe.router={moe_cfg.router!r}: MoEFeedForward takes one of {routers.ROUTERS}")
        if moe_cfg.num_experts < 1 or moe_cfg.capacity <= 0:
            raise ValueError(
                f"moe.num_experts={moe_cfg.num_experts} must be >= 1 and moe.capacity={moe_cfg.capacity} > 0"
            )
        if moe_cfg.inference not in routers.INFERENCE_MODES:
            raise ValueError(f"moe.inference={moe_cfg.inference!r}: choose one of {routers.INFERENCE_MODES}")
        self.router = moe_cfg.router
        self.num_experts = moe_cfg.num_experts
        self.capacity = moe_cfg.capacity
        self.top_k = moe_cfg.top_k
        self.aux_loss_weight = moe_cfg.aux_loss_weight
        self.predictor_loss_weight = moe_cfg.predictor_loss_weight
        # Eval-time routing of expert_choice_global; plain attributes so a sampler can switch them
        # (set_inference_routing) without rebuilding or reloading the model.
        self.inference = moe_cfg.inference
        self.gamma = moe_cfg.gamma
        # A plain Parameter, not nn.Linear: a model-wide DiT `_basic_init` over nn.Linear modules
        # would otherwise overwrite the N(0, 0.006) init with xavier.
        self.router_weight_ED = nn.Parameter(torch.randn(self.num_experts, dim) * ROUTER_INIT_STD)
        self.capacity_predictor = (
            CapacityPredictor(dim, self.num_experts, moe_cfg.threshold_momentum)
            if self.router == "expert_choice_global"
            else None
        )
        self.experts = StackedExperts(self.num_experts, dim, hidden_dim)
        self.pool: TokenPool = LocalPool()
        self.dispatcher: Dispatcher = LocalDispatcher()

    def forward(self, x_BLD: Tensor) -> Tensor:
        """Only computes: the losses, masks and predictor probabilities the step needs go to an
        open `MoECollector` (model/moe/collector.py), if one covers this layer."""
        b, seq, d = x_BLD.shape
        x_ND = x_BLD.reshape(b * seq, d)
        scores_NE = routers.router_scores(x_ND, self.router_weight_ED)
        zero = scores_NE.new_zeros(())
        predictor_bce, aux_loss, prob_NE = zero, zero, None

        if self.router == "expert_choice_global":
            mask_NE, k_E, n_pool, predictor_bce, prob_NE = self._route_global(x_ND, scores_NE)
        else:
            if self.router == "expert_choice_local":
                mask_NE = routers.expert_choice_local(scores_NE.view(b, seq, self.num_experts), self.capacity)
            else:
                mask_NE = routers.token_choice(scores_NE, self.top_k)
                if self.training:
                    aux_loss = routers.load_balancing_loss(scores_NE, mask_NE, self.aux_loss_weight)
            k_E = mask_NE.sum(0)
            n_pool = torch.full((), x_ND.shape[0], dtype=torch.long, device=x_ND.device)

        # The forward's one host read: the dispatcher's row counts (exchanged with the EP peers).
        plan = self.dispatcher.plan(mask_NE.sum(0), self.experts)
        a = routers.assignment_from_mask(mask_NE, scores_NE, plan.rows)
        y_ND = self.dispatcher(x_ND, a, self.experts, plan)
        collector.record(
            self,
            lambda: collector.LayerRecord(
                mask_NE=mask_NE.detach(),
                k_E=k_E,
                n_pool=n_pool,
                predictor_bce=predictor_bce,
                aux_loss=aux_loss,
                loss=self.predictor_loss_weight * predictor_bce + aux_loss,
                prob_NE=prob_NE,
            ),
        )
        return y_ND.view(b, seq, d)

    def _route_global(self, x_ND: Tensor, scores_NE: Tensor):
        """DiffMoE: training and static inference take ``floor(C N_pool / E)`` per expert;
        dynamic / interval take ``k_e`` counted from the predictor. Returns (mask, k_E, n_pool,
        bce, training: the detached predicted probabilities for the step's thresholds)."""
        predictor = self.capacity_predictor
        mode = self.inference
        if self.training or mode == "static":
            mask_NE, k_E, n_pool = self.pool.capacity_topk_mask(scores_NE, self.capacity)
        elif mode in ("dynamic", "interval"):
            prob_NE = torch.sigmoid(predictor(x_ND))
            tau_E = predictor.threshold_E if mode == "dynamic" else prob_NE.new_full(prob_NE.shape[1:], self.gamma)
            mask_NE, k_E, n_pool = routers.expert_choice_dynamic(scores_NE, prob_NE, tau_E, self.pool)
        else:
            raise ValueError(f"inference={mode!r}: choose one of {routers.INFERENCE_MODES}")

        if not self.training:
            return mask_NE, k_E, n_pool, scores_NE.new_zeros(()), None
        pred_NE = predictor(x_ND)
        # The thresholds move once per optimizer step, outside forward (MoECollector.update_thresholds).
        return mask_NE, k_E, n_pool, predictor.loss(pred_NE, mask_NE), torch.sigmoid(pred_NE.detach().float())


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def set_inference_routing(model: nn.Module, mode: str, gamma: float | None = None) -> None:
    """Set eval-time routing (``dynamic | static | interval``, and gamma) on every MoE layer."""
    if mode not in routers.INFERENCE_MODES:
        raise ValueError(f"inference mode {mode!r}: choose one of {routers.INFERENCE_MODES}")
    for layer in moe_layers(model):
        layer.inference = mode
        if gamma is not None:
            layer.gamma = gamma
