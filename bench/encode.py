"""Encode throughput: the build-latents flow against a bare loop over the same autoencoder and images,
1 vs 2 Dask workers, and the latent reader's throughput.

    python bench/encode.py                    # about 3 minutes on 2 idle CPU cores; no network, no GPU
    python bench/encode.py --glibc-defaults   # adds a bare loop with glibc's malloc defaults (+30 s)

Workload: scikit-learn's 1,797 digits, upscaled 8x to 64x64 (grey, fed to the VAE as RGB), encoded by a
small random diffusers AutoencoderKL (block_out_channels 32/64/128, 4 latent channels) into (4, 16, 16)
latents, each image and its mirror image, in shards of 128 rows. About 17 ms of encoder work per row on
one thread: enough that orchestration costs show, small enough to finish in minutes.

- bare loop: the same storage.autoencoders.encode_files over the same shards, in a fresh process with one
  torch thread, as a Dask worker process has (the nanny sets OMP_NUM_THREADS=1); no store, no Prefect, no
  Dask; with the malloc settings the flow gives its workers (flows.build_latents.WORKER_MALLOC_ENV), so the
  ratio measures orchestration alone (--glibc-defaults adds a run with glibc's defaults).
- flow, N workers: run_build_latents on an already running LocalCluster of N one-thread worker processes
  (dask_address), wall time of the whole flow (plan, create store, encode, write, finalize with its full
  re-read and checksums).
- flow, own cluster: the same, with the flow starting (and stopping) its LocalCluster: what `dumo
  build-latents` costs end to end on this machine.
- reader: LatentDataset(in_memory=True).global_batch(step, 256) in a loop, latents/s in one process.

Prints a table and writes JSON (bench/results/encode.json).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # per-shard lines would flood the table

import torch  # noqa: E402

from flows.build_latents import WORKER_MALLOC_ENV, run_build_latents, worker_env, worker_malloc_config  # noqa: E402
from storage.autoencoders import AutoencoderSpec, describe, encode_files  # noqa: E402
from storage.images import list_images, plan_shards, write_digits  # noqa: E402
from storage.latent_dataset import LatentDataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "encode.json"
UPSCALE, RESOLUTION, SHARD_SIZE = 8, 64, 128
TARGETS = {"flow_vs_bare": 0.90, "speedup_2_vs_1": 1.7, "reader_latents_per_s": 20_000}


def make_vae(path: str) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(32, 64, 128),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        sample_size=RESOLUTION,
    ).save_pretrained(path)


def bare_loop(source_url: str, vae: str) -> float:
    """Seconds to encode every shard with the flow's own encode function, no orchestration."""
    import diffusers  # noqa: F401  (imported before timing, as on the standing cluster's workers)

    torch.set_num_threads(1)
    spec = AutoencoderSpec("sd-vae", vae)
    source = list_images(source_url)
    t0 = time.perf_counter()
    info = describe(spec, 3, RESOLUTION)
    for shard in plan_shards(len(source), SHARD_SIZE):
        encode_files(source_url, source.files[shard.start : shard.stop], spec, info, RESOLUTION, shard.start)
    return time.perf_counter() - t0


def bare_loop_process(source_url: str, vae: str, malloc_env: dict[str, str]) -> float:
    """bare_loop in a fresh process: glibc reads its malloc settings once, at start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # a nanny may have set some
    env.update(malloc_env, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--bare", source_url, vae], env=env, check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def _cpu_seconds() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def flow_on_cluster(source_url: str, store: str, vae: str, workers: int) -> tuple[float, float]:
    """(seconds for the whole flow, CPU cores its workers used on average) on a running LocalCluster of
    ``workers`` one-thread processes. Cores used below ``workers`` means the machine had other work."""
    from distributed import Client, LocalCluster

    with (
        worker_malloc_config(),
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, env=worker_env()
        ) as cluster,
        Client(cluster) as client,
    ):
        # a standing cluster has its libraries imported (as the bare loop has); the model itself is still
        # loaded inside the flow, as the bare loop loads it inside its timing
        client.run(lambda: [__import__(m) for m in ("diffusers", "storage.autoencoders", "tasks.encode")] and None)
        cpu0 = sum(client.run(_cpu_seconds).values())
        t0 = time.perf_counter()
        run_build_latents(source_url, store, **_build_args(vae), dask_address=cluster.scheduler_address)
        seconds = time.perf_counter() - t0
        return seconds, (sum(client.run(_cpu_seconds).values()) - cpu0) / seconds


def busy_fraction(store: str, workers: int, seconds: float) -> float:
    """Share of the workers' wall time spent inside the encode stage function (from the shard records):
    what orchestration leaves for the work, and a measure that another load on the machine moves less."""
    from storage.latents import shard_records

    return sum(r["encode_seconds"] for r in shard_records(store)) / (workers * seconds)


def _build_args(vae: str) -> dict:
    return {"autoencoder": "sd-vae", "vae": vae, "resolution": RESOLUTION, "shard_size": SHARD_SIZE}


def reader_rate(store: str, seconds: float = 2.0, batch: int = 256) -> tuple[float, list[int]]:
    ds = LatentDataset(store, seed=0, in_memory=True)
    ds.global_batch(0, batch)
    n, step, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = ds.global_batch(step, batch)
        n, step = n + len(x), step + 1
    return n / (time.perf_counter() - t0), list(ds.latent_shape)


def main(glibc_defaults: bool = False) -> int:
    load_start = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="dumo-bench-encode-")
    src, vae = f"{tmp}/images/digits64", f"{tmp}/tiny-vae"
    write_digits(src, upscale=UPSCALE)
    make_vae(vae)
    rows = len(list_images(src))

    bare_default_s = bare_loop_process(src, vae, {}) if glibc_defaults else None
    bare_s = bare_loop_process(src, vae, WORKER_MALLOC_ENV)
    flow1_s, cores1 = flow_on_cluster(src, f"{tmp}/latents/w1.zarr", vae, workers=1)
    flow2_s, cores2 = flow_on_cluster(src, f"{tmp}/latents/w2.zarr", vae, workers=2)
    t0 = time.perf_counter()
    run_build_latents(src, f"{tmp}/latents/own.zarr", **_build_args(vae), workers=2, threads_per_worker=1)
    own_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_build_latents(src, f"{tmp}/latents/own.zarr", **_build_args(vae), workers=2)
    rerun_s = time.perf_counter() - t0
    write_digits(f"{tmp}/images/digits8")
    run_build_latents(
        f"{tmp}/images/digits8", f"{tmp}/latents/px.zarr", resolution=8, shard_size=256, workers=2, processes=False
    )
    reader_small, shape_small = reader_rate(f"{tmp}/latents/px.zarr")
    reader_vae, shape_vae = reader_rate(f"{tmp}/latents/w2.zarr")

    rate = lambda s: rows / s
    busy1 = busy_fraction(f"{tmp}/latents/w1.zarr", 1, flow1_s)
    busy2 = busy_fraction(f"{tmp}/latents/w2.zarr", 2, flow2_s)
    load = f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, torch {torch.__version__},"
        f" python {platform.python_version()}",
        "workload": f"{rows} digits at {RESOLUTION}x{RESOLUTION}, random AutoencoderKL (32/64/128) -> (4, 16, 16),"
        f" both flips, shards of {SHARD_SIZE} rows",
        "bare_loop_rows_per_s": rate(bare_s),
        "bare_loop_glibc_defaults_rows_per_s": rate(bare_default_s) if bare_default_s else None,
        "flow_1_worker_rows_per_s": rate(flow1_s),
        "flow_2_workers_rows_per_s": rate(flow2_s),
        "flow_own_cluster_2_workers_rows_per_s": rate(own_s),
        "rerun_complete_store_s": rerun_s,
        "flow_vs_bare": bare_s / flow1_s,
        "speedup_2_vs_1": flow1_s / flow2_s,
        "reader_latents_per_s": {str(shape_small): reader_small, str(shape_vae): reader_vae},
        "seconds": {
            "bare": bare_s,
            "bare_glibc_defaults": bare_default_s,
            "flow_1": flow1_s,
            "flow_2": flow2_s,
            "flow_own_cluster_2": own_s,
        },
        "busy_fraction": {"flow_1": busy1, "flow_2": busy2},
        "worker_cores_used": {"flow_1": cores1, "flow_2": cores2},
        "load_average_1min": load,
        "targets": TARGETS,
    }
    default_rate = rate(bare_default_s) if bare_default_s else float("nan")
    lines = [
        f"machine: {result['machine']}",
        f"workload: {result['workload']}",
        f"load average (1 min): {load} (other processes on the machine)",
        "",
        f"| {'measure':<54} | {'value':>12} | {'target':>8} |",
        f"| {'-' * 54} | {'-' * 12} | {'-' * 8} |",
        f"| {'bare loop, 1 thread, glibc malloc defaults (rows/s)':<54} | {default_rate:>12.1f} | {'':>8} |",
        f"| {'bare loop, 1 thread, worker malloc settings (rows/s)':<54} | {rate(bare_s):>12.1f} | {'':>8} |",
        f"| {'flow, running cluster, 1 worker (rows/s)':<54} | {rate(flow1_s):>12.1f} | {'':>8} |",
        f"| {'flow, running cluster, 2 workers (rows/s)':<54} | {rate(flow2_s):>12.1f} | {'':>8} |",
        f"| {'flow, own LocalCluster, 2 workers, end to end (rows/s)':<54} | {rate(own_s):>12.1f} | {'':>8} |",
        f"| {'flow 1 worker / bare loop':<54} | {bare_s / flow1_s:>12.2f} | {'>= 0.90':>8} |",
        f"| {'2 workers / 1 worker':<54} | {flow1_s / flow2_s:>12.2f} | {'>= 1.7':>8} |",
        f"| {'workers busy encoding, flow 1 worker / 2 workers':<54} | {busy1:>5.2f} {busy2:>6.2f} | {'':>8} |",
        f"| {'worker CPU cores used, flow 1 worker / 2 workers':<54} | {cores1:>5.2f} {cores2:>6.2f} | {'':>8} |",
        f"| {'re-run on a complete store (s)':<54} | {rerun_s:>12.2f} | {'':>8} |",
        f"| {f'reader, in memory, {tuple(shape_small)} (latents/s)':<54} | {reader_small:>12,.0f} | {'>= 20000':>8} |",
        f"| {f'reader, in memory, {tuple(shape_vae)} (latents/s)':<54} | {reader_vae:>12,.0f} | {'>= 20000':>8} |",
    ]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        print(bare_loop(sys.argv[2], sys.argv[3]))
        sys.exit(0)
    sys.exit(main(glibc_defaults="--glibc-defaults" in sys.argv))
