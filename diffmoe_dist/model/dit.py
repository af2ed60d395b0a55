"""DiT with adaLN-Zero (Peebles & Xie), whose FFN slot holds a dense MLP or a DiffMoE layer.

The model knows nothing of processes or launchers: `diffmoe_dist.parallel.parallelize` shards its
MoE layers from outside, so this file reads like the paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmoe_dist.config import ModelConfig, MoEConfig
from diffmoe_dist.model.ffn import build_ffn


def modulate(x_BLD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_BLD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t in [0, 1] followed by an MLP. t is scaled by 1000 so the
    frequencies match DiT's integer-timestep embedding."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
        args = t_B.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t_B * 1000.0, self.frequency_size))


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


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out_BHLd = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out_BHLd.transpose(1, 2).reshape(B, L, D))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, moe: MoEConfig, index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = build_ffn(dim, int(dim * mlp_ratio), moe, index)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_BD).chunk(6, dim=1)
        x_BLD = x_BLD + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x_BLD), shift_msa, scale_msa))
        return x_BLD + gate_mlp.unsqueeze(1) * self.ffn(modulate(self.norm2(x_BLD), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x_BLD), shift, scale))


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (DiT/MAE), shape (grid*grid, dim)."""
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(gy, dim // 2), embed_1d(gx, dim // 2)], dim=1).float()


class DiT(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig):
        super().__init__()
        depth, dim, heads = model.resolved()
        self.in_channels = model.in_channels
        self.patch_size = model.patch_size
        self.image_size = model.image_size
        self.num_classes = model.num_classes
        self.grid = model.image_size // model.patch_size
        self.x_embedder = nn.Conv2d(model.in_channels, dim, kernel_size=model.patch_size, stride=model.patch_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(model.num_classes, dim, model.class_dropout)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, model.mlp_ratio, moe, i) for i in range(depth)])
        self.final_layer = FinalLayer(dim, model.patch_size, model.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # DiT's init: xavier for linears, then adaLN-Zero (modulation and output layer start at zero,
        # so every block starts as the identity). MoE modules initialise their own experts/routers.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        for block in self.blocks:
            block.attn.apply(_basic_init)
            block.adaLN_modulation.apply(_basic_init)
            if not hasattr(block.ffn, "experts"):  # MoE layers initialise themselves
                block.ffn.apply(_basic_init)
        self.t_embedder.apply(_basic_init)
        self.final_layer.apply(_basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.bias, 0)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x_BLP: torch.Tensor) -> torch.Tensor:
        B, p, c, g = x_BLP.shape[0], self.patch_size, self.in_channels, self.grid
        x = x_BLP.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, c, g * p, g * p)

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predicts the rectified-flow velocity v = x_data - noise at time t (t=0 is noise).
        `y` (class labels, shape B) is named as the trainer's batch key."""
        x_BLD = self.x_embedder(x_BCHW).flatten(2).transpose(1, 2) + self.pos_embed
        c_BD = self.t_embedder(t_B) + self.y_embedder(y)
        for block in self.blocks:
            x_BLD = block(x_BLD, c_BD)
        return self.unpatchify(self.final_layer(x_BLD, c_BD))

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


def build_model(model: ModelConfig, moe: MoEConfig) -> nn.Module:
    """The DiT for `model.task`: class-conditional (`DiT`) or text-conditional (`model.text.TextDiT`)."""
    if model.task == "t2i":
        from diffmoe_dist.model.text import TextDiT

        return TextDiT(model, moe)
    return DiT(model, moe)
