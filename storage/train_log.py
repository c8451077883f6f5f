"""A run's training log on any root: JSON lines at ``runs/<run>/train-log.jsonl``.

One record per step: ``step``, ``loss``, ``loss_v``, ``loss_u`` (null where the objective has no such
term), ``grad_norm``, ``lr``, ``images_per_s``, ``world_size``. A resumed run redoes the steps after its
checkpoint, so where a step appears twice its later record wins.

Every line is strict JSON: a NaN or infinite number is written as the string ``"NaN"``, ``"Infinity"`` or
``"-Infinity"`` (distinct from null, "no such term"), and ``read_train_log`` turns them back into floats.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from storage import fs
from storage.layout import RunLayout

NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def dumps(record: dict[str, Any]) -> str:
    """One record as a line of strict JSON (non-finite numbers as strings)."""
    return json.dumps({k: _encode(v) for k, v in record.items()}, allow_nan=False)


def loads(line: str) -> dict[str, Any]:
    return {k: NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in json.loads(line).items()}


def read_train_log(layout: RunLayout) -> list[dict[str, Any]]:
    """A run's per-step records, one per step (where a resumed run redid a step, its later record wins)."""
    if not fs.exists(layout.train_log):
        return []
    by_step = {}
    # Only whole lines: the last one may be half-appended (being written, or cut by a crash)
    for line in fs.read_text(layout.train_log).split("\n")[:-1]:
        if line.strip():
            rec = loads(line)
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


HEADLINE_TERMS = ("loss_v", "loss_u")  # unweighted: they fall as the model learns


def loss_headline(record: dict[str, Any] | None, digits: int = 4) -> str:
    """The losses of a record for a person: the unweighted ``loss_v`` / ``loss_u`` first, the weighted loss
    the optimizer sees after them in brackets. Adaptive weighting divides each sample's loss by (about)
    its own size, so the weighted loss sits near a constant (2.0 for two terms) however well training
    goes; headlining it made a run that learned look like one that failed."""
    if not record:
        return "loss n/a"
    terms = [f"{k} {record[k]:.{digits}f}" for k in HEADLINE_TERMS if record.get(k) is not None]
    weighted = record.get("loss")
    if not terms:
        return "loss n/a" if weighted is None else f"loss {weighted:.{digits}f}"
    return " ".join(terms) + ("" if weighted is None else f" (weighted loss {weighted:.{digits}f})")


class TrainLog:
    """The writer. A local file is appended to at every log window; an object cannot be appended to, so it is
    rewritten at most every REMOTE_FLUSH_S and at each checkpoint (``flush()``)."""

    REMOTE_FLUSH_S = 60.0

    def __init__(self, layout: RunLayout, keep_until: int):
        self.layout, self.url = layout, layout.train_log
        # A crash leaves records past the checkpoint resumed from: drop them, those steps are redone.
        self.records = [r for r in read_train_log(layout) if r["step"] <= keep_until]
        fs.write_text(self.url, "".join(dumps(r) + "\n" for r in self.records))
        self.unflushed: list[dict[str, Any]] = []
        self.flushed_at = time.monotonic()

    def add(
        self, step_losses: list[tuple[int, list[float | None], Any, float]], images_per_s: float, world: int
    ) -> dict:
        """Records for ``(step, [loss, loss_v, loss_u], grad_norm, lr)`` rows (None = no such term); the last."""
        new = []
        for step, losses, grad_norm, lr in step_losses:
            loss, loss_v, loss_u = losses
            grad_norm = None if grad_norm is None else float(grad_norm)
            rec = dict(step=step, loss=loss, loss_v=loss_v, loss_u=loss_u, lr=lr, grad_norm=grad_norm)
            new.append({**rec, "images_per_s": images_per_s, "world_size": world})
        self.records += new
        self.unflushed += new
        self.flush(force=fs.is_local(self.url))
        return new[-1]

    def flush(self, force: bool = True) -> None:
        if not self.unflushed or not (force or time.monotonic() - self.flushed_at > self.REMOTE_FLUSH_S):
            return
        if fs.is_local(self.url):
            with open(fs.local_path(self.url), "a") as f:
                f.writelines(dumps(r) + "\n" for r in self.unflushed)
        else:
            fs.write_text(self.url, "".join(dumps(r) + "\n" for r in self.records))
        self.unflushed, self.flushed_at = [], time.monotonic()
