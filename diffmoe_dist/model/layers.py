"""The DiT building blocks both DiTs share (Peebles & Xie): adaLN modulation, timestep embedding,
self-attention, the final layer, the 2-D sin-cos position embedding, patch (un)embedding, the
trunk both DiTs hold (`DiTBase`) and the adaLN-Zero initialisation. `dit.py` (class labels) and
`text.py` (captions) compose them; neither imports the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x_BLD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_BLD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


def modulate_gain(x_BLD: torch.Tensor, shift_BD: torch.Tensor, gain_BD: torch.Tensor) -> torch.Tensor:
    """`modulate` with ``gain = 1 + scale`` already added (`DiTBase.block_modulations`)."""
    return x_BLD * gain_BD.unsqueeze(1) + shift_BD.unsqueeze(1)


def stacked_linear(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """``torch.cat([m(x) for m in linears], -1)`` in one GEMM: the linears' weights and biases concatenated."""
    return F.linear(x, torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears]))


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


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        # unbind, not qkv[0..2] (each select's backward is zeros + copy, then adds), on the (B, L, 3, H, d)
        # view: its backward stacks the three gradients straight into that contiguous layout (no copy)
        q, k, v = (
            t.transpose(1, 2) for t in self.qkv(x_BLD).view(B, L, 3, self.num_heads, D // self.num_heads).unbind(2)
        )
        out_BHLd = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out_BHLd.transpose(1, 2).reshape(B, L, D))


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


def unpatchify(x_BLP: torch.Tensor, patch_size: int, channels: int, grid: int) -> torch.Tensor:
    """(B, grid*grid, p*p*C) patch tokens -> (B, C, grid*p, grid*p) images."""
    B, p, c, g = x_BLP.shape[0], patch_size, channels, grid
    x = x_BLP.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, c, g * p, g * p)


class DiTBase(nn.Module):
    """What both DiTs hold, built in two calls around the conditioning embedder so that modules are
    registered (and their construction draws taken) in the order the checkpoints and the exactness
    tests depend on: x_embedder, t_embedder, <conditioning>, pos_embed, blocks, final_layer."""

    def _build_patch_embedding(self, model, dim: int) -> None:
        self.in_channels = model.in_channels
        self.patch_size = model.patch_size
        self.image_size = model.image_size
        self.grid = model.image_size // model.patch_size
        self.x_embedder = nn.Conv2d(model.in_channels, dim, kernel_size=model.patch_size, stride=model.patch_size)
        self.t_embedder = TimestepEmbedder(dim)

    def _build_trunk(self, dim: int, blocks: list[nn.Module]) -> None:
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid).unsqueeze(0), persistent=False)
        # added to each block's adaLN output (shift, scale, gate): the 1 of 1 + scale, for all blocks in one op
        self.register_buffer("adaln_gain", torch.tensor([0.0, 1.0, 0.0]).view(3, 1), persistent=False)
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = self.in_channels * (2 if getattr(self, "learn_sigma", False) else 1)
        self.final_layer = FinalLayer(dim, self.patch_size, self.out_channels)

    def shared_linears(self) -> list[nn.Linear]:
        """The blocks' linears whose input is the same for every block, run stacked in `block_inputs`
        (parallel/mixed_precision.py casts their weights apart from the blocks')."""
        return self.adaln_linears()

    def adaln_linears(self) -> list[nn.Linear]:
        """Each block's adaLN linear, in block order (`block_modulations` runs them as one GEMM)."""
        return [block.adaLN_modulation[-1] for block in self.blocks]

    def block_modulations(self, c_BD: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Every block's adaLN output, per block (shift, 1 + scale, gate) for attention then for the FFN,
        each (B, D): one SiLU and one GEMM over all blocks' adaLN weights (c is the same for every block),
        the 1 added in one op. Shift and gain meet the fp32 normalised tokens: upcast here once (the same
        products as autocast's type promotion), so that their gradients are not cast back block by
        block; the gates multiply low-precision outputs and keep their dtype."""
        B, D = c_BD.shape
        out = stacked_linear(F.silu(c_BD), self.adaln_linears())
        mods = out.view(B, -1, 3, D) + self.adaln_gain.to(out.dtype)  # (B, 2 * depth, 3, D)
        sg = mods[:, :, :2].float().reshape(B, -1, D).unbind(1)  # shift, gain of attention / FFN of each block
        gates = mods[:, :, 2].unbind(1)
        return [(sg[4 * i], sg[4 * i + 1], gates[2 * i], sg[4 * i + 2], sg[4 * i + 3], gates[2 * i + 1])
                for i in range(len(gates) // 2)]  # fmt: skip

    def block_inputs(self, c_BD: torch.Tensor) -> list[tuple]:
        """What each block takes besides the tokens (computed for all blocks at once)."""
        return [(mod,) for mod in self.block_modulations(c_BD)]

    def embed_patches(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(x_BCHW).flatten(2).transpose(1, 2) + self.pos_embed

    def output(self, x_BLD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.final_layer(x_BLD, c_BD), self.patch_size, self.out_channels, self.grid)


def xavier_init(module: nn.Module) -> None:
    """DiT's `_basic_init`: xavier-uniform linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        torch.nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)


def init_adaln_zero(
    model: nn.Module,
    *,
    block_parts: tuple[str, ...],
    conditioning: Iterable[nn.Module] = (),
    embedding_tables: Iterable[nn.Parameter] = (),
    zero_block_parts: tuple[str, ...] = (),
) -> None:
    """DiT's initialisation of `model` (x_embedder, t_embedder, blocks, final_layer): xavier linears,
    then adaLN-Zero (modulation and output layer start at zero, so every block starts as the
    identity). ``block_parts``: the sub-modules of each block initialised as linears (the FFN too
    when dense: MoE layers initialise their own experts and routers); ``conditioning``: further
    embedders; ``embedding_tables``: N(0, 0.02) tables; ``zero_block_parts``: linears of each block
    (dotted paths) that also start at zero, e.g. a cross-attention output. The draws follow this order, which the
    checkpoints and the exactness tests depend on."""
    for block in model.blocks:
        for name in block_parts:
            block.get_submodule(name).apply(xavier_init)
        if not hasattr(block.ffn, "experts"):  # MoE layers initialise themselves
            block.ffn.apply(xavier_init)
    model.t_embedder.apply(xavier_init)
    for module in conditioning:
        module.apply(xavier_init)
    model.final_layer.apply(xavier_init)
    w = model.x_embedder.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.constant_(model.x_embedder.bias, 0)
    for table in embedding_tables:
        nn.init.normal_(table, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    zero = [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    for block in model.blocks:
        zero += [block.adaLN_modulation[-1]] + [block.get_submodule(name) for name in zero_block_parts]
    for linear in zero:
        nn.init.constant_(linear.weight, 0)
        nn.init.constant_(linear.bias, 0)
