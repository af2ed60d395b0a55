"""`diffmoe-params --config X`: total and active parameters (DiffMoE Appendix C).

Active = (1 + C)/(1 + E) * #FFN + #Attn + #AdaLN + #Other for interleaved MoE; the capacity
predictor is reported separately (see count_parameters). We count it per layer as
total minus the experts a token does not visit: each MoE layer keeps C of its E experts active
(top_k for token choice). With interleave 2 this equals the paper's formula exactly.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from diffmoe_dist.config import ConfigError, MoEConfig, load_config


def count_parameters(model: torch.nn.Module, moe: MoEConfig) -> dict[str, int]:
    from diffmoe_dist.model.moe.experts import StackedExperts
    from diffmoe_dist.model.moe.predictor import CapacityPredictor
    from diffmoe_dist.model.moe.routing import router_type

    # The paper's counts leave out the capacity predictor (an auxiliary head): B-E16 is 555M/130M and
    # L-E16 1.982B/458M only without it. We report it on its own line.
    predictor = sum(p.numel() for m in model.modules() if isinstance(m, CapacityPredictor) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters()) - predictor
    inactive = 0
    for m in model.modules():
        if isinstance(m, StackedExperts):
            per_expert = sum(p.numel() for p in m.parameters()) // m.num_local
            active_experts = router_type(moe.router).active_experts(moe)
            inactive += int(round((m.num_local - active_experts) * per_expert))
    return {"total": total, "active": total - inactive, "predictor": predictor}


def dense_and_expert_counts(model_cfg, moe_cfg) -> tuple[int, int]:
    """(non-expert, expert) parameter counts of the whole model, built on the meta device: nothing
    is allocated, so any size can be asked about before a run commits to it."""
    from diffmoe_dist.model.build import build_model

    with torch.device("meta"):
        model = build_model(model_cfg, moe_cfg)
    expert = sum(p.numel() for p in model.parameters() if getattr(p, "is_expert", False))
    return sum(p.numel() for p in model.parameters()) - expert, expert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffmoe-params", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.validate(world_size=cfg.parallel.expert_parallel_size)
    except ConfigError as exc:
        print(f"diffmoe-params: error: {exc}", file=sys.stderr)
        return 2
    from diffmoe_dist.model.build import build_model

    with torch.device("meta"):  # XL-size models without allocating their weights
        model = build_model(cfg.model, cfg.moe, cfg.diffusion.objective)
    print(json.dumps(count_parameters(model, cfg.moe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
