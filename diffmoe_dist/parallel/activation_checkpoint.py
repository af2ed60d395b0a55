"""Activation checkpointing of the DiT blocks, applied from outside the model by `parallelize`.

The recompute in backward needs no special case: forward only computes, and what a step keeps
from it (losses, the threshold EMA's inputs) goes to the trainer's `MoECollector`, which is closed
by the time backward recomputes a block (model/moe/collector.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute every DiT block in backward instead of keeping its activations (non-reentrant
    `torch.utils.checkpoint`, RNG state preserved, so a step's numbers do not change). Patches each
    block's ``forward`` in place, so parameter names (and checkpoints) stay the same. Apply it to
    the trained model only, after the EMA copy. Returns the number of blocks wrapped."""
    blocks = getattr(model, "blocks", [])
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, _block=block, **kwargs):
            if not (torch.is_grad_enabled() and _block.training):
                return _inner(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)
