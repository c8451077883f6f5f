"""Feature extractors of the evaluation: uint8 images -> the features FID and spread are measured in.

Legend for shapes: N images, C channels (1 grey or 3 RGB), H x W pixels, D feature width, K classes.

``FEATURE_EXTRACTORS`` is the one declaration of the choices: the config's ``eval.feature_extractor``, the
flows' parameter and the CLI's ``--feature-extractor`` all derive from its keys.
    classifier           a small CNN trained on the dataset's own labelled images (dumo_model.classifier):
                         offline, and its logits give the class accuracy of conditional samples
    inception-v3-compat  torch-fidelity's Inception-v3 (Heusel et al. 2017's TF weights, converted):
                         2048-d pool features, and the unbiased logits for the Inception Score
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from dumo_model.classifier import ClassifierConfig, FeatureClassifier

FEATURE_BATCH = 250  # images per forward pass


class Features(NamedTuple):
    features: np.ndarray  # (N, D) float32
    class_logits: np.ndarray | None  # (N, K): the classifier's, for class accuracy
    is_logits: np.ndarray | None  # (N, 1008): Inception's, for the Inception Score


def to_pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float pixels in [-1, 1], the range the classifier is trained in."""
    return torch.from_numpy(images).to(device).float() / 127.5 - 1


class ClassifierExtractor:
    """The penultimate layer of a trained ``FeatureClassifier`` (pixels mapped back to [-1, 1])."""

    name = "classifier"

    def __init__(self, model: FeatureClassifier, device: torch.device):
        self.model = model.to(device).eval()
        self.device = device
        self.id: str | None = None

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> Features:
        out = self.model(to_pixels(images, self.device))
        return Features(out.features.float().cpu().numpy(), out.logits.float().cpu().numpy(), None)


class InceptionExtractor:
    """torch-fidelity's ``inception-v3-compat`` from a local weights file; ``weights_digest`` (sha256 of the
    file) names the extractor in the reference cache, so other weights never reuse its statistics."""

    name = "inception-v3-compat"

    def __init__(self, weights_path: str, weights_digest: str, device: torch.device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity unpickles the file with weights_only=False; refuse anything but plain tensors first
        torch.load(weights_path, map_location="cpu", weights_only=True)
        self.net = FeatureExtractorInceptionV3(
            self.name, ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        ).to(device)
        self.device = device
        self.id: str | None = f"{self.name}-{weights_digest.split(':')[-1][:12]}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> Features:
        x = torch.from_numpy(images).to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as any image viewer would show it
        features, logits = self.net(x)
        return Features(features.cpu().numpy(), None, logits.cpu().numpy())


Extractor = ClassifierExtractor | InceptionExtractor


@dataclass(frozen=True)
class ExtractorSpec:
    implementation: type[ClassifierExtractor] | type[InceptionExtractor]
    width: int  # D: the width of the features FID is computed on
    trained_on_dataset: bool  # True: built from the dataset's real images (cached with the reference)


FEATURE_EXTRACTORS: dict[str, ExtractorSpec] = {
    "classifier": ExtractorSpec(
        ClassifierExtractor, ClassifierConfig.__dataclass_fields__["feature_dim"].default, trained_on_dataset=True
    ),
    "inception-v3-compat": ExtractorSpec(InceptionExtractor, 2048, trained_on_dataset=False),
}
# The closed choice as a type, for pydantic and Prefect parameters: the registry's keys, declared nowhere else.
FeatureExtractorName = Literal[tuple(FEATURE_EXTRACTORS)]  # type: ignore[valid-type]


def extract(extractor: Extractor, images: np.ndarray) -> Features:
    """Features of images (N, C, H, W) uint8, FEATURE_BATCH at a time."""
    parts = [extractor(images[lo : lo + FEATURE_BATCH]) for lo in range(0, len(images), FEATURE_BATCH)]
    cat = [None if p[0] is None else np.concatenate(p) for p in zip(*parts)]
    return Features(*cat)  # type: ignore[arg-type]
