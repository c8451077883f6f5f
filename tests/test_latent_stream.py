"""The streaming reader over S3 (moto's server, real s3fs): bit for bit the in-memory reader's batches for
the same (seed, step) at any world size and after a resume, each shard read from the store once per node."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from storage import latents
from storage.fs import filesystem
from storage.latent_dataset import LatentDataset
from storage.latents import StoreCorruptError

NUM_ROWS, SHARD, SHAPE = 300, 64, (4, 4, 4)  # 5 shards, the last one short


def make_store(url: str) -> str:
    latents.write_synthetic(url, NUM_ROWS, SHAPE, SHARD, latent_shift=0.1, excluded_rows=[SHARD + 3])
    return url


def test_streaming_is_the_in_memory_reader_bit_for_bit(s3_bucket: str, tmp_path) -> None:
    store = make_store(f"{s3_bucket}/latents/synthetic.zarr")
    cache = str(tmp_path / "node-cache")
    memory = LatentDataset(store, seed=3, in_memory=True)
    streamed = LatentDataset(store, seed=3, in_memory=False, cache_dir=cache, prefetch_steps=2)
    assert streamed.stream is not None and memory.stream is None and streamed.num_samples == NUM_ROWS - 1
    batch = 32
    steps = 2 * streamed.steps_per_epoch(batch) + 1  # into a third epoch
    for world in (1, 2, 4):
        for step in range(steps):
            for rank in range(world):
                x0, y0 = memory.global_batch(step, batch, rank, world)
                x1, y1 = streamed.global_batch(step, batch, rank, world)
                assert torch.equal(x0, x1) and torch.equal(y0, y1), f"step {step}, rank {rank} of {world}"
    assert streamed.stream.shards_read == 5  # each shard read from the store once

    # a resumed rank on the same node: a new reader, starting mid-run, served from the node's cache alone
    fs, path = filesystem(store)
    for name in ("mean", "std"):
        fs.rm(f"{path}/{name}/c", recursive=True)  # the shard objects are gone from the store
    resumed = LatentDataset(store, seed=3, in_memory=False, cache_dir=cache)
    for step in (steps - 1, 5, 6):
        x0, y0 = memory.global_batch(step, batch, 1, 2)
        x1, y1 = resumed.global_batch(step, batch, 1, 2)
        assert torch.equal(x0, x1) and torch.equal(y0, y1), f"resumed at step {step}"
    assert resumed.stream.shards_read == 0

    # another node (an empty cache of its own) reads the store, which now has only fill values to give: the
    # shard's checksum refuses them before anything is trained on
    other = LatentDataset(store, seed=3, in_memory=False, cache_dir=str(tmp_path / "other-node"))
    with pytest.raises(StoreCorruptError, match=r"shard \d+ .*checksum"):
        other.global_batch(0, batch)
    assert other.stream.shards_read == 0


def test_ranks_of_a_node_share_one_read_per_shard(tmp_path) -> None:
    store = make_store(str(tmp_path / "local.zarr"))
    cache = str(tmp_path / "cache")
    ranks = [LatentDataset(store, seed=0, in_memory=False, cache_dir=cache) for _ in range(2)]
    threads = [threading.Thread(target=r.global_batch, args=(0, 64, k, 2)) for k, r in enumerate(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in ranks:
        r.stream.prefetch(np.arange(NUM_ROWS))
        r.stream.gather(np.arange(NUM_ROWS), np.zeros(NUM_ROWS, dtype=np.int64))
    assert sum(r.stream.shards_read for r in ranks) == 5
