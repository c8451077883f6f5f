"""Corrupt bytes in a latent store are never read as data: the reader checks each shard's checksum on its
first read and names the store, the shard and the way out; ``dumo verify-store --repair`` re-encodes the
bad shards from the source."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from flows.cli import main as cli
from storage import images, latents
from storage.fs import local_path
from storage.latent_dataset import LatentDataset
from storage.layout import Root
from tests.stores import pixels_store

NUM_IMAGES, SHARD = 96, 32


def build_digits_store(root: str) -> str:
    """A complete store of the first 96 digits in 3 shards, recording its source (as build-latents does), so
    verify-store can repair it: the 96 files are linked into a tree of their own, the store's whole source."""
    source = images.write_digits(Root(root).images("digits"))
    files = source.files[:NUM_IMAGES]
    small = Root(root).images("digits-96")
    fsys_src, fsys_dst = local_path(source.url), local_path(small)
    for f in files:  # the source of the store is exactly these files
        os.makedirs(os.path.join(fsys_dst, os.path.dirname(f.relpath)), exist_ok=True)
        os.link(os.path.join(fsys_src, f.relpath), os.path.join(fsys_dst, f.relpath))
    source = images.list_images(small)
    return pixels_store(Root(root).latent_store("digits-96"), source, shard_size=SHARD, record_source=True)


@pytest.fixture
def store(tmp_path) -> str:
    return build_digits_store(str(tmp_path / "root"))


def _shard_file(url: str, array: str, shard: int) -> str:
    base = os.path.join(local_path(url), array, "c", str(shard))
    if os.path.isfile(base):  # a 1-D array: one chunk file per shard
        return base
    (path,) = [os.path.join(d, f) for d, _, names in os.walk(base) for f in names]
    return path


def _flip_bytes(path: str, count: int = 4) -> None:
    raw = bytearray(open(path, "rb").read())
    for k in range(count):
        raw[(len(raw) // 3 + 7 * k) % len(raw)] ^= 0xFF
    with open(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("in_memory", [True, False])
def test_values_changed_behind_the_store_are_refused_on_first_read(store, in_memory) -> None:
    # What a flip that the codec accepts does: valid compressed bytes holding other values (1.7e38)
    zarr.open_group(local_path(store), mode="r+")["mean"][40] = 1.7e38
    with pytest.raises(latents.StoreCorruptError) as info:
        ds = LatentDataset(store, in_memory=in_memory)
        for step in range(ds.steps_per_epoch(16)):  # streaming mode meets shard 1 on its first read
            ds.global_batch(step, 16)
    message = str(info.value)
    assert "\n" not in message and store in message and "shard 1 (rows 32-64): checksum" in message
    assert f"dumo verify-store {store} --repair" in message and info.value.shard == 1


def test_flipped_bytes_name_the_shard_in_one_line_then_verify_store_repairs_them(store, capsys) -> None:
    good = LatentDataset(store, in_memory=True)
    expected = good.global_batch(0, 32)
    _flip_bytes(_shard_file(store, "mean", 2))
    with pytest.raises(latents.StoreCorruptError, match=r"shard 2 \(rows 64-96\)") as info:
        LatentDataset(store, in_memory=True)
    assert "\n" not in str(info.value)  # not the codec's 40 lines of frames

    assert cli(["verify-store", store]) == 1
    out, err = capsys.readouterr()
    assert "2 of 3 shards match" in out and "bad shard 2" in err and "--repair" in err
    assert cli(["verify-store", store, "--repair"]) == 0
    assert "repaired 1 of 3 shards [2]" in capsys.readouterr().out
    assert latents.verify(store) == [] and latents.is_complete(store)
    x, y = LatentDataset(store, in_memory=True).global_batch(0, 32)
    np.testing.assert_array_equal(x.numpy(), expected[0].numpy())
    np.testing.assert_array_equal(y.numpy(), expected[1].numpy())
    assert latents.shard_records(store)[2]["repaired_at"]


def test_repair_refuses_a_source_that_changed(store, capsys) -> None:
    _flip_bytes(_shard_file(store, "label", 0))
    source = latents.open_store(store).attrs["source_url"]
    victim = os.path.join(local_path(source), images.list_images(source).files[0].relpath)
    with open(victim, "ab") as f:
        f.write(b"\0")  # a file that is no longer the one encoded
    with pytest.raises(latents.StoreError, match="not the ones .* was built from"):
        cli(["verify-store", store, "--repair", "--debug"])  # --debug: the exception itself
    capsys.readouterr()
    assert cli(["verify-store", store, "--repair"]) == 1  # what a user sees: one line naming the cause
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "not the ones" in err[0], err
