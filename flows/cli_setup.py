"""What every ``dumo`` command sets up before it does anything: Prefect's start-up settings and logging.

``prepare_environment`` runs first in ``flows.cli.main`` for every subcommand (before Prefect is imported,
since Prefect reads its settings once), so no command waits on a shorter start-up timeout than another and
none tries to reach the internet for telemetry. Values already in the environment win.

``use_prefect`` decides, for the single-process commands (``train``, ``evaluate``), whether their work runs
as a Prefect flow: yes when a Prefect server is configured (``PREFECT_API_URL``: the run, its events and
artifacts land there), no when none is, because the flow would start a temporary server (20-30 s before
work begins on this project's 2-core machines; see bench/startup.py) whose database nobody looks at, and
these commands cache by their own records (checkpoints resume, evaluations are keyed by checkpoint digest
and protocol), not by Prefect. ``--prefect`` / ``--no-prefect`` force either way.
"""

from __future__ import annotations

import logging
import os

STARTUP_ENV = {
    # A fresh machine's first temporary server migrates a new SQLite database: 20 s (Prefect's default) was
    # too short for the first build-latents here. One value for every command.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # Offline, the server's telemetry service and the client's analytics log errors; neither can work.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


PROJECT_LOGGERS = ("dumo", "tasks", "storage")  # dumo.train, dumo.evaluate, storage.reference_stats, storage.metrics...


def prepare_environment() -> None:
    for key, value in STARTUP_ENV.items():
        os.environ.setdefault(key, value)


def use_prefect(flag: bool | None) -> bool:
    """``flag`` when given (--prefect / --no-prefect), else whether a Prefect server is configured."""
    if flag is not None:
        return flag
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import PREFECT_API_URL  # also set in a Prefect profile

    return bool(PREFECT_API_URL.value())


def plain_logging() -> None:
    """Let the INFO lines of the project's loggers reach stderr when no flow run carries them.

    ``logging.basicConfig(level=INFO)`` did nothing once Prefect was imported: Prefect puts its console
    handler on the root logger, so basicConfig saw a handler and left the root at WARNING, and a
    ``--no-prefect`` command printed no progress at all. The project's loggers get INFO themselves; their
    lines go to whichever handler the root has (Prefect's console handler, else a plain one made here)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
