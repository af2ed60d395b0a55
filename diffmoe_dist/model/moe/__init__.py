"""Mixture-of-experts FFN for DiT: DiffMoE's global expert choice and the EC-DiT / TC-DiT baselines."""

from diffmoe_dist.model.moe.collector import LayerRecord, MoECollector
from diffmoe_dist.model.moe.dispatch import (
    Dispatched,
    Dispatcher,
    DispatchPlan,
    DispatchStats,
    LocalDispatcher,
    combine,
)
from diffmoe_dist.model.moe.experts import StackedExperts
from diffmoe_dist.model.moe.layer import MoEFeedForward, moe_layers, set_inference_routing
from diffmoe_dist.model.moe.pool import LocalPool, TokenPool
from diffmoe_dist.model.moe.predictor import CapacityPredictor
from diffmoe_dist.model.moe.routers import Assignment

__all__ = [
    "Assignment",
    "CapacityPredictor",
    "DispatchPlan",
    "DispatchStats",
    "Dispatched",
    "Dispatcher",
    "LayerRecord",
    "LocalDispatcher",
    "LocalPool",
    "MoECollector",
    "MoEFeedForward",
    "StackedExperts",
    "TokenPool",
    "combine",
    "moe_layers",
    "set_inference_routing",
]
