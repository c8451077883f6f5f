"""A trained model as a self-contained directory (``dumo export``): ``model.safetensors`` + ``config.json``.

Loaded by ``DualHeadDiT.from_pretrained(DIR)`` with no project config, latent store or run: the config
rebuilds the network, the weights (position table included) fill it. The layout is the usual one of model
directories (``config.json`` beside ``model.safetensors``), so other tools can read it too. Own code rather
than huggingface_hub's ``PyTorchModelHubMixin``: its loader defaults to ``strict=False`` (a partial load
passes silently) and has no dtype argument; this one loads strictly, on the meta device first, so an XL/2
model is never built twice in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dumo_model.dit import DiTConfig, DualHeadDiT, config_from_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROVENANCE_KEY = "dumo"  # config.json entry that is not a DiTConfig field


def export_state(model: DualHeadDiT, drop_v_head: bool = False) -> tuple[dict[str, torch.Tensor], DiTConfig]:
    """(every tensor of ``model``, its config); with ``drop_v_head`` a dual model loses its v head and becomes
    the one-head (u) network that 1- and 2-step sampling needs."""
    cfg, state = model.cfg, dict(model.state_dict())
    if drop_v_head:
        if cfg.heads != "dual":
            raise ValueError(f"only a dual-head model has a v head to drop (this one has heads={cfg.heads!r})")
        state = {k: v for k, v in state.items() if not k.startswith("head_v.")}
        cfg = replace(cfg, heads="u")
    return state, cfg


def config_json(cfg: DiTConfig, provenance: dict[str, Any]) -> dict[str, Any]:
    return {**asdict(cfg), PROVENANCE_KEY: provenance}


def load_exported(
    directory: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> DualHeadDiT:
    """The model of an export directory on ``device`` (default CPU) in ``dtype`` (default as saved), in eval
    mode. Every tensor of the file must fit the network and every tensor of the network must be in the file."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}: not a directory written by `dumo export`")
    data = json.loads((directory / CONFIG_FILE).read_text())
    data.pop(PROVENANCE_KEY, None)
    cfg = config_from_dict(data)
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = DualHeadDiT(cfg)
    state = load_file(directory / WEIGHTS_FILE, device=str(torch.device(device or "cpu")))
    model.load_state_dict(state, strict=True, assign=True)  # requires_grad stays the module's (frozen positions)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
