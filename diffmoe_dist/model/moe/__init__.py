"""Mixture-of-experts FFN for DiT: DiffMoE's global expert choice and the EC-DiT / TC-DiT baselines."""

from diffmoe_dist.model.moe.dispatch import LocalDispatcher
from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.layer import (
    MoEFeedForward,
    collect_moe_losses,
    mean_capacity,
    moe_layers,
    set_inference_routing,
)
from diffmoe_dist.model.moe.pool import LocalPool, TokenPool
from diffmoe_dist.model.moe.predictor import CapacityPredictor
from diffmoe_dist.model.moe.routers import Assignment

__all__ = [
    "Assignment",
    "CapacityPredictor",
    "LocalDispatcher",
    "LocalPool",
    "MoEFeedForward",
    "StackedExperts",
    "TokenPool",
    "collect_moe_losses",
    "mean_capacity",
    "moe_layers",
    "set_inference_routing",
]
