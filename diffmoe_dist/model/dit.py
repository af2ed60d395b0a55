"""DiT with adaLN-Zero (Peebles & Xie), whose FFN slot holds a dense MLP or a DiffMoE layer.

The model knows nothing of processes or launchers: `diffmoe_dist.parallel.parallelize` shards its
MoE layers from outside, so this file reads like the paper.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffmoe_dist.config import ModelConfig, MoEConfig
from diffmoe_dist.model.ffn import build_ffn
from diffmoe_dist.model.layers import Attention, DiTBase, init_adaln_zero, modulate_gain


class LabelEmbedder(nn.Module):
    """Class embedding with an extra "null" row (index num_classes) used by label dropout and CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y_B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop_B = torch.rand(y_B.shape, device=y_B.device, generator=generator) < self.dropout
            y_B = torch.where(drop_B, torch.full_like(y_B, self.num_classes), y_B)
        return self.table(y_B)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, moe: MoEConfig, index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = build_ffn(dim, int(dim * mlp_ratio), moe, index)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x_BLD: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``mod``: this block's adaLN output (`DiTBase.block_modulations`), the 1 of 1 + scale added."""
        shift_msa, gain_msa, gate_msa, shift_mlp, gain_mlp, gate_mlp = mod
        x_BLD = x_BLD + gate_msa.unsqueeze(1) * self.attn(modulate_gain(self.norm1(x_BLD), shift_msa, gain_msa))
        return x_BLD + gate_mlp.unsqueeze(1) * self.ffn(modulate_gain(self.norm2(x_BLD), shift_mlp, gain_mlp))


class DiT(DiTBase):
    def __init__(self, model: ModelConfig, moe: MoEConfig, learn_sigma: bool = False):
        super().__init__()
        # DDPM (diffusion.objective=ddpm): the output holds eps and the variance interpolation (DiT's learn_sigma)
        self.learn_sigma = learn_sigma
        depth, dim, heads = model.resolved()
        self.num_classes = model.num_classes
        self._build_patch_embedding(model, dim)
        self.y_embedder = LabelEmbedder(model.num_classes, dim, model.class_dropout)
        self._build_trunk(dim, [DiTBlock(dim, heads, model.mlp_ratio, moe, i) for i in range(depth)])
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_adaln_zero(self, block_parts=("attn", "adaLN_modulation"), embedding_tables=[self.y_embedder.table.weight])

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predicts the rectified-flow velocity v = x_data - noise at time t (t=0 is noise).
        `y` (class labels, shape B) is named as the trainer's batch key."""
        x_BLD = self.embed_patches(x_BCHW)
        c_BD = self.t_embedder(t_B) + self.y_embedder(y)
        for block, inputs in zip(self.blocks, self.block_inputs(c_BD)):
            x_BLD = block(x_BLD, *inputs)
        return self.output(x_BLD, c_BD)

    def forward_with_cfg(
        self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Classifier-free guidance: v = v_null + scale * (v_cond - v_null), both halves in one batch
        so that MoE layers see one token pool, as in training."""
        if scale == 1.0:
            return self(x_BCHW, t_B, y_B)
        null_B = torch.full_like(y_B, self.num_classes)
        v = self(torch.cat([x_BCHW, x_BCHW]), torch.cat([t_B, t_B]), torch.cat([y_B, null_B]))
        v_cond, v_null = v.chunk(2)
        return v_null + scale * (v_cond - v_null)
