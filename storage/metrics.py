"""Evaluation records, sample files, the sample grid and the lock of an evaluation, on any root.

    runs/<run>/evals/step-XXXXXXX/<protocol>/
        metrics.json          the record (schema below); written last, so it is the commit marker
        grid.png              sample grid: one block per sampler, one row per class
        samples.npz           ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) of the protocol's first sampler
        samples-<label>.npz   the same for each further sampler (e.g. ``samples-2-step.npz``)
    references/<key>/         the reference cache: storage.reference_stats

A record is a cache entry: it holds the checkpoint digest and the protocol hash, and an evaluation whose
key matches a record is skipped. Two evaluations of one checkpoint are serialised by ``exclusive`` (a lock
object created with an exclusive create, refreshed by a heartbeat, broken when stale), so the files of one
evaluation directory always come from one evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image

from storage import fs
from storage.errors import is_transient

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
SAMPLES_FILE = "samples.npz"
LOCK_FILE = ".lock"


def samples_filename(index: int, label: str) -> str:
    """``samples.npz`` for the protocol's first sampler (the documented contract), then ``samples-<label>.npz``."""
    return SAMPLES_FILE if index == 0 else f"samples-{label}.npz"


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- records ------------------------------------------------------------------------------------------
def read_record(eval_dir: str) -> dict[str, Any] | None:
    """The record in ``eval_dir``, or None when there is none (or it is unreadable, i.e. not a record)."""
    url = fs.join(eval_dir, METRICS_FILE)
    try:
        return json.loads(fs.read_text(url))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        log.warning("ignoring unreadable record %s", url)
        return None


def cached_record(eval_dir: str, checkpoint_digest: str, protocol_hash: str) -> dict[str, Any] | None:
    """The record in ``eval_dir`` if it was made from this checkpoint under this protocol, else None."""
    record = read_record(eval_dir)
    if record is None:
        return None
    if record.get("checkpoint_digest") == checkpoint_digest and record.get("protocol_hash") == protocol_hash:
        return record
    return None


def write_record(eval_dir: str, record: dict[str, Any]) -> str:
    """Write ``metrics.json`` in one object (atomic on local disks and object stores). Returns its URL."""
    url = fs.join(eval_dir, METRICS_FILE)
    fs.write_text(url, json.dumps(record, indent=1, sort_keys=False) + "\n")
    return url


# -- samples ------------------------------------------------------------------------------------------
class SamplesWriter:
    """Streams ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) into an npz, batch by batch, so FID-50K at
    256 px never holds 10 GB in memory. The file is built under a temporary name beside its destination on
    local disks (then renamed), in a local temporary directory otherwise (then uploaded in one piece), so a
    reader never sees half of it. np.load reads it as usual."""

    def __init__(self, url: str, labels: np.ndarray, height: int, width: int):
        self.url = url
        self.num_images = len(labels)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._written = 0
        if fs.is_local(url):
            final = fs.local_path(url)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            self._path, self._tmpdir = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}", None
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="dumo-samples-")
            self._path = os.path.join(self._tmpdir, "samples.npz")
        self._zip = zipfile.ZipFile(self._path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._entry = self._zip.open("images.npy", "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": (self.num_images, height, width, 3)}
        np.lib.format.write_array_header_2_0(self._entry, header)

    def write(self, images: np.ndarray) -> None:
        """Append a batch (b, H, W, 3) uint8."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (b, H, W, 3) uint8, got {images.shape} {images.dtype}")
        if self._written + len(images) > self.num_images:
            raise ValueError(f"more than the {self.num_images} images announced")
        self._entry.write(np.ascontiguousarray(images).tobytes())
        self._written += len(images)

    def close(self) -> str:
        """Finish the file and put it at ``url``; returns its sha256."""
        if self._written != self.num_images:
            raise ValueError(f"wrote {self._written} of {self.num_images} images")
        self._entry.close()
        buf = io.BytesIO()
        np.lib.format.write_array(buf, self.labels)
        self._zip.writestr("labels.npy", buf.getvalue())
        self._zip.close()
        digest = hashlib.sha256()
        with open(self._path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        if self._tmpdir is None:
            os.replace(self._path, fs.local_path(self.url))
        else:
            fsys, path = fs.filesystem(self.url)
            fsys.put_file(self._path, path)
        self.abort()
        return "sha256:" + digest.hexdigest()

    def abort(self) -> None:
        """Drop the temporary file (after close, or instead of it)."""
        if self._zip.fp is not None:  # abandoned before close: finish the zip so the file can go
            self._entry.close()
            self._zip.close()
        if self._tmpdir is None:
            if os.path.exists(self._path):
                os.remove(self._path)
        else:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


# -- grid ---------------------------------------------------------------------------------------------
def grid_png(
    blocks: list[np.ndarray],
    titles: list[str] | None = None,
    row_labels: list[str] | None = None,
    min_cell_px: int = 32,
    gap_px: int = 4,
    block_gap_px: int = 16,
) -> bytes:
    """PNG of sample blocks side by side (one per sampler, in protocol order); each block is
    (rows, cols, H, W, 3) uint8, rows = classes, laid out by torchvision's ``make_grid``. ``titles`` head the
    blocks (sampler and steps), ``row_labels`` name the rows (classes) on the left. Small images are
    enlarged by pixel repetition so 8x8 digits stay visible; gaps are mid grey, wider between blocks."""
    import torch
    from PIL import ImageDraw, ImageFont
    from torchvision.utils import make_grid

    rows = max(b.shape[0] for b in blocks)
    h, w = blocks[0].shape[2:4]
    scale = max(1, -(-min_cell_px // max(h, w)))
    grids = []
    for block in blocks:
        cells = torch.from_numpy(np.ascontiguousarray(block)).reshape(-1, h, w, 3).permute(0, 3, 1, 2)
        cells = cells.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        if block.shape[0] < rows:  # a block with fewer rows: grey cells below
            pad = torch.full((block.shape[1] * (rows - block.shape[0]), *cells.shape[1:]), 128, dtype=torch.uint8)
            cells = torch.cat([cells, pad])
        grids.append(make_grid(cells, nrow=block.shape[1], padding=gap_px, pad_value=128).permute(1, 2, 0).numpy())
    font = ImageFont.load_default()
    text_h = 14 if titles else 0
    label_w = 8 + 7 * max((len(r) for r in row_labels or []), default=0) if row_labels else 0
    width = label_w + sum(g.shape[1] for g in grids) + block_gap_px * (len(grids) - 1)
    canvas = np.full((text_h + grids[0].shape[0], width, 3), 128, np.uint8)
    x0, starts = label_w, []
    for grid in grids:
        canvas[text_h : text_h + grid.shape[0], x0 : x0 + grid.shape[1]] = grid
        starts.append(x0)
        x0 += grid.shape[1] + block_gap_px
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for x, title in zip(starts, titles or []):
        draw.text((x + gap_px, 1), title, fill=(255, 255, 255), font=font)
    cell_h = h * scale + gap_px
    for r, label in enumerate((row_labels or [])[:rows]):
        draw.text((4, text_h + gap_px + r * cell_h + (h * scale - 10) // 2), label, fill=(255, 255, 255), font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- lock ---------------------------------------------------------------------------------------------
def _create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` only if absent: O_EXCL locally, a conditional PUT (If-None-Match) on S3, the same
    check on memory://. False when it exists."""
    fsys, path = fs.filesystem(url)
    if fs.is_local(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        fsys.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def _read_lock(url: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.read_text(url))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # gone, or being written this instant


@contextmanager
def exclusive(
    lock_url: str, stale_after_s: float = 300.0, heartbeat_s: float = 30.0, poll_s: float = 1.0
) -> Iterator[None]:
    """Hold the lock object ``lock_url`` for the body. Waits while another holder's heartbeat is fresh;
    a holder that has not refreshed it for ``stale_after_s`` (crashed, killed) is replaced. The holder's
    heartbeat thread rewrites the object every ``heartbeat_s``."""
    token = uuid.uuid4().hex
    host = os.uname().nodename

    def payload() -> bytes:
        return json.dumps({"token": token, "host": host, "pid": os.getpid(), "heartbeat": time.time()}).encode()

    waited_since = time.monotonic()
    logged = False
    while True:
        try:
            created = _create_exclusive(lock_url, payload())
        except Exception as exc:  # a lost answer: whether the create was applied is read below
            if not is_transient(exc):
                raise
            created = False
        if created:
            break
        holder = _read_lock(lock_url)
        if holder is not None and holder.get("token") == token:
            # Our own conditional PUT was applied but its answer was lost, and the client's retry got 412
            log.info("lock %s: our create was applied though its answer was lost; holding it", lock_url)
            break
        if holder is not None and time.time() - float(holder.get("heartbeat", 0)) > stale_after_s:
            again = _read_lock(lock_url)  # re-read: break only the lock we judged stale
            if again is not None and again.get("token") == holder.get("token"):
                log.warning(
                    "breaking stale lock %s (holder %s pid %s, silent for > %.0f s)",
                    lock_url,
                    holder.get("host"),
                    holder.get("pid"),
                    stale_after_s,
                )
                fs.remove(lock_url)
            continue
        if not logged:
            log.info(
                "waiting for lock %s (held by %s pid %s)",
                lock_url,
                (holder or {}).get("host"),
                (holder or {}).get("pid"),
            )
            logged = True
        time.sleep(poll_s)
    if logged:
        log.info("got lock %s after %.1f s", lock_url, time.monotonic() - waited_since)

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            current = _read_lock(lock_url)
            if current is not None and current.get("token") == token:
                fs.write_bytes(lock_url, payload())

    thread = threading.Thread(target=beat, name="lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        current = _read_lock(lock_url)
        if current is not None and current.get("token") == token:
            fs.remove(lock_url)


# -- presentation -------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def format_table(record: dict[str, Any]) -> str:
    """A markdown table of a record: one row per sampler, the real-data baseline beside each figure."""
    real = record.get("real") or {}
    has_is = any(s.get("inception_score") is not None for s in record["samplers"].values())
    head = ["sampler", "class acc", "FID (real-vs-real)", "spread vs real", "NN dist to train (real held-out)"]
    head += ["IS", "KID"] if has_is else []
    lines = [
        f"**{record['run']}** step {record['step']}, protocol `{record['protocol']}`, "
        f"{record['feature_extractor']['name']} features, N = {record['num_samples']} per sampler",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for label, m in record["samplers"].items():
        row = [
            label,
            f"{_fmt(m.get('class_accuracy'))} ({_fmt(real.get('class_accuracy'))})",
            f"{_fmt(m.get('fid'))} ({_fmt(real.get('fid'))})",
            _fmt(m.get("spread_ratio")),
            f"{_fmt(m.get('nn_l2_train'))} ({_fmt(real.get('nn_l2_train'))})",
        ]
        if has_is:
            row += [_fmt(m.get("inception_score")), _fmt(m.get("kid"), 4)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
