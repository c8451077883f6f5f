"""The latent store (create, region writes, finalize, plain-zarr reads) and its reader, LatentDataset."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from storage import latents
from storage.fs import filesystem
from storage.latent_dataset import LatentDataset, sample_noise

N, SHARD, SHAPE = 100, 16, (2, 4, 4)  # 7 shards, the last one short (4 rows)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "latent-store.md"


def _attrs(**over) -> dict:
    attrs = {
        "autoencoder": {"name": "pixels", "id": "pixels", "revision": "1", "weights_digest": None},
        "latent_scale": 0.5,
        "latent_shift": 0.25,
        "pixel_range": [-1.0, 1.0],
        "crop": "adm_center_crop",
        "resolution": 4,
        "image_channels": 2,
        "flip": "stored",
        "class_names": ["a", "b", "c"],
        "dataset_fingerprint": "sha256:test",
    }
    return {**attrs, **over}


def _rows(start: int, stop: int) -> dict:
    """Deterministic rows: mean = row index in every element (flip 1 negated), std = 0.1."""
    idx = np.arange(start, stop, dtype=np.float32)
    mean = np.broadcast_to(idx[:, None, None, None, None], (stop - start, 2, *SHAPE)).copy()
    mean[:, 1] *= -1
    return {
        "mean": mean,
        "std": np.full_like(mean, 0.1),
        "label": np.arange(start, stop) % 3,
        "source": [f"{'abc'[i % 3]}/{i:03d}.png" for i in range(start, stop)],
    }


def _build(url: str, dtype: str = "float32", parallel: bool = True, finalize: bool = True) -> latents.StoreInfo:
    info = latents.create(url, N, SHAPE, dtype, SHARD, _attrs())
    write = lambda i: latents.write_shard(url, i, **_rows(*info.shard_rows(i)))
    if parallel:
        with ThreadPoolExecutor(4) as pool:  # parallel writers, each owning whole shards
            list(pool.map(write, range(info.num_shards)))
    else:
        for i in range(info.num_shards):
            write(i)
    if finalize:
        latents.finalize(url)
    return info


def _object_keys(url: str, array: str) -> set[str]:
    fs, path = filesystem(url)
    prefix = f"{path}/{array}/"
    return {p[len(prefix) :] for p in fs.find(prefix)}


def test_parallel_writers_each_own_exactly_one_shard_object(tmp_path) -> None:
    url = str(tmp_path / "latents" / "s.zarr")
    info = _build(url)
    shards = range(info.num_shards)
    assert info.num_shards == 7
    assert _object_keys(url, "mean") == {"zarr.json"} | {f"c/{i}/0/0/0/0" for i in shards}
    assert _object_keys(url, "std") == {"zarr.json"} | {f"c/{i}/0/0/0/0" for i in shards}
    for name in ("label", "source", "shard_records"):
        assert _object_keys(url, name) == {"zarr.json"} | {f"c/{i}" for i in shards}
    assert latents.is_complete(url)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_read_with_plain_zarr(tmp_path, dtype: str) -> None:
    url = str(tmp_path / "s.zarr")
    _build(url, dtype)
    group = zarr.open_group(url, mode="r")  # plain zarr, no project code
    expected = _rows(0, N)
    assert group["mean"].dtype == np.dtype(dtype) and group["mean"].shape == (N, 2, *SHAPE)
    np.testing.assert_array_equal(group["mean"][:], expected["mean"].astype(dtype))
    np.testing.assert_array_equal(group["std"][:], expected["std"].astype(dtype))
    np.testing.assert_array_equal(group["label"][:], expected["label"])
    assert group["source"][:].tolist() == expected["source"]
    attrs = group.attrs.asdict()
    assert attrs["complete"] is True and attrs["schema_version"] == latents.SCHEMA_VERSION
    for key in latents.REQUIRED_ATTRS + ("software", "store_id", "shards", "report", "latent_shape"):
        assert key in attrs, key
    assert [r["index"] for r in attrs["shards"]] == list(range(7))
    assert attrs["report"]["num_valid"] == N and attrs["software"]["zarr"] == zarr.__version__


def test_docs_snippet_reads_a_store(tmp_path, capsys) -> None:
    url = str(tmp_path / "s.zarr")
    _build(url)
    snippet = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert snippet, "docs/latent-store.md lost its python snippet"
    exec(compile(snippet.group(1), str(DOCS), "exec"), {"STORE": url})
    assert "a/000.png a (2, 4, 4) pixels" in capsys.readouterr().out


def test_rewriting_a_shard_is_safe_and_finalize_catches_damage(tmp_path) -> None:
    url = str(tmp_path / "s.zarr")
    info = _build(url, finalize=False)
    before = latents.shard_records(url)[3]
    again = latents.write_shard(url, 3, **_rows(*info.shard_rows(3)))  # a retried task redoes its shard
    assert again["checksum"] == before["checksum"]
    assert latents.verify_shard(url, 3) is None
    # damage a row behind the store's back: finalize names the shard and refuses to complete
    zarr.open_group(url, mode="r+")["mean"][50] = 7.0
    with pytest.raises(latents.StoreError, match=r"shard 3 \(rows 48-64\): checksum"):
        latents.finalize(url)
    assert not latents.is_complete(url)
    latents.write_shard(url, 3, **_rows(48, 64))
    assert latents.finalize(url)["num_rows"] == N


def test_finalize_names_missing_shards_and_rejects_wrong_shapes(tmp_path) -> None:
    url = str(tmp_path / "s.zarr")
    info = latents.create(url, N, SHAPE, "float32", SHARD, _attrs())
    for i in (0, 1, 2, 4, 5, 6):
        latents.write_shard(url, i, **_rows(*info.shard_rows(i)))
    with pytest.raises(latents.StoreError, match=r"1 shard\(s\).*shard 3 \(rows 48-64\): no completion record"):
        latents.finalize(url)
    with pytest.raises(ValueError, match=r"rows \[48, 64\)"):
        latents.write_shard(url, 3, **_rows(48, 60))
    with pytest.raises(latents.StoreError):
        latents.create(url, N, SHAPE, "float32", SHARD, _attrs())  # exists: no silent overwrite
    with pytest.raises(ValueError, match="missing"):
        latents.create(str(tmp_path / "t.zarr"), N, SHAPE, "float32", SHARD, {"crop": "x"})


def test_s3_round_trip_with_plain_zarr(s3_bucket: str, moto_endpoint: str) -> None:
    url = f"{s3_bucket}/latents/s.zarr"
    _build(url, "float16")
    assert latents.is_complete(url)
    assert _object_keys(url, "mean") == {"zarr.json"} | {f"c/{i}/0/0/0/0" for i in range(7)}
    group = zarr.open_group(url, mode="r", storage_options={"endpoint_url": moto_endpoint})
    np.testing.assert_array_equal(group["mean"][:], _rows(0, N)["mean"].astype("float16"))
    assert group["source"][:].tolist() == _rows(0, N)["source"]
    ds = LatentDataset(url, seed=3)
    x, y = ds.global_batch(0, 10)
    assert x.shape == (10, *SHAPE) and y.dtype == torch.int64


# ---- the reader ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("reader") / "s.zarr")
    info = latents.create(url, N, SHAPE, "float32", SHARD, _attrs())
    for i in range(info.num_shards):
        rows = _rows(*info.shard_rows(i))
        if i == 2:  # two rows excluded as bad files
            rows["label"][[1, 5]] = -1
        latents.write_shard(url, i, **rows)
    latents.finalize(url)
    return url


def test_reader_refuses_incomplete_stores(tmp_path) -> None:
    url = str(tmp_path / "s.zarr")
    _build(url, finalize=False)
    with pytest.raises(latents.StoreError, match="not complete"):
        LatentDataset(url)


def test_reader_sample_formula_flip_and_exclusions(store_url: str) -> None:
    ds = LatentDataset(store_url, seed=0, in_memory=True)
    assert ds.num_samples == N - 2 and ds.latent_shape == SHAPE and ds.num_classes == 3
    rows = np.arange(N)[np.arange(N) != 33]
    rows = rows[rows != 37]
    x, y = ds.samples(rows, epoch=0)
    noise, flips = sample_noise(0, 0, rows, int(np.prod(SHAPE)))
    mean = np.where(flips == 1, -rows, rows).astype(np.float32)[:, None]
    expected = (mean + 0.1 * noise - 0.25) * 0.5  # (mean + std * noise - shift) * scale
    np.testing.assert_allclose(x.reshape(len(rows), -1).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert 0.4 < flips.mean() < 0.6
    np.testing.assert_array_equal(y.numpy(), rows % 3)
    seen = np.concatenate([ds.permutation(e) for e in range(3)])
    assert 33 not in seen and 37 not in seen  # excluded rows are never sampled


def test_reader_is_deterministic_for_seed_and_epoch(store_url: str) -> None:
    a, b = LatentDataset(store_url, seed=7), LatentDataset(store_url, seed=7, in_memory=False)
    for step in (0, 5, 11):  # 98 // 16 = 6 steps per epoch: steps 5 and 11 close epochs 0 and 1
        xa, ya = a.global_batch(step, 16)
        xb, yb = b.global_batch(step, 16)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = LatentDataset(store_url, seed=8)
    assert not torch.equal(other.global_batch(0, 16)[0], a.global_batch(0, 16)[0])
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert sorted(a.permutation(1)) == sorted(a.permutation(0))  # each epoch visits every sample once


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_sharding_partitions_the_global_batch(store_url: str, world_size: int) -> None:
    ds = LatentDataset(store_url, seed=1)
    for step in (0, 7):
        x, y = ds.global_batch(step, 16)
        parts = [ds.global_batch(step, 16, rank=r, world_size=world_size) for r in range(world_size)]
        assert all(p[0].shape[0] == 16 // world_size for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="not divisible"):
        ds.global_batch(0, 10, rank=0, world_size=4)


def test_resume_at_step_equals_the_uninterrupted_run(store_url: str) -> None:
    full = LatentDataset(store_url, seed=5, rank=1, world_size=2)
    stream = full.batches(16)
    uninterrupted = [next(stream) for _ in range(15)]  # 2.5 epochs
    resumed_ds = LatentDataset(store_url, seed=5, rank=1, world_size=2)  # a fresh process after a crash
    resumed = resumed_ds.batches(16, start_step=8)
    for step in range(8, 15):
        x, y = next(resumed)
        assert torch.equal(x, uninterrupted[step][0]) and torch.equal(y, uninterrupted[step][1])


def test_torch_dataset_interface(store_url: str) -> None:
    ds = LatentDataset(store_url, seed=2, rank=0, world_size=2)
    assert len(ds) == 49
    items = list(ds)
    assert len(items) == 49 and items[0][0].shape == SHAPE
    x0, y0 = ds[0]
    assert torch.equal(x0, items[0][0]) and y0 == items[0][1]
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], x0)
    loader = torch.utils.data.DataLoader(ds, batch_size=7)
    assert sum(len(y) for _, y in loader) == 49


def test_store_files_are_json_records(store_url: str) -> None:
    records = latents.shard_records(store_url)
    assert records[2]["stop"] == 48 and records[2]["checksum"].startswith("sha256:")
    assert json.loads(json.dumps(records)) == records
    assert os.path.exists(os.path.join(store_url, "shard_records", "c", "6"))
