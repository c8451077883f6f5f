"""Checkpoint store on any root: a step directory, committed by a marker written last.

    runs/<run>/checkpoints/step-XXXXXXX/
        ema.safetensors   EMA weights (float32), what sampling and evaluation load
        model.json        the DiTConfig of the network, so a checkpoint rebuilds its own model
        config.yaml       the resolved pipeline config of the run
        trainer/          DeepSpeed state for an exact resume (written by the trainer)
        latest            "trainer": DeepSpeed's pointer to the tag, so its stock tools (zero_to_fp32, ...)
                          need no --tag
        ds_config.json    the DeepSpeed config the run generated from its typed config
        COMMITTED         JSON {step, ema_sha256, files}; written last: no marker, no checkpoint

A crash mid-write leaves a directory without COMMITTED, which ``committed_steps`` never lists and the
next save at that step clears first. "latest" is the newest committed step.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from storage import fs
from storage.layout import RunLayout, parse_step_dirname

MARKER = "COMMITTED"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.json"
CONFIG_FILE = "config.yaml"
TRAINER_DIR = "trainer"
DEEPSPEED_LATEST = "latest"
DS_CONFIG_FILE = "ds_config.json"


def is_committed(ckpt_url: str) -> bool:
    return fs.exists(fs.join(ckpt_url, MARKER))


def committed_steps(run: RunLayout) -> list[int]:
    """Steps of committed checkpoints, ascending. Temporary and half-written directories are ignored."""
    steps = []
    for name in fs.listdir(run.checkpoints):
        step = parse_step_dirname(name)
        if step is not None and is_committed(run.checkpoint(step)):
            steps.append(step)
    return sorted(steps)


def latest(run: RunLayout) -> int | None:
    steps = committed_steps(run)
    return steps[-1] if steps else None


def clear_uncommitted(ckpt_url: str) -> None:
    """Remove a half-written checkpoint left by a crash, before writing that step again."""
    if fs.exists(ckpt_url) and not is_committed(ckpt_url):
        fs.remove(ckpt_url)


def write_weights(ckpt_url: str, ema_state: dict, model_config: dict[str, Any], config_yaml: str) -> None:
    """Write EMA weights, the network's config and the run config into an (uncommitted) checkpoint."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in ema_state.items()}
    fs.write_bytes(fs.join(ckpt_url, EMA_FILE), st_save(tensors))
    fs.write_text(fs.join(ckpt_url, MODEL_FILE), json.dumps(model_config, indent=1, sort_keys=True))
    fs.write_text(fs.join(ckpt_url, CONFIG_FILE), config_yaml)


def write_deepspeed_files(ckpt_url: str, ds_config: dict[str, Any]) -> None:
    """The files DeepSpeed's own tools look for beside its tag directory: ``latest`` (naming the tag) and the
    generated config, so ``python -m deepspeed.utils.zero_to_fp32 <checkpoint> <out>`` works as is."""
    fs.write_text(fs.join(ckpt_url, DEEPSPEED_LATEST), TRAINER_DIR)
    fs.write_text(fs.join(ckpt_url, DS_CONFIG_FILE), json.dumps(ds_config, indent=1, sort_keys=True) + "\n")


def commit(ckpt_url: str, step: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the marker last. It records the EMA digest (the evaluation cache key) and the files."""
    ema = fs.read_bytes(fs.join(ckpt_url, EMA_FILE))
    fsys, path = fs.filesystem(ckpt_url)
    files = sorted(p[len(path.rstrip("/")) + 1 :] for p in fsys.find(path))
    record = {
        "step": step,
        "ema_sha256": hashlib.sha256(ema).hexdigest(),
        "files": files,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    fs.write_text(fs.join(ckpt_url, MARKER), json.dumps(record, indent=1))
    return record


def read_marker(ckpt_url: str) -> dict[str, Any]:
    if not is_committed(ckpt_url):
        raise FileNotFoundError(f"checkpoint {ckpt_url} is not committed (no {MARKER} marker)")
    return json.loads(fs.read_text(fs.join(ckpt_url, MARKER)))


def digest(ckpt_url: str) -> str:
    """The sha256 of the committed EMA weights."""
    return read_marker(ckpt_url)["ema_sha256"]


def load_weights(ckpt_url: str) -> tuple[dict[str, Any], dict]:
    """(model config dict, EMA state dict) of a committed checkpoint; checks the digest."""
    record = read_marker(ckpt_url)
    raw = fs.read_bytes(fs.join(ckpt_url, EMA_FILE))
    if hashlib.sha256(raw).hexdigest() != record["ema_sha256"]:
        raise OSError(f"{ckpt_url}/{EMA_FILE} does not match the digest in its {MARKER} marker")
    return json.loads(fs.read_text(fs.join(ckpt_url, MODEL_FILE))), st_load(raw)


def read_config_yaml(ckpt_url: str) -> str:
    return fs.read_text(fs.join(ckpt_url, CONFIG_FILE))


def trainer_state_url(ckpt_url: str) -> str:
    return fs.join(ckpt_url, TRAINER_DIR)


def retention(steps: list[int], keep_last: int, keep_every: int | None) -> list[int]:
    """The committed steps to delete: all but the newest ``keep_last`` and every ``keep_every``-th."""
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return [s for s in steps if s not in keep]


def apply_retention(run: RunLayout, keep_last: int, keep_every: int | None) -> list[int]:
    """Delete old committed checkpoints (marker first, so a crash never leaves a marked partial one)."""
    removed = retention(committed_steps(run), keep_last, keep_every)
    for step in removed:
        url = run.checkpoint(step)
        fs.remove(fs.join(url, MARKER))
        fs.remove(url)
    return removed
