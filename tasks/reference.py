"""What a checkpoint's samples are scored against, made once per dataset and feature extractor: the
dataset's real images, the feature extractor (the classifier is trained here, on the reference half of the
real images) and its statistics, cached as one bundle under ``references/<key>/`` (storage.reference_stats).
Evaluations of every checkpoint and run share it; tasks.evaluate asks for it."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from dumo_model.classifier import RECIPE_VERSION, ClassifierConfig, FeatureClassifier, train_classifier
from dumo_model.features import FEATURE_EXTRACTORS, ClassifierExtractor, Extractor, extract, to_pixels
from dumo_model.metrics import Reference, gaussian_stats, to_uint8
from storage import metrics, reference_stats
from storage.autoencoders import file_digest
from storage.layout import Root
from storage.reference_stats import Bundle, RealImages
from tasks.config import EvalConfig
from tasks.progress import Progress, run_logger


def _logger() -> logging.Logger | logging.LoggerAdapter:
    return run_logger("dumo.evaluate")  # the evaluation's logger: these lines are part of its story


def load_real_images(root: Root, store_url: str, tree_urls: list[str]) -> RealImages:
    """The store's real images (cached in the reference cache), read with the protocol's pixel mapping."""
    logger = _logger()
    return reference_stats.load_real_images(
        root,
        store_url,
        tree_urls,
        lambda x: to_uint8(torch.from_numpy(x)).numpy(),
        logger,
        lambda what, total: Progress(what, total, "image", logger),
    )


def prepare(
    root: Root, real: RealImages | None, eval_cfg: EvalConfig, num_classes: int, device: torch.device
) -> tuple[Extractor, Reference]:
    """The feature extractor and its reference statistics, computed once per (real images, extractor) and
    cached as one object under ``references/<key>/``; ``eval_cfg.reference_npz`` (ADM-style mu, sigma)
    replaces the computed statistics for FID."""
    name = eval_cfg.feature_extractor
    spec = FEATURE_EXTRACTORS[name]
    extractor: Extractor | None = None
    if spec.trained_on_dataset:
        if real is None:
            raise ValueError(f"the {name} feature extractor needs the dataset's real images")
        bundle_name = f"{name}-v{RECIPE_VERSION}"
    else:
        path = reference_stats.inception_weights_path(eval_cfg.inception_weights)
        extractor = spec.implementation(path, file_digest(path), device)  # type: ignore[call-arg]
        bundle_name = str(extractor.id)
    reference: Reference | None = None
    if real is not None:
        url = reference_stats.bundle_url(root, real, bundle_name)
        with reference_stats.locked(url):
            bundle = reference_stats.read_bundle(url)
            if bundle is None:
                _build_bundle(url, real, name, extractor, num_classes, device)
                bundle = reference_stats.read_bundle(url)
        assert bundle is not None
        if extractor is None:  # the classifier, as cached (whichever evaluation trained it)
            model = FeatureClassifier(ClassifierConfig(**bundle.meta["classifier_config"]))
            model.load_state_dict({k: torch.from_numpy(v) for k, v in bundle.classifier_state.items()})
            extractor = ClassifierExtractor(model, device)
        reference = Reference(
            bundle.mu,
            bundle.sigma,
            bundle.ref_features,
            bundle.holdout_features,
            real.labels[real.holdout_index],
            bundle.holdout_logits,
            bundle.holdout_is_logits,
            f"computed:{url}",
            bundle.digest,
            bundle.meta,
        )
    if eval_cfg.reference_npz:  # FID against these statistics; the held-out baselines stay as computed
        width = spec.width if reference is None else reference.mu.shape[0]  # the extractor's actual width
        mu, sigma, data = reference_stats.read_reference_npz(eval_cfg.reference_npz, width, name)
        held = reference or Reference(mu, sigma, None, None, None, None, None, "", "")
        reference = replace(
            held,
            mu=mu,
            sigma=sigma,
            ref_features=None,
            source=f"npz:{eval_cfg.reference_npz}",
            digest=metrics.sha256_bytes(data),
            meta={**held.meta, "reference_npz": eval_cfg.reference_npz},
        )
    if reference is None or extractor is None:
        raise ValueError("no reference: neither the dataset's real images nor eval.reference_npz")
    return extractor, reference


def _build_bundle(
    url: str, real: RealImages, name: str, extractor: Extractor | None, num_classes: int, device: torch.device
) -> None:
    """Compute and write one reference bundle. ``extractor`` None: train the classifier first, on the
    reference half only (the held-out half stays unseen, like generated samples)."""
    logger = _logger()
    meta: dict[str, Any] = {"feature_extractor": name, "real_images": real.meta}
    state = {}
    if extractor is None:
        ref_images, ref_labels = real.images[real.reference_index], real.labels[real.reference_index]
        _, ch, res, _ = real.images.shape
        cfg = ClassifierConfig(in_channels=ch, resolution=res, num_classes=num_classes)
        logger.info(f"feature classifier: training on {len(ref_images)} real images, once per dataset ({url})")
        with Progress("feature classifier training", 0, "step", logger) as progress:
            x, y = to_pixels(ref_images, device), torch.from_numpy(ref_labels).to(device)
            model = train_classifier(x, y, cfg, seed=reference_stats.SPLIT_SEED, on_step=progress.step_of)
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        meta.update(classifier_config=cfg.to_dict(), classifier_recipe_version=RECIPE_VERSION)
        extractor = ClassifierExtractor(model, device)
    ref = extract(extractor, real.images[real.reference_index])
    held = extract(extractor, real.images[real.holdout_index])
    if held.class_logits is not None:
        acc = float((held.class_logits.argmax(1) == real.labels[real.holdout_index]).mean())
        meta["classifier_holdout_accuracy"] = acc
        logger.info("classifier: held-out accuracy %.4f on %d real images", acc, len(held.class_logits))
    mu, sigma = gaussian_stats(ref.features)
    bundle = Bundle(mu, sigma, ref.features, held.features, held.class_logits, held.is_logits, state, meta)
    reference_stats.write_bundle(url, bundle)
    logger.info(
        "reference %s: %d reference + %d held-out images, %d-d features",
        url,
        len(ref.features),
        len(held.features),
        ref.features.shape[1],
    )
