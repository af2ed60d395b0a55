"""The MoE feed-forward layer: router, capacity predictor, experts, pool and dispatcher.

The parallel code replaces ``self.pool`` (pool across DP ranks), ``self.dispatcher`` (all-to-all
to expert owners) and shards ``self.experts``; the routing math here never changes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from diffmoe_dist.model.moe import routers
from diffmoe_dist.model.moe.dispatch import LocalDispatcher
from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.pool import LocalPool
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
        self.pool = LocalPool()
        self.dispatcher = LocalDispatcher()
        self.stats: dict = {}
        self.last_assignment: routers.Assignment | None = None

    def forward(self, x_BLD: Tensor) -> Tensor:
        b, seq, d = x_BLD.shape
        x_ND = x_BLD.reshape(b * seq, d)
        scores_NE = routers.router_scores(x_ND, self.router_weight_ED)
        zero = scores_NE.new_zeros(())
        predictor_bce, aux_loss = zero, zero

        if self.router == "expert_choice_global":
            n_pool = self.pool.size(x_ND.shape[0])
            mask_NE, k_E, predictor_bce = self._route_global(x_ND, scores_NE, n_pool)
        elif self.router == "expert_choice_local":
            mask_NE = routers.expert_choice_local(scores_NE.view(b, seq, -1), self.capacity)
            k_E, n_pool = mask_NE.sum(0), x_ND.shape[0]
        else:
            mask_NE = routers.token_choice(scores_NE, self.top_k)
            k_E, n_pool = mask_NE.sum(0), x_ND.shape[0]
            if self.training:
                aux_loss = routers.load_balancing_loss(scores_NE, mask_NE, self.aux_loss_weight)

        assignment = routers.assignment_from_mask(mask_NE, scores_NE)
        y_ND = self.dispatcher(x_ND, assignment.token_idx_M, assignment.expert_idx_M, assignment.weight_M, self.experts)
        # Detached copies only: holding autograd tensors across steps would keep graphs alive.
        self.last_assignment = assignment.detach()
        self.stats = {
            "predictor_bce": predictor_bce,
            "aux_loss": aux_loss,
            "capacity_avg": routers.capacity_avg(k_E, n_pool),
            "tokens_per_expert": mask_NE.sum(0),  # local tokens per expert
        }
        return y_ND.view(b, seq, d)

    def __getstate__(self):
        # deepcopy (the EMA model) and pickle go through here: the last forward's stats hold
        # non-leaf autograd tensors, which refuse to be deep-copied, and are per-step state anyway.
        state = self.__dict__.copy()
        state["stats"], state["last_assignment"] = {}, None
        return state

    def _route_global(self, x_ND: Tensor, scores_NE: Tensor, n_pool: int) -> tuple[Tensor, Tensor, Tensor]:
        """DiffMoE: training and static inference take ``floor(C N_pool / E)`` per expert;
        dynamic / interval take ``k_e`` counted from the predictor. Returns (mask, k_E, bce)."""
        predictor = self.capacity_predictor
        mode = self.inference
        if self.training or mode == "static":
            mask_NE, k_E = routers.expert_choice_global(scores_NE, self.capacity, self.pool, n_pool)
        elif mode in ("dynamic", "interval"):
            prob_NE = torch.sigmoid(predictor(x_ND))
            tau_E = predictor.threshold_E if mode == "dynamic" else torch.full_like(prob_NE[0], self.gamma)
            mask_NE, k_E = routers.expert_choice_dynamic(scores_NE, prob_NE, tau_E, self.pool)
        else:
            raise ValueError(f"inference={mode!r}: choose one of {routers.INFERENCE_MODES}")

        if not self.training:
            return mask_NE, k_E, scores_NE.new_zeros(())
        pred_NE = predictor(x_ND)
        bce = predictor.loss(pred_NE, mask_NE)
        # The EMA quantile uses the training k (all entries of k_E are equal here).
        # Note: activation checkpointing that re-runs this forward would update tau twice.
        predictor.update_threshold(pred_NE, int(k_E[0]), self.pool)
        return mask_NE, k_E, bce


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


def collect_moe_losses(model: nn.Module) -> dict[str, Tensor]:
    """Sum of the last forward's MoE losses over layers: raw ``predictor_bce`` and ``aux_loss``
    (the latter already weighted), and ``loss`` = sum of predictor_loss_weight * bce + aux_loss,
    the term the trainer adds to the diffusion loss."""
    bce, aux, loss = [], [], []
    for layer in moe_layers(model):
        if not layer.stats:
            continue
        bce.append(layer.stats["predictor_bce"])
        aux.append(layer.stats["aux_loss"])
        loss.append(layer.predictor_loss_weight * layer.stats["predictor_bce"] + layer.stats["aux_loss"])
    if not loss:  # a dense model: zeros where the loss lives (the trainer stacks them with it)
        zero = torch.zeros((), device=next(model.parameters()).device)
        return {"predictor_bce": zero, "aux_loss": zero, "loss": zero}
    return {"predictor_bce": sum(bce), "aux_loss": sum(aux), "loss": sum(loss)}


def mean_capacity(model: nn.Module) -> float:
    """Average over MoE layers of the achieved capacity ``C_avg`` of the last forward."""
    caps = [float(layer.stats["capacity_avg"]) for layer in moe_layers(model) if layer.stats]
    return sum(caps) / len(caps) if caps else 0.0
