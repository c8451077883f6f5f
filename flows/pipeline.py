"""The full pipeline, the flow named ``dumo`` (deployment ``dumo/full-pipeline``):

    images -> build-latents (skipped when the store is complete) -> train (resumes; optional inline
    evaluation every K checkpoints) -> final evaluation of the newest checkpoint -> summary artifact.

With a Prefect server, training emits ``dumo.checkpoint.saved`` and the ``evaluate-checkpoint/on-checkpoint``
deployment evaluates each checkpoint; without one (the demo), set ``eval.every_checkpoints`` to evaluate
inline.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.build_latents import build_latents
from tasks.config import DataConfig, EvalConfig, PipelineConfig, config_of
from tasks.encode import BuiltStore
from tasks.evaluate import evaluate_checkpoint, evaluate_checkpoint_task
from tasks.pipeline import locate_data_task, summarize_task
from tasks.train import train_task


def build_store(root: str, data: DataConfig) -> BuiltStore:
    """The latent store of ``data`` under ``root``, built (or found complete) from its images."""
    where = locate_data_task(root, data)
    return build_latents(where.source, where.store, data)


def inline_evaluator(protocol: EvalConfig, num_steps: int):
    """on_checkpoint callback: evaluate every K-th committed checkpoint before step ``num_steps`` while
    training goes on (``protocol.every_checkpoints``; the final one is evaluated after training)."""
    every = protocol.every_checkpoints
    if not every:
        return None
    seen = {"n": 0}

    def on_checkpoint(url: str, step: int) -> None:
        seen["n"] += 1
        if seen["n"] % every == 0 and step < num_steps:
            evaluate_checkpoint(url, protocol)

    return on_checkpoint


@flow(name="dumo", log_prints=True)
def full_pipeline(config: str | PipelineConfig = "demo", overrides: list[str] | None = None) -> dict[str, Any]:
    """Images to a trained one-step generator and its metrics. ``config``: a preset name in configs/
    (demo, imagenet256-b2, imagenet256-xl2) or a YAML path, or the config the caller parsed already (the
    CLI); ``overrides``: ``key.path=value`` strings (e.g. ``train.num_steps=2000``, ``root=s3://bucket/dumo``).
    Returns the run summary."""
    cfg = config_of(config, overrides)  # every invariant is checked before any work starts
    logger = get_run_logger()
    logger.info(
        f"run {cfg.name} on root {cfg.root}: {cfg.objective.name} {cfg.model.preset}, "
        f"{cfg.train.num_steps} steps of {cfg.train.batch_size_global} on {cfg.train.world_size} ranks"
    )
    build = build_store(cfg.root, cfg.data)
    train = train_task(cfg, on_checkpoint=inline_evaluator(cfg.eval, cfg.train.num_steps))
    record = evaluate_checkpoint_task(train.checkpoint_url, cfg.eval)
    summary = summarize_task(cfg.name, build, train, record)
    logger.info(f"run {cfg.name} done: results table, sample grid and loss curve in this flow run's artifacts")
    return summary


if __name__ == "__main__":
    full_pipeline(config="demo")
