"""Read a released checkpoint file (DiT, SiT, ...) from a path or any fsspec URL, and write and read the
directory ``dumo export`` makes.

    <export dir>/
        model.safetensors   the weights (EMA by default), position table included
        config.json         the DiTConfig, plus {"dumo": {...}} provenance
        README.md           model card: run, step, metrics records, the latent store's autoencoder

Formats read: ``.safetensors``; anything else as a PyTorch pickle, read with ``weights_only=True`` (no code
runs) and memory-mapped when local, so a 2.7 GB XL/2 file is not copied into memory twice.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from storage import fs

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


def read_state_file(url: str) -> Any:
    """The object stored in a checkpoint file: a dict of tensors (or a dict holding one)."""
    if not fs.exists(url):
        raise FileNotFoundError(f"no checkpoint file at {url}: model.init_from must name a DiT/SiT .pt or .safetensors")
    if url.endswith(".safetensors"):
        return st_load(fs.read_bytes(url))
    try:
        if fs.is_local(url):
            return torch.load(fs.local_path(url), map_location="cpu", weights_only=True, mmap=True)
        return torch.load(io.BytesIO(fs.read_bytes(url)), map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one that needs code to unpickle
        raise ValueError(f"{url} is not a PyTorch state-dict file readable without running code ({exc})") from exc


def write_export(url: str, tensors: dict[str, torch.Tensor], config: dict[str, Any], card: str) -> list[str]:
    """Write the three files of an export into ``url``; returns their URLs (weights first, card last)."""
    weights = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    files = [fs.join(url, WEIGHTS_FILE), fs.join(url, CONFIG_FILE), fs.join(url, CARD_FILE)]
    fs.write_bytes(files[0], st_save(weights, metadata={"format": "pt"}))
    fs.write_text(files[1], json.dumps(config, indent=1, sort_keys=True) + "\n")
    fs.write_text(files[2], card)
    return files
