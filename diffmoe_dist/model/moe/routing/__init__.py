"""Routers as objects (base.py): one class per ``moe.router``, looked up by name here only."""

from __future__ import annotations

from diffmoe_dist.model.moe.routing.base import RouteInputs, Router, Selection
from diffmoe_dist.model.moe.routing.expert_choice import GlobalExpertChoice, LocalExpertChoice
from diffmoe_dist.model.moe.routing.race import ExpertRace
from diffmoe_dist.model.moe.routing.token_choice import TokenChoice

ROUTER_TYPES: dict[str, type[Router]] = {
    r.name: r for r in (GlobalExpertChoice, LocalExpertChoice, TokenChoice, ExpertRace)
}


def router_type(name: str) -> type[Router]:
    """The router class of ``moe.router`` (config/options.py lists the names; they must agree)."""
    try:
        return ROUTER_TYPES[name]
    except KeyError:
        raise ValueError(f"moe.router={name!r}: choose one of {tuple(ROUTER_TYPES)}") from None


def has_predictor(moe_cfg) -> bool:
    """The config's MoE layers carry a capacity predictor (dynamic / interval inference apply)."""
    return moe_cfg.router in ROUTER_TYPES and ROUTER_TYPES[moe_cfg.router].uses_predictor


def build_router(moe_cfg) -> Router:
    return router_type(moe_cfg.router)(moe_cfg)


__all__ = ["ROUTER_TYPES", "RouteInputs", "Router", "Selection", "build_router", "has_predictor", "router_type"]
