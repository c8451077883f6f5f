"""build-latents on a Dask cluster it did not start: ``dask scheduler`` and two ``dask worker`` processes
on 127.0.0.1 (Dask's own CLI), GPU-style resources, one autoencoder load per worker process, a worker
killed mid-build, and the workers' task runs and logs in the flow's Prefect API."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from flows.build_latents import build_latents, dask_task_runner, task_resources
from storage import autoencoders, latents
from storage.images import write_digits
from tasks.config import DataConfig
from tests.dask_cluster import ExternalCluster

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
SHARD_SIZE = 60  # the 1,797 digits in 30 shards: enough tasks for a kill to land in the middle
NUM_SHARDS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalCluster]:
    c = ExternalCluster(tmp_path_factory.mktemp("dask"))
    try:
        c.add_worker("gpu-0", resources="GPU=1")  # the resource a GPU node's worker advertises
        c.add_worker("cpu-0")
        c.wait_for_workers(2)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("src") / "rgb"
    rng = np.random.default_rng(0)
    for wnid in ("n01", "n02"):
        (root / wnid).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / wnid / f"{k}.JPEG")
    return str(root)


def _worker_stats(cluster: ExternalCluster) -> dict[str, dict[str, int]]:
    """ENCODE_STATS of each live worker process, by worker name."""
    from distributed import Client

    with Client(cluster.address, timeout=30) as client:
        names = {addr: w["name"] for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        stats = client.run(lambda: dict(autoencoders.ENCODE_STATS))
    return {names[addr]: s for addr, s in stats.items()}


def test_task_resources() -> None:
    assert task_resources("cuda", None) == {"GPU": 1}
    assert task_resources("cpu", None) is None and task_resources(None, None) is None
    assert task_resources("cuda", {}) is None  # explicitly none
    assert task_resources(None, {"GPU": 1, "MEM": 2}) == {"GPU": 1, "MEM": 2}


def test_gpu_resource_and_one_autoencoder_per_worker(cluster: ExternalCluster, rgb_dir: str, tiny_vae_dir, tmp_path):
    store = str(tmp_path / "latents" / "vae.zarr")
    data = DataConfig(
        autoencoder="sd-vae",
        vae=tiny_vae_dir,
        resolution=16,
        shard_size=2,
        dask_address=cluster.address,
        device="cpu",  # what device="cuda" asks for by default, on a machine without one
    )
    summary = build_latents(rgb_dir, store, data, worker_resources={"GPU": 1})
    assert summary.num_rows == 8 and summary.shards_encoded == 4
    records = latents.shard_records(store)
    gpu_pid = cluster.workers["gpu-0"].pid
    assert {r["pid"] for r in records} == {gpu_pid}  # only the worker that has the resource ran them
    # the worker loaded the VAE for its first task and kept it for the other three
    assert [r["autoencoder_loads"] for r in records] == [1, 1, 1, 1]
    assert _worker_stats(cluster)["gpu-0"]["loads"] == 1


def _killer(cluster: ExternalCluster, store: str, name: str, after: int, out: dict) -> None:
    """Kill worker ``name`` as soon as ``after`` shards it wrote are committed in the store."""
    pid = cluster.workers[name].pid
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            mine = [r["index"] for r in latents.shard_records(store) if r and r["pid"] == pid]
        except (latents.StoreError, KeyError, FileNotFoundError):  # the store is still being created
            mine = []
        if len(mine) >= after:
            cluster.kill(name)
            out["committed_before_kill"] = mine
            return
        time.sleep(0.05)


def test_worker_killed_mid_build(cluster: ExternalCluster, tmp_path) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId

    src = str(tmp_path / "digits")
    write_digits(src)
    store = str(tmp_path / "latents" / "digits.zarr")
    before = _worker_stats(cluster)
    victim_pid, survivor = cluster.workers["cpu-0"].pid, "gpu-0"
    killed: dict = {}
    killer = threading.Thread(target=_killer, args=(cluster, store, "cpu-0", 2, killed), daemon=True)
    killer.start()
    data = DataConfig(resolution=8, shard_size=SHARD_SIZE, dask_address=cluster.address)
    state = build_latents(src, store, data, return_state=True)
    killer.join(timeout=5)
    summary = state.result()
    assert killed, "the victim worker committed fewer than 2 shards before the build ended"
    assert "cpu-0" not in cluster.workers

    # every row, every checksum (finalize re-read and checked every shard before setting complete)
    assert summary.num_rows == 1797 and latents.is_complete(store)
    assert all(latents.verify_shard(store, i) is None for i in range(NUM_SHARDS))
    records = latents.shard_records(store)
    survivor_pid = cluster.workers[survivor].pid
    assert {r["pid"] for r in records} == {victim_pid, survivor_pid}
    by_victim = [r["index"] for r in records if r["pid"] == victim_pid]
    assert set(killed["committed_before_kill"]) <= set(by_victim)  # its committed shards were not redone
    # no shard written twice: the survivor encoded exactly the rows the victim had not committed
    encoded = _worker_stats(cluster)[survivor]["images"] - before[survivor]["images"]
    victim_rows = sum(r["stop"] - r["start"] for r in records if r["pid"] == victim_pid)
    assert encoded == 1797 - victim_rows

    # the workers reported to this flow's API (the test harness), not to servers of their own
    flow_run_id = state.state_details.flow_run_id
    survivor_shards = {r["index"] for r in records if r["pid"] == survivor_pid}
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
        deadline = time.monotonic() + 30  # a worker sends its logs in batches: the last may still be on the way
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            shards_logged = {int(m.message.split(":")[0].split()[1]) for m in logs if "rows encoded in" in m.message}
            if survivor_shards <= shards_logged or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    completed = Counter(r.name.rsplit("-", 1)[0] for r in runs if r.state and r.state.is_completed())
    assert completed["encode-shard"] >= NUM_SHARDS
    assert survivor_shards <= shards_logged


def test_dashboard_is_a_setting_that_works() -> None:
    with dask_task_runner(workers=1, processes=False, dashboard_address="127.0.0.1:0") as runner:
        link = runner.client.dashboard_link  # the client (and its cluster) start on first use
        assert link.startswith("http://") and ":8787/" not in link  # the port asked for (any free one)
        port = int(link.rsplit(":", 1)[1].split("/")[0])  # served on 127.0.0.1, as asked
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30) as response:
            assert response.status == 200 and b"Dask" in response.read()
    with dask_task_runner(workers=1, processes=False, dashboard_address=None) as runner:
        link = runner.client.dashboard_link  # the scheduler's HTTP server (health, metrics): no dashboard
        port = int(link.rsplit(":", 1)[1].split("/")[0])
        assert port != 8787
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30)


def test_workers_report_to_the_flows_ephemeral_api(cluster: ExternalCluster, tmp_path) -> None:
    """``dumo build-latents --dask-address`` with no Prefect server: the flow's run starts a temporary API
    of its own, and the workers, whose environment names no API, must use that one, not start their own."""
    import os
    import subprocess
    import sys

    log = cluster.tmp / "gpu-0.log"
    seen = log.stat().st_size
    write_digits(str(tmp_path / "digits"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a fresh home: no server, no harness
    dumo = os.path.join(os.path.dirname(sys.executable), "dumo")
    argv = [dumo, "build-latents", str(tmp_path / "digits"), str(tmp_path / "s.zarr"), "--autoencoder", "pixels"]
    argv += ["--resolution", "8", "--shard-size", "600", "--dask-address", cluster.address]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting temporary server" in done.stderr  # the flow's own ephemeral API
    worker_log = log.read_text()[seen:]
    assert "rows encoded" in worker_log  # the worker ran the shards...
    assert "Starting temporary server" not in worker_log  # ...reporting to the flow's API, not a server of its own
