"""Latents -> pixels for sample grids, diffmoe-sample and diffmoe-eval.

`tools/make_shards.py images --vae DIR` records the VAE in the shards' manifest ({"vae": {"path",
"scaling_factor", "shift_factor"}}); samples of such a model are scaled latents, and the grid one
can look at is the VAE's decoding of them. `--vae DIR` (or sample.vae) overrides the recorded path.
Shards without a VAE (the digits: their "latents" are the pixels) are left as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffmoe_dist.data.shards import MANIFEST


def recorded_vae(data_path: str) -> dict | None:
    """The VAE of the shards under `data_path` (train/, else heldout/), or None."""
    for split in ("train", "heldout"):
        manifest = Path(data_path) / split / MANIFEST
        if manifest.is_file():
            return json.loads(manifest.read_text()).get("vae")
    return None


class LatentDecoder:
    """diffusers AutoencoderKL from a local directory; latents are (z - shift) * scale, as the
    shards store them. Returns images in [-1, 1]."""

    def __init__(self, vae_dir: str, device: torch.device | str = "cpu", recorded: dict | None = None):
        from diffusers import AutoencoderKL

        if not (Path(vae_dir) / "config.json").is_file():
            raise FileNotFoundError(f"VAE directory {vae_dir} has no config.json: pass --vae DIR (an AutoencoderKL)")
        self.vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).to(device).eval()
        # The factors the shards were made with win over the (possibly overriding) VAE's own.
        config = {**self.vae.config, **(recorded or {})}
        self.scale = float(config.get("scaling_factor") or 1.0)
        self.shift = float(config.get("shift_factor") or 0.0)
        self.device = device

    @torch.no_grad()
    def __call__(self, latents_BCHW: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        out = []
        for z in latents_BCHW.split(batch_size):
            z = z.to(self.device, torch.float32) / self.scale + self.shift
            out.append(self.vae.decode(z).sample.clamp(-1, 1).cpu())
        return torch.cat(out)


def build_decoder(data_path: str, override: str = "", device: torch.device | str = "cpu") -> LatentDecoder | None:
    """The decoder for samples of a model trained on `data_path`: `override` if set, else the VAE the
    shards record, else None (the samples are pixels)."""
    vae = recorded_vae(data_path)
    if override or vae:
        return LatentDecoder(override or vae["path"], device, vae)
    return None
