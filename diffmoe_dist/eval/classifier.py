"""A small CNN that judges generated 16x16 digits: class accuracy and a feature space for FID.

Trained deterministically on the digits train split in a few seconds on one thread (minutes on a
loaded machine), then cached per data set (`$DIFFMOE_CACHE_DIR` or `~/.cache/diffmoe_dist`, the file
named by a digest of the training split) so every run and every rank judges samples with the same
weights. The first use says so on stderr before it trains, with the time it will take. Shifts of
+-1 px and light pixel noise in training make it robust to the small misalignments and grain of
generated samples.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmoe_dist.data.digits import IMAGE_SIZE, NUM_CLASSES, load_digits_split

FEATURE_DIM = 64
CACHE_PREFIX = "digits_classifier"
# Bump when the architecture or the training recipe changes: older caches are then retrained.
FORMAT_VERSION = 1
_TRAIN_SEED = 0
_EPOCHS = 12
_BATCH_SIZE = 64
_LR = 2e-3


class DigitsClassifier(nn.Module):
    """(B, 1, 16, 16) in [-1, 1] -> logits (B, 10); `features` is the 64-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.hidden = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 64), taken before their ReLU so no dimension is dead (always 0),
        which keeps the feature covariance of a few hundred samples well conditioned for FID."""
        _check_images(x_B1HW)
        # Generated samples can overshoot [-1, 1]; saving them as images would clip them too.
        x_B1HW = x_B1HW.float().clamp(-1.0, 1.0)
        return self.hidden(self.conv(x_B1HW).flatten(1))

    def logits(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(x_B1HW))))

    def forward(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        return self.logits(x_B1HW)

    @torch.no_grad()
    def predict(self, x_B1HW: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class per image (B,), in eval mode, batched to bound memory."""
        return torch.cat([self.logits(x).argmax(1) for x in x_B1HW.split(batch_size)])


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"digits classifier expects images of shape (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) in [-1, 1], got {shape}"
        )


def _random_shift(x_B1HW: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shifts each image by an independent integer offset in [-max_shift, max_shift]^2 (background fill)."""
    B, _, H, W = x_B1HW.shape
    padded = F.pad(x_B1HW, (max_shift,) * 4, value=-1.0)
    dy_B, dx_B = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)
    rows_BH = dy_B[:, None] + torch.arange(H)
    cols_BW = dx_B[:, None] + torch.arange(W)
    out_BHW = padded[torch.arange(B)[:, None, None], 0, rows_BH[:, :, None], cols_BW[:, None, :]]
    return out_BHW.unsqueeze(1)


def train_classifier(seed: int = _TRAIN_SEED, epochs: int = _EPOCHS, on_epoch=None) -> DigitsClassifier:
    """Trains on the digits train split; deterministic for a given seed and thread count.

    Uses its own generator for data order and augmentation and forks the global RNG for the weight
    init, so callers' random streams are left untouched. ``on_epoch(done, epochs)`` after each epoch.
    """
    x_train, y_train = load_digits_split("train")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=1e-4)
        steps_per_epoch = -(-len(y_train) // _BATCH_SIZE)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=_LR, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        model.train()
        for epoch in range(epochs):
            for idx in torch.randperm(len(y_train), generator=generator).split(_BATCH_SIZE):
                x = _random_shift(x_train[idx], generator)
                x = x + 0.05 * torch.randn(x.shape, generator=generator)
                loss = F.cross_entropy(model.logits(x), y_train[idx], label_smoothing=0.05)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if on_epoch is not None:
                on_epoch(epoch + 1, epochs)
    return model.eval()


def heldout_accuracy(model: DigitsClassifier) -> float:
    x, y = load_digits_split("heldout")
    return (model.eval().predict(x) == y).float().mean().item()


def _state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFMOE_CACHE_DIR") or Path.home() / ".cache" / "diffmoe_dist")


def _load_cached(path: Path) -> DigitsClassifier:
    payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version {payload.get('format_version')} != {FORMAT_VERSION}")
    state_dict = payload["state_dict"]
    if _state_digest(state_dict) != payload["sha256"]:
        raise ValueError("sha256 of the stored weights does not match")
    model = DigitsClassifier()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _save_atomic(model: DigitsClassifier, path: Path, accuracy: float) -> None:
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format_version": FORMAT_VERSION,
        "sha256": _state_digest(state_dict),
        "heldout_accuracy": accuracy,
        "state_dict": state_dict,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # tmp file in the same directory + os.replace: concurrent ranks or a crash never leave a torn file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dataset_digest() -> str:
    """The training split's digest (images and labels) with the recipe version: another data set, or
    another recipe, gets its own cache file."""
    x, y = load_digits_split("train")
    digest = hashlib.sha256(f"v{FORMAT_VERSION}:{tuple(x.shape)}".encode())
    digest.update(x.contiguous().numpy().tobytes())
    digest.update(y.contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def cache_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the classifier of this data set is cached."""
    return Path(cache_dir or default_cache_dir()) / f"{CACHE_PREFIX}-{dataset_digest()}.pt"


def _say(msg: str) -> None:
    # stderr: the evaluators' stdout carries their JSON alone (`diffmoe-eval ... | tee eval.json`)
    print(f"[diffmoe-eval] {msg}", file=sys.stderr, flush=True)


def load_or_train_classifier(cache_dir: str | os.PathLike | None = None) -> DigitsClassifier:
    """The cached digits classifier in eval mode; trained (~10 s, one thread) and cached if missing/invalid.

    cache_dir: defaults to `$DIFFMOE_CACHE_DIR`, else `~/.cache/diffmoe_dist`.
    """
    path = cache_file(cache_dir)
    if path.exists():
        try:
            return _load_cached(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
            warnings.warn(f"digits classifier cache {path} is unusable ({exc}); retraining", stacklevel=2)
    n = len(load_digits_split("train")[1])
    _say(
        f"training the evaluation classifier (digits CNN, {_EPOCHS} epochs on {n} images; once per data set, "
        f"then cached at {path}): started"
    )
    start = time.perf_counter()

    def estimate(done: int, epochs: int) -> None:
        if done == 1:
            per_epoch = time.perf_counter() - start
            _say(f"classifier epoch 1/{epochs} took {per_epoch:.1f} s: about {per_epoch * epochs:.0f} s in all")

    model = train_classifier(on_epoch=estimate)
    accuracy = heldout_accuracy(model)
    try:
        _save_atomic(model, path, accuracy)
    except OSError as exc:
        warnings.warn(f"could not cache the digits classifier at {path} ({exc})", stacklevel=2)
    elapsed = time.perf_counter() - start
    _say(f"training the evaluation classifier: done in {elapsed:.1f} s (held-out accuracy {accuracy:.2%})")
    return model
