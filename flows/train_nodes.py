"""The ``train-nodes`` flow: one training run across several nodes, one torchrun launcher per node.

    start the launchers (here) or submit the job (cluster scheduler) -> follow the committed checkpoints

See tasks/train_nodes.py for how the flow and the nodes meet: only through the run's storage root, so the
flow can run anywhere that reaches the root (and the Prefect API), not on the training nodes themselves.
"""

from __future__ import annotations

import tempfile

from prefect import flow, get_run_logger

from tasks.config import load_config
from tasks.train import NodeLaunch, TrainResult, free_port, preflight, resolve
from tasks.train_nodes import follow_run, start_local_nodes, stop_local_nodes, submit_job


@flow(name="train-nodes")
def train_nodes_flow(
    config: str,
    overrides: list[str] | None = None,
    nnodes: int = 2,
    submit: str | None = None,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    timeout_s: float = 7 * 86400,
    poll_s: float = 5.0,
) -> TrainResult:
    """Train ``config`` (a preset or YAML path the nodes can read too) with ``overrides`` on ``nnodes`` nodes.

    Args:
        submit: None starts the ``nnodes`` launchers on this host (rendezvous on 127.0.0.1); else a shell
            command that submits the job to the cluster's scheduler, formatted with ``{nnodes}``,
            ``{master_addr}``, ``{master_port}``, ``{config}`` and ``{run}`` (docs/scaling.md has examples).
        timeout_s, poll_s: how long to follow the run, and how often to look at its checkpoints.
    Returns the run's result (its last committed checkpoint, the last losses of its train log).
    """
    logger = get_run_logger()
    port = master_port or free_port()
    node0 = NodeLaunch(nnodes, 0, master_addr, port)
    overrides = list(overrides or [])
    cfg = resolve(load_config(config, overrides + node0.config_overrides()))
    facts = preflight(cfg, node0)  # a bad config fails here, before any node starts
    logger.info(
        f"run {cfg.name}: {nnodes} nodes x {cfg.train.num_processes} processes, to step {cfg.train.num_steps}"
        f" (resume step {facts.resume_step}), rendezvous {master_addr}:{port}"
    )
    if submit is not None:
        fields = {"nnodes": nnodes, "master_addr": master_addr, "master_port": port, "config": config, "run": cfg.name}
        job = submit_job(submit, fields)
        logger.info(f"submitted: {job}")
        return follow_run(cfg, timeout_s=timeout_s, poll_s=poll_s)
    log_dir = tempfile.mkdtemp(prefix="dumo-nodes-")
    procs = start_local_nodes(config, overrides, nnodes, port, log_dir)
    try:
        return follow_run(cfg, procs, log_dir, timeout_s=timeout_s, poll_s=poll_s)
    finally:
        stop_local_nodes(procs)
