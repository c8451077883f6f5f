"""A Dask cluster the flow did not start: ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1,
started with Dask's own CLI as a user (or dask-jobqueue, or dask-kubernetes) would start them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = str(Path(__file__).resolve().parent.parent)
DASK = os.path.join(os.path.dirname(sys.executable), "dask")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_DIR, env.get("PYTHONPATH")) if p)
    env.pop("PREFECT_API_URL", None)  # a worker's environment names no API: the flow must hand it over
    return env


class ExternalCluster:
    """``dask scheduler`` plus named ``dask worker`` processes (one thread each, no nanny, so that a
    worker's pid is the process that runs its tasks and a kill is final). Stop with ``close()``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.workers: dict[str, subprocess.Popen] = {}
        scheduler_file = tmp / "scheduler.json"
        argv = [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
        self.scheduler = self._start([*argv, "--scheduler-file", str(scheduler_file)], "scheduler")
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {(tmp / 'scheduler.log').read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go, but give it a moment to be complete
        self.address = json.loads(scheduler_file.read_text())["address"]

    def _start(self, argv: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)

    def add_worker(self, name: str, resources: str | None = None) -> int:
        argv = [DASK, "worker", self.address, "--name", name, "--nthreads", "1", "--no-nanny", "--no-dashboard"]
        argv += ["--host", "127.0.0.1"] + (["--resources", resources] if resources else [])
        self.workers[name] = self._start(argv, name)
        return self.workers[name].pid

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        from distributed import Client

        with Client(self.address, timeout=timeout) as client:
            client.wait_for_workers(n, timeout=timeout)

    def kill(self, name: str) -> None:
        """SIGKILL: the worker is gone without a goodbye, as a lost node or a pre-empted job is."""
        proc = self.workers.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers.values(), self.scheduler]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.workers.clear()
