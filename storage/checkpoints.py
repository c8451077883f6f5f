"""Checkpoint store on any root: a step directory, committed by a marker written last.

    runs/<run>/checkpoints/step-XXXXXXX/
        ema.safetensors   EMA weights (float32), what sampling and evaluation load
        model.json        the DiTConfig of the network, so a checkpoint rebuilds its own model
        config.yaml       the resolved pipeline config of the run
        trainer/          DeepSpeed state for an exact resume (written by the trainer)
        latest            "trainer": DeepSpeed's pointer to the tag, so its stock tools (zero_to_fp32, ...)
                          need no --tag
        ds_config.json    the DeepSpeed config the run generated from its typed config
        COMMITTED         JSON {step, ema_sha256, files, sha256: {file: digest}}; written last: no marker,
                          no checkpoint

A crash mid-write leaves a directory without COMMITTED, which ``committed_steps`` never lists and the
next save at that step clears first. "latest" is the newest committed step; "latest intact" the newest whose
files all match the digests of its marker (``verify``): what resume falls back to when bytes have rotted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

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
_READ_BLOCK = 8 * 2**20  # digests are computed over streamed blocks: a ZeRO partition can be gigabytes


class CheckpointCorruptError(ValueError):
    """A committed checkpoint whose files do not match the digests of its marker. A ValueError, not an
    OSError: reading the same bytes again gives the same mismatch, so no retry may spin on it."""

    def __init__(self, url: str, problems: list[str]):
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        super().__init__(
            f"checkpoint {url} is corrupt ({shown}). Evaluate another step, or delete it (training then resumes"
            " from the newest intact checkpoint before it)"
        )
        self.url, self.problems = url, list(problems)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (Dask, Prefect results)
        return (type(self), (self.url, self.problems))


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


def write_weights(ckpt_url: str, ema_state: dict, model_config: dict[str, Any], config_yaml: str) -> dict[str, str]:
    """Write EMA weights, the network's config and the run config into an (uncommitted) checkpoint; returns
    their sha256 digests, for ``commit``."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in ema_state.items()}
    blobs = {
        EMA_FILE: st_save(tensors),
        MODEL_FILE: json.dumps(model_config, indent=1, sort_keys=True).encode(),
        CONFIG_FILE: config_yaml.encode(),
    }
    for name, data in blobs.items():
        fs.write_bytes(fs.join(ckpt_url, name), data)
    return {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}


def write_deepspeed_files(ckpt_url: str, ds_config: dict[str, Any]) -> None:
    """The files DeepSpeed's own tools look for beside its tag directory: ``latest`` (naming the tag) and the
    generated config, so ``python -m deepspeed.utils.zero_to_fp32 <checkpoint> <out>`` works as is."""
    fs.write_text(fs.join(ckpt_url, DEEPSPEED_LATEST), TRAINER_DIR)
    fs.write_text(fs.join(ckpt_url, DS_CONFIG_FILE), json.dumps(ds_config, indent=1, sort_keys=True) + "\n")


def _sha256_stream(read: Callable[[int], bytes]) -> str:
    h = hashlib.sha256()
    while block := read(_READ_BLOCK):
        h.update(block)
    return h.hexdigest()


def file_sha256(url: str) -> str:
    """sha256 (hex) of one object, streamed."""
    fsys, path = fs.filesystem(url)
    with fsys.open(path, "rb") as f:
        return _sha256_stream(f.read)


def local_digests(local_dir: str, prefix: str = "") -> dict[str, str]:
    """``{prefix + relative path: sha256}`` of every file under a local directory: the trainer hashes its
    DeepSpeed state in staging, before the upload, so an object store is not read back to commit."""
    out = {}
    for dirpath, _, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[prefix + os.path.relpath(full, local_dir).replace(os.sep, "/")] = _sha256_stream(f.read)
    return out


def _list_files(ckpt_url: str) -> list[str]:
    fsys, path = fs.filesystem(ckpt_url)
    return sorted(p[len(path.rstrip("/")) + 1 :] for p in fsys.find(path))


def commit(
    ckpt_url: str, step: int, extra: dict[str, Any] | None = None, digests: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write the marker last. It records the sha256 of every file of the checkpoint, whatever files it holds
    (``digests`` gives those the caller hashed already, the rest are read here), and the EMA digest apart
    (the evaluation cache key)."""
    files = [f for f in _list_files(ckpt_url) if f != MARKER]
    known = digests or {}
    sha = {f: known[f] if f in known else file_sha256(fs.join(ckpt_url, f)) for f in files}
    record = {
        "step": step,
        "ema_sha256": sha[EMA_FILE],
        "files": files,
        "sha256": sha,
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


def _expected(record: dict[str, Any]) -> dict[str, str]:
    """The recorded digests; a marker from before per-file digests has the EMA's only."""
    return dict(record.get("sha256") or {EMA_FILE: record["ema_sha256"]})


def _check(name: str, expected: str | None, found: str | None) -> str | None:
    if expected is None or found == expected:
        return None
    if found is None:
        return f"{name} is missing"
    return f"{name} has sha256 {found[:12]}..., its marker records {expected[:12]}..."


def verify(ckpt_url: str, only: list[str] | None = None) -> list[str]:
    """What is wrong with a committed checkpoint's files (empty when every file matches its marker's digest),
    in words. ``only``: check these files alone (what a reader is about to load)."""
    expected = _expected(read_marker(ckpt_url))
    problems = []
    for name in sorted(expected) if only is None else only:
        try:
            found = file_sha256(fs.join(ckpt_url, name))
        except FileNotFoundError:
            found = None
        problem = _check(name, expected.get(name), found)
        if problem:
            problems.append(problem)
    return problems


def latest_intact(run: RunLayout, on_corrupt: Callable[[int, list[str]], None] | None = None) -> int | None:
    """The newest committed step whose files all match their digests; ``on_corrupt(step, problems)`` is
    called for each newer one passed over (left in place: the next save at that step replaces it)."""
    for step in reversed(committed_steps(run)):
        problems = verify(run.checkpoint(step))
        if not problems:
            return step
        if on_corrupt is not None:
            on_corrupt(step, problems)
    return None


def clear(ckpt_url: str) -> None:
    """Remove a checkpoint directory before writing its step again (marker first, so a crash in between
    never leaves a marked partial one)."""
    if fs.exists(ckpt_url):
        fs.remove(fs.join(ckpt_url, MARKER))
        fs.remove(ckpt_url)


def _read_checked(ckpt_url: str, name: str, expected: dict[str, str]) -> bytes:
    raw = fs.read_bytes(fs.join(ckpt_url, name))
    problem = _check(name, expected.get(name), hashlib.sha256(raw).hexdigest())
    if problem:
        raise CheckpointCorruptError(ckpt_url, [problem])
    return raw


def load_weights(ckpt_url: str) -> tuple[dict[str, Any], dict]:
    """(model config dict, EMA state dict) of a committed checkpoint; checks both files' digests."""
    expected = _expected(read_marker(ckpt_url))
    raw = _read_checked(ckpt_url, EMA_FILE, expected)
    model = json.loads(_read_checked(ckpt_url, MODEL_FILE, expected))
    return model, st_load(raw)


def read_config_yaml(ckpt_url: str) -> str:
    """The run config a committed checkpoint was trained with (digest checked)."""
    return _read_checked(ckpt_url, CONFIG_FILE, _expected(read_marker(ckpt_url))).decode("utf-8")


def trainer_state_url(ckpt_url: str) -> str:
    return fs.join(ckpt_url, TRAINER_DIR)


def read_model_config(ckpt_url: str) -> dict[str, Any]:
    """The network a checkpoint holds, as its ``model.json`` records it."""
    return json.loads(fs.read_text(fs.join(ckpt_url, MODEL_FILE)))


class TrainerSettings(Protocol):
    """What a resume depends on of the train config (the project's TrainConfig has these)."""

    @property
    def world_size(self) -> int: ...

    @property
    def zero_stage(self) -> int: ...

    @property
    def precision(self) -> str: ...


def check_resumable(
    state: dict[str, Any], train: TrainerSettings, model: dict[str, Any], saved_model: dict[str, Any], url: str
) -> bool:
    """Whether a run can continue from the checkpoint at ``url``, whose marker records the trainer ``state``
    and whose network is ``saved_model``: raise ValueError, in words, when it cannot continue as ``model``
    under ``train``; return True when its DeepSpeed state needs the universal format (ZeRO 1/2 at another
    world size), else False. The one resume check: the parent runs it before starting any process, the
    ranks again on the checkpoint they chose."""
    if saved_model != model:
        diff = sorted(k for k in set(model) | set(saved_model) if model.get(k) != saved_model.get(k))
        raise ValueError(
            f"{url} holds another network (differs in {diff}): this run cannot continue from it. Use a new run"
            " name (--set name=NEW) or delete the run's directory to start it again"
        )
    for key in ("zero_stage", "precision"):
        if state.get(key) != getattr(train, key):
            raise ValueError(
                f"{url} was written with {key}={state.get(key)}, this run has {key}="
                f"{getattr(train, key)}: DeepSpeed state does not carry over; keep it or use a new run"
            )
    was, now = state.get("world_size"), train.world_size
    if was == now or train.zero_stage == 0:  # ZeRO-0 keeps the whole optimizer state in one file
        return False
    if train.zero_stage == 3:
        raise ValueError(
            f"{url} was written by {was} ranks with ZeRO-3 and this run has {now}: ZeRO-3 state cannot be"
            f" re-partitioned (it would load wrong weights). Run with {was} ranks; to take the weights"
            " elsewhere, tasks.ranks.distributed.consolidated_weights(url) gathers them into one fp32 state dict"
        )
    return True


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
