"""S3 faults injected between s3fs and moto (tests/fault_proxy.py): transient ones are retried and lose
nothing, a lost answer to the lock's conditional PUT does not make it wait on itself, and a wrong S3 setup
fails at once in one line naming the variables to set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import s3fs

from storage import fs, metrics
from storage.errors import S3SetupError
from tests.fault_proxy import FaultProxy


@pytest.fixture
def proxy(s3_bucket, moto_endpoint, monkeypatch):
    with FaultProxy(moto_endpoint, lifetime_s=300) as p:
        monkeypatch.setenv("DUMO_S3_ENDPOINT_URL", p.url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield p
    s3fs.S3FileSystem.clear_instance_cache()


def test_the_proxy_injects_each_fault_kind_bounded_and_forwards_the_rest(proxy, s3_bucket):
    proxy.fault_rate, proxy.max_faults = 1.0, 0  # bounded at 0: everything forwarded
    fs.write_bytes(fs.join(s3_bucket, "a"), b"x" * 1000)
    assert fs.read_bytes(fs.join(s3_bucket, "a")) == b"x" * 1000 and proxy.faults == 0
    proxy.fault_rate, proxy.max_faults = 0.5, 12
    for i in range(12):  # s3fs and botocore retry each fault until the request gets through
        fs.write_bytes(fs.join(s3_bucket, f"k{i}"), bytes([i]) * 100)
    assert all(fs.read_bytes(fs.join(s3_bucket, f"k{i}")) == bytes([i]) * 100 for i in range(12))
    assert proxy.faults == 12 and set(proxy.counts) == {"503", "500", "drop_before", "drop_after"}, proxy.counts


def test_the_lock_recognises_its_own_token_after_a_lost_answer(proxy, s3_bucket):
    lock = fs.join(s3_bucket, "evals", metrics.LOCK_FILE)
    # S3 applies the conditional PUT, the answer is lost, the client's retry gets 412 Precondition Failed
    proxy.fail_next("drop_after", lambda method, path, headers: method == "PUT" and path.endswith(metrics.LOCK_FILE))
    got: list[float] = []

    def take() -> None:
        t0 = time.monotonic()
        with metrics.exclusive(lock, poll_s=0.05, stale_after_s=300):
            got.append(time.monotonic() - t0)
            assert json.loads(fs.read_text(lock))["pid"] == os.getpid()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(30)  # before: it waited 300 s for itself, then broke "a stale lock" held by its own pid
    assert got and got[0] < 10, "the lock waited on itself"
    assert proxy.counts["drop_after"] == 1
    assert not fs.exists(lock)


@pytest.mark.parametrize("case", ["no credentials", "unreachable endpoint", "not an S3 endpoint"])
def test_a_wrong_s3_setup_fails_in_seconds_naming_the_variables(case, moto_endpoint, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DUMO_S3"))}
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    env.update(AWS_EC2_METADATA_DISABLED="true", DUMO_S3_ENDPOINT_URL=moto_endpoint)
    if case != "no credentials":
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    if case == "unreachable endpoint":
        env["DUMO_S3_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard: nothing listens
    if case == "not an S3 endpoint":
        env["DUMO_S3_ENDPOINT_URL"] = f"{moto_endpoint}/moto-api/nothing-here"
    code = "from storage import fs; fs.exists('s3://some-bucket/latents/x.zarr/zarr.json')"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("storage.errors.S3SetupError: ")
    expected = "AWS_ACCESS_KEY_ID" if case == "no credentials" else "DUMO_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL)"
    assert expected in last
    assert seconds < 30, f"{case}: {seconds:.1f} s to fail"  # generous: the 2-core machine may be loaded


def test_setup_errors_are_permanent_and_a_bucket_that_is_missing_is_named(s3_bucket, moto_endpoint):
    from storage.errors import is_transient

    with pytest.raises(S3SetupError, match="no bucket 'not-there'") as info:
        fs.exists("s3://not-there/x")
    assert not is_transient(info.value)


def test_the_standard_aws_endpoint_variable_is_botocores_to_read(s3_bucket, moto_endpoint, monkeypatch):
    """Without DUMO_S3_ENDPOINT_URL, botocore itself takes AWS_ENDPOINT_URL_S3 (the project passes no
    endpoint), and a wrong one is named by that variable in the one-line error."""
    monkeypatch.delenv("DUMO_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    assert "endpoint_url" not in fs.storage_options(f"{s3_bucket}/x")
    fs.write_bytes(f"{s3_bucket}/runs/a.txt", b"through botocore's own endpoint")
    assert fs.read_bytes(f"{s3_bucket}/runs/a.txt") == b"through botocore's own endpoint"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard: nothing listens
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(S3SetupError, match=r"http://127.0.0.1:9 \(from AWS_ENDPOINT_URL_S3\)"):
        fs.exists(f"{s3_bucket}/runs/a.txt")
    s3fs.S3FileSystem.clear_instance_cache()
