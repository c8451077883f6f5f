"""A local Prefect server with the project's deployments and one worker: what `make serve` / `make stop` run.

    python -m tasks.local_server start    # server on 127.0.0.1 -> pool -> `prefect deploy --all` -> worker
    python -m tasks.local_server status   # what runs, and the API URL
    python -m tasks.local_server deploy   # deploy prefect.yaml again (after editing it) to the running server
    python -m tasks.local_server stop     # worker, then server, by PID

State lives in ``.serve/`` in the repository: ``home/`` (PREFECT_HOME: the server's SQLite database),
``server.pid``, ``worker.pid``, ``api_url`` and the two processes' logs. Settings from the environment:
``DUMO_PREFECT_PORT`` (default 4200, or a free port when 4200 is taken), ``DUMO_WORK_POOL`` (default
``dumo-local``) and ``DUMO_ROOT`` (the root that ``reevaluate-checkpoints/nightly`` scans; default the demo's
``demo-root`` in the repository). prefect.yaml reads the last two as ``{{ $DUMO_WORK_POOL }}`` and
``{{ $DUMO_ROOT }}``.

``LocalPrefect`` holds the steps (start the server, wait until healthy, create the pool, deploy, run a
worker once or for good, stop); the end-to-end test uses the same class. Each Prefect step is a CLI command
in a subprocess, the command a user would type (the health check is a plain HTTP GET); Prefect is imported
only to install the crash automation (tasks.zombies). Processes are found and stopped with psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = PROJECT_DIR / ".serve"
HOST = "127.0.0.1"
DEFAULT_PORT = 4200
DEFAULT_POOL = "dumo-local"
DEFAULT_ROOT = "demo-root"  # the demo's root (configs/demo.yaml), made absolute against the repository


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone; one that is our child is reaped here)."""
    import psutil

    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _command_line(pid: int) -> str:
    """The process's command line ('' when it is gone); used to check a PID file still names our process."""
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first. Flow runs, and the training ranks they launch, start
    sessions of their own, so a process group does not reach them; their parent links do."""
    import psutil

    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


def terminate_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM to ``pid`` and its descendants, then SIGKILL to whatever is left after ``grace`` seconds.

    A Prefect worker turns its first SIGTERM into a graceful shutdown that waits for its flow runs to end
    (and a server forwards it to uvicorn), so the SIGKILL is what bounds the wait."""
    tree = process_tree(pid)  # taken first: children of a killed parent are re-parented and lost from view
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while any(pid_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        tree = [p for p in tree if pid_alive(p)]
        if not tree:
            return


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class LocalPrefect:
    """One local Prefect server + one process work pool, with PIDs, URL and logs under ``state_dir``.

    ``env`` is added to the environment of every command (the test uses it for a fast worker poll); the
    worker's environment is also what its flow runs get.
    """

    state_dir: Path = STATE_DIR
    port: int | None = None  # None: DEFAULT_PORT when free, else any free port
    pool: str = DEFAULT_POOL
    root: str = DEFAULT_ROOT
    project_dir: Path = PROJECT_DIR
    env: dict[str, str] = field(default_factory=dict)
    prefect: str = str(Path(sys.executable).with_name("prefect"))  # the CLI of this interpreter's environment

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        if "://" not in self.root:  # a local root: absolute, so flow runs do not depend on their cwd
            self.root = str((self.project_dir / self.root).resolve())
        if self.url_file.exists() and self.running("server"):  # a server started earlier keeps its port
            self.port = int(self.url_file.read_text().split(":")[-1].split("/")[0])

    # --- where things are -----------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.state_dir / "home"

    @property
    def url_file(self) -> Path:
        return self.state_dir / "api_url"

    def pid_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    @property
    def api_url(self) -> str:
        if self.port is None:
            raise RuntimeError("no port chosen yet: start the server first")
        return f"http://{HOST}:{self.port}/api"

    def command_env(self) -> dict[str, str]:
        """The environment of every Prefect command: this server, this home, no telemetry, the pool/root
        that prefect.yaml reads, and wide lines (Rich wraps CLI output at 80 columns otherwise)."""
        env = dict(os.environ)
        env.update(
            COLUMNS="200",
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DUMO_WORK_POOL=self.pool,
            DUMO_ROOT=self.root,
        )
        env.update(self.env)
        return env

    # --- processes ------------------------------------------------------------------------------------
    def running(self, name: str) -> int | None:
        """The PID in ``<name>.pid`` when that process is alive and is a Prefect process, else None."""
        path = self.pid_file(name)
        if not path.exists():
            return None
        pid = int(path.read_text().strip())
        if pid_alive(pid) and "prefect" in _command_line(pid):
            return pid
        return None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as r:
                return r.status == 200 and json.loads(r.read()) is True
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _spawn(self, name: str, argv: list[str]) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file(name), "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=self.project_dir,
                env=self.command_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # own process group: stopped with its children
        self.pid_file(name).write_text(f"{proc.pid}\n")
        return proc.pid

    def start_server(self, timeout: float = 180.0) -> int:
        """Start ``prefect server start`` on 127.0.0.1 and wait until /api/health answers."""
        if self.port is None:
            self.port = DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port()
        elif not port_is_free(self.port):
            raise RuntimeError(f"port {self.port} on {HOST} is taken; set DUMO_PREFECT_PORT to another one")
        self.home.mkdir(parents=True, exist_ok=True)
        # Not `prefect server start --background`: in 3.8.8 it leaves the server's stdout and stderr on pipes
        # that nobody reads once the CLI exits (the log is lost, and a server that writes more than a pipe
        # buffer blocks); a foreground server of our own logs to .serve/server.log and is found by its PID.
        pid = self._spawn("server", [self.prefect, "server", "start", "--host", HOST, "--port", str(self.port)])
        self.url_file.write_text(self.api_url + "\n")
        self.wait_healthy(pid, timeout)
        return pid

    def wait_healthy(self, pid: int, timeout: float = 180.0) -> None:
        """Wait until the server with ``pid`` answers /api/health; stop it and raise if it does not."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not pid_alive(pid):
                raise RuntimeError(
                    f"prefect server exited during start; {self.log_file('server')}:\n" + _tail(self.log_file("server"))
                )
            if time.monotonic() > deadline:
                self.stop_process("server")
                raise TimeoutError(
                    f"prefect server not healthy at {self.api_url} after {timeout:.0f} s; "
                    f"{self.log_file('server')}:\n" + _tail(self.log_file("server"))
                )
            time.sleep(0.5)

    def cli(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``prefect --no-prompt <args>`` against this server from the repository directory."""
        argv = [self.prefect, "--no-prompt", *args]
        try:
            out = subprocess.run(
                argv,
                cwd=self.project_dir,
                env=self.command_env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"`prefect {' '.join(args)}` did not finish in {timeout:.0f} s") from exc
        if check and out.returncode != 0:
            raise RuntimeError(
                f"`prefect {' '.join(args)}` failed (exit {out.returncode}):\n"
                f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
            )
        return out

    def create_pool(self) -> bool:
        """Create the process work pool; True if created, False if it existed (then it is left as it is)."""
        if self.cli("work-pool", "inspect", self.pool, check=False).returncode == 0:
            return False
        self.cli("work-pool", "create", self.pool, "--type", "process")
        return True

    def deploy(self) -> list[str]:
        """``prefect --no-prompt deploy --all`` from prefect.yaml in the repository; returns the names of the
        deployments it created or updated. Run from the repository, it records a pull step that makes each
        flow run start in the repository."""
        out = self.cli("deploy", "--all", "--prefect-file", str(self.project_dir / "prefect.yaml")).stdout
        return re.findall(r"Deployment '([^']+)' successfully", out)

    def start_worker(self) -> int:
        """A long-running process worker on the pool, started in the repository directory."""
        return self._spawn("worker", [self.prefect, "worker", "start", "--pool", self.pool, "--type", "process"])

    def run_worker_once(self, timeout: float = 900.0) -> str:
        """``prefect worker start --run-once``: submit every flow run of the pool that is due, wait for them,
        exit. Returns the worker's output; past ``timeout`` the worker and its flow runs are killed and
        TimeoutError says so."""
        argv = [self.prefect, "worker", "start", "--pool", self.pool, "--type", "process", "--run-once"]
        proc = subprocess.Popen(
            argv,
            cwd=self.project_dir,
            env=self.command_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            terminate_tree(proc.pid, grace=5.0)
            out, _ = proc.communicate()
            raise TimeoutError(
                f"`prefect worker start --run-once` still running after {timeout:.0f} s; killed it"
                " and its flow runs. Its output ended with:\n" + out[-6000:]
            ) from None
        if proc.returncode != 0:
            raise RuntimeError(f"`prefect worker start --run-once` exited with {proc.returncode}:\n{out[-6000:]}")
        return out

    def stop_process(self, name: str, grace: float = 10.0) -> bool:
        """Stop the process in ``<name>.pid`` with everything it started; True if one was running."""
        pid = self.running(name)
        self.pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        terminate_tree(pid, grace)
        return True

    # --- the whole thing ------------------------------------------------------------------------------
    def start(self) -> None:
        """Server (reused when already running) -> pool -> deploy -> worker (reused when running)."""
        if pid := self.running("server"):
            self.wait_healthy(pid)
            print(f"server already running (pid {pid}) at {self.api_url}")
        else:
            t0 = time.monotonic()
            pid = self.start_server()
            print(
                f"server started (pid {pid}) at {self.api_url} in {time.monotonic() - t0:.0f} s; "
                f"log {self.log_file('server')}"
            )
        created = self.create_pool()
        print(f"work pool {self.pool!r} (process) {'created' if created else 'already there'}")
        t0 = time.monotonic()
        names = self.deploy()
        print(
            f"deployed prefect.yaml in {time.monotonic() - t0:.0f} s: {', '.join(names)}"
            f" (reevaluate-checkpoints/nightly scans {self.root})"
        )
        from tasks.zombies import install_crash_automation  # killed flow runs end as Crashed

        print(install_crash_automation(self.api_url))
        if pid := self.running("worker"):
            print(f"worker already running (pid {pid})")
        else:
            pid = self.start_worker()
            print(f"worker started (pid {pid}) on pool {self.pool!r}; log {self.log_file('worker')}")
        print(
            "\nnext:\n"
            f"  export PREFECT_API_URL={self.api_url}\n"
            "  prefect deployment run dumo/full-pipeline\n"
            f"UI: http://{HOST}:{self.port}  -  stop everything with `make stop`"
        )

    def stop(self) -> None:
        """Worker first (it reports to the server), then the server."""
        for name in ("worker", "server"):
            print(f"{name}: {'stopped' if self.stop_process(name) else 'was not running'}")
        self.url_file.unlink(missing_ok=True)

    def status(self) -> int:
        server, worker = self.running("server"), self.running("worker")
        url = self.api_url if self.port else "-"
        health = "healthy" if server and self.healthy() else "not answering"
        print(f"server: {f'pid {server}, {health}' if server else 'not running'} ({url})")
        print(f"worker: {f'pid {worker}' if worker else 'not running'} (pool {self.pool!r})")
        return 0 if server and worker else 1


def from_environment() -> LocalPrefect:
    port = os.environ.get("DUMO_PREFECT_PORT")
    return LocalPrefect(
        port=int(port) if port else None,
        pool=os.environ.get("DUMO_WORK_POOL", DEFAULT_POOL),
        root=os.environ.get("DUMO_ROOT", DEFAULT_ROOT),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.local_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "deploy"])
    args = parser.parse_args(argv)
    local = from_environment()
    if args.command == "start":
        local.start()
    elif args.command == "stop":
        local.stop()
    elif args.command == "deploy":
        if not (local.running("server") and local.healthy()):
            print("no server running: `make serve` first", file=sys.stderr)
            return 1
        print("deployed: " + ", ".join(local.deploy()))
    else:
        return local.status()
    return 0


if __name__ == "__main__":
    sys.exit(main())
