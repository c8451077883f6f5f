"""Evaluation flows.

``evaluate-checkpoint``: one committed checkpoint -> metrics.json, grid.png, samples.npz in its run's
evals directory, plus a results table and the grid as artifacts. prefect.yaml's trigger on
``dumo.checkpoint.saved`` passes the event payload (``checkpoint_url``, ``step``) as parameters.

``reevaluate-checkpoints``: every committed checkpoint of one run (or of all runs) under a root that has no
record for the protocol, evaluated one after another (each evaluation uses the whole machine); run on a
cron schedule, it catches checkpoints whose event was missed and protocols that changed.

Protocol overrides are typed parameters; left at None, each checkpoint's run config decides.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from tasks.config import FeatureExtractorName
from tasks.evaluate import (
    EvalRecord,
    check_checkpoint,
    evaluate_checkpoint_task,
    find_unevaluated_task,
    resolve_protocol,
)

# The protocol overrides both flows take as parameters (Prefect needs each spelt out in the signature).
PROTOCOL_PARAMETERS = (
    "protocol",
    "num_samples",
    "batch_size",
    "feature_extractor",
    "inception_weights",
    "reference_npz",
    "seed",
)


def _overrides(params: dict[str, Any]) -> dict[str, Any]:
    """The protocol overrides among a flow's parameters (``locals()``) that were given."""
    return {k: params[k] for k in PROTOCOL_PARAMETERS if params[k] is not None}


@flow(name="evaluate-checkpoint")
def evaluate_checkpoint_flow(
    checkpoint_url: str,
    step: int | None = None,
    protocol: str | None = None,
    num_samples: int | None = None,
    batch_size: int | None = None,
    feature_extractor: FeatureExtractorName | None = None,
    inception_weights: str | None = None,
    reference_npz: str | None = None,
    seed: int | None = None,
) -> EvalRecord:
    """Evaluate the committed checkpoint at ``checkpoint_url`` (``…/runs/<run>/checkpoints/step-N``).
    ``step``, when given (the event payload carries it), must match the URL. Returns the metrics record;
    a checkpoint already evaluated under the same protocol returns its record without sampling."""
    overrides = _overrides(locals())
    check_checkpoint(checkpoint_url, step)  # the same error as `dumo evaluate --no-prefect`
    eval_cfg = resolve_protocol(checkpoint_url, **overrides)
    return evaluate_checkpoint_task(checkpoint_url, eval_cfg)


@flow(name="reevaluate-checkpoints")
def reevaluate_checkpoints_flow(
    root: str,
    run: str | None = None,
    protocol: str | None = None,
    num_samples: int | None = None,
    batch_size: int | None = None,
    feature_extractor: FeatureExtractorName | None = None,
    inception_weights: str | None = None,
    reference_npz: str | None = None,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every committed checkpoint under ``root`` (of ``run``, or of all runs) that lacks a record
    for its protocol (its run's ``eval`` section with these overrides). Returns a summary per checkpoint
    evaluated: run, step, protocol and the metrics directory. A failed evaluation does not stop the others;
    the flow fails at the end, naming them."""
    overrides = _overrides(locals())
    todo = find_unevaluated_task(root, run, None, overrides)  # url -> its resolved protocol
    logger = get_run_logger()
    logger.info(f"{len(todo)} checkpoint(s) under {root} without metrics for their protocol")
    done, failed = [], []
    for url, eval_cfg in todo.items():
        state = evaluate_checkpoint_task(url, eval_cfg, return_state=True)
        if state.is_failed():
            failed.append(url)
            logger.error(f"evaluation of {url} failed: {state.message}")
            continue
        record: EvalRecord = state.result()
        done.append({"run": record.run, "step": record.step, "protocol": record.protocol, "eval_dir": record.eval_dir})
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} evaluations failed: {', '.join(failed)}")
    return done


if __name__ == "__main__":
    reevaluate_checkpoints_flow(root="demo-root")
