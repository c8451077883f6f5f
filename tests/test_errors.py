"""Every project exception survives pickling (Prefect results, Dask workers) with its type and message,
and the one retry classification says transient or permanent as documented in storage/errors.py."""

from __future__ import annotations

import errno
import importlib
import inspect
import pickle
import pkgutil

import aiohttp
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from storage.autoencoders import AutoencoderUnavailable
from storage.checkpoints import CheckpointCorruptError
from storage.errors import S3SetupError, is_transient
from storage.images import BadImageError
from storage.latents import StoreCorruptError, StoreError
from tasks.ranks.trainer import NonFiniteLossError

PACKAGES = ("storage", "tasks", "flows", "dumo_model")
EXAMPLES: dict[type, BaseException] = {
    BadImageError: BadImageError("s3://b/train/n01/x.JPEG", "not an image PIL can identify"),
    CheckpointCorruptError: CheckpointCorruptError("file:///r/step-0000004", ["trainer/a.pt has sha256 ..."]),
    StoreError: StoreError("no latent store at s3://b/latents/x.zarr"),
    StoreCorruptError: StoreCorruptError("s3://b/latents/x.zarr", 3, "(rows 96-128): checksum a != recorded b"),
    S3SetupError: S3SetupError("no S3 credentials found: set AWS_ACCESS_KEY_ID"),
    AutoencoderUnavailable: AutoencoderUnavailable("put the VAE in DIR"),
    NonFiniteLossError: NonFiniteLossError(40, 1, 0, 30),
}


def project_exceptions() -> set[type]:
    found = set()
    for package in PACKAGES:
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__.split(".")[0] in PACKAGES:
                    found.add(obj)
    return found


def example(cls: type) -> BaseException:
    """The example above, or ``cls("message")`` for a class added since (which must then take one)."""
    return EXAMPLES[cls] if cls in EXAMPLES else cls("an example message")


def _same(a: BaseException, b: BaseException) -> None:
    assert type(a) is type(b) and str(a) == str(b) and vars(a) == vars(b)


def test_every_project_exception_survives_a_pickle_round_trip():
    classes = project_exceptions()
    assert set(EXAMPLES) <= classes  # the discovery sees them all
    for cls in classes:
        exc = example(cls)
        _same(pickle.loads(pickle.dumps(exc)), exc)


def _raise(cls: type) -> None:
    raise example(cls)


def test_project_exceptions_cross_a_dask_worker_process_intact():
    from distributed import Client, LocalCluster

    classes = sorted(project_exceptions(), key=lambda c: c.__name__)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            futures = [client.submit(_raise, cls, pure=False) for cls in classes]
            for cls, future in zip(classes, futures):
                exc = future.exception()  # raised in the worker process, pickled back here
                _same(exc, example(cls))


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def _wrapped(cause: BaseException, err: int = errno.EIO) -> OSError:
    """What s3fs raises: an OSError with botocore's error as its cause."""
    exc = OSError(err, str(cause))
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    "exc",
    [
        _wrapped(_client_error(503, "SlowDown"), errno.EBUSY),
        _wrapped(_client_error(500, "InternalError"), errno.EREMOTEIO),
        _wrapped(_client_error(429, "TooManyRequests")),
        ReadTimeoutError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"),
        _wrapped(aiohttp.ServerDisconnectedError()),
        TimeoutError("read timed out"),
        ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        OSError(errno.EBUSY, "SlowDown"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_transient_errors_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        *EXAMPLES.values(),
        NoCredentialsError(),
        _wrapped(EndpointConnectionError(endpoint_url="http://127.0.0.1:9")),
        _wrapped(_client_error(403, "InvalidAccessKeyId")),
        _wrapped(_client_error(404, "NoSuchKey")),
        FileNotFoundError("s3://b/x"),
        PermissionError("denied"),
        ValueError("a bug"),
        OSError("reading s3://b/x: BadImageError"),
        _wrapped(BadImageError("x.png", "truncated")),
    ],  # fmt: skip
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_permanent_errors_are_not_retried(exc):
    assert not is_transient(exc)


def test_prefect_retry_conditions_use_the_classification():
    from prefect.states import Failed

    from tasks.encode import _retry_on_io_error
    from tasks.evaluate import _transient_io

    for condition in (_retry_on_io_error, _transient_io):
        assert condition(None, None, Failed(data=_wrapped(_client_error(503, "SlowDown"), errno.EBUSY)))
        assert not condition(None, None, Failed(data=EXAMPLES[CheckpointCorruptError]))  # was retried 3x (78 s)
        assert not condition(None, None, Failed(data=_wrapped(NoCredentialsError())))
