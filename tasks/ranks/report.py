"""What rank 0 reports of training, and nothing on the other ranks (``create_report`` picks): the run's
train log, which the parent (tasks.train), the loss curve and any reader take the losses from; the step
lines on stdout, which the parent logs as progress; a progress bar on a terminal; the loss curve at each
checkpoint.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

import torch

from storage import fs
from storage.layout import RunLayout
from storage.train_log import TrainLog, loss_headline
from tasks.config import TrainConfig


def plot_loss_curve(layout: RunLayout, records: list[dict[str, Any]]) -> None:
    """loss.png in the run directory against the step, log scale: the unweighted loss_v and loss_u (what
    shows learning) on the left axis, the weighted loss the optimizer sees (near-constant under adaptive
    weighting) on a right axis of its own, so its flat line does not read as a failed run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=100)
    lines = []
    for key in ("loss_v", "loss_u"):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            lines += ax.plot(*zip(*points), label=key, linewidth=1)
    ax.set(xlabel="step", ylabel="unweighted loss (batch mean)", yscale="log", title=layout.name)
    weighted = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    if weighted and lines:
        right = ax.twinx()
        lines += right.plot(*zip(*weighted), label="weighted loss (right)", color="0.6", linewidth=0.8)
        right.set(ylabel="weighted loss")
    elif weighted:  # an objective without named terms: its loss is the headline
        lines += ax.plot(*zip(*weighted), label="loss", linewidth=1)
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    fs.write_bytes(layout.loss_curve, buf.getvalue())


Window = list[tuple[int, torch.Tensor, Any, float]]  # (step, [loss, loss_v, loss_u] on this rank, grad norm, lr)


class Report:
    """The report of a rank other than 0: every method does nothing."""

    def advance(self) -> None:
        """One step done."""

    def window(self, steps: Window, means: list[list[float]], terms: tuple[bool, ...], images_per_s: float) -> None:
        """The steps of a log window with their losses averaged over the ranks (``means``, one row per step;
        ``terms``: which of loss, loss_v, loss_u the objective has)."""

    def flush(self) -> None:
        """Make the train log whole in storage."""

    def checkpoint(self) -> None:
        """Before a checkpoint is committed: the train log up to it and the loss curve in storage."""

    def done(self, step: int, steps_per_s: float) -> None:
        """Training ended at ``step``."""


class MainReport(Report):
    """Rank 0's report."""

    def __init__(self, layout: RunLayout, train: TrainConfig, log: Any, start: int):
        self.layout, self.t, self.log = layout, train, log
        self.train_log = TrainLog(layout, keep_until=start)  # drops records past the checkpoint resumed from
        self.last: dict[str, Any] = {}
        self.bar: Any = None
        if not os.environ.get("DUMO_NO_PROGRESS"):
            from tqdm import tqdm

            interval = 0.5 if sys.stderr.isatty() else 10.0  # into a pipe every refresh is a line: fewer
            self.bar = tqdm(total=train.num_steps, initial=start, unit="step", file=sys.stderr, mininterval=interval)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def window(self, steps: Window, means: list[list[float]], terms: tuple[bool, ...], images_per_s: float) -> None:
        rows = [
            (s, [v if has else None for v, has in zip(m, terms)], grad_norm, lr)
            for (s, _, grad_norm, lr), m in zip(steps, means)
        ]
        self.last = self.train_log.add(rows, images_per_s, self.t.world_size)
        self.log.info(self.line(self.last))

    def line(self, r: dict[str, Any]) -> str:
        f = lambda key, spec: "n/a" if r[key] is None else format(r[key], spec)
        left = (self.t.num_steps - r["step"]) * self.t.batch_size_global / max(r["images_per_s"], 1e-9)
        return (
            f"step {r['step']}/{self.t.num_steps} ({100 * r['step'] / self.t.num_steps:.0f}%, about {left:.0f} s"
            f" left) {loss_headline(r, 5)} grad_norm {f('grad_norm', '.4f')}"
            f" lr {r['lr']:.3g} images/s {r['images_per_s']:.1f}"
        )

    def flush(self) -> None:
        self.train_log.flush()

    def checkpoint(self) -> None:
        self.train_log.flush()
        plot_loss_curve(self.layout, self.train_log.records)

    def done(self, step: int, steps_per_s: float) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log.info(
            f"training done at step {step}: {loss_headline(self.last)}, {steps_per_s:.3f} steps/s this attempt"
        )


def create_report(is_main: bool, layout: RunLayout, train: TrainConfig, log: Any, start: int) -> Report:
    return MainReport(layout, train, log, start) if is_main else Report()
