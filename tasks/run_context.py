"""Whether code runs inside a Prefect flow or task run, asked one way for the whole project.

Library functions (training, evaluation, progress, artifacts) are called both under Prefect and directly (the
``--no-prefect`` commands, the training ranks, the tests): inside a run their log lines and artifacts belong
to the run, outside they go to plain ``logging`` and nowhere. No Prefect import at module level: the training
ranks import this too.
"""

from __future__ import annotations

import logging


def in_prefect_run() -> bool:
    """True inside a Prefect flow run or task run (then the run logger, artifacts and events have a home)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - Prefect is a dependency
        return False
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def run_logger(name: str) -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run (its lines reach the UI), else the logger ``name``."""
    if in_prefect_run():
        from prefect.logging import get_run_logger

        return get_run_logger()
    return logging.getLogger(name)
