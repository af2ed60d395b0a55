"""``diffusion.objective``: what a training step draws and regresses, one call each for the trainer."""

from __future__ import annotations

import torch

from diffmoe_dist.diffusion.ddpm import ddpm_loss, ddpm_targets
from diffmoe_dist.diffusion.flow import flow_loss, flow_targets


def training_targets(diffusion_cfg, x_B: torch.Tensor, generator: torch.Generator | None = None):
    """Returns (x_t, the model's time input, the loss's target state)."""
    if diffusion_cfg.objective == "ddpm":
        return ddpm_targets(x_B, generator, diffusion_cfg.same_t_per_batch)
    return flow_targets(x_B, generator, diffusion_cfg.same_t_per_batch)


def training_loss(diffusion_cfg, out: torch.Tensor, target) -> torch.Tensor:
    if diffusion_cfg.objective == "ddpm":
        return ddpm_loss(out, target)
    return flow_loss(out, target)
