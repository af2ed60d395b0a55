"""Exponential moving average of weights and buffers (docs/design.md section 1: EMA covers buffers too, so the
MoE thresholds used by dynamic inference come from the averaged model). The trainer's
checkpoint holds `model` (keys ema/NAME) and `num_updates` (meta "ema_num_updates")."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        # The usual warm-up: short runs are not dominated by the random initial weights.
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        for ema_t, t in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_t.lerp_(t.detach().to(ema_t.dtype), 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            if b.dtype.is_floating_point:
                ema_b.lerp_(b.to(ema_b.dtype), 1.0 - d)
            else:
                ema_b.copy_(b)
