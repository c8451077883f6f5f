"""An S3 endpoint for tests: moto's server on 127.0.0.1, spoken to by real s3fs over HTTP.

tests/conftest.py makes them fixtures of every test module: request them; do not import them.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator

import pytest

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto server for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh empty bucket, ``s3://<name>``, with the environment that storage.fs reads (endpoint and
    credentials) set for this test only. moto's state is reset first."""
    import s3fs  # here, not at the top: conftest registers this fixture for every test, also where no s3fs is

    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("DUMO_S3_ENDPOINT_URL", moto_endpoint)
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")).read()
    s3fs.S3FileSystem.clear_instance_cache()  # cached instances would remember listings of the old state
    bucket = f"dumo-test-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True).mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
