"""Tasks of the full pipeline that belong to no single stage: where the images and the store are, and
the summary of a run. Plain functions first (callable without Prefect), tasks last."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import fs, images, metrics
from storage.layout import Root, RunLayout
from storage.train_log import loss_headline
from tasks.config import DataConfig
from tasks.encode import BuiltStore
from tasks.eval_record import EvalRecord
from tasks.train import TrainResult

BUILTIN_DIGITS = "builtin:digits"
log = logging.getLogger("dumo.pipeline")


@dataclass(frozen=True)
class DataLocation:
    """Where a run's images are read from and its latent store is written (build_latents' URLs)."""

    source: str
    store: str


def source_and_store(root_url: str, data: DataConfig) -> DataLocation:
    """The image tree URL (writing the builtin digits tree under the root first when asked) and the
    latent store URL of a run."""
    root = Root(root_url)
    source = data.source
    if source == BUILTIN_DIGITS:
        source = root.digits_images(data.upscale)
        if not fs.exists(fs.join(source, "9")):  # the last class folder is written last
            tree = images.write_digits(source, upscale=data.upscale)
            log.info(f"wrote the scikit-learn digits tree: {len(tree.files)} images in {source}")
    elif source.startswith("builtin:"):
        raise ValueError(f"unknown builtin source {source!r}; the one builtin is {BUILTIN_DIGITS!r}")
    return DataLocation(source, root.latent_store(data.store_name))


@task(name="locate-data", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def locate_data_task(root_url: str, data: DataConfig) -> DataLocation:
    return source_and_store(root_url, data)


def _final_losses(train: TrainResult) -> str:
    """``final loss_v .. loss_u .. (weighted loss ..)``: the unweighted terms first (see loss_headline)."""
    losses = {"loss": train.final_loss, "loss_v": train.final_loss_v, "loss_u": train.final_loss_u}
    return "final " + loss_headline(losses)


@task(name="summarize", cache_policy=NO_CACHE)
def summarize_task(name: str, build: BuiltStore, train: TrainResult, record: EvalRecord) -> dict[str, Any]:
    """The summary of run ``name``, also published as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    table = metrics.format_table(record.to_json())
    text = (
        f"## dumo run `{name}`\n\nstore `{build.store}` ({build.num_rows} rows); "
        f"trained to step {train.step} ({_final_losses(train)}, "
        f"{train.steps_per_s:.2f} steps/s); checkpoint `{train.checkpoint_url}`\n\n{table}\n"
    )
    key = "dumo-summary-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())
    create_markdown_artifact(markdown=text, key=key, description=f"dumo run {name}")
    return {
        "run": name,
        "store": build.store,
        "checkpoint_url": train.checkpoint_url,
        "step": train.step,
        "final_loss": train.final_loss,
        "final_loss_v": train.final_loss_v,
        "final_loss_u": train.final_loss_u,
        "eval_dir": record.eval_dir,
        "loss_curve": RunLayout.of_url(train.run_url).loss_curve,
        "metrics": record.to_json()["samplers"],
        "table": table,
    }
