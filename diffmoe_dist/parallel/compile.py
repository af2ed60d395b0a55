"""``train.compile``: each DiT block compiled with ``torch.compile``, as torchtitan compiles its blocks.

Applied by `parallelize` to the trained model after activation checkpointing (the compiled region
is the checkpointed block, recompute included) and before the gradient reducer's hooks; the EMA
model (sampling only) stays eager. ``nn.Module.compile`` compiles in place, so parameter names and
checkpoints do not change.

The MoE layers inside a block stay eager (``torch.compiler.disable``), each a graph break: their
selection all-reduces the radix histograms and reads the pool's size on the device, and their
dispatch reads the split sizes on the host once per layer; neither is graph-safe, and the router
and the capacity predictor must keep their batch invariance bit for bit (model/moe/invariant.py;
measured, torch 2.13 CPU: inductor's fused softmax gives other bits than eager, and then a token's
score would depend on which path computed it).
What compiles are the dense parts: adaLN modulation, norms, attention, cross-attention, the
dense FFN, and the residual arithmetic around the MoE call.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffmoe_dist.model.moe.layer import moe_layers


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compiles every block of ``model.blocks`` in place (MoE layers excluded, module docstring).
    ``backend``: torch.compile's (tests use ``aot_eager``: the same graphs and graph breaks without
    inductor's minutes of C++ builds on a loaded CPU). Returns the number of blocks compiled."""
    blocks = getattr(model, "blocks", [])
    for block in blocks:
        for layer in moe_layers(block):
            layer.forward = torch.compiler.disable(layer.forward, recursive=True)
        block.compile(backend=backend)
    return len(blocks)
