"""The feature classifier of the offline ``classifier`` metrics: shapes for the image sizes it serves, and
determinism (its weights key cached reference statistics, so the same data must give the same network)."""

from __future__ import annotations

import pytest
import torch

from dumo_model.classifier import ClassifierConfig, FeatureClassifier, train_classifier


@pytest.mark.parametrize("channels,resolution", [(1, 8), (3, 8), (1, 28), (3, 32), (3, 64)])
def test_features_and_logits_for_each_input_size(channels: int, resolution: int) -> None:
    cfg = ClassifierConfig(in_channels=channels, resolution=resolution, num_classes=7, feature_dim=48)
    out = FeatureClassifier(cfg).eval()(torch.rand(5, channels, resolution, resolution) * 2 - 1)
    assert out.features.shape == (5, 48) and out.logits.shape == (5, 7)


def test_training_is_deterministic_and_learns_a_separable_set() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.rand(64, 1, 8, 8, generator=gen) * 0.5 - 1
    x[y == 1, :, :4] += 1.2  # class 1: bright top half
    cfg = ClassifierConfig(in_channels=1, resolution=8, num_classes=2, width=8, feature_dim=16)
    a, b = (train_classifier(x, y, cfg, num_epochs=1, batch_size=32, seed=3) for _ in range(2))
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    with torch.no_grad():
        assert (a(x).logits.argmax(1) == y).float().mean() > 0.9


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        ClassifierConfig(in_channels=2, resolution=8, num_classes=10)
