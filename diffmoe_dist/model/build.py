"""`build_model`: the DiT a config names, above both DiTs (neither imports the other)."""

from __future__ import annotations

import torch.nn as nn

from diffmoe_dist.config import ModelConfig, MoEConfig
from diffmoe_dist.model.dit import DiT
from diffmoe_dist.model.text import TextDiT


def build_model(model: ModelConfig, moe: MoEConfig, objective: str = "flow") -> nn.Module:
    """The DiT for `model.task`: class-conditional (`DiT`) or text-conditional (`TextDiT`);
    ``objective`` (diffusion.objective): ddpm doubles the output channels (eps and variance)."""
    if model.task == "t2i":
        return TextDiT(model, moe)
    return DiT(model, moe, learn_sigma=objective == "ddpm")
