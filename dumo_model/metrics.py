"""The metrics of the evaluation protocol, from features and uint8 images (N, C, H, W), C = 1 or 3.

Metrics of an image set with class labels (generated: the conditioning labels):
    fid             Frechet distance of its features to the reference statistics (TTUR / torch-fidelity formula)
    class_accuracy  classifier argmax == label (classifier features only)
    spread          mean over classes of the mean pairwise L2 feature distance within the class
    spread_ratio    spread / spread of the held-out real images (1 = as diverse as real data)
    nn_l2_train     mean over images of the L2 distance in pixel space ([0, 1] units, all channels) to
                    the nearest real training image; held-out real images are compared leave-one-out, so a
                    generator that copies its training set shows a figure far below theirs
    inception_score, kid   inception-v3-compat only (KID needs reference features, absent from an npz)

The real images are split once into a *reference* half (FID statistics; the classifier's training set) and
a *held-out* half (every real-vs-real baseline), so samples and baseline images are both unseen by the
feature extractor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

NN_MAX_QUERIES = 1000  # nearest-neighbour distances are averaged over the first 1,000 images of a set
SPREAD_MAX_PER_CLASS = 500


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> uint8, as the evaluation protocol does: clip to [0, 1], scale, round."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass(frozen=True, eq=False)
class Reference:
    """FID statistics and held-out features of one feature extractor on one set of real images."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    ref_features: np.ndarray | None  # (M_ref, D); None when the statistics came from an npz
    holdout_features: np.ndarray | None  # (M_h, D)
    holdout_labels: np.ndarray | None  # (M_h,)
    holdout_logits: np.ndarray | None  # classifier only: (M_h, K)
    holdout_is_logits: np.ndarray | None  # inception only: (M_h, 1008), for the real Inception Score
    source: str  # "computed:<url>" or "npz:<path>"
    digest: str
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def sigma_sqrt(self) -> np.ndarray:
        """Once per reference: every sampler and the baseline share it."""
        return psd_sqrt(self.sigma)


@dataclass(frozen=True)
class Scores:
    """The metrics of one labelled image set (see the module docstring); None where they do not apply."""

    num_images: int
    fid: float
    class_accuracy: float | None = None
    spread: float | None = None
    spread_ratio: float | None = None
    nn_l2_train: float | None = None
    inception_score: float | None = None
    inception_score_std: float | None = None
    kid: float | None = None
    kid_std: float | None = None


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance matrix (negative rounding-noise eigenvalues clipped)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, sigma2_sqrt: np.ndarray | None = None
) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2): the FID formula of Heusel et al. 2017 (TTUR), as
    torch_fidelity.metric_fid computes it. tr sqrt(S1 S2) is taken as the sum of the square roots of the
    eigenvalues of S2^1/2 S1 S2^1/2 (the same eigenvalues, and symmetric): eigvalsh instead of a general
    eigvals, about ten times faster at 2048 dimensions. tests/test_evaluate.py checks it against torch-fidelity."""
    root2 = psd_sqrt(sigma2) if sigma2_sqrt is None else sigma2_sqrt
    m = root2 @ sigma1 @ root2
    eig = np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig).sum())


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of features (N, D), in float64: the statistics FID compares."""
    f = features.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def fid_to(features: np.ndarray, reference: Reference) -> float:
    return frechet_distance(*gaussian_stats(features), reference.mu, reference.sigma, reference.sigma_sqrt)


def within_class_spread(features: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean over classes (with >= 2 members) of the mean pairwise L2 distance between their features."""
    per_class = []
    for c in np.unique(labels):
        f = torch.from_numpy(features[labels == c][:SPREAD_MAX_PER_CLASS]).double()
        if len(f) >= 2:
            per_class.append(float(torch.cdist(f, f).sum() / (len(f) * (len(f) - 1))))
    return float(np.mean(per_class)) if per_class else None


def nearest_l2(
    queries: np.ndarray, keys: np.ndarray, self_index: np.ndarray | None = None, device: torch.device | None = None
) -> np.ndarray:
    """For each query image, the L2 distance ([0, 1] pixel units) to the nearest key image; ``self_index``
    excludes each query's own row of ``keys`` (leave-one-out). The search runs in float32 ``torch.cdist``
    (matrix products for sets this size); the distance to the neighbour found is then recomputed exactly in
    float64, so a copy measures 0, not rounding noise."""
    dev = device or torch.device("cpu")
    q = torch.from_numpy(queries.reshape(len(queries), -1)).to(dev).float() / 255
    best = torch.full((len(q),), float("inf"), device=dev)
    best_index = torch.zeros(len(q), dtype=torch.long, device=dev)
    for lo in range(0, len(keys), 1024):
        k = torch.from_numpy(keys[lo : lo + 1024].reshape(min(1024, len(keys) - lo), -1)).to(dev).float() / 255
        d2 = torch.cdist(q, k).square()  # (n, b); a matmul inside, so rounding noise: recomputed below
        if self_index is not None:
            own = torch.from_numpy(self_index).to(dev) - lo
            hit = (own >= 0) & (own < len(k))
            d2[hit.nonzero().squeeze(1), own[hit]] = float("inf")
        value, index = d2.min(1)
        better = value < best
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + lo, best_index)
    nearest = keys[best_index.cpu().numpy()].reshape(len(queries), -1).astype(np.float64) / 255
    return np.linalg.norm(queries.reshape(len(queries), -1).astype(np.float64) / 255 - nearest, axis=1)


def _inception_metrics(features: np.ndarray, is_logits: np.ndarray, reference: Reference) -> dict[str, float | None]:
    from torch_fidelity.metric_isc import isc_features_to_metric

    # 10 splits as usual (5,000 each for IS-50K), but at least 100 images per split on small sets
    splits = min(10, max(1, len(is_logits) // 100))
    isc = isc_features_to_metric(torch.from_numpy(is_logits), splits=splits)
    out = {"inception_score": isc["inception_score_mean"], "inception_score_std": isc["inception_score_std"]}
    if reference.ref_features is not None:
        from torch_fidelity.metric_kid import kid_features_to_metric

        size = min(1000, len(features), len(reference.ref_features))
        kid = kid_features_to_metric(
            torch.from_numpy(features),
            torch.from_numpy(reference.ref_features),
            kid_subsets=100,
            kid_subset_size=size,
            verbose=False,
        )
        out |= {"kid": kid["kernel_inception_distance_mean"], "kid_std": kid["kernel_inception_distance_std"]}
    return out


def score(
    features: np.ndarray,
    class_logits: np.ndarray | None,
    is_logits: np.ndarray | None,
    labels: np.ndarray,
    nn_images: np.ndarray | None,
    reference: Reference,
    train_images: np.ndarray | None,
    nn_self_index: np.ndarray | None = None,
    device: torch.device | None = None,
) -> Scores:
    """All metrics of one labelled image set (see the module docstring). ``nn_images`` are compared with
    ``train_images`` (the real images), ``nn_self_index`` naming each one's own row there, if any."""
    spread = within_class_spread(features, labels)
    real_spread = None
    if reference.holdout_features is not None:
        real_spread = within_class_spread(reference.holdout_features, reference.holdout_labels)
    nn_l2 = None
    if train_images is not None and nn_images is not None:
        nn_l2 = float(nearest_l2(nn_images, train_images, nn_self_index, device).mean())
    return Scores(
        num_images=len(features),
        fid=fid_to(features, reference),
        class_accuracy=None if class_logits is None else float((class_logits.argmax(1) == labels).mean()),
        spread=spread,
        spread_ratio=spread / real_spread if spread is not None and real_spread else None,
        nn_l2_train=nn_l2,
        **(_inception_metrics(features, is_logits, reference) if is_logits is not None else {}),
    )


def real_baseline(
    reference: Reference,
    images: np.ndarray | None,
    holdout_index: np.ndarray | None,
    num_images: int,
    device: torch.device | None = None,
) -> Scores | None:
    """The metrics of up to ``num_images`` held-out real images (rows ``holdout_index`` of the real
    ``images``): what a perfect generator would score."""
    if reference.holdout_features is None or images is None or holdout_index is None:
        return None
    n = min(num_images, len(reference.holdout_features))
    idx = holdout_index[:n]
    nn = min(n, NN_MAX_QUERIES)
    logits = None if reference.holdout_logits is None else reference.holdout_logits[:n]
    is_logits = None if reference.holdout_is_logits is None else reference.holdout_is_logits[:n]
    return score(
        reference.holdout_features[:n],
        logits,
        is_logits,
        reference.holdout_labels[:n],
        images[idx[:nn]],
        reference,
        images,
        nn_self_index=idx[:nn],
        device=device,
    )
