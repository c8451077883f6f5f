"""Build the network of a run from its config and its latent store's shape. No Prefect here."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dumo_model.dit import DiTConfig, DualHeadDiT, model_config
from tasks.config import PipelineConfig


def dit_config(cfg: PipelineConfig, latent_shape: tuple[int, int, int], num_classes: int) -> DiTConfig:
    """The DiTConfig of a run: preset + overrides, heads from the objective, shape from the store."""
    channels, height, width = latent_shape
    if height != width:
        raise ValueError(f"latents must be square, the store has {height}x{width}")
    return model_config(
        cfg.model.preset,
        **{**cfg.model.overrides, "time_scale": cfg.time_scale},
        heads=cfg.heads,
        input_size=height,
        in_channels=channels,
        num_classes=num_classes,
    )


def model_from_dict(config: dict[str, Any]) -> DualHeadDiT:
    """Rebuild a network from the ``model.json`` a checkpoint carries."""
    return DualHeadDiT(DiTConfig(**config))


def config_dict(model: DualHeadDiT) -> dict[str, Any]:
    return asdict(model.cfg)
