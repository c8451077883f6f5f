"""Files that commands write for a person: ``dumo sample``'s grid and images.

<out>.png   grid: one row per class, ``per_class`` columns
<out>.npz   ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) int64, rows in grid order
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from storage import fs
from storage.layout import RunLayout
from storage.metrics import grid_png, read_record


def samples_urls(out: str) -> tuple[str, str]:
    """(png, npz) URLs for the prefix ``out`` (a trailing .png or .npz is dropped)."""
    base = out[: -len(".png")] if out.endswith((".png", ".npz")) else out
    return fs.normalize(base + ".png"), fs.normalize(base + ".npz")


def write_samples(out: str, images: np.ndarray, labels: np.ndarray, block: np.ndarray) -> tuple[str, str]:
    """Write the grid of ``block`` (rows, cols, H, W, 3) and the npz of ``images`` with ``labels``."""
    png, npz = samples_urls(out)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=np.asarray(labels, np.int64))
    fs.write_bytes(npz, buf.getvalue())
    fs.write_bytes(png, grid_png([block]))
    return png, npz


def step_records(run: RunLayout, step: int, checkpoint_digest: str) -> list[dict[str, Any]]:
    """The metrics records of one checkpoint, one per protocol, made from these very weights (a record of an
    older checkpoint at the same step, since replaced, is left out)."""
    records = []
    for protocol in fs.listdir(run.eval_dir(step, "")):
        record = read_record(run.eval_dir(step, protocol))
        if record is not None and record.get("checkpoint_digest") == checkpoint_digest:
            records.append(record)
    return records
