"""Progress of long work, where the user is looking: a tqdm bar on a terminal, else (inside a Prefect run, or
into a pipe or file) one log line at most every ``every_s`` seconds, so a 2-minute step shows a dozen lines,
not hundreds (a tqdm bar into a pipe writes one line per refresh: 256 INFO lines from one training run).

    with Progress("sampling 1-step", total=1000, unit="image") as p:
        for batch in ...: p.update(len(batch))

Its log lines go to ``tasks.run_context.run_logger`` (the Prefect run's logger inside a run, else plain
``logging``). No Prefect import at module level: the training ranks import this too.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from tasks.run_context import in_prefect_run, run_logger

PROGRESS_EVERY_S = 10.0


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """Counts work done out of ``total``; reports by bar or by log line (see the module docstring)."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "item",
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        every_s: float = PROGRESS_EVERY_S,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.unit, self.every_s, self.clock = what, int(total), unit, every_s, clock
        self.log = logger or run_logger("dumo.progress")
        self.done = 0
        self.t0 = self.last = clock()
        if bar is None:
            bar = sys.stderr.isatty() and not in_prefect_run()
        self._bar: Any = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=what, unit=unit, file=sys.stderr, leave=False)

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.what}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%, {_duration(elapsed)}"
        if 0.05 * self.total <= self.done < self.total and elapsed > 0:  # earlier, set-up time skews it
            text += f", about {_duration(elapsed * (self.total - self.done) / self.done)} left"
        return text + ")"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self.log.info(self.line())

    def step_of(self, done: int, total: int) -> None:
        """Absolute form, as a callback ``on_step(done, total)`` gives it (the total known only inside)."""
        if total != self.total:
            self.total = int(total)
            if self._bar is not None:
                self._bar.total = self.total
        self.update(done - self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.clock() - self.t0 >= self.every_s:  # long work ends with its total; short work stays quiet
            self.log.info(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
