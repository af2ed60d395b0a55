"""The MoE feed-forward layer: router, capacity predictor, experts, pool and dispatcher.

The parallel code replaces ``self.pool`` (pool across DP ranks), ``self.dispatcher`` (all-to-all
to expert owners) and shards ``self.experts``; the routing math here never changes. Losses and
per-step stats leave through an open `MoECollector` (collector.py), never module attributes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from diffmoe_dist.model.mlp import FeedForward
from diffmoe_dist.model.moe import collector, routers
from diffmoe_dist.model.moe.dispatch import Dispatched, Dispatcher, LocalDispatcher, dispatch_experts_combine
from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.pool import LocalPool, TokenPool
from diffmoe_dist.model.moe.predictor import CapacityPredictor
from diffmoe_dist.model.moe.routing import RouteInputs, Router, build_router

ROUTER_INIT_STD = 0.006  # DiffMoE's router init N(0, 0.006)


class MoEFeedForward(nn.Module):
    """``y_t = sum over experts e that picked t of S[t, e] * Expert_e(x_t)`` (0 if none)."""

    def __init__(self, dim: int, hidden_dim: int, moe_cfg):
        super().__init__()
        if moe_cfg.num_experts < 1 or moe_cfg.capacity <= 0:
            raise ValueError(
                f"moe.num_experts={moe_cfg.num_experts} must be >= 1 and moe.capacity={moe_cfg.capacity} > 0"
            )
        if moe_cfg.inference not in routers.INFERENCE_MODES:
            raise ValueError(f"moe.inference={moe_cfg.inference!r}: choose one of {routers.INFERENCE_MODES}")
        # The router object (routing/): its selection, its losses, and what it needs built here.
        self.router: Router = build_router(moe_cfg)
        self.num_experts = moe_cfg.num_experts
        # Eval-time routing of the routers with a capacity predictor; plain attributes so a sampler
        # can switch them (set_inference_routing) without rebuilding or reloading the model.
        self.inference = moe_cfg.inference
        self.gamma = moe_cfg.gamma
        # A plain Parameter, not nn.Linear: a model-wide DiT `_basic_init` over nn.Linear modules
        # would otherwise overwrite the N(0, 0.006) init with xavier.
        self.router_weight_ED = nn.Parameter(torch.randn(self.num_experts, dim) * ROUTER_INIT_STD)
        self.capacity_predictor = (
            CapacityPredictor(dim, self.num_experts, moe_cfg.threshold_momentum) if self.router.uses_predictor else None
        )
        self.experts = StackedExperts(self.num_experts, dim, hidden_dim)
        # Shared experts: n full-size MLPs every token passes through, as one MLP of n H hidden units
        # (the official code builds one MLP of 2 H for any n > 0: our n = 2). Replicated, not sharded.
        n_shared = getattr(moe_cfg, "num_shared_experts", 0)
        self.shared_experts = FeedForward(dim, n_shared * hidden_dim) if n_shared > 0 else None
        self.pool: TokenPool = LocalPool()
        self.dispatcher: Dispatcher = LocalDispatcher()
        # exact | padded (moe.dispatch): how the row counts reach the host (dispatch.py)
        self.dispatch_mode = getattr(moe_cfg, "dispatch", "exact")

    @property
    def capacity(self) -> float:
        """The training capacity C; the router owns it (the capacity schedule moves it per step)."""
        return self.router.capacity

    @capacity.setter
    def capacity(self, value: float) -> None:
        self.router.capacity = value

    def forward(self, x_BLD: Tensor) -> Tensor:
        """Only computes: the losses, masks and predictor probabilities the step needs go to an
        open `MoECollector` (model/moe/collector.py), if one covers this layer."""
        b, seq, d = x_BLD.shape
        x_ND = x_BLD.reshape(b * seq, d)
        scores_NE = routers.router_scores(x_ND, self.router_weight_ED)
        inputs = RouteInputs(x_ND, seq, self.pool, self.capacity_predictor, self.training, self.inference, self.gamma)
        sel = self.router.select(scores_NE, inputs)
        mask_NE = sel.mask_NE
        y_ND, dispatched = self.dispatch_experts_combine(x_ND, mask_NE, scores_NE, inputs, collector.timed(self))
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        collector.record(
            self,
            lambda: collector.LayerRecord(
                mask_NE=mask_NE.detach(),
                k_E=sel.k_E,
                n_pool=sel.n_pool,
                losses=sel.losses,
                loss=sel.loss if sel.loss is not None else scores_NE.new_zeros(()),
                prob_NE=sel.prob_NE,
                dispatch=dispatched.stats,
            ),
        )
        return y_ND.view(b, seq, d)

    def dispatch_experts_combine(
        self, x_ND: Tensor, mask_NE: Tensor, scores_NE: Tensor, inputs: RouteInputs, timed: bool = False
    ) -> tuple[Tensor, Dispatched]:
        """The selected rows to their experts and back, weighted by their scores. ``exact``: the
        forward's one host read, the dispatcher's row counts (exchanged with the EP peers).
        ``padded`` (training, routers with a host bound): blocks of the router's bound, no read."""
        block = self.router.padded_rows(x_ND.shape[0], inputs) if self.dispatch_mode == "padded" else None
        if block is None:
            plan = self.dispatcher.plan(mask_NE.sum(0), self.experts, timed)
            a = routers.assignment_from_mask(mask_NE, scores_NE, plan.rows)
        else:
            plan = self.dispatcher.padded_plan(block, self.experts)
            a = routers.padded_assignment(mask_NE, scores_NE, block)
        return dispatch_experts_combine(self.dispatcher, x_ND, a, self.experts, plan, timed)


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


def scheduled_capacity(moe_cfg, step: int) -> float:
    """The official code's training capacity schedule: ``E`` up to ``capacity_full_steps``, then
    linear down to ``moe.capacity`` at ``capacity_decay_steps``, then fixed (no schedule: always C)."""
    full, end, c, e = moe_cfg.capacity_full_steps, moe_cfg.capacity_decay_steps, moe_cfg.capacity, moe_cfg.num_experts
    if not end or step > end:
        return float(c)
    if step <= full:
        return float(e)
    return c + (e - c) * (end - step) / (end - full)


def schedule_capacity(model: nn.Module, moe_cfg, step: int) -> None:
    """Sets every MoE layer's training capacity for optimizer step ``step`` (the trainer calls it
    before each step's forwards; evaluation keeps whatever the last step set, C after the schedule)."""
    if not moe_cfg.capacity_decay_steps:
        return
    capacity = scheduled_capacity(moe_cfg, step)
    for layer in moe_layers(model):
        layer.capacity = capacity
