"""A multi-node training job driven by a Prefect flow (flows/train_nodes.py).

A cluster starts one launcher per node (SLURM's ``srun``, a Kubernetes PyTorchJob): each runs
``dumo train --config C --nnodes N --node-rank K --master-addr HOST --master-port P`` and torchrun's
rendezvous on node 0 joins them into one DeepSpeed job. The flow does not run on those nodes. It either

- starts the N launchers itself on this host (``submit=None``; one machine, or a test), or
- hands the job to the cluster's scheduler with one shell command (``submit="sbatch job.sh"``, ``kubectl
  apply -f pytorchjob.yaml``...), which it formats with ``{nnodes}``, ``{master_addr}``, ``{master_port}``,
  ``{config}`` and ``{run}``,

and then follows the run where every node writes it: the committed checkpoints on the storage root. Each new
commit becomes a ``dumo.checkpoint.saved`` event; the flow returns when the last step is committed, and fails
when a launcher it started fails, or when nothing reaches the last step within ``timeout_s``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage import checkpoints as ckpts
from storage.layout import Root
from tasks.config import PipelineConfig
from tasks.train import PROJECT_DIR, CommitWatcher, NodeLaunch, TrainResult, announce_checkpoint

DUMO = os.path.join(os.path.dirname(sys.executable), "dumo")  # the console script of this environment


def node_argv(config_path: str, overrides: list[str], node: NodeLaunch) -> list[str]:
    """The command one node runs: the same on every node but for ``--node-rank``."""
    argv = [DUMO, "train", "--config", config_path]
    for item in overrides:
        argv += ["--set", item]
    argv += ["--nnodes", str(node.nnodes), "--node-rank", str(node.node_rank)]
    return [*argv, "--master-addr", node.master_addr, "--master-port", str(node.master_port), "--no-prefect"]


def start_local_nodes(
    config_path: str, overrides: list[str], nnodes: int, master_port: int, log_dir: str
) -> list[subprocess.Popen]:
    """Start ``nnodes`` launchers on this host (node ranks 0..N-1, rendezvous on 127.0.0.1), each in a process
    group of its own with its output in ``log_dir/node-K.log``."""
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (PROJECT_DIR, os.environ.get("PYTHONPATH")) if p))
    procs = []
    for rank in range(nnodes):
        node = NodeLaunch(nnodes, rank, "127.0.0.1", master_port)
        with open(os.path.join(log_dir, f"node-{rank}.log"), "wb") as log:
            argv = node_argv(config_path, overrides, node)
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    return procs


def stop_local_nodes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each launcher's process group (its ranks die with it), SIGKILL after 20 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@task(name="submit-training-job", cache_policy=NO_CACHE)
def submit_job(command: str, fields: dict[str, Any]) -> str:
    """Run the cluster's submit command once (formatted with ``fields``) and return what it printed (the job
    id, for sbatch). A non-zero exit fails the task with the command's own error output."""
    line = command.format(**{k: shlex.quote(str(v)) for k, v in fields.items()})
    get_run_logger().info(f"submitting the training job: {line}")
    done = subprocess.run(line, shell=True, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"submit command exited {done.returncode}: {line}\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no output)"


@task(name="follow-training-run", cache_policy=NO_CACHE)
def follow_run(
    cfg: PipelineConfig,
    procs: list[subprocess.Popen] | None = None,
    log_dir: str | None = None,
    timeout_s: float = 7 * 86400,
    poll_s: float = 5.0,
) -> TrainResult:
    """Wait until the run's checkpoint of ``train.num_steps`` is committed, emitting ``dumo.checkpoint.saved``
    for each commit seen on the way. ``procs``: launchers this flow started; one that fails ends the wait."""
    logger = get_run_logger()
    run = Root(cfg.root).run(cfg.name)
    commits = CommitWatcher(run, every_s=poll_s)
    deadline = time.monotonic() + timeout_s
    while True:
        for step in commits.new():
            logger.info(f"checkpoint step {step} committed at {run.checkpoint(step)}")
            announce_checkpoint(cfg.name, run.checkpoint(step), step, logger)
        latest = ckpts.latest(run)
        if latest is not None and latest >= cfg.train.num_steps:
            break
        codes = [p.poll() for p in procs or []]
        failed = [k for k, code in enumerate(codes) if code not in (None, 0)]
        if failed or (procs and all(code == 0 for code in codes)):
            # the others would wait for the missing node's ranks until torch's rendezvous timeout
            stop_local_nodes(procs or [])
            k = failed[0] if failed else 0
            log = _tail(Path(log_dir) / f"node-{k}.log") if log_dir else ""
            how = f"node {k}'s launcher exited {codes[k]}" if failed else "every launcher exited"
            raise RuntimeError(f"{how} before step {cfg.train.num_steps} was committed (latest {latest}):\n{log}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"run {run.url} reached step {latest} of {cfg.train.num_steps} in {timeout_s:.0f} s; the job goes"
                " on where it was submitted: run this flow again to keep following it"
            )
        time.sleep(poll_s)
    for proc in procs or []:  # the checkpoint of the last step is committed: the launchers are finishing
        proc.wait(timeout=120)
    logger.info(f"run {run.url}: step {latest} committed")
    return TrainResult.of_run(run)
