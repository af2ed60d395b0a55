"""Specifications of the digits evaluator: classifier quality and caching, FID math, metrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from diffmoe_dist.data.digits import load_digits_split
from diffmoe_dist.eval import classifier as classifier_mod
from diffmoe_dist.eval.classifier import heldout_accuracy, load_or_train_classifier, train_classifier
from diffmoe_dist.eval.fid import (
    DigitsFeatures,
    TorchScriptFeatures,
    fid_from_features,
    frechet_distance,
    statistics,
)
from diffmoe_dist.eval.metrics import evaluate_images


@pytest.fixture(scope="module")
def trained(classifier_cache):
    """The session's classifier (conftest.py: trained once per session into its cache)."""
    return load_or_train_classifier()


@pytest.fixture(scope="module")
def extractor(trained):
    return DigitsFeatures(trained)


def test_classifier_reaches_97_percent_heldout(trained):
    # Quality only: how long training takes is a benchmark's question, not a unit test's.
    assert heldout_accuracy(trained) >= 0.97


def test_classifier_training_is_deterministic():
    a, b = train_classifier(seed=3, epochs=1), train_classifier(seed=3, epochs=1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_training_leaves_the_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_classifier_cache_loads_without_retraining_and_retrains_when_corrupt(trained, tmp_path, monkeypatch):
    model = trained
    calls = []

    def fake_train(**kwargs):
        calls.append(1)
        return model

    monkeypatch.setattr(classifier_mod, "train_classifier", fake_train)
    first = load_or_train_classifier(tmp_path)  # missing -> trained (faked) and cached
    path = classifier_mod.cache_file(tmp_path)
    assert path.name.startswith("digits_classifier-") and path.parent == tmp_path
    assert calls == [1] and path.is_file()
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"

    loaded = load_or_train_classifier(tmp_path)  # present -> loaded, not retrained
    assert calls == [1]
    for (name, pa), pb in zip(first.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name

    path.write_bytes(path.read_bytes()[:100])  # torn file
    with pytest.warns(UserWarning, match="unusable"):
        load_or_train_classifier(tmp_path)
    assert calls == [1, 1]

    # Tampered weights with a valid container fail the sha256 check.
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.bias"] += 1.0
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="sha256"):
        load_or_train_classifier(tmp_path)
    assert calls == [1, 1, 1]


def test_cache_dir_defaults_to_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFMOE_CACHE_DIR", str(tmp_path / "env"))
    assert classifier_mod.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("DIFFMOE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert classifier_mod.default_cache_dir() == tmp_path / ".cache" / "diffmoe_dist"


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    # For diagonal covariances, Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(v1) - sqrt(v2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_survives_singular_covariances():
    zeros = np.zeros((4, 4))
    assert frechet_distance(np.ones(4), zeros, np.zeros(4), zeros) == pytest.approx(4.0, abs=1e-4)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_of_a_set_against_itself_is_zero(extractor):
    x, _ = load_digits_split("heldout")
    feats = extractor(x)
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-3)


def test_real_vs_real_is_small_and_real_vs_noise_is_large(extractor):
    heldout, _ = load_digits_split("heldout")
    train, _ = load_digits_split("train")
    noise = torch.randn(180, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    real_vs_real = fid_from_features(extractor(train[:500]), extractor(heldout))
    real_vs_noise = fid_from_features(extractor(noise), extractor(heldout))
    assert real_vs_real < 0.1 * real_vs_noise, (real_vs_real, real_vs_noise)


def test_statistics_returns_mean_and_covariance():
    feats = torch.randn(50, 3, dtype=torch.float64)
    mu, sigma = statistics(feats)
    np.testing.assert_allclose(mu, feats.mean(0).numpy())
    np.testing.assert_allclose(sigma, np.cov(feats.numpy(), rowvar=False))
    with pytest.raises(ValueError, match="B >= 2"):
        statistics(torch.randn(1, 3))


def test_evaluate_images_reports_fid_accuracy_and_floor(trained, extractor):
    model = trained
    train, labels = load_digits_split("train")
    real = evaluate_images(train[:200], labels[:200], extractor=extractor, classifier=model)
    assert set(real) == {
        "digits_fid",
        "class_accuracy",
        "num_samples",
        "num_reference",
        "real_vs_real_floor",
        "features",
    }
    assert real["num_samples"] == 200 and real["num_reference"] == 180 and real["features"] == "digits_cnn"
    assert real["class_accuracy"] >= 0.97
    assert 0.0 < real["real_vs_real_floor"] < 100.0 and real["digits_fid"] < 100.0

    # Real images drawn for the wrong class: accuracy collapses, the distance does not change.
    wrong = evaluate_images(train[:200], (labels[:200] + 1) % 10, extractor=extractor, classifier=model)
    assert wrong["class_accuracy"] < 0.1
    assert wrong["digits_fid"] == pytest.approx(real["digits_fid"])

    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    bad = evaluate_images(noise, labels[:200], extractor=extractor, classifier=model, with_floor=False)
    assert bad["digits_fid"] > 10 * real["real_vs_real_floor"] and bad["real_vs_real_floor"] is None


def test_evaluate_images_rejects_nonfinite_samples(trained):
    x = torch.zeros(4, 1, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_images(x, torch.zeros(4, dtype=torch.long), classifier=trained)


def test_torchscript_features_plug_in_a_local_module(tmp_path, trained):
    class Pool(torch.nn.Module):
        def forward(self, x):  # (B, 3, 8, 8) -> (B, 3, 1, 1), like Inception's pool3
            return x.mean(dim=(2, 3), keepdim=True)

    path = tmp_path / "pool.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
        torch.jit.save(torch.jit.script(Pool()), str(path))
    extractor = TorchScriptFeatures(path, resize=8, channels=3, input_range="0,255")
    x, labels = load_digits_split("heldout")
    feats = extractor(x)
    assert feats.shape == (180, 3)
    expected = ((torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear") + 1) * 127.5).mean(dim=(1, 2, 3))
    torch.testing.assert_close(feats[:, 0], expected)
    result = evaluate_images(x, labels, extractor=extractor, classifier=trained)
    assert result["features"] == "torchscript:pool.pt" and result["digits_fid"] == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(FileNotFoundError, match="torch.jit.save"):
        TorchScriptFeatures(tmp_path / "missing.pt")

    exported = tmp_path / "pool.pt2"
    batch = {"x": {0: torch.export.Dim("batch")}}  # the extractor feeds batches of varying size
    torch.export.save(torch.export.export(Pool(), (torch.zeros(2, 3, 8, 8),), dynamic_shapes=batch), str(exported))
    from_export = TorchScriptFeatures(exported, resize=8, channels=3, input_range="0,255")
    torch.testing.assert_close(from_export(x), feats)
