"""Progress at a sensible cadence, the loss a person reads, and the log lines of a command without Prefect."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from PIL import Image

from storage.layout import Root
from storage.train_log import loss_headline
from tasks.progress import Progress
from tasks.ranks.report import plot_loss_curve

PROJECT = Path(__file__).resolve().parent.parent


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_by_time_not_by_update(caplog) -> None:
    clock = _Clock()
    logger = logging.getLogger("dumo.test-progress")
    caplog.set_level(logging.INFO, logger=logger.name)
    with Progress("sampling 1-step", 800, "image", logger, every_s=10, bar=False, clock=clock) as p:
        for _ in range(800):  # 800 updates over 100 s of work (0.125 s: exact in binary)
            clock.now += 0.125
            p.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert 9 <= len(lines) <= 11  # about one line per 10 s, not one per update
    assert lines[0] == "sampling 1-step: 80/800 images (10%, 10 s, about 1 min 30 s left)"
    assert lines[-1] == "sampling 1-step: 800/800 images (100%, 1 min 40 s)"


def test_short_work_stays_quiet_and_absolute_steps_set_the_total(caplog) -> None:
    clock = _Clock()
    logger = logging.getLogger("dumo.test-progress")
    caplog.set_level(logging.INFO, logger=logger.name)
    with Progress("classifier", 0, "step", logger, every_s=10, bar=False, clock=clock) as p:
        for k in range(1, 51):
            clock.now += 0.1
            p.step_of(k, 50)
    assert p.total == 50 and p.done == 50 and caplog.records == []


def test_the_headline_is_the_unweighted_loss() -> None:
    record = {"loss": 1.99912, "loss_v": 0.41234, "loss_u": 0.51201}
    assert loss_headline(record) == "loss_v 0.4123 loss_u 0.5120 (weighted loss 1.9991)"
    assert loss_headline({"loss": 0.25, "loss_v": None, "loss_u": None}) == "loss 0.2500"
    assert loss_headline(None) == "loss n/a"


def test_loss_curve_puts_the_weighted_loss_on_its_own_axis(tmp_path: Path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = Root(str(tmp_path)).run("r")
    records = [{"step": s, "loss": 2.0, "loss_v": 1 / s, "loss_u": 2 / s} for s in range(1, 50)]
    axes_seen = []
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):  # the real savefig, noting the axes the figure has
        axes_seen.append([(ax.get_ylabel(), [line.get_label() for line in ax.get_lines()]) for ax in fig.axes])
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    plot_loss_curve(layout, records)
    assert axes_seen == [
        [("unweighted loss (batch mean)", ["loss_v", "loss_u"]), ("weighted loss", ["weighted loss (right)"])]
    ]
    assert Image.open(Path(tmp_path) / "runs" / "r" / "loss.png").size == (650, 350)


def test_no_prefect_command_prints_its_log_lines(tmp_path: Path) -> None:
    """Prefect's console handler on the root logger made basicConfig a no-op: a --no-prefect command printed
    none of its INFO lines. After plain_logging, with Prefect imported, they reach stderr."""
    code = (
        "import sys, logging; import prefect; from flows.cli_setup import plain_logging; plain_logging();"
        " logging.getLogger('dumo.evaluate').info('evaluating tiny step 1'); "
        "logging.getLogger('tasks.eval_metrics').info('real images: reading 10')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "evaluating tiny step 1" in done.stderr and "real images: reading 10" in done.stderr
