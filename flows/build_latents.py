"""The ``build-latents`` flow: an image tree on any fsspec URL -> a complete Zarr v3 latent store.

    plan-shards -> prepare-store -> encode-shard x N (on a Dask task runner) -> finalize-store

How to build is the ``data`` section of the config (tasks.config.DataConfig); where from and where to
are the ``source`` and ``store`` URLs (the full pipeline finds them from the data section and the root).
The encode tasks run on a ``DaskTaskRunner``: a LocalCluster sized to this machine by default, or an
existing cluster when ``data.dask_address`` is given (dask-jobqueue, dask-kubernetes, GPU workers...; give its
workers the environment WORKER_MALLOC_ENV at start, or the encoder runs slower there). With
``data.device="cuda"`` every encode task asks for one ``GPU`` resource (start GPU workers with
``--resources GPU=1``), and each worker process loads its autoencoder once for all its tasks. The workers
of either cluster report their task runs and logs to the API this flow reports to (docs/scaling.md).
A complete store built with the same settings is left alone (the source is not listed again); a half-built
one is resumed: shards with a record in the store hit the Prefect cache (or their record) and only the
missing ones are encoded.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from typing import Any

import dask
from prefect import flow, get_client, get_run_logger
from prefect.futures import as_completed
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

from tasks.config import DataConfig, Device
from tasks.encode import (
    BadImagePolicy,
    BuiltStore,
    PreparedStore,
    ShardResult,
    SourcePlan,
    encode_shard_for,
    expected_attrs,
    finalize_store,
    plan_shards,
    prepare_store,
    store_status,
)

# Dask's nanny starts worker processes with MALLOC_TRIM_THRESHOLD_=65536. Setting any glibc threshold stops
# glibc adapting its mmap threshold, so every large tensor is mmap'd and unmapped again: the encoder ran ~40%
# slower in a worker than in a plain process (36 vs 59 rows/s, bench/encode.py's VAE, one thread). These are
# the values glibc's own adaptation settles at on 64-bit Linux (mmap 32 MiB, trim twice that). glibc reads
# them once, at process start, so they must be in the nanny's pre-spawn environment, not a worker's ``env``.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}


def worker_malloc_config() -> contextlib.AbstractContextManager:
    """Dask config under which a LocalCluster's worker processes start with WORKER_MALLOC_ENV; it must be
    active when the cluster starts (a DaskTaskRunner starts its cluster lazily, on the first submit)."""
    pre_spawn = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    return dask.config.set({"distributed.nanny.pre-spawn-environ": {**pre_spawn, **WORKER_MALLOC_ENV}})


def flow_api_url() -> str | None:
    """The HTTP URL of the Prefect API this process reports to (a server, a test harness, or the ephemeral
    server a flow run without one starts), or None when there is none to hand over."""
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    return url if url.startswith("http") else None


def worker_env() -> dict[str, str]:
    """``env`` for the worker processes of a LocalCluster (the flow's own, or one you start yourself).
    Worker processes must report to the API this flow reports to: under a configured server they inherit
    PREFECT_API_URL from the environment; an ephemeral API (no server, or a test harness) is known only to
    this process's settings, so its URL is handed over, else each worker would start a server of its own."""
    if os.environ.get("PREFECT_API_URL"):
        return {}
    url = flow_api_url()
    return {"PREFECT_API_URL": url} if url else {}


def reporting_to_flow_api() -> contextlib.AbstractContextManager:
    """Settings under which tasks are submitted to an existing cluster: prefect-dask sends the submitting
    context's settings along with each task, and the worker runs the task under them. Its own environment
    names no API (started by dask-jobqueue, dask-kubernetes or by hand), so without this each worker
    process would start a temporary server of its own and its task runs and logs would never be seen."""
    url = flow_api_url()
    return temporary_settings(updates={PREFECT_API_URL: url}) if url else contextlib.nullcontext()


def dask_task_runner(
    workers: int | None = None,
    dask_address: str | None = None,
    threads_per_worker: int = 1,
    processes: bool = True,
    dashboard_address: str | None = None,
) -> DaskTaskRunner:
    """A runner on the cluster at ``dask_address``, else on a LocalCluster of ``workers`` workers (default:
    one per ``threads_per_worker`` CPU cores of this machine) with its dashboard at ``dashboard_address``
    (``:8787``, ``127.0.0.1:0`` for any free port; None: no dashboard, so that two builds on one machine
    never collide on a port)."""
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    n = workers or max(1, (os.cpu_count() or 1) // max(1, threads_per_worker))
    cluster_kwargs: dict[str, Any] = {
        "n_workers": n,
        "threads_per_worker": threads_per_worker,
        "processes": processes,
        "dashboard_address": dashboard_address,
    }
    if dashboard_address is None:
        # LocalCluster's dashboard_address=None still starts the scheduler's HTTP server, with the dashboard
        # whenever bokeh is installed, on :8787 (distributed 2026.8, Scheduler.start_http_server). Off means
        # off: no dashboard, and the health/metrics server on a free loopback port, so builds never collide.
        cluster_kwargs["scheduler_kwargs"] = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
    if processes:  # thread workers share this process's settings; only worker processes need telling
        cluster_kwargs["env"] = worker_env()
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)


def task_resources(device: Device | None, worker_resources: dict[str, float] | None) -> dict[str, float] | None:
    """The Dask resources of one encode task: as given, else one ``GPU`` when encoding on cuda (so a worker
    started with ``--resources GPU=1`` runs one encode at a time, and CPU-only workers run none)."""
    if worker_resources is not None:
        return worker_resources or None
    return {"GPU": 1} if device == "cuda" else None


def encode_shards(
    runner: DaskTaskRunner,
    prepared: PreparedStore,
    plan: SourcePlan,
    on_bad_image: BadImagePolicy = "fail",
    batch_size: int | None = None,
    device: Device | None = None,
    worker_resources: dict[str, float] | None = None,
) -> list[ShardResult]:
    """One encode task per shard on ``runner`` (started), with progress as shards finish. Every shard runs
    to its end; then the failures, if any, are raised together. A plain function, not a subflow: a subflow's
    parameters go to the Prefect API, and a plan lists every source file (1.28M for ImageNet).
    ``worker_resources``: Dask resources each task holds while it runs (``{"GPU": 1}``: one task per GPU)."""
    logger = get_run_logger()
    store_url = prepared.target.store_url
    cached_task, fresh_task = encode_shard_for(store_url), encode_shard_for(store_url, refresh_cache=True)
    futures = []
    for shard in plan.shards:
        task = cached_task if shard.index in prepared.recorded else fresh_task
        parameters = dict(
            target=prepared.target,
            shard=shard,
            on_bad_image=on_bad_image,
            source_url=plan.source_url,
            batch_size=batch_size,
            device=device,
        )
        # prefect-dask takes no resources argument; Dask reads them from the annotations active at submit
        with dask.annotate(resources=worker_resources) if worker_resources else contextlib.nullcontext():
            futures.append(runner.submit(task, parameters))
    total_rows, num_shards = plan.num_rows, len(futures)
    t0 = time.perf_counter()
    done_rows = encoded_rows = 0
    results, failures = [], []
    for k, future in enumerate(as_completed(futures), 1):
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            failures.append(result)
            logger.error(f"shard failed ({k}/{num_shards}): {result}")
            continue
        cached = future.state.name == "Cached"
        results.append(replace(result, cached=cached))
        done_rows += result.rows
        encoded_rows += 0 if cached or not result.encoded else result.rows
        rate = encoded_rows / max(time.perf_counter() - t0, 1e-9)
        how = "cached" if cached else ("encoded" if result.encoded else "already in store")
        logger.info(
            f"shard {result.index} {how} ({k}/{num_shards} done), {done_rows}/{total_rows} rows,"
            f" {rate:.0f} rows/s encoded"
        )
    if failures:
        shown = "; ".join(str(f) for f in failures[:5])
        raise RuntimeError(f"{len(failures)} of {num_shards} shards failed: {shown}")
    return sorted(results, key=lambda r: r.index)


@flow(name="build-latents")
def build_latents(
    source: str,
    store: str,
    data: DataConfig = DataConfig(),
    threads_per_worker: int = 1,
    processes: bool = True,
    batch_size: int | None = None,
    worker_resources: dict[str, float] | None = None,
) -> BuiltStore:
    """Encode the class-folder image tree at ``source`` into the latent store at ``store``.

    Args:
        source: ``<source>/<class>/<image>`` on any fsspec URL (local path, file://, s3://, memory://).
        store: the Zarr store URL, normally ``<root>/latents/<name>.zarr`` (results cache under ``<root>``).
        data: how to build: autoencoder (and vae), resolution, shard_size, latent_dtype, on_bad_image, the
            cluster (workers, or dask_address; dask_dashboard) and the device (see DataConfig). Its source,
            store_name and upscale are not read here: ``source`` and ``store`` are the URLs they led to.
        threads_per_worker, processes: the LocalCluster's workers (processes=False: threads, for tests).
        batch_size: images per autoencoder call (default: the autoencoder's).
        worker_resources: Dask resources per encode task; default ``{"GPU": 1}`` with device cuda, else none.

    Returns what it did (BuiltStore): the store URL, rows, shards encoded now and found cached, the store's
    report (skipped files), seconds.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    status = store_status(store, expected_attrs(data))
    if status["complete"]:
        logger.info(
            f"store {store} is complete ({status['num_rows']} rows, source {status['dataset_fingerprint']}):"
            " nothing to encode (the source was not listed again; delete the store to rebuild it). Its bytes are"
            f" checked against their checksums when read; `dumo verify-store {store}` checks them all now"
        )
        return BuiltStore(store, status["num_rows"], 0, 0, status["report"], round(time.perf_counter() - t0, 3))
    plan = plan_shards(source, data.shard_size)
    prepared = prepare_store(store, plan, data)
    worker_resources = task_resources(data.device, worker_resources)
    runner = dask_task_runner(data.workers, data.dask_address, threads_per_worker, processes, data.dask_dashboard)
    reporting = reporting_to_flow_api() if data.dask_address else contextlib.nullcontext()
    with worker_malloc_config(), runner, reporting:  # prefect-dask logs the dashboard's link when there is one
        results = encode_shards(runner, prepared, plan, data.on_bad_image, batch_size, data.device, worker_resources)
    report = finalize_store(store)
    seconds = time.perf_counter() - t0
    encoded = sum(1 for r in results if r.encoded and not r.cached)
    cached = sum(1 for r in results if r.cached)
    logger.info(f"build-latents: {store} complete, {report['num_rows']} rows in {seconds:.1f} s")
    return BuiltStore(store, report["num_rows"], encoded, cached, report, round(seconds, 3))


def run_build_latents(
    source: str,
    store: str,
    threads_per_worker: int = 1,
    processes: bool = True,
    batch_size: int | None = None,
    worker_resources: dict[str, float] | None = None,
    **data: Any,
) -> BuiltStore:
    """The flow with the fields of its DataConfig as keywords (``resolution=8, shard_size=4``), for tests and
    benchmarks; a subflow when called inside another flow."""
    return build_latents(source, store, DataConfig(**data), threads_per_worker, processes, batch_size, worker_resources)
