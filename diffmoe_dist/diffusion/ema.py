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
        """``ema <- ema + (1 - d) (model - ema)`` over weights and float buffers, with one
        ``torch._foreach_lerp_`` per (dtype, device) group instead of one op per tensor (issue 23:
        on a GPU each op is a kernel launch); integer buffers are copied."""
        d = self.current_decay()
        self.num_updates += 1
        pairs = list(zip(self.model.parameters(), model.parameters(), strict=True))
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            if b.dtype.is_floating_point:
                pairs.append((ema_b, b))
            else:
                ema_b.copy_(b)
        groups: dict[tuple, tuple[list, list]] = {}
        for ema_t, t in pairs:
            dst, src = groups.setdefault((ema_t.dtype, ema_t.device, t.dtype, t.device), ([], []))
            dst.append(ema_t)
            src.append(t)  # under no_grad: no detach op needed
        for (dtype, device, src_dtype, src_device), (dst, src) in groups.items():
            if (src_dtype, src_device) != (dtype, device):
                src = [t.to(device=device, dtype=dtype) for t in src]
            torch._foreach_lerp_(dst, src, 1.0 - d)
