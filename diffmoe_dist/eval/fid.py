"""Frechet distance between feature distributions, with pluggable feature extractors.

`DigitsFeatures` is the default for the embedded digits data (the small CNN's penultimate layer);
`TorchScriptFeatures` plugs in Inception (or any network) from a local TorchScript file, so real
FID needs no download from here. Values are only comparable at equal sample counts and equal
features: FID is biased upwards for small sets, so report the real-vs-real floor beside it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps a batch of images (B, C, H, W) in [-1, 1] to features (B, F)."""

    name: str

    def __call__(self, images_BCHW: torch.Tensor) -> torch.Tensor: ...


def statistics(features_BF: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean_F, covariance_FF) in float64, the sufficient statistics of the Gaussian fit."""
    feats = features_BF.detach().cpu().double().numpy() if torch.is_tensor(features_BF) else features_BF
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"statistics needs features of shape (B >= 2, F), got {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"features contain {int((~np.isfinite(feats)).sum())} non-finite values")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's sqrtm, reporting (instead of printing) a singular or non-finite result."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(a)
        except scipy.linalg.LinAlgWarning:
            return np.full_like(a, np.nan), False
    return root, bool(np.isfinite(root).all())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as pytorch-fid computes it.

    A singular product (fewer samples than feature dimensions, or dead features) is retried with
    `eps` added to both diagonals; small imaginary parts from numerical error are dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"frechet_distance shapes disagree: mu1 {mu1.shape}, mu2 {mu2.shape}, "
            f"sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean, ok = _sqrtm(sigma1 @ sigma2)
    if not ok:
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, ok = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not ok:
            raise ValueError("frechet_distance: sqrtm of the covariance product failed even with eps offset")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm; "
                "the covariances are ill-conditioned (use more samples or fewer feature dimensions)"
            )
        covmean = covmean.real
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    # Mathematically >= 0; only rounding (e.g. a set against itself) goes a hair below.
    return float(max(distance, 0.0))


def _extract_batched(fn, images_BCHW: torch.Tensor, batch_size: int) -> torch.Tensor:
    if not torch.is_tensor(images_BCHW) or images_BCHW.dim() != 4:
        shape = tuple(images_BCHW.shape) if torch.is_tensor(images_BCHW) else type(images_BCHW).__name__
        raise ValueError(f"feature extractors expect images (B, C, H, W) in [-1, 1], got {shape}")
    with torch.no_grad():
        return torch.cat([fn(x).float().cpu() for x in images_BCHW.split(batch_size)])


class DigitsFeatures:
    """The digits classifier's 64-d penultimate features (its pre-ReLU hidden layer)."""

    name = "digits_cnn"

    def __init__(self, classifier: torch.nn.Module | None = None, batch_size: int = 512) -> None:
        if classifier is None:
            from diffmoe_dist.eval.classifier import load_or_train_classifier

            classifier = load_or_train_classifier()
        self.classifier = classifier.eval()
        self.batch_size = batch_size

    def __call__(self, images_B1HW: torch.Tensor) -> torch.Tensor:
        return _extract_batched(self.classifier.features, images_B1HW, self.batch_size)


class TorchScriptFeatures:
    """Features from a local TorchScript module, e.g. an Inception-v3 pool3 export for real FID.

    TorchScript is what pytorch-fid, clean-fid and StyleGAN ship Inception as; a `torch.export`
    archive (`.pt2`, exported with a dynamic batch dimension) is accepted too, since torch 2.13
    deprecates TorchScript.

    Images in [-1, 1] are mapped to `input_range` ("-1,1", "0,1" or "0,255", whatever the module
    expects), grayscale is repeated to `channels` when given, and `resize=(H, W)` (or an int)
    resizes bilinearly first. Outputs of shape (B, F, 1, 1) are flattened; a tuple output gives its
    first element. Nothing is downloaded: the user provides the file.
    """

    _RANGES = {"-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0), "0,255": (0.0, 255.0)}

    def __init__(
        self,
        path: str | os.PathLike,
        resize: int | tuple[int, int] | None = None,
        channels: int | None = None,
        input_range: str = "-1,1",
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"TorchScript feature network {path} not found; export one with torch.jit.save "
                "(e.g. an Inception-v3 pool3 model) and pass its local path"
            )
        if input_range not in self._RANGES:
            raise ValueError(f"input_range={input_range!r} is not known; use one of {sorted(self._RANGES)}")
        if path.suffix == ".pt2":
            self.module = torch.export.load(str(path)).module().to(device)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(path), map_location=device).eval()
        self.resize = (resize, resize) if isinstance(resize, int) else resize
        self.channels = channels
        self.input_range = input_range
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.name = f"torchscript:{path.name}"

    def _features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BCHW = x_BCHW.to(self.device, torch.float32).clamp(-1.0, 1.0)
        if self.channels is not None and x_BCHW.shape[1] != self.channels:
            if x_BCHW.shape[1] != 1:
                raise ValueError(f"cannot map {x_BCHW.shape[1]} channels to {self.channels}")
            x_BCHW = x_BCHW.expand(-1, self.channels, -1, -1)
        if self.resize is not None and tuple(x_BCHW.shape[-2:]) != tuple(self.resize):
            x_BCHW = F.interpolate(x_BCHW, size=self.resize, mode="bilinear", align_corners=False)
        lo, hi = self._RANGES[self.input_range]
        x_BCHW = (x_BCHW + 1.0) * 0.5 * (hi - lo) + lo
        out = self.module(x_BCHW)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)

    def __call__(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return _extract_batched(self._features, images_BCHW, self.batch_size)


def fid_from_features(features_a_BF: torch.Tensor, features_b_BF: torch.Tensor) -> float:
    return frechet_distance(*statistics(features_a_BF), *statistics(features_b_BF))


def fid(images_a: torch.Tensor, images_b: torch.Tensor, extractor: FeatureExtractor) -> float:
    """Frechet distance between two image sets in `extractor`'s feature space."""
    return fid_from_features(extractor(images_a), extractor(images_b))
