"""What checking the store's per-shard checksums on read costs the training reader.

    python bench/store_verify.py [--rows 8192] [--repeats 3]

Workload: a synthetic store of SD-VAE geometry at 256 px, (4, 32, 32) float16 latents with both flips,
shards of 1024 rows, on local disk (random values, so zstd cannot shrink them much). Measured, best of
``--repeats``, in one process:
- in memory, unchecked: plain zarr reads of mean, std and label (what the reader did before);
- in memory, checked: ``LatentDataset(in_memory=True)``, which reads shard by shard and checks each
  shard's sha256 against its record;
- streaming: one epoch of ``global_batch(step, 256)`` with ``in_memory=False``, with every shard marked
  verified beforehand (unchecked) and as it comes (checked: each shard is read whole once and hashed).

Prints a table and writes JSON (bench/results/store_verify.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from storage import latents  # noqa: E402
from storage.latent_dataset import LatentDataset  # noqa: E402

SHAPE, SHARD, BATCH = (4, 32, 32), 1024, 256


def build(url: str, rows: int) -> None:
    latents.write_synthetic(url, rows, SHAPE, SHARD)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "s.zarr")
        build(url, args.rows)
        nbytes = 2 * args.rows * 2 * int(np.prod(SHAPE)) * 2

        def unchecked_memory() -> None:
            g = zarr.open_group(url, mode="r")
            g["mean"][:], g["std"][:], g["label"][:]

        def stream(checked: bool) -> None:
            ds = LatentDataset(url, in_memory=False)
            if not checked:
                ds._verified = set(range(ds.info.num_shards))
            for step in range(ds.steps_per_epoch(BATCH)):
                ds.global_batch(step, BATCH)

        rows = [
            ("in memory, unchecked (plain zarr reads)", best(unchecked_memory, args.repeats)),
            ("in memory, checked (LatentDataset)", best(lambda: LatentDataset(url, in_memory=True), args.repeats)),
            ("streaming epoch, unchecked", best(lambda: stream(False), args.repeats)),
            ("streaming epoch, checked on first touch", best(lambda: stream(True), args.repeats)),
        ]
    print(f"store: {args.rows} rows of {SHAPE} float16 x 2 flips, mean+std {nbytes / 2**20:.0f} MiB, local disk")
    print(f"{'reader':<44} {'seconds':>8} {'MiB/s':>8} {'vs unchecked':>13}")
    for k, (name, seconds) in enumerate(rows):
        base = rows[k - k % 2][1]
        print(f"{name:<44} {seconds:8.3f} {nbytes / 2**20 / seconds:8.0f} {seconds / base:12.2f}x")
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "rows": args.rows,
        "bytes": nbytes,
        "seconds": {name: round(s, 4) for name, s in rows},
    }
    path = Path(__file__).resolve().parent / "results" / "store_verify.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
