"""AdamW and its learning-rate schedule (linear warm-up, then constant), as both engines build them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffmoe_dist.config import OptimConfig


def lr_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def adamw(params, o: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW with ``optim.*``; ``optim.adamw_impl`` picks the kernel (foreach, fused or a loop)."""
    kernel = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[o.adamw_impl]
    return torch.optim.AdamW(
        params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, **kernel
    )


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps))
