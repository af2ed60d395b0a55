"""The embedded default dataset: scikit-learn's bundled `load_digits` (1,797 real 8x8 images).

Images are bilinearly upsampled to 16x16, one channel, scaled to [-1, 1], so that patch 2 gives
64 tokens per image. The held-out split is fixed (a seeded permutation that never changes), so the
evaluator and every training run agree on which images were never trained on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
HELDOUT_FRACTION = 0.1
_SPLIT_SEED = 20250318  # fixed forever: changing it would leak held-out images into training

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _load_all() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # load_digits pixels are integers in [0, 16].
    x_B188 = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x_B1HW = F.interpolate(x_B188, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x_B1HW = (x_B1HW * 2.0 - 1.0).clamp(-1.0, 1.0)
    y_B = torch.tensor(digits.target, dtype=torch.long)
    return x_B1HW, y_B


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (images_B1HW in [-1, 1], labels_B) for split 'train' or 'heldout'."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is not known; use 'train' or 'heldout'")
    x, y = _load_all()
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    n_heldout = int(round(HELDOUT_FRACTION * len(y)))
    idx = perm[:n_heldout] if split == "heldout" else perm[n_heldout:]
    idx = torch.as_tensor(np.sort(idx))
    return x[idx].contiguous(), y[idx].contiguous()


def digits_samples(split: str):
    """The webdataset samples of one split, in split order, and their count: the 16x16 pixels as the
    "latent" (1, 16, 16) in [-1, 1], the class label, and its word as caption."""
    images_B1HW, labels_B = load_digits_split(split)

    def samples():
        for i, (image, label) in enumerate(zip(images_B1HW.numpy(), labels_B.tolist(), strict=True)):
            yield {
                "__key__": f"{split}-{i:06d}",  # zero-padded: key order == split order
                "latent.npy": image.astype("float32"),
                "cls": int(label),
                "caption.txt": DIGIT_WORDS[label],
            }

    return samples(), len(labels_B)


def write_digits_shards(out, samples_per_shard: int = 256, overwrite: bool = False, wrap=None) -> dict[str, dict]:
    """The class-conditional digits data set: ``out/train/`` and ``out/heldout/`` shards with their
    manifests and offset indexes (what `tools/make_shards.py digits`, the tests, the benchmarks and
    the planner's measurement use). ``wrap(samples, total, split)`` may wrap each split's samples
    (a progress bar). Returns each split's manifest."""
    from pathlib import Path

    from diffmoe_dist.data.shards import write_shards

    manifests = {}
    for split in ("train", "heldout"):
        samples, total = digits_samples(split)
        manifests[split] = write_shards(
            Path(out) / split,
            wrap(samples, total, split) if wrap else samples,
            samples_per_shard=samples_per_shard,
            created_by=f"tools/make_shards.py digits (split={split})",
            overwrite=overwrite,
            index=True,
        )
    return manifests
