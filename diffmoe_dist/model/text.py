"""Text-conditioned DiT: DiT blocks plus cross-attention to frozen text-encoder tokens.

Conditioning enters twice, as in PixArt-alpha and SD3: every block cross-attends to the projected
caption tokens (padding masked out), and the masked mean of the caption tokens is added to the
timestep embedding that drives adaLN. Everything else is the class-conditional DiT's (`layers.py`):
adaLN-Zero, the FFN slot (`build_ffn`, so DiffMoE layers sit on the same blocks with the same
routing), patch embedding and final layer. Cross-attention starts at zero (its output projection is
zero-initialised, as PixArt-alpha does), so every block still starts as the identity.

Shapes: B batch, L image tokens, T text tokens, D model width, E = text_dim (encoder width).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmoe_dist.config import ModelConfig, MoEConfig
from diffmoe_dist.model.ffn import build_ffn
from diffmoe_dist.model.layers import Attention, DiTBase, init_adaln_zero, modulate_gain, stacked_linear


class TextEmbedder(nn.Module):
    """Caption tokens (B, T, E) -> tokens for cross-attention (B, T, D) and a pooled vector (B, D).

    The null caption for classifier-free guidance is a *learned* token sequence (T, E), all of it
    unmasked, swapped in for a caption with probability `dropout` in training (PixArt-alpha's
    caption dropout). Not a zeroed one: a fully masked caption is impossible (softmax over no keys is
    NaN), and an unmasked all-zero caption pins the unconditional branch to the projections' biases,
    which it can only move through weights the conditional branch shares; the learned sequence gives
    it parameters of its own. It lives in the checkpoint, so sampling needs no encoder for it.
    """

    def __init__(self, text_dim: int, text_len: int, hidden_size: int, dropout: float):
        super().__init__()
        self.text_dim, self.text_len, self.dropout = text_dim, text_len, dropout
        self.null_text_TE = nn.Parameter(torch.randn(text_len, text_dim) / text_dim**0.5)
        self.token_proj = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.pooled_proj = nn.Sequential(
            nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def check(self, text_BTE: torch.Tensor, mask_BT: torch.Tensor) -> None:
        if text_BTE.dim() != 3 or tuple(text_BTE.shape[1:]) != (self.text_len, self.text_dim):
            raise ValueError(
                f"text has shape {tuple(text_BTE.shape)} but the model was built for (B, model.text_len="
                f"{self.text_len}, model.text_dim={self.text_dim}): encode captions with that length and encoder"
            )
        if tuple(mask_BT.shape) != tuple(text_BTE.shape[:2]):
            raise ValueError(f"text_mask has shape {tuple(mask_BT.shape)}, expected {tuple(text_BTE.shape[:2])}")

    def with_null(
        self, text_BTE: torch.Tensor, mask_BT: torch.Tensor, drop_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replaces the captions where drop_B is True by the null caption (every token valid)."""
        null_BTE = self.null_text_TE.to(text_BTE.dtype).expand_as(text_BTE)
        return torch.where(drop_B[:, None, None], null_BTE, text_BTE), mask_BT | drop_B[:, None]

    def forward(
        self, text_BTE: torch.Tensor, mask_BT: torch.Tensor, drop_B: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (tokens_BTD, pooled_BD, mask_BT after the null swap)."""
        self.check(text_BTE, mask_BT)
        mask_BT = mask_BT.bool()
        if drop_B is None and self.training and self.dropout > 0:
            drop_B = torch.rand(text_BTE.shape[0], device=text_BTE.device) < self.dropout
        if drop_B is not None:
            text_BTE, mask_BT = self.with_null(text_BTE, mask_BT, drop_B)
        # Masked mean: padding tokens never reach the pooled vector, whatever they hold.
        w_BT1 = mask_BT.unsqueeze(-1).to(text_BTE.dtype)
        pooled_BE = (text_BTE * w_BT1).sum(1) / w_BT1.sum(1).clamp(min=1.0)
        return self.token_proj(text_BTE), self.pooled_proj(pooled_BE), mask_BT


def text_attention_bias(mask_BT: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Additive key bias (B, 1, 1, T): 0 at caption tokens, -inf at padding, in the dtype attention
    runs in (autocast's, else ``x``'s). What SDPA makes of a bool mask in every block (the same
    values, so the same bits), made once per forward instead of once per block."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return torch.where(mask_BT[:, None, None, :], torch.zeros((), dtype=dtype, device=x.device), float("-inf"))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to caption tokens; keys at padding are masked out
    (``bias_B11T`` from `text_attention_bias`). The keys and values (``kv``) of every block are computed
    at once (`TextDiT.cross_attention_kv`): the caption tokens are the same for every block."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias_B11T: torch.Tensor):
        B, L, D = x_BLD.shape
        H = self.num_heads
        q_BHLd = self.q(x_BLD).view(B, L, H, D // H).transpose(1, 2)
        k_BHTd, v_BHTd = kv
        # additive mask, broadcast over heads and queries
        out_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHTd, v_BHTd, attn_mask=bias_B11T)
        return self.proj(out_BHLd.transpose(1, 2).reshape(B, L, D))


class TextDiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, moe: MoEConfig, index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = build_ffn(dim, int(dim * mlp_ratio), moe, index)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self, x_BLD: torch.Tensor, mod: tuple[torch.Tensor, ...], kv: tuple[torch.Tensor, ...], bias_B11T: torch.Tensor
    ) -> torch.Tensor:
        """``mod``: this block's adaLN output (`DiTBase.block_modulations`), ``kv``: its cross-attention
        keys and values (`TextDiT.cross_attention_kv`)."""
        shift_msa, gain_msa, gate_msa, shift_mlp, gain_mlp, gate_mlp = mod
        x_BLD = x_BLD + gate_msa.unsqueeze(1) * self.attn(modulate_gain(self.norm1(x_BLD), shift_msa, gain_msa))
        x_BLD = x_BLD + self.cross_attn(self.norm_cross(x_BLD), kv, bias_B11T)
        return x_BLD + gate_mlp.unsqueeze(1) * self.ffn(modulate_gain(self.norm2(x_BLD), shift_mlp, gain_mlp))


class TextDiT(DiTBase):
    """`forward(x, t, text, text_mask)`: keyword names match the trainer's batch keys."""

    def __init__(self, model: ModelConfig, moe: MoEConfig):
        super().__init__()
        depth, dim, heads = model.resolved()
        self.text_len, self.text_dim = model.text_len, model.text_dim
        self._build_patch_embedding(model, dim)
        self.text_embedder = TextEmbedder(model.text_dim, model.text_len, dim, model.class_dropout)
        self._build_trunk(dim, [TextDiTBlock(dim, heads, model.mlp_ratio, moe, i) for i in range(depth)])
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # As DiT, plus a zero cross-attention output (PixArt-alpha).
        init_adaln_zero(
            self,
            block_parts=("attn", "cross_attn", "adaLN_modulation"),
            conditioning=[self.text_embedder.token_proj, self.text_embedder.pooled_proj],
            zero_block_parts=("cross_attn.proj",),
        )

    def shared_linears(self) -> list[nn.Linear]:
        return super().shared_linears() + self.kv_linears()

    def kv_linears(self) -> list[nn.Linear]:
        """Each block's cross-attention ``kv`` linear, in block order (`cross_attention_kv`: one GEMM)."""
        return [block.cross_attn.kv for block in self.blocks]

    def cross_attention_kv(self, text_BTD: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's cross-attention (keys, values), each (B, H, T, d), from one GEMM over all blocks'
        ``kv`` weights (the caption tokens are the same for every block) and one unbind."""
        B, T, D = text_BTD.shape
        H = self.blocks[0].cross_attn.num_heads
        kv = stacked_linear(text_BTD, self.kv_linears())
        kvs = [t.transpose(1, 2) for t in kv.view(B, T, -1, H, D // H).unbind(2)]
        return [(kvs[i], kvs[i + 1]) for i in range(0, len(kvs), 2)]

    def block_inputs(self, c_BD: torch.Tensor, text_BTD: torch.Tensor) -> list[tuple]:
        return [(mod, kv) for mod, kv in zip(self.block_modulations(c_BD), self.cross_attention_kv(text_BTD))]

    def _forward(
        self, x_BCHW: torch.Tensor, t_B: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, drop_B=None
    ) -> torch.Tensor:
        x_BLD = self.embed_patches(x_BCHW)
        text_BTD, pooled_BD, mask_BT = self.text_embedder(text, text_mask, drop_B)
        c_BD = self.t_embedder(t_B) + pooled_BD
        bias_B11T = text_attention_bias(mask_BT, x_BLD)
        for block, (mod, kv) in zip(self.blocks, self.block_inputs(c_BD, text_BTD)):
            x_BLD = block(x_BLD, mod, kv, bias_B11T)
        return self.output(x_BLD, c_BD)

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """Rectified-flow velocity at time t for captions `text` (B, T, E) with `text_mask` (B, T),
        True at real tokens. In training, captions are swapped for the null one with p=class_dropout."""
        return self._forward(x_BCHW, t_B, text, text_mask)

    def forward_with_cfg(
        self, x_BCHW: torch.Tensor, t_B: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """v = v_null + scale * (v_cond - v_null); conditional and null halves run as ONE batch so the
        MoE layers route over one token pool, as in training."""
        if scale == 1.0:
            return self._forward(
                x_BCHW, t_B, text, text_mask, torch.zeros(len(t_B), dtype=torch.bool, device=t_B.device)
            )
        B = x_BCHW.shape[0]
        drop_2B = torch.arange(2 * B, device=t_B.device) >= B
        v = self._forward(
            torch.cat([x_BCHW, x_BCHW]),
            torch.cat([t_B, t_B]),
            torch.cat([text, text]),
            torch.cat([text_mask, text_mask]),
            drop_2B,
        )
        v_cond, v_null = v.chunk(2)
        return v_null + scale * (v_cond - v_null)


class PromptConditioned(nn.Module):
    """A TextDiT seen as a class-conditional model over a bank of P encoded prompts: "label" i means
    prompt i. Lets the class-conditional sampler (`diffusion.sampling.sample_images`) and its seeding,
    CFG and grids drive text-to-image sampling unchanged."""

    def __init__(self, model: TextDiT, text_PTE: torch.Tensor, mask_PT: torch.Tensor):
        super().__init__()
        self.model = model
        self.in_channels, self.image_size = model.in_channels, model.image_size
        self.register_buffer("text_PTE", text_PTE.float(), persistent=False)
        self.register_buffer("mask_PT", mask_PT.bool(), persistent=False)

    def forward_with_cfg(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, prompt_B: torch.Tensor, scale: float):
        idx = prompt_B.to(self.text_PTE.device)
        text, mask = self.text_PTE[idx].to(x_BCHW.device), self.mask_PT[idx].to(x_BCHW.device)
        return self.model.forward_with_cfg(x_BCHW, t_B, text, mask, scale)
