"""A build-latents flow run SIGKILLed while it encodes: the re-run encodes only the shards that have no
record, and the finished store verifies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows.build_latents import run_build_latents
from storage import latents
from storage.images import write_digits

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
SHARD = 64  # 1,797 digits -> 29 shards


def _recorded(store: str) -> int:
    """Shards with a record; 0 while the store is being created (its arrays appear one by one)."""
    try:
        return sum(r is not None for r in latents.shard_records(store))
    except (KeyError, FileNotFoundError, latents.StoreError):
        return 0


def test_a_sigkilled_encode_resumes_with_only_the_missing_shards(tmp_path):
    from prefect.settings import PREFECT_API_URL

    source = str(tmp_path / "digits")
    write_digits(source)
    store = str(tmp_path / "latents" / "digits.zarr")
    code = (
        "from flows.build_latents import run_build_latents; "
        f"run_build_latents({source!r}, {store!r}, resolution=8, shard_size={SHARD}, workers=1, processes=False)"
    )
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}  # the harness's server
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while _recorded(store) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the encode ended before it was killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _recorded(store)
    assert 3 <= done < 29 and not latents.is_complete(store)
    summary = run_build_latents(source, store, resolution=8, shard_size=SHARD, workers=1, processes=False)
    assert summary.shards_encoded == 29 - done  # the killed run's shards are not encoded again
    assert latents.is_complete(store) and latents.verify(store) == []
