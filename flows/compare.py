"""The ``compare-objectives`` flow: flow_matching, meanflow and dumo trained on one store with the same
backbone, seed, batch and number of steps (optionally several budgets and seeds), each evaluated under
the same protocol, then a comparison table (markdown and JSON) and a plot of metric against sampling steps.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from flows.pipeline import build_store
from tasks.compare import ArmResult, arm_configs, check_identical, publish_comparison_task, store_shape
from tasks.config import PipelineConfig, config_of
from tasks.evaluate import evaluate_checkpoint_task
from tasks.train import train_task


@flow(name="compare-objectives", log_prints=True)
def compare_objectives(config: str | PipelineConfig = "demo", overrides: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate every arm of ``config``'s ``compare`` section (``config``: a preset name or YAML
    path, or the config the caller parsed already). Arms run one after another (each
    uses the whole machine). Re-running resumes unfinished arms and reuses finished ones and their metrics."""
    cfg = config_of(config, overrides)
    build = build_store(cfg.root, cfg.data)  # first: compute budgets count FLOPs on the store's latent shape
    arms = arm_configs(cfg, store_shape(build.store))
    check_identical(arms)  # before anything trains
    logger = get_run_logger()
    logger.info(
        f"comparing {list(cfg.compare.arms)} x seeds {list(cfg.compare.seeds)} x budgets "
        f"{list(dict.fromkeys(a.budget for a in arms))}: {len(arms)} runs"
    )
    results = []
    for i, arm in enumerate(arms, 1):
        t0 = time.perf_counter()
        trained = train_task(arm.config)
        seconds = time.perf_counter() - t0
        record = evaluate_checkpoint_task(trained.checkpoint_url, arm.config.eval)
        logger.info(f"arm {i}/{len(arms)} {arm.config.name}: trained to step {trained.step} in {seconds:.0f} s")
        results.append(ArmResult(arm, trained.checkpoint_url, record, round(seconds, 1)))
    written = publish_comparison_task(cfg.root, cfg.name, arms, results)
    logger.info(f"comparison in {written['dir']}; best 1-step class accuracy: {written['winner']}\n{written['table']}")
    return written


if __name__ == "__main__":
    compare_objectives(config="demo")
