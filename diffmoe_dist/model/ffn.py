"""The DiT feed-forward block and the choice, per transformer block, between dense and MoE."""

from __future__ import annotations

import torch.nn as nn

from diffmoe_dist.config import DENSE_ROUTER
from diffmoe_dist.model.mlp import FeedForward
from diffmoe_dist.model.moe.layer import MoEFeedForward


def is_moe_block(moe_cfg, block_index: int) -> bool:
    """Block i is MoE iff the router is not dense and ``i % interleave == interleave - 1``
    (the odd blocks for interleave 2, as in DiffMoE)."""
    if moe_cfg is None or moe_cfg.router == DENSE_ROUTER:
        return False
    if moe_cfg.interleave < 1:
        raise ValueError(f"moe.interleave={moe_cfg.interleave} must be >= 1 (2 = every other block)")
    return block_index % moe_cfg.interleave == moe_cfg.interleave - 1


def build_ffn(dim: int, hidden_dim: int, moe_cfg, block_index: int) -> nn.Module:
    """The FFN of transformer block ``block_index``: dense, or an MoE of full-size experts."""
    if not is_moe_block(moe_cfg, block_index):
        return FeedForward(dim, hidden_dim)
    return MoEFeedForward(dim, hidden_dim, moe_cfg)
