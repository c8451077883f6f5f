"""The ``train`` flow: a config (preset name or YAML path) plus overrides -> one training task.

The task launches the DeepSpeed ranks as processes and resumes from the run's newest committed checkpoint,
so running the flow again continues a run; after each checkpoint it emits ``dumo.checkpoint.saved``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks.config import PipelineConfig, config_of
from tasks.train import NodeLaunch, TrainResult, train_task


@flow(name="train")
def train_flow(
    config: str | PipelineConfig = "demo", overrides: list[str] | None = None, node: dict[str, Any] | None = None
) -> TrainResult:
    """Train the run that ``config`` (a preset in configs/ or a YAML path, or the config the caller parsed
    already) with ``overrides`` (``key=value``, e.g. ``train.num_steps=1000``) describes. Returns where the run
    got to (TrainResult).
    ``node``: NodeLaunch's fields when this is node 0's launcher of a multi-node job (flows/train_nodes.py
    drives a whole multi-node job)."""
    cfg = config_of(config, overrides)  # validation errors surface here, before any process starts
    get_run_logger().info(f"resolved config of run {cfg.name}:\n{cfg.to_yaml()}")
    return train_task(cfg, None if node is None else NodeLaunch(**node))


if __name__ == "__main__":
    train_flow(config="demo")
