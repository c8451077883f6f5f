"""Which errors are worth retrying: one classification, used by every retry of the project.

Transient (may pass if the same call is made again): timeouts, dropped or reset connections, HTTP 5xx,
408 and 429, S3's SlowDown / InternalError / ServiceUnavailable. Permanent (the same call fails the same
way): bad input (a file that does not decode, a digest mismatch, a corrupt store), missing or refused
credentials, an endpoint that cannot be reached or does not speak S3, absent files, and every error not
known to be transient. The whole ``__cause__`` / ``__context__`` chain is read, because s3fs turns botocore's
errors into ``OSError`` with the original as the cause; a permanent link anywhere wins.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

# HTTP statuses and S3 error codes that a later attempt may not see again
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
)
# What s3fs maps SlowDown/ServiceUnavailable (EBUSY), InternalError (EREMOTEIO) and socket errors to
TRANSIENT_ERRNOS = frozenset(
    {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN}
)
# Whatever the message says, these never pass by themselves
PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    ValueError,  # bad input: BadImageError, CheckpointCorruptError, S3SetupError, config errors
    TypeError,
    KeyError,
    ArithmeticError,  # NonFiniteLossError
    NotImplementedError,
)
TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TimeoutError,  # also asyncio.TimeoutError and socket.timeout
    socket.timeout,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)


class S3SetupError(ValueError):
    """The S3 configuration cannot work: no credentials, an endpoint that cannot be reached or does not
    answer like S3, credentials it refuses. Permanent: retrying only delays the message."""


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes and contexts, outermost first (each once)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]  # type: ignore[list-item]


def _botocore_kind(e: BaseException) -> str | None:
    """'transient', 'permanent' or None for botocore and aiohttp errors (imported lazily: optional here)."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return None
    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {}) or {}
        status = (e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if err.get("Code") in TRANSIENT_CODES or status in TRANSIENT_STATUS:
            return "transient"
        return "permanent"
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError | bx.NoRegionError | bx.ParamValidationError):
        return "permanent"
    if isinstance(e, bx.ConnectTimeoutError):  # before EndpointConnectionError, its parent: a slow connect
        return "transient"
    if isinstance(e, bx.EndpointConnectionError):  # nothing listens there, or the name does not resolve
        return "permanent"
    if isinstance(e, bx.ReadTimeoutError | bx.ConnectionClosedError | bx.ResponseStreamingError):
        return "transient"
    if isinstance(e, bx.IncompleteReadError | bx.HTTPClientError):
        return "transient"
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return None
    if isinstance(e, aiohttp.ClientConnectorError):  # refused or unresolvable: checked before ClientOSError
        return "permanent"
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        return "transient"
    if isinstance(e, aiohttp.ServerTimeoutError):
        return "transient"
    return None


def is_transient(exc: BaseException) -> bool:
    """True when the call that raised ``exc`` may succeed if made again."""
    links = list(chain(exc))
    kinds = [_botocore_kind(e) for e in links]
    if "permanent" in kinds or any(isinstance(e, PERMANENT_TYPES) for e in links):
        return False
    if "transient" in kinds or any(isinstance(e, TRANSIENT_TYPES) for e in links):
        return True
    return any(isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS for e in links)
