"""What evaluation measures, from features: the real-image reference, the two feature extractors, and the
metrics. Plain functions (no Prefect); ``tasks.evaluate`` drives them.

Real images are the dataset the latent store was built from (its class-folder tree, checked against the
store's dataset fingerprint; for the ``pixels`` autoencoder the store's own latents are those pixels). They
are split once, by a fixed seed, into halves: the *reference* half gives the FID statistics (and trains the
classifier), the *held-out* half gives every real-vs-real baseline, so samples and baseline images are
both unseen by the feature extractor. All images here are uint8 (N, C, H, W), C = 1 or 3.

Metrics of an image set with class labels (generated: the conditioning labels):
    fid             Frechet distance of its features to the reference half (TTUR / torch-fidelity formula)
    class_accuracy  classifier argmax == label (classifier features only)
    spread          mean over classes of the mean pairwise L2 feature distance within the class
    spread_ratio    spread / spread of the held-out real images (1 = as diverse as real data)
    nn_l2_train     mean over images of the L2 distance in pixel space ([0, 1] units, all channels) to
                    the nearest real training image; held-out real images are compared leave-one-out, so a
                    generator that copies its training set shows a figure far below theirs
    inception_score, kid   inception-v3-compat only (KID needs reference features, absent from an npz)
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from dumo_model.classifier import RECIPE_VERSION, ClassifierConfig, FeatureClassifier, train_classifier
from storage import fs, latents, metrics
from storage.autoencoders import file_digest
from storage.images import list_images, load_images
from storage.layout import Root
from tasks.progress import Progress, run_logger


def _log() -> logging.Logger | logging.LoggerAdapter:
    return run_logger(__name__)  # the run's logger inside Prefect (lines reach the UI), else plain logging


MAX_REAL_IMAGES = 20_000  # real images kept as reference, evenly spread over the sorted (class-major) rows
REAL_IMAGES_BUDGET_BYTES = 1 << 30  # ...and at most this many bytes of them (5,461 images at 256 px RGB)
SPLIT_SEED = 0
NN_MAX_QUERIES = 1000  # nearest-neighbour distances are averaged over the first 1,000 images of a set
SPREAD_MAX_PER_CLASS = 500
FEATURE_BATCH = 250
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the name torch-fidelity downloads to


@dataclass
class RealImages:
    images: np.ndarray  # (M, C, H, W) uint8
    labels: np.ndarray  # (M,) int64
    holdout_index: np.ndarray  # (M // 2,) rows of the held-out half, in random order (any prefix is a fair subset)
    reference_index: np.ndarray  # the other rows: FID statistics and classifier training
    key: str  # reference directory name
    meta: dict[str, Any]


@dataclass
class Reference:
    """FID statistics and held-out features of one feature extractor on one set of real images."""

    mu: np.ndarray
    sigma: np.ndarray
    ref_features: np.ndarray | None  # (M_ref, D); None when the statistics came from an npz
    holdout_features: np.ndarray | None  # (M_h, D)
    holdout_labels: np.ndarray | None
    holdout_logits: np.ndarray | None  # classifier only: (M_h, K)
    holdout_is_logits: np.ndarray | None  # inception only: (M_h, 1008), for the real Inception Score
    source: str  # "computed:<url>" or "npz:<path>"
    digest: str
    meta: dict[str, Any]
    sigma_sqrt: np.ndarray | None = None  # computed on first use


# -- real images --------------------------------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> uint8, as the evaluation protocol does: clip to [0, 1], scale, round."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _load_from_tree(tree_url: str, rows: np.ndarray, attrs: dict[str, Any]) -> np.ndarray | None:
    """The images of store rows ``rows`` from the class-folder tree, or None when the tree is absent or is
    not the dataset the store was built from."""
    try:
        source = list_images(tree_url)
    except FileNotFoundError:
        return None
    if source.fingerprint != attrs["dataset_fingerprint"]:
        _log().warning("image tree %s is not the store's dataset (fingerprint differs); not using it", tree_url)
        return None
    files = [source.files[i] for i in rows]
    res, ch = int(attrs["resolution"]), int(attrs["image_channels"])
    out = np.empty((len(rows), ch, res, res), np.uint8)
    with Progress(f"real images from {tree_url}", len(files), "image", _log()) as progress:
        for lo in range(0, len(files), 512):
            for j, img in enumerate(load_images(tree_url, files[lo : lo + 512], res, ch)):
                if isinstance(img, Exception):
                    raise img  # the store skipped bad rows already; a file that went bad since is an error
                out[lo + j] = to_uint8(torch.from_numpy(img)).numpy()
            progress.update(len(files[lo : lo + 512]))
    return out


def load_real_images(root: Root, store_url: str, tree_urls: list[str]) -> RealImages:
    """The real images of a store (cached under ``references/<key>/real-images.npz``). ``tree_urls``: where
    the source tree may be, tried in order; the ``pixels`` store's own latents are the fallback."""
    info = latents.open_store(store_url)
    attrs = info.attrs
    res, ch = int(attrs["resolution"]), int(attrs["image_channels"])
    cap = int(min(MAX_REAL_IMAGES, REAL_IMAGES_BUDGET_BYTES // (res * res * ch)))
    identity = {
        "dataset_fingerprint": attrs["dataset_fingerprint"],
        "resolution": res,
        "image_channels": ch,
        "crop": attrs.get("crop"),
        "max_images": cap,
        "split_seed": SPLIT_SEED,
        "version": 1,
    }
    key = metrics.reference_key(identity)
    url = fs.join(root.references(key), metrics.REAL_IMAGES_FILE)
    with metrics.exclusive(url + metrics.LOCK_FILE):
        cached = metrics.read_npz(url)
        if cached is None:
            group = zarr.open_group(latents.zarr_store(store_url, read_only=True), mode="r")
            labels = np.asarray(group["label"][:], dtype=np.int64)
            valid = np.flatnonzero(labels >= 0)  # rows the store skipped as bad files carry -1
            rows = valid[np.linspace(0, len(valid) - 1, min(cap, len(valid))).round().astype(int)]
            _log().info(f"real images: reading {len(rows)} of the store's dataset once (cached in {url})")
            images, source = None, ""
            for tree in tree_urls:
                images = _load_from_tree(tree, rows, attrs)
                if images is not None:
                    source = f"image tree {fs.normalize(tree)}"
                    break
            if images is None and attrs["autoencoder"]["name"] == "pixels":
                # pixels latents are the cropped images in [-1, 1], bit-exact after to_uint8
                images = to_uint8(torch.from_numpy(np.asarray(group["mean"].oindex[rows, 0]))).numpy()
                source = f"latents of {fs.normalize(store_url)} (pixels autoencoder)"
            if images is None:
                raise FileNotFoundError(
                    f"no image tree of the store's dataset ({attrs['dataset_fingerprint']}) at {tree_urls}:"
                    " the reference must be real images; put the source tree back there, or give"
                    " eval.reference_npz"
                )
            order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
            split = {"holdout_index": order[: len(rows) // 2], "reference_index": np.sort(order[len(rows) // 2 :])}
            meta = {**identity, "source": source, "num_images": len(rows), "num_holdout": len(rows) // 2}
            metrics.write_npz(url, {"images": images, "labels": labels[rows], **split}, meta)
            _log().info("real images: %d of %d rows from %s -> %s", len(rows), len(valid), source, url)
            cached = metrics.read_npz(url)
    assert cached is not None
    arrays, meta, _ = cached
    return RealImages(
        arrays["images"],
        arrays["labels"].astype(np.int64),
        arrays["holdout_index"],
        arrays["reference_index"],
        key,
        meta,
    )


# -- feature extractors -------------------------------------------------------------------------------
class Extractor:
    """Images (N, C, H, W) uint8 -> (features (N, D) float32, class logits (N, K) or None, IS logits or None)."""

    name: str = ""

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        raise NotImplementedError


class ClassifierExtractor(Extractor):
    name = "classifier"

    def __init__(self, model: FeatureClassifier, device: torch.device):
        self.model = model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        x = torch.from_numpy(images).to(self.device).float() / 127.5 - 1
        out = self.model(x)
        return out.features.float().cpu().numpy(), out.logits.float().cpu().numpy(), None


def inception_weights_path(configured: str | None) -> str:
    """The Inception-v3 weights file: the configured path, else torch-fidelity's file in the torch hub cache.
    Never downloads: a missing file is an error that says which file to place where."""
    default = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    path = os.path.expanduser(configured) if configured else default
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception-v3 weights not found at {path}. Download {INCEPTION_FILE} (torch-fidelity's"
            " converted TF weights, https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
            f"{INCEPTION_FILE}) on a machine with network and place it at {default}, or pass its path as"
            " eval.inception_weights / --inception-weights"
        )
    return path


class InceptionExtractor(Extractor):
    """torch-fidelity's ``inception-v3-compat``: 2048-d pool features and the unbiased logits for IS."""

    name = "inception-v3-compat"

    def __init__(self, weights_path: str, device: torch.device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity unpickles the file with weights_only=False; refuse anything but plain tensors first
        torch.load(weights_path, map_location="cpu", weights_only=True)
        self.net = FeatureExtractorInceptionV3(
            self.name, ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        ).to(device)
        self.device = device
        self.id = f"{self.name}-{file_digest(weights_path).split(':')[1][:12]}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        x = torch.from_numpy(images).to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as any image viewer would show it
        features, logits = self.net(x)
        return features.cpu().numpy(), None, logits.cpu().numpy()


def extract(extractor: Extractor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    parts = [extractor(images[lo : lo + FEATURE_BATCH]) for lo in range(0, len(images), FEATURE_BATCH)]
    cat = [None if p[0] is None else np.concatenate(p) for p in zip(*parts)]
    return cat[0], cat[1], cat[2]  # type: ignore[return-value]


# -- reference ----------------------------------------------------------------------------------------
INCEPTION_FEATURE_DIM = 2048


def feature_width(feature_extractor: str) -> int:
    """The width of the features FID is computed on: the classifier's penultimate layer, or Inception's pool."""
    if feature_extractor == "inception-v3-compat":
        return INCEPTION_FEATURE_DIM
    return ClassifierConfig.__dataclass_fields__["feature_dim"].default


def read_reference_npz(path: str, width: int, feature_extractor: str) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(mu, sigma, file bytes) of ADM-style reference statistics, checked against the features they will be
    compared with: a width that differs would otherwise fail deep in a matrix product."""
    if not fs.exists(path):
        raise FileNotFoundError(f"reference statistics {path} (--reference-npz / eval.reference_npz) do not exist")
    data = fs.read_bytes(path)
    try:
        with np.load(io.BytesIO(data)) as z:
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not an npz with arrays mu and sigma (ADM reference statistics): {exc}") from exc
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or len(mu) != width:
        raise ValueError(
            f"{path} holds statistics of {mu.shape[-1] if mu.ndim else '?'}-d features (mu {mu.shape}, sigma"
            f" {sigma.shape}) but the {feature_extractor} feature extractor gives {width}-d features: use"
            f" statistics made with the same extractor (ADM's VIRTUAL_imagenet256_labeled.npz is"
            f" inception-v3-compat, {INCEPTION_FEATURE_DIM}-d), or drop --reference-npz to compute them from"
            " the dataset's images"
        )
    return mu, sigma, data


def prepare(
    root: Root,
    real: RealImages | None,
    feature_extractor: str,
    num_classes: int,
    device: torch.device,
    inception_weights: str | None = None,
    reference_npz: str | None = None,
) -> tuple[Extractor, Reference]:
    """The feature extractor and its reference statistics, computed once per (real images, extractor) and
    cached as one object under ``references/<key>/``; ``reference_npz`` (ADM-style mu, sigma) replaces the
    computed statistics for FID."""
    extractor: Extractor | None = None
    if feature_extractor == "inception-v3-compat":
        extractor = InceptionExtractor(inception_weights_path(inception_weights), device)
        bundle_name = f"{extractor.id}.npz"
    elif feature_extractor == "classifier":
        if real is None:
            raise ValueError("the classifier feature extractor needs the dataset's real images")
        bundle_name = f"classifier-v{RECIPE_VERSION}.npz"
    else:
        raise ValueError(f"unknown feature extractor {feature_extractor!r}")
    reference: Reference | None = None
    if real is not None:
        url = fs.join(root.references(real.key), bundle_name)
        with metrics.exclusive(url + metrics.LOCK_FILE):
            if metrics.read_npz(url) is None:
                _build_bundle(url, real, feature_extractor, extractor, num_classes, device)
            arrays, meta, digest = metrics.read_npz(url)  # type: ignore[misc]
        if extractor is None:  # the classifier, as cached (whichever evaluation trained it)
            model = FeatureClassifier(ClassifierConfig(**meta["classifier_config"]))
            prefix = "classifier/"
            model.load_state_dict(
                {k[len(prefix) :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)}
            )
            extractor = ClassifierExtractor(model, device)
        reference = Reference(
            arrays["mu"],
            arrays["sigma"],
            arrays["ref_features"],
            arrays["holdout_features"],
            real.labels[real.holdout_index],
            arrays.get("holdout_logits"),
            arrays.get("holdout_is_logits"),
            f"computed:{url}",
            digest,
            meta,
        )
    if reference_npz:
        width = feature_width(feature_extractor)
        if reference is not None and reference.ref_features is not None:
            width = reference.ref_features.shape[1]  # the extractor's actual width
        mu, sigma, data = read_reference_npz(reference_npz, width, feature_extractor)
        held = reference or Reference(mu, sigma, None, None, None, None, None, "", "", {})
        reference = Reference(
            mu,
            sigma,
            None,
            held.holdout_features,
            held.holdout_labels,
            held.holdout_logits,
            held.holdout_is_logits,
            f"npz:{reference_npz}",
            metrics.sha256_bytes(data),
            {**held.meta, "reference_npz": reference_npz},
        )
    if reference is None or extractor is None:
        raise ValueError("no reference: neither the dataset's real images nor eval.reference_npz")
    return extractor, reference


def _build_bundle(
    url: str, real: RealImages, name: str, extractor: Extractor | None, num_classes: int, device: torch.device
) -> None:
    """Compute and write one reference bundle. ``extractor`` None: train the classifier first, on the
    reference half only (the held-out half stays unseen, like generated samples)."""
    ref_images, ref_labels = real.images[real.reference_index], real.labels[real.reference_index]
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"feature_extractor": name, "real_images": real.meta}
    if extractor is None:
        _, ch, res, _ = real.images.shape
        cfg = ClassifierConfig(in_channels=ch, resolution=res, num_classes=num_classes)
        x = torch.from_numpy(ref_images).to(device).float() / 127.5 - 1
        _log().info(f"feature classifier: training on {len(x)} real images, once per dataset (cached in {url})")
        with Progress("feature classifier training", 0, "step", _log()) as progress:
            model = train_classifier(
                x, torch.from_numpy(ref_labels).to(device), cfg, seed=SPLIT_SEED, on_step=progress.step_of
            )
        arrays.update({f"classifier/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()})
        meta.update(classifier_config=cfg.to_dict(), classifier_recipe_version=RECIPE_VERSION)
        extractor = ClassifierExtractor(model, device)
    ref_features, _, _ = extract(extractor, ref_images)
    holdout_features, holdout_logits, holdout_is_logits = extract(extractor, real.images[real.holdout_index])
    f64 = ref_features.astype(np.float64)
    arrays.update(
        mu=f64.mean(0), sigma=np.cov(f64, rowvar=False), ref_features=ref_features, holdout_features=holdout_features
    )
    if holdout_is_logits is not None:
        arrays["holdout_is_logits"] = holdout_is_logits
    if holdout_logits is not None:
        arrays["holdout_logits"] = holdout_logits
        acc = float((holdout_logits.argmax(1) == real.labels[real.holdout_index]).mean())
        meta["classifier_holdout_accuracy"] = acc
        _log().info("classifier: held-out accuracy %.4f on %d real images", acc, len(holdout_logits))
    metrics.write_npz(url, arrays, meta)
    _log().info(
        "reference %s: %d reference + %d held-out images, %d-d features",
        url,
        len(ref_features),
        len(holdout_features),
        ref_features.shape[1],
    )


# -- metrics ------------------------------------------------------------------------------------------
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


def fid_to(features: np.ndarray, reference: Reference) -> float:
    if reference.sigma_sqrt is None:  # once per reference: every sampler and the baseline share it
        reference.sigma_sqrt = psd_sqrt(reference.sigma)
    f = features.astype(np.float64)
    return frechet_distance(f.mean(0), np.cov(f, rowvar=False), reference.mu, reference.sigma, reference.sigma_sqrt)


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


def score(
    features: np.ndarray,
    class_logits: np.ndarray | None,
    is_logits: np.ndarray | None,
    labels: np.ndarray,
    nn_images: np.ndarray | None,
    reference: Reference,
    real: RealImages | None,
    nn_self_index: np.ndarray | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """All metrics of one labelled image set (see the module docstring)."""
    out: dict[str, Any] = {"num_images": len(features), "fid": fid_to(features, reference)}
    out["class_accuracy"] = None if class_logits is None else float((class_logits.argmax(1) == labels).mean())
    spread = within_class_spread(features, labels)
    real_spread = None
    if reference.holdout_features is not None:
        real_spread = within_class_spread(reference.holdout_features, reference.holdout_labels)
    out["spread"] = spread
    out["spread_ratio"] = spread / real_spread if spread is not None and real_spread else None
    out["nn_l2_train"] = None
    if real is not None and nn_images is not None:
        out["nn_l2_train"] = float(nearest_l2(nn_images, real.images, nn_self_index, device).mean())
    out["inception_score"] = out["inception_score_std"] = out["kid"] = out["kid_std"] = None
    if is_logits is not None:
        from torch_fidelity.metric_isc import isc_features_to_metric

        # 10 splits as usual (5,000 each for IS-50K), but at least 100 images per split on small sets
        splits = min(10, max(1, len(is_logits) // 100))
        isc = isc_features_to_metric(torch.from_numpy(is_logits), splits=splits)
        out["inception_score"], out["inception_score_std"] = isc["inception_score_mean"], isc["inception_score_std"]
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
            out["kid"], out["kid_std"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
    return out


def real_baseline(
    reference: Reference, real: RealImages | None, num_images: int, device: torch.device | None = None
) -> dict[str, Any] | None:
    """The metrics of up to ``num_images`` held-out real images: what a perfect generator would score."""
    if reference.holdout_features is None or real is None:
        return None
    n = min(num_images, len(reference.holdout_features))
    idx = real.holdout_index[:n]
    nn = min(n, NN_MAX_QUERIES)
    logits = None if reference.holdout_logits is None else reference.holdout_logits[:n]
    is_logits = None if reference.holdout_is_logits is None else reference.holdout_is_logits[:n]
    return score(
        reference.holdout_features[:n],
        logits,
        is_logits,
        reference.holdout_labels[:n],
        real.images[idx[:nn]],
        reference,
        real,
        nn_self_index=idx[:nn],
        device=device,
    )
