"""The retry condition of every retried Prefect task: only errors that may pass (``storage.errors``)."""

from __future__ import annotations

from typing import Any

from storage.errors import is_transient


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: retry timeouts, dropped connections and 5xx; never bad input, a digest
    mismatch, missing credentials, an unreachable endpoint or an absent file."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)
