"""Sample-quality metrics for class-conditional digits: feature-space FID and class accuracy.

Class accuracy flatters (a classifier labels blurry 8s as 8s), so it is always reported beside the
Frechet distance to held-out real images, and beside the real-vs-real floor: the distance between
as many *real* train images and the same reference, i.e. what a perfect generator would score at
this sample count.
"""

from __future__ import annotations

import torch

from diffmoe_dist.data.digits import NUM_CLASSES, load_digits_split
from diffmoe_dist.eval.fid import DigitsFeatures, FeatureExtractor, frechet_distance, statistics

_FLOOR_SEED = 0
_SPLITS = ("heldout", "train")


def class_accuracy(classifier: torch.nn.Module, images_B1HW: torch.Tensor, labels_B: torch.Tensor) -> float:
    """Share of class-conditional samples that the classifier labels as the class they were drawn for."""
    return (classifier.eval().predict(images_B1HW) == labels_B.cpu()).float().mean().item()


def _check_inputs(images: torch.Tensor, labels: torch.Tensor | None) -> None:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[0] < 2:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"evaluate_images needs images (B >= 2, C, H, W) in [-1, 1], got {shape}")
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ValueError(f"images contain {bad} non-finite values: the sampler diverged; no metric is meaningful")
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"labels must lie in [0, {NUM_CLASSES}), got [{labels.min()}, {labels.max()}]")


def evaluate_images(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    extractor: FeatureExtractor | None = None,
    classifier: torch.nn.Module | None = None,
    reference: str | torch.Tensor = "heldout",
    with_floor: bool = True,
) -> dict:
    """Scores generated digits (B, 1, 16, 16) in [-1, 1] drawn for `labels` (B,).

    reference: "heldout" (the 180 images no run trains on; the default), "train", or a tensor of
    real images. Returns {"digits_fid", "class_accuracy" (None without labels), "num_samples",
    "num_reference", "real_vs_real_floor" (None for a tensor reference or with_floor=False),
    "features" (the extractor's name)}.
    """
    _check_inputs(images, labels)
    if classifier is None and (labels is not None or extractor is None):
        from diffmoe_dist.eval.classifier import load_or_train_classifier

        classifier = load_or_train_classifier()
    if extractor is None:
        extractor = DigitsFeatures(classifier)

    if isinstance(reference, str):
        if reference not in _SPLITS:
            raise ValueError(f"reference={reference!r} is not known; use one of {_SPLITS} or a tensor of images")
        reference_images, _ = load_digits_split(reference)
    else:
        reference_images = reference
    ref_stats = statistics(extractor(reference_images))
    result = {
        "digits_fid": frechet_distance(*statistics(extractor(images)), *ref_stats),
        "class_accuracy": None if labels is None else class_accuracy(classifier, images, labels),
        "num_samples": int(images.shape[0]),
        "num_reference": int(reference_images.shape[0]),
        "real_vs_real_floor": None,
        "features": extractor.name,
    }
    if with_floor and isinstance(reference, str):
        other, _ = load_digits_split(_SPLITS[1 - _SPLITS.index(reference)])
        n = min(len(images), len(other))
        subset = torch.randperm(len(other), generator=torch.Generator().manual_seed(_FLOOR_SEED))[:n]
        result["real_vs_real_floor"] = frechet_distance(*statistics(extractor(other[subset])), *ref_stats)
    return result
