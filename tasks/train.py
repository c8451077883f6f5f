"""The train task: check the config, launch the rank processes (``python -m tasks.ranks``), follow them.

    train_run(cfg, on_checkpoint=None) -> TrainResult(run_url, checkpoint_url, step, final_loss, final_loss_v,
                                                      final_loss_u, steps_per_s)

The whole config stops here: ``train_run`` resolves it and writes it into the run directory, where the ranks
read it back; the launcher below it is given the train section and the run's layout.

Launchers (``train.launcher``; ``auto`` picks by size): ``inline`` one process with RANK/WORLD_SIZE/...
set, no launcher; ``torchrun`` N processes on this machine, or on each node of a multi-node job when
``train_run`` is given a ``NodeLaunch`` (one launcher per node, as SLURM's ``srun`` or a Kubernetes
PyTorchJob starts them; torchrun's static rendezvous at the master address); ``deepspeed`` the deepspeed
launcher (hosts from ``train.hostfile``, reached by ssh/pdsh). Every check that can fail
runs before any process starts. Running the same config again resumes from the newest committed checkpoint.

The ranks' output is logged as it comes; what the run did is read from storage, where the ranks write it:
checkpoints from their commit markers (``CommitWatcher``), losses from the train log. After each commit,
``on_checkpoint(url, step)`` is called and, when a Prefect API is reachable, the event
``dumo.checkpoint.saved`` is emitted. Prefect is imported inside functions: ``train_run`` needs no server.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import checkpoints as ckpts
from storage import fs, latents
from storage.layout import Root, RunLayout
from storage.train_log import read_train_log
from tasks.config import PipelineConfig, TrainConfig, resolve
from tasks.modeling import dit_config, resume_check
from tasks.progress import PROGRESS_EVERY_S
from tasks.run_context import in_prefect_run, run_logger

EVENT = "dumo.checkpoint.saved"
STEP_LINE = re.compile(r"step (\d+)/(\d+) ")  # a rank's progress line; all of them are in train-log.jsonl
PROJECT_DIR = str(Path(__file__).resolve().parent.parent)
# Non-secret settings a rank on another node needs; credentials stay in each node's own environment.
FORWARDED_ENV_PREFIXES = ("DUMO_", "DS_ACCELERATOR", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class NodeLaunch:
    """This machine's place in a job started once per node: torchrun's ``--nnodes``, ``--node-rank``,
    ``--master-addr`` and ``--master-port`` (the rendezvous, on node 0). Every node runs the same config."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank {self.node_rank} not in [0, nnodes={self.nnodes})")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master port {self.master_port} is not a TCP port")

    def config_overrides(self) -> list[str]:
        """What this launch means for the run's config (the same on every node)."""
        return [f"train.num_nodes={self.nnodes}", "train.launcher=torchrun"]


@dataclass(frozen=True)
class TrainResult:
    """Where a run got to, read from its storage: the newest committed checkpoint and the last train-log
    record. ``steps_per_s``: this attempt's speed (0.0 when it had nothing to do, None when unknown)."""

    run_url: str
    checkpoint_url: str | None
    step: int | None
    final_loss: float | None  # weighted, as optimised (near-constant under adaptive weighting)
    final_loss_v: float | None  # unweighted: the figures that show learning
    final_loss_u: float | None
    steps_per_s: float | None

    @classmethod
    def of_run(cls, run: RunLayout, steps_per_s: float | None = None) -> TrainResult:
        """The run's state in storage; ``steps_per_s`` None: this attempt's speed, as the newest checkpoint's
        marker records it."""
        step = ckpts.latest(run)
        url = None if step is None else run.checkpoint(step)
        if url is not None and steps_per_s is None:
            steps_per_s = ckpts.read_marker(url).get("attempt", {}).get("steps_per_s")
        log = read_train_log(run)
        last = log[-1] if log else {}
        return cls(run.url, url, step, last.get("loss"), last.get("loss_v"), last.get("loss_u"), steps_per_s)


@dataclass(frozen=True)
class Preflight:
    """What the checks before launch found."""

    store_url: str
    num_samples: int
    resume_step: int | None  # the newest committed checkpoint (the ranks still check its digests)


def preflight(cfg: PipelineConfig, node: NodeLaunch | None = None) -> Preflight:
    """Everything that can be checked before a process starts; raises ValueError (or StoreError) in words."""
    t = cfg.train
    store_url = Root(cfg.root).latent_store(cfg.data.store_name)
    if not latents.store_exists(store_url):
        raise latents.StoreError(f"no latent store at {store_url}: build it first (dumo build-latents)")
    info = latents.open_store(store_url)
    if not info.complete:
        raise latents.StoreError(f"latent store {store_url} is not complete (finalize has not passed)")
    report = info.attrs.get("report") or {}
    num_samples = int(report.get("num_valid", info.num_rows))
    if t.batch_size_global > num_samples:
        raise ValueError(f"global batch {t.batch_size_global} > {num_samples} samples in {store_url}")
    model = dit_config(cfg.model, cfg.heads, info.latent_shape, len(info.class_names))  # raises on a bad shape
    if t.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("train.device is cuda but no CUDA device is visible")
    if node is not None and (node.nnodes != t.num_nodes or t.launcher != "torchrun"):
        raise ValueError(
            f"--nnodes {node.nnodes} needs train.num_nodes={node.nnodes} and train.launcher=torchrun, the config"
            f" has {t.num_nodes} and {t.launcher} (NodeLaunch.config_overrides gives them)"
        )
    if node is None and t.num_nodes > 1 and not os.path.isfile(t.hostfile or ""):
        raise ValueError(
            f"train.hostfile {t.hostfile!r} does not exist (needed for {t.num_nodes} nodes through the deepspeed"
            " launcher); or start one launcher per node: dumo train --nnodes N --node-rank K --master-addr HOST"
            " --master-port P"
        )
    if t.launcher == "inline" and t.world_size > 1:
        raise ValueError(f"launcher inline runs 1 process; world size is {t.world_size}: use torchrun or auto")
    run = Root(cfg.root).run(cfg.name)
    step = ckpts.latest(run)
    if step is not None:  # the ranks check again; failing here saves starting N processes for nothing
        resume_check(t, cfg.model, model, run.checkpoint(step))
    elif cfg.model.init_from and not fs.exists(cfg.model.init_from):
        raise FileNotFoundError(f"model.init_from: no file at {cfg.model.init_from} (a DiT/SiT .pt or .safetensors)")
    return Preflight(store_url, num_samples, step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    t: TrainConfig, run: RunLayout, port: int, env_file: str | None = None, node: NodeLaunch | None = None
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of the launcher of ``run``'s ranks (on this node of ``node``'s job)."""
    worker = ["-m", "tasks.ranks", run.root.url, run.name]
    if node is not None:  # torchrun's static rendezvous: global ranks in node-rank order, rank 0 on node 0
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(node.nnodes)]
        argv += ["--node_rank", str(node.node_rank), "--nproc_per_node", str(t.num_processes)]
        return [*argv, "--master_addr", node.master_addr, "--master_port", str(node.master_port), *worker], {}
    launcher = t.launcher
    if launcher == "auto":
        launcher = "deepspeed" if t.num_nodes > 1 else "inline" if t.world_size == 1 else "torchrun"
    if launcher == "inline":
        env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        return [sys.executable, *worker], {**env, "MASTER_PORT": str(port)}
    if launcher == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node"]
        return [*argv, str(t.num_processes), "--master_addr", "127.0.0.1", "--master_port", str(port), *worker], {}
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(t.num_processes)]
    argv += ["--master_port", str(port), "--no_local_rank"]  # the ranks read LOCAL_RANK from the environment
    if t.num_nodes > 1:
        argv += ["--hostfile", str(t.hostfile), "--num_nodes", str(t.num_nodes)]
    env = {"DS_ENV_FILE": env_file} if env_file else {}
    return [*argv, "--module", *worker[1:]], env


def _prefect_api_reachable() -> bool:
    return bool(os.environ.get("PREFECT_API_URL")) or in_prefect_run()


def emit_checkpoint_event(run_name: str, url: str, step: int) -> None:
    """``dumo.checkpoint.saved`` on the run's resource, payload {checkpoint_url, step}."""
    from prefect.events import emit_event

    resource = {"prefect.resource.id": f"dumo.run.{run_name}", "prefect.resource.name": run_name}
    emit_event(event=EVENT, resource=resource, payload={"checkpoint_url": url, "step": step})


def announce_checkpoint(
    run_name: str, url: str, step: int, log: Any, on_checkpoint: Callable[[str, int], None] | None = None
) -> None:
    """A commit seen: call ``on_checkpoint``, emit ``dumo.checkpoint.saved`` where Prefect listens. (Rank 0
    logs the commit itself, in the output the launcher logs; a follower that sees no rank output logs it.)"""
    if on_checkpoint is not None:
        on_checkpoint(url, step)
    if _prefect_api_reachable():
        try:
            emit_checkpoint_event(run_name, url, step)
        except Exception as exc:  # an event lost must not kill a training run
            log.warning(f"could not emit {EVENT} for step {step}: {type(exc).__name__}: {exc}")


class CommitWatcher:
    """The checkpoints a run commits from now on, read where the ranks write them (the markers, written
    last): each commit once, in step order. Steps committed before the watch began count again when written
    anew (a corrupt checkpoint passed over at resume, then redone); that can only happen until the run commits
    past the newest of them, so only until then are their markers read. A checkpoint deleted by retention
    before a look found it is not reported (nothing could load it any more)."""

    def __init__(self, run: RunLayout, every_s: float | None = None):
        self.run = run
        self.every_s = every_s if every_s is not None else 0.1 if fs.is_local(run.url) else 2.0
        self.before = {s: self._marker(s) for s in ckpts.committed_steps(run)}
        self.reported: set[int] = set()
        self.looked_at = float("-inf")

    def _marker(self, step: int) -> dict[str, Any] | None:
        try:
            return ckpts.read_marker(self.run.checkpoint(step))
        except FileNotFoundError:  # being replaced, or removed by retention, right now
            return None

    def new(self) -> list[int]:
        """Steps committed since the last look."""
        self.looked_at = time.monotonic()
        past_before = any(s > max(self.before) for s in self.reported) if self.before else True
        found = []
        for step in ckpts.committed_steps(self.run):
            if step in self.reported:
                continue
            if step in self.before:
                if past_before:
                    continue
                marker = self._marker(step)
                if marker is None or marker == self.before[step]:
                    continue
            found.append(step)
            self.reported.add(step)
        return found

    def due(self) -> list[int]:
        """``new()`` when ``every_s`` has passed since the last look, else nothing (costs no request)."""
        return self.new() if time.monotonic() - self.looked_at >= self.every_s else []


def _pump(stream: Any, name: str, out: queue.Queue) -> None:
    """Split a child's byte stream into lines on \\n and \\r (each progress-bar refresh is a line)."""
    buf = b""
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        buf += chunk
        *lines, buf = re.split(rb"\r\n|\r|\n", buf)
        for line in lines:
            if line.strip():
                out.put((name, line.decode("utf-8", "replace")))
    if buf.strip():
        out.put((name, buf.decode("utf-8", "replace")))
    out.put((name, None))


def _failure(code: int, err_dir: str, tail: deque) -> RuntimeError:
    """The first failing rank's traceback (the ranks write them), else the tail of the output."""
    files = sorted(Path(err_dir).glob("rank-*.txt"), key=lambda p: p.stat().st_mtime)
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    if files:
        lines = files[0].read_text().splitlines()[-40:]
        return RuntimeError(f"training failed ({how}); {files[0].stem} raised:\n" + "\n".join(lines))
    return RuntimeError(f"training failed ({how}); last output:\n" + "\n".join(tail))


def train_run(
    cfg: PipelineConfig, on_checkpoint: Callable[[str, int], None] | None = None, node: NodeLaunch | None = None
) -> TrainResult:
    """Train ``cfg`` (resuming from its newest committed checkpoint) and return where it got to. With
    ``node``, this is one node's launcher of a multi-node job; every node returns when the job ends, with the
    run's state as storage holds it."""
    log = run_logger("dumo.train")
    cfg = resolve(cfg)
    facts = preflight(cfg, node)
    run: RunLayout = Root(cfg.root).run(cfg.name)
    fs.write_text(run.config, cfg.to_yaml())
    t = cfg.train
    log.info(
        f"run {run.url}: {t.num_steps} steps, {t.world_size} ranks, ZeRO-{t.zero_stage}, {t.precision},"
        f" store {facts.store_url} ({facts.num_samples} samples), resume step {facts.resume_step}"
    )
    if facts.resume_step is not None and facts.resume_step >= t.num_steps:
        log.info(f"nothing to do: the run is at step {facts.resume_step} >= train.num_steps {t.num_steps}")
        return TrainResult.of_run(run, steps_per_s=0.0)
    tmp = tempfile.mkdtemp(prefix="dumo-train-")
    try:
        _launch(run, t, tmp, on_checkpoint, log, node)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TrainResult.of_run(run)


def _launch(
    run: RunLayout,
    t: TrainConfig,
    tmp: str,
    on_checkpoint: Callable[[str, int], None] | None,
    log: Any,
    node: NodeLaunch | None = None,
) -> None:
    """Start the launcher in a process group of its own, log its output, announce each checkpoint it commits,
    and raise with the failing rank's traceback if it fails."""
    err_dir = os.path.join(tmp, "errors")
    env = dict(os.environ)
    env.update(DUMO_ERROR_DIR=err_dir, DS_ACCELERATOR=t.device, PYTHONUNBUFFERED="1")
    # The ranks' stderr is this pipe: a tqdm bar there is one log line per refresh (256 INFO lines in one
    # run). Their "step N/M ..." lines, every train.log_every steps, are the progress instead.
    env["DUMO_NO_PROGRESS"] = "1"
    if node is not None and "DUMO_STAGING_DIR" not in env:  # node-local scratch: two "nodes" may share a host
        env["DUMO_STAGING_DIR"] = os.path.join(tmp, "staging")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_DIR, env.get("PYTHONPATH")) if p)
    env_file = None
    if t.launcher == "deepspeed" or t.num_nodes > 1:  # what pdsh carries to the other nodes
        env_file = os.path.join(tmp, "deepspeed_env")
        with open(env_file, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIXES))
    argv, extra = launch_command(t, run, free_port(), env_file, node)
    env.update(extra)
    commits = CommitWatcher(run)  # before the ranks start: every commit of theirs is new to it
    hosts_rank_0 = node is None or node.node_rank == 0  # one launcher of a job announces its commits

    def announce(steps: list[int]) -> None:
        for step in steps if hosts_rank_0 else []:
            announce_checkpoint(run.name, run.checkpoint(step), step, log, on_checkpoint)

    log.info("launching: " + " ".join(argv))
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, start_new_session=True
    )  # its own process group: stopped together below
    lines: queue.Queue = queue.Queue()  # two pump threads, so a slow on_checkpoint never blocks the ranks
    for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        threading.Thread(target=_pump, args=(stream, name, lines), daemon=True).start()
    tail: deque = deque(maxlen=60)
    last_step_line = float("-inf")
    try:
        open_streams = 2
        while open_streams:
            announce(commits.due())
            try:
                _, line = lines.get(timeout=commits.every_s)
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
                continue
            tail.append(line)
            if (m := STEP_LINE.match(line)) and m[1] != m[2]:  # every train.log_every steps: thinned by time
                if time.monotonic() - last_step_line >= PROGRESS_EVERY_S:
                    last_step_line = time.monotonic()
                    log.info(line)
            else:
                log.info(line)
        code = proc.wait()
        announce(commits.new())  # those committed since the last look
    finally:
        if proc.poll() is None:  # the parent failed or was interrupted: take the ranks down with it
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if code != 0:
        raise _failure(code, err_dir, tail)
    latest = ckpts.latest(run)  # every rank returns after the last commit (tasks.ranks.distributed.save)
    if latest is None or latest < t.num_steps:
        raise RuntimeError(
            f"the ranks exited without committing step {t.num_steps} (newest checkpoint: {latest}); last output:\n"
            + "\n".join(tail)
        )


@task(name="train", retries=0, cache_policy=NO_CACHE)
def train_task(
    cfg: PipelineConfig, node: NodeLaunch | None = None, on_checkpoint: Callable[[str, int], None] | None = None
) -> TrainResult:
    """Prefect task over ``train_run`` (``on_checkpoint(url, step)`` after each commit: the pipeline's inline
    evaluation). No retries: training resumes by itself when run again. The loss curve is published as an
    artifact the UI shows."""
    result = train_run(cfg, on_checkpoint, node)
    publish_loss_curve(RunLayout.of_url(result.run_url))
    return result


def publish_loss_curve(run: RunLayout) -> None:
    """runs/<run>/loss.png as a markdown artifact of the current run (nothing outside one)."""
    from tasks import artifacts

    if fs.exists(run.loss_curve):
        title = f"{run.name}: unweighted loss_v / loss_u (left), weighted loss (right)"
        key = artifacts.key_of("loss", run.name)
        artifacts.publish_png(key, fs.read_bytes(run.loss_curve), title, fs.display(run.loss_curve), title)
