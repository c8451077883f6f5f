"""Prefect tasks of the build-latents flow: plan -> prepare store -> encode each shard -> finalize.

Each body is a few calls into ``storage``; the same functions work without Prefect (``.fn``).
The values that cross the tasks are typed: the plan is a ``storage.images.SourcePlan`` of ``ShardPlan``s,
the prepared store a ``PreparedStore`` whose ``target`` each encode task takes.
``encode_shard`` is cached on its inputs + its source (not the run id), keyed by its target (store URL and
id, autoencoder, its identity, the preprocessing) and its shard (index, rows, files and their fingerprint),
with results kept
under the store's root (``<root>/cache/results``), so a re-run on any machine of a cluster skips finished
shards. The shard records in the store stay the truth: ``finalize`` checks them, whatever the cache says.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.filesystems import RemoteFileSystem, WritableFileSystem
from prefect.tasks import Task, exponential_backoff

from storage import autoencoders, images, latents
from storage.autoencoders import AutoencoderSpec, describe
from storage.fs import is_local, local_path, storage_options
from storage.images import BadImagePolicy, ShardPlan, SourcePlan
from storage.layout import root_of_latent_store
from tasks.config import DataConfig, Device
from tasks.retry import retry_transient

FLIP_POLICY = "stored: axis 1 of mean/std = [original, horizontal flip]; the reader picks one uniformly"


def _retry_on_io_error(task: Task, task_run: Any, state: Any) -> bool:
    """Retry transient I/O errors (network, object store); never a file that does not decode."""
    return retry_transient(task, task_run, state)


def result_storage(store_url: str) -> Path | WritableFileSystem:
    """Where encode results persist: ``<root>/cache/results`` beside the store. A pathlib.Path for local
    roots (a str would be read as a block name); a saved fsspec block for object stores, whose settings
    carry the endpoint only (credentials come from the environment of each worker)."""
    cache = root_of_latent_store(store_url).result_cache
    if is_local(cache):
        return Path(local_path(cache))
    # Tasks on a Dask runner only take result storage that is saved server-side: one block per cache URL.
    block = RemoteFileSystem(basepath=cache, settings=storage_options(cache))
    block.save(f"dumo-results-{hashlib.sha256(cache.encode()).hexdigest()[:12]}", overwrite=True)
    return block


@dataclass(frozen=True)
class StoreTarget:
    """What an encode task writes into, and with what: the store (URL, and id: a recreated store is another
    one), the autoencoder, its identity (weights digest) and the preprocessing. All of it keys the cache."""

    store_url: str
    store_id: str
    autoencoder: AutoencoderSpec
    autoencoder_identity: dict[str, Any]
    preprocessing: dict[str, Any]  # {"crop", "resolution", "image_channels"}


@dataclass(frozen=True)
class PreparedStore:
    """A store ready for its encode tasks. ``recorded`` (shards already written, when a build resumes) is
    kept out of the target: it changes from run to run, and the cache key of a shard must not."""

    target: StoreTarget
    num_rows: int
    num_shards: int
    recorded: frozenset[int]


@dataclass(frozen=True)
class ShardResult:
    """What one encode task did: shard ``index`` holds ``rows`` rows (``skipped`` files left out); ``encoded``
    False when an earlier run had written it (its record proves it). ``cached``: the flow's mark of a result
    that Prefect's cache returned without running the task."""

    index: int
    rows: int
    skipped: int
    encoded: bool
    cached: bool = False


@dataclass(frozen=True)
class BuiltStore:
    """What a build-latents run did: the complete store, its rows, the shards it encoded now and those its
    cache already held (both 0 when the store was complete before), the store's report, the wall time."""

    store: str
    num_rows: int
    shards_encoded: int
    shards_cached: int
    report: dict[str, Any]  # the store's attrs["report"] (storage.latents.finalize)
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Only encode_shard is cached; the other tasks are cheap, and hashing a plan (every source file) is not.
@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards(source_url: str, shard_size: int) -> SourcePlan:
    """List the source tree and cut it into shards of ``shard_size`` rows, with per-shard fingerprints."""
    plan = images.plan_source(images.list_images(source_url), shard_size)
    get_run_logger().info(
        f"source {source_url}: {plan.num_rows} images in {len(plan.class_names)} classes,"
        f" {len(plan.shards)} shards of {shard_size} rows"
    )
    return plan


def _compatibility(info: latents.StoreInfo, wanted: dict[str, Any]) -> list[str]:
    """What differs between an existing store and the one asked for (empty when it can be resumed)."""
    have = dict(info.attrs)
    have["weights_digest"] = have["autoencoder"].get("weights_digest")
    have["autoencoder_name"] = have["autoencoder"].get("name")
    return [f"{k}: store has {have.get(k)!r}, asked for {v!r}" for k, v in wanted.items() if have.get(k) != v]


def expected_attrs(data: DataConfig) -> dict[str, Any]:
    """The store attributes that ``data`` fixes before any source is listed (see store_status)."""
    return {
        "autoencoder_name": data.autoencoder,
        "resolution": data.resolution,
        "latent_dtype": data.latent_dtype,
        "shard_size": data.shard_size,
    }


@task(name="prepare-store", cache_policy=NO_CACHE)
def prepare_store(store_url: str, plan: SourcePlan, data: DataConfig) -> PreparedStore:
    """Create the store, or reopen a half-built one made for the same source, autoencoder and settings."""
    spec = AutoencoderSpec(data.autoencoder, data.vae)
    resolution, latent_dtype, shard_size = data.resolution, data.latent_dtype, data.shard_size
    ae = describe(spec, plan.image_channels if spec.name == "pixels" else 3, resolution)
    wanted = {
        "dataset_fingerprint": plan.fingerprint,
        "autoencoder_name": spec.name,
        "weights_digest": ae.identity["weights_digest"],
        "resolution": resolution,
        "crop": images.CROP_RECIPE,
        "image_channels": ae.image_channels,
        "latent_shape": list(ae.latent_shape),
        "latent_dtype": latent_dtype,
        "shard_size": shard_size,
        "num_rows": plan.num_rows,
    }
    logger = get_run_logger()
    if latents.store_exists(store_url):
        info = latents.open_store(store_url)
        diffs = _compatibility(info, wanted)
        if diffs:
            raise latents.StoreError(
                f"{store_url} exists but was built differently ({'; '.join(diffs)}); delete it or pick another URL"
            )
        recorded = [r["index"] for r in latents.shard_records(store_url) if r]
        logger.info(f"store {store_url}: resuming, {len(recorded)}/{info.num_shards} shards already written")
    else:
        attrs = {
            "autoencoder": ae.identity,
            "latent_scale": ae.latent_scale,
            "latent_shift": ae.latent_shift,
            "pixel_range": list(images.PIXEL_RANGE),
            "crop": images.CROP_RECIPE,
            "resolution": resolution,
            "image_channels": ae.image_channels,
            "flip": FLIP_POLICY,
            "class_names": list(plan.class_names),
            "dataset_fingerprint": plan.fingerprint,
            "source_url": plan.source_url,  # where verify-store --repair re-encodes from
        }
        info = latents.create(store_url, plan.num_rows, ae.latent_shape, latent_dtype, shard_size, attrs)
        recorded = []
        c, h, w = ae.latent_shape
        logger.info(f"store {store_url}: created, {info.num_rows} rows of ({c}, {h}, {w}) {latent_dtype}")
    preprocessing = {"crop": images.CROP_RECIPE, "resolution": resolution, "image_channels": ae.image_channels}
    target = StoreTarget(store_url, info.store_id, spec, ae.identity, preprocessing)
    return PreparedStore(target, info.num_rows, info.num_shards, frozenset(recorded))


@task(
    name="encode-shard",
    # Exclusions go on INPUTS itself: a compound policy's "-" adds a second Inputs policy beside the first.
    cache_policy=(INPUTS - "source_url" - "batch_size" - "device") + TASK_SOURCE,
    persist_result=True,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=_retry_on_io_error,
)
def encode_shard(
    target: StoreTarget,
    shard: ShardPlan,
    on_bad_image: BadImagePolicy,
    source_url: str,
    batch_size: int | None = None,
    device: Device | None = None,
) -> ShardResult:
    """Encode one shard's images and write them as one whole Zarr shard, then its record. The cache key is
    the rest of the inputs: the target (``store_id``, ``autoencoder_identity`` and ``preprocessing`` are
    there for it alone), the shard and the bad-image policy. ``source_url``,
    ``batch_size`` and ``device`` are left out: the shard's files stand for the source, and the other two
    change how a shard is encoded, not which one."""
    store_url, shard_index, files = target.store_url, shard.index, shard.files
    record = latents.shard_record(store_url, shard_index)
    if record and record.get("source_fingerprint") == shard.fingerprint:
        # written by an earlier run whose cached result is gone: the record is the proof
        return ShardResult(shard_index, len(files), len(record["skipped"]), encoded=False)
    extra = {"source_fingerprint": shard.fingerprint}
    record = autoencoders.encode_shard(
        store_url, shard_index, source_url, files, target.autoencoder, on_bad_image, batch_size, extra, device
    )
    logger = get_run_logger()
    for s in record["skipped"]:
        logger.warning(f"shard {shard_index}: skipped bad image {s['source']}: {s['error']}")
    seconds = record["encode_seconds"]
    rate = len(files) / max(seconds, 1e-3)
    logger.info(f"shard {shard_index}: {len(files)} rows encoded in {seconds:.2f} s ({rate:.0f} rows/s)")
    return ShardResult(shard_index, len(files), len(record["skipped"]), encoded=True)


def encode_shard_for(store_url: str, refresh_cache: bool = False) -> Task:
    """``encode_shard`` with its results persisted beside ``store_url``; ``refresh_cache`` for shards that
    have no record in the store, so that a stale cache entry can never stand in for missing data."""
    return encode_shard.with_options(result_storage=result_storage(store_url), refresh_cache=refresh_cache)


@task(name="store-status", cache_policy=NO_CACHE)
def store_status(store_url: str, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"exists", "complete", ...attrs}`` of a store, without listing any source. With ``expect`` (attrs
    such as ``resolution``, ``autoencoder_name``), a complete store that differs is an error, not a no-op."""
    if not latents.store_exists(store_url):
        return {"exists": False, "complete": False}
    info = latents.open_store(store_url)
    diffs = _compatibility(info, expect or {})
    if info.complete and diffs:
        raise latents.StoreError(f"{store_url} is complete but was built differently ({'; '.join(diffs)})")
    return {"exists": True, **info.attrs}


@task(name="finalize-store", cache_policy=NO_CACHE)
def finalize_store(store_url: str) -> dict[str, Any]:
    """Verify every shard against its record, write the report, set ``complete: true``."""
    report = latents.finalize(store_url)
    converted = ", ".join(f"{kind} {e['count']}" for kind, e in report["conversions"].items())
    get_run_logger().info(
        f"store {store_url}: complete, {report['num_valid']}/{report['num_rows']} rows valid,"
        f" {report['num_skipped']} skipped" + (f"; images converted: {converted}" if converted else "")
    )
    return report
