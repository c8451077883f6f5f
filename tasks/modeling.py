"""The network of a run: built from its model section and its latent store's shape, or continued from a
checkpoint (the resume check). No Prefect here."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from dumo_model.dit import LEGACY_CONFIG, DiTConfig, DualHeadDiT, config_from_dict, model_config
from storage import checkpoints as ckpts
from tasks.config import ModelSection, TrainConfig


def dit_config(section: ModelSection, heads: str, latent_shape: tuple[int, int, int], num_classes: int) -> DiTConfig:
    """The DiTConfig of a run: the model section's preset + overrides, ``heads`` from the objective
    (PipelineConfig.heads), shape from the store."""
    channels, height, width = latent_shape
    if height != width:
        raise ValueError(f"latents must be square, the store has {height}x{width}")
    return model_config(
        section.preset,
        **{**section.overrides, "time_scale": section.time_scale_for(heads)},
        heads=heads,
        input_size=height,
        in_channels=channels,
        num_classes=num_classes,
    )


def model_from_dict(config: dict[str, Any]) -> DualHeadDiT:
    """Rebuild a network from the ``model.json`` a checkpoint carries (fields it predates: legacy values)."""
    return DualHeadDiT(config_from_dict(config))


def resume_config(section: ModelSection, model: DiTConfig, saved: dict[str, Any]) -> tuple[DiTConfig, dict[str, Any]]:
    """(the network a run continues with, the checkpoint's network as a complete dict). A field added since
    the checkpoint was written (pos_embed_axes) and not set in the run's model section keeps the checkpoint's
    value, so a run begun before the field existed continues, and evaluates, on the table it was trained with."""
    saved_full = asdict(config_from_dict(saved))
    adopt = {k: saved_full[k] for k in LEGACY_CONFIG if k not in section.overrides}
    return replace(model, **adopt), saved_full


def resume_check(train: TrainConfig, section: ModelSection, model: DiTConfig, url: str) -> tuple[DiTConfig, bool]:
    """(the network the run continues with, whether the DeepSpeed state needs the universal format) for
    continuing a run of ``train`` and ``section`` from the checkpoint at ``url``; raises ValueError when it
    cannot continue. Run by the parent before any process starts and by the ranks on the checkpoint they
    agreed on."""
    model, saved_model = resume_config(section, model, ckpts.read_model_config(url))
    state = ckpts.read_marker(url).get("trainer", {})
    return model, ckpts.check_resumable(state, train, asdict(model), saved_model, url)


def init_from_pretrained(model: DualHeadDiT, section: ModelSection) -> str:
    """Load ``model.init_from`` (a released DiT/SiT file) into a new run's network; returns the log line."""
    from dumo_model.pretrained import init_from_released
    from storage.pretrained import read_state_file

    fmt = section.source_format
    state = read_state_file(section.init_from or "")
    report = init_from_released(model, state, fmt, section.init_v_head, section.init_u_head)
    return f"initialised from {section.init_from}: {report.line()}"


def config_dict(model: DualHeadDiT) -> dict[str, Any]:
    return asdict(model.cfg)
