"""Activation checkpointing of the DiT blocks, applied from outside the model by `parallelize`."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.utils.checkpoint


def _skip_threshold_update(*args, **kwargs) -> None:
    pass


@contextlib.contextmanager
def _recompute_without_threshold_updates(block: nn.Module):
    """The MoE layer updates its thresholds (an EMA, with collectives) inside forward; the recompute
    in backward must not update them a second time. Shadows `update_threshold` on the block's
    predictors for the duration of the recompute (every rank recomputes the same blocks)."""
    from diffmoe_dist.model.moe.predictor import CapacityPredictor

    saved = [(m, m.__dict__.get("update_threshold")) for m in block.modules() if isinstance(m, CapacityPredictor)]
    for predictor, _ in saved:
        predictor.update_threshold = _skip_threshold_update
    try:
        yield
    finally:
        for predictor, previous in saved:
            if previous is None:
                del predictor.update_threshold
            else:
                predictor.update_threshold = previous


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
            return torch.utils.checkpoint.checkpoint(
                _inner,
                *args,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _recompute_without_threshold_updates(_block)),
                **kwargs,
            )

        block.forward = forward
    return len(blocks)
