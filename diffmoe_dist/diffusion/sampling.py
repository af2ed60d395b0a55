"""Class-conditional sampling with CFG, and image grids. Works single-process or collectively
(every rank calls it with its share of labels: MoE layers with a distributed pool need all ranks)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffmoe_dist.diffusion.ddpm import sample_ddpm
from diffmoe_dist.diffusion.flow import sample_ode


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    labels_B: torch.Tensor,
    *,
    cfg_scale: float,
    num_steps: int,
    sampler: str,
    seed: int,
    device: torch.device | str = "cpu",
    on_evaluation=None,
) -> torch.Tensor:
    """Returns images_BCHW in [-1, 1] for the given class labels (EMA model expected).
    ``on_evaluation()``, if given, is called after each velocity evaluation (progress bars)."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(len(labels_B), model.in_channels, model.image_size, model.image_size, generator=g).to(device)
    labels_B = labels_B.to(device)

    if getattr(model, "learn_sigma", False):  # diffusion.objective=ddpm: DiT's sampler, num_steps of 1,000
        out = sample_ddpm(model, noise, labels_B, cfg_scale, num_steps, g, on_evaluation).clamp(-1, 1)
        model.train(was_training)
        return out

    def velocity(x, t):
        v = model.forward_with_cfg(x, t, labels_B, cfg_scale).float()
        if on_evaluation is not None:
            on_evaluation()
        return v

    out = sample_ode(velocity, noise, num_steps, sampler).clamp(-1, 1)
    model.train(was_training)
    return out


def save_grid(images_BCHW: torch.Tensor, path: str, nrow: int, scale: int | None = None) -> None:
    """Writes a grid PNG (nrow images per row), each image upscaled by `scale` (nearest; default 4
    below 64 pixels, else 1)."""
    x = ((images_BCHW.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    B, C, H, W = x.shape
    scale = scale if scale is not None else (4 if max(H, W) < 64 else 1)
    ncol = (B + nrow - 1) // nrow
    grid = torch.zeros(C, ncol * (H + 1) + 1, nrow * (W + 1) + 1, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (H + 1) : 1 + r * (H + 1) + H, 1 + c * (W + 1) : 1 + c * (W + 1) + W] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    arr = np.repeat(np.repeat(arr, scale, axis=0), scale, axis=1)
    img = Image.fromarray(arr[..., 0] if C == 1 else arr)
    img.save(path)


def sample_in_chunks(
    model: torch.nn.Module, labels: torch.Tensor, *, chunk_size: int, first_seed: int, **sample_kwargs
) -> torch.Tensor:
    """`sample_images` over ``labels`` ``chunk_size`` at a time, chunk i seeded ``first_seed + i``
    (so a run's images do not depend on anything but the chunking); ``sample_kwargs`` go to
    `sample_images` (cfg_scale, num_steps, sampler, device, on_evaluation)."""
    chunks = labels.split(chunk_size)
    return torch.cat([sample_images(model, c, seed=first_seed + i, **sample_kwargs) for i, c in enumerate(chunks)])


class CapacityMeter:
    """Records the achieved average capacity C_avg of every MoE forward while active: an open
    `MoECollector` that keeps only C_avg (one value per MoE layer per model evaluation, in order)."""

    def __init__(self, model: torch.nn.Module):
        from diffmoe_dist.model.moe.collector import MoECollector

        self._capacities: list[torch.Tensor] = []  # C_avg only: sampling runs many forwards
        collector = MoECollector(on_record=lambda layer, rec: self._capacities.append(rec.capacity_avg))
        self._open = collector.collect(model)
        self._open.__enter__()

    @property
    def values(self) -> list[float]:
        return torch.stack(self._capacities).tolist() if self._capacities else []

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    def close(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
