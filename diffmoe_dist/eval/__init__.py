"""Sample evaluation: the digits classifier, FID with pluggable features, and metrics."""

from diffmoe_dist.eval.classifier import DigitsClassifier, load_or_train_classifier
from diffmoe_dist.eval.fid import (
    DigitsFeatures,
    FeatureExtractor,
    TorchScriptFeatures,
    frechet_distance,
    statistics,
)
from diffmoe_dist.eval.metrics import evaluate_images

__all__ = [
    "DigitsClassifier",
    "DigitsFeatures",
    "FeatureExtractor",
    "TorchScriptFeatures",
    "evaluate_images",
    "frechet_distance",
    "load_or_train_classifier",
    "statistics",
]
