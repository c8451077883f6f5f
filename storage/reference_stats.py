"""The reference cache of the evaluation, on any root: the real images and, per feature extractor, their
statistics, keyed by the dataset's fingerprint.

    references/<key>/
        real-images.npz       the real images used as reference (uint8), their labels and the held-out split
        <extractor>.npz       reference statistics (``mu``, ``sigma``, ADM-style) plus held-out features and,
                              for the classifier, its weights: one object, so stats and weights always match

Real images are the dataset the latent store was built from (its class-folder tree, checked against the
store's dataset fingerprint; for the ``pixels`` autoencoder the store's own latents are those pixels). They
are split once, by a fixed seed, into halves: the *reference* half gives the FID statistics (and trains the
classifier), the *held-out* half gives every real-vs-real baseline. All images here are uint8 (N, C, H, W).

Bytes and arrays only: the feature extractors and the metrics are dumo_model's, composed by tasks.evaluate.
Each cache object is made under a lock (storage.metrics.exclusive), so concurrent evaluations make it once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import zarr

from storage import fs, latents
from storage.images import list_images, load_images
from storage.layout import Root
from storage.metrics import LOCK_FILE, exclusive, sha256_bytes

log = logging.getLogger(__name__)

REAL_IMAGES_FILE = "real-images.npz"
MAX_REAL_IMAGES = 20_000  # real images kept as reference, evenly spread over the sorted (class-major) rows
REAL_IMAGES_BUDGET_BYTES = 1 << 30  # ...and at most this many bytes of them (5,461 images at 256 px RGB)
SPLIT_SEED = 0
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the name torch-fidelity downloads to
CLASSIFIER_PREFIX = "classifier/"  # array names of the classifier's weights inside its bundle

Logger = logging.Logger | logging.LoggerAdapter
ToUint8 = Callable[[np.ndarray], np.ndarray]  # pixels in [-1, 1] (float) -> uint8, the protocol's mapping


class ProgressLike(Protocol):
    def update(self, n: int = 1) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> None: ...


@dataclass(frozen=True, eq=False)
class RealImages:
    images: np.ndarray  # (M, C, H, W) uint8
    labels: np.ndarray  # (M,) int64
    holdout_index: np.ndarray  # (M // 2,) rows of the held-out half, in random order (any prefix is a fair subset)
    reference_index: np.ndarray  # the other rows: FID statistics and classifier training
    key: str  # reference directory name
    meta: dict[str, Any]


@dataclass(frozen=True, eq=False)
class Bundle:
    """One ``<extractor>.npz``: the statistics of the reference half, the held-out half's features (and
    logits), the classifier's weights for the classifier; with the object's meta and sha256."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    ref_features: np.ndarray  # (M_ref, D)
    holdout_features: np.ndarray  # (M_h, D)
    holdout_logits: np.ndarray | None = None  # (M_h, K): the classifier's
    holdout_is_logits: np.ndarray | None = None  # (M_h, 1008): Inception's
    classifier_state: dict[str, np.ndarray] = field(default_factory=dict)  # state dict of the classifier
    meta: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    digest: str = ""


# -- npz objects --------------------------------------------------------------------------------------
def reference_key(identity: dict[str, Any]) -> str:
    """A short stable directory name for a reference: sha256 of its identity (dataset fingerprint,
    resolution, channels, crop, selection), prefixed with the resolution for people reading the tree."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{identity.get('resolution', 'x')}px-{digest}"


def write_npz(url: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """One npz object holding ``arrays`` and ``meta`` (JSON, under the key ``meta``); returns its sha256."""
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    data = buf.getvalue()
    fs.write_bytes(url, data)
    return sha256_bytes(data)


def read_npz(url: str) -> tuple[dict[str, np.ndarray], dict[str, Any], str] | None:
    """(arrays, meta, sha256) of an npz written by ``write_npz``; None when it does not exist."""
    try:
        data = fs.read_bytes(url)
    except FileNotFoundError:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    return arrays, meta, sha256_bytes(data)


@contextmanager
def locked(url: str) -> Iterator[None]:
    """Hold the lock of the cache object ``url`` (one maker at a time; readers wait for it)."""
    with exclusive(url + LOCK_FILE):
        yield


# -- real images --------------------------------------------------------------------------------------
def _load_from_tree(
    tree_url: str,
    rows: np.ndarray,
    attrs: dict[str, Any],
    to_uint8: ToUint8,
    logger: Logger,
    progress: Callable[[str, int], ProgressLike] | None,
) -> np.ndarray | None:
    """The images of store rows ``rows`` from the class-folder tree, or None when the tree is absent or is
    not the dataset the store was built from."""
    try:
        source = list_images(tree_url)
    except FileNotFoundError:
        return None
    if source.fingerprint != attrs["dataset_fingerprint"]:
        logger.warning("image tree %s is not the store's dataset (fingerprint differs); not using it", tree_url)
        return None
    files = [source.files[i] for i in rows]
    res, ch = int(attrs["resolution"]), int(attrs["image_channels"])
    out = np.empty((len(rows), ch, res, res), np.uint8)
    with progress(f"real images from {tree_url}", len(files)) if progress else nullcontext() as bar:
        for lo in range(0, len(files), 512):
            for j, img in enumerate(load_images(tree_url, files[lo : lo + 512], res, ch)):
                if isinstance(img, Exception):
                    raise img  # the store skipped bad rows already; a file that went bad since is an error
                out[lo + j] = to_uint8(img)
            if bar is not None:
                bar.update(len(files[lo : lo + 512]))
    return out


def load_real_images(
    root: Root,
    store_url: str,
    tree_urls: list[str],
    to_uint8: ToUint8,
    logger: Logger = log,
    progress: Callable[[str, int], ProgressLike] | None = None,
) -> RealImages:
    """The real images of a store (cached under ``references/<key>/real-images.npz``). ``tree_urls``: where
    the source tree may be, tried in order; the ``pixels`` store's own latents are the fallback.
    ``progress(what, total)`` makes a progress counter for the reading of a tree."""
    attrs = latents.open_store(store_url).attrs
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
    key = reference_key(identity)
    url = fs.join(root.references(key), REAL_IMAGES_FILE)
    with locked(url):
        cached = read_npz(url)
        if cached is None:
            group = zarr.open_group(latents.zarr_store(store_url, read_only=True), mode="r")
            labels = np.asarray(group["label"][:], dtype=np.int64)
            valid = np.flatnonzero(labels >= 0)  # rows the store skipped as bad files carry -1
            rows = valid[np.linspace(0, len(valid) - 1, min(cap, len(valid))).round().astype(int)]
            logger.info(f"real images: reading {len(rows)} of the store's dataset once (cached in {url})")
            images, source = None, ""
            for tree in tree_urls:
                images = _load_from_tree(tree, rows, attrs, to_uint8, logger, progress)
                if images is not None:
                    source = f"image tree {fs.normalize(tree)}"
                    break
            if images is None and attrs["autoencoder"]["name"] == "pixels":
                # pixels latents are the cropped images in [-1, 1], bit-exact after to_uint8
                images = to_uint8(np.asarray(group["mean"].oindex[rows, 0]))
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
            write_npz(url, {"images": images, "labels": labels[rows], **split}, meta)
            logger.info("real images: %d of %d rows from %s -> %s", len(rows), len(valid), source, url)
            cached = read_npz(url)
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


# -- extractor bundles --------------------------------------------------------------------------------
def bundle_url(root: Root, real: RealImages, name: str) -> str:
    """``references/<key>/<name>.npz``: ``name`` says which extractor (and which weights or recipe)."""
    return fs.join(root.references(real.key), f"{name}.npz")


def read_bundle(url: str) -> Bundle | None:
    found = read_npz(url)
    if found is None:
        return None
    a, meta, digest = found
    n = len(CLASSIFIER_PREFIX)
    state = {k[n:]: v for k, v in a.items() if k.startswith(CLASSIFIER_PREFIX)}
    return Bundle(
        a["mu"],
        a["sigma"],
        a["ref_features"],
        a["holdout_features"],
        a.get("holdout_logits"),
        a.get("holdout_is_logits"),
        state,
        meta,
        url,
        digest,
    )


def write_bundle(url: str, bundle: Bundle) -> None:
    """Write one bundle (the classifier's weights under ``classifier/``, then the statistics)."""
    arrays = {f"{CLASSIFIER_PREFIX}{k}": v for k, v in bundle.classifier_state.items()}
    arrays |= {"mu": bundle.mu, "sigma": bundle.sigma}
    arrays |= {"ref_features": bundle.ref_features, "holdout_features": bundle.holdout_features}
    if bundle.holdout_is_logits is not None:
        arrays["holdout_is_logits"] = bundle.holdout_is_logits
    if bundle.holdout_logits is not None:
        arrays["holdout_logits"] = bundle.holdout_logits
    write_npz(url, arrays, bundle.meta)


# -- ADM-style statistics and Inception weights -------------------------------------------------------
def read_reference_npz(path: str, width: int, feature_extractor: str) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(mu, sigma, file bytes) of ADM-style reference statistics, checked against the features they will be
    compared with (``width``): a width that differs would otherwise fail deep in a matrix product."""
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
            " statistics made with the same extractor (ADM's VIRTUAL_imagenet256_labeled.npz is"
            " inception-v3-compat, 2048-d), or drop --reference-npz to compute them from the dataset's images"
        )
    return mu, sigma, data


def inception_weights_path(configured: str | None) -> str:
    """The Inception-v3 weights file: the configured path, else torch-fidelity's file in the torch hub cache.
    Never downloads: a missing file is an error that says which file to place where."""
    import torch.hub

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
