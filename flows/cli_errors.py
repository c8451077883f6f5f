"""How the ``dumo`` command reports a failure: an expected error (bad input, bad config, missing file, refused
store) is one line on stderr, ``dumo COMMAND: error: ...``, and exit status 1; anything else is a bug and
keeps its traceback. ``--debug`` or ``DUMO_DEBUG=1`` brings the traceback back for every error.

While a command runs, Prefect's console handlers get a filter that drops the traceback of an expected error
from their records (a flow run logs it once per task and once per flow): the error is printed once, here.
"""

from __future__ import annotations

import logging
import os
import sys

DEBUG_ENV = "DUMO_DEBUG"
# The exceptions the code raises, in words, for a mistake of the user's: ValueError covers pydantic's
# ValidationError; OSError subclasses are files that are absent or in the way (FileNotFoundError,
# FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError); StoreError is a refused store.
EXPECTED_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or DUMO_DEBUG set to anything but empty/0/false."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_expected(exc: BaseException) -> bool:
    """True for the errors that name a bad input and the way out (no traceback needed)."""
    from tasks.cli_support import is_refused_store

    return isinstance(exc, (ValueError, *EXPECTED_OS_ERRORS)) or is_refused_store(exc)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line. A pydantic ValidationError becomes ``loc: message; ...`` with the
    offending input, instead of its multi-line report with a documentation URL."""
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic is a dependency
        ValidationError = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            if err.get("type") not in ("value_error", "assertion_error") and "input" in err:
                given = err["input"]
                if not isinstance(given, dict | list):  # a whole section would drown the message
                    msg += f" (got {given!r})"
            parts.append(f"{loc}: {msg}" if loc else msg)
        text = "config: " + "; ".join(parts)
    elif isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # newlines and runs of spaces: one line


class _DropExpectedTracebacks(logging.Filter):
    """On a console handler: a record whose exception is expected keeps its first line, loses the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_expected(exc):
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = str(record.getMessage()).splitlines()[0], ()
        return True


_FILTER = _DropExpectedTracebacks()


def quiet_prefect_tracebacks() -> None:
    """Attach the filter to the console handlers of Prefect's loggers (configured when Prefect is imported;
    call this after that). Idempotent."""
    names = ["", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.engine"]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def report(command: str | None, exc: BaseException) -> int:
    """Print the one line for an expected error; returns the exit status."""
    print(f"dumo {command or ''}: error: {one_line(exc)}".replace("dumo : ", "dumo: "), file=sys.stderr)
    return 1
