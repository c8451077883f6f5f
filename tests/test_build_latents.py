"""The build-latents flow with real components: Prefect (test harness), a Dask LocalCluster, moto's S3
server spoken to by s3fs, a tiny random diffusers AutoencoderKL."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from sklearn.datasets import load_digits

from flows.build_latents import run_build_latents
from storage import autoencoders, latents
from storage.fs import filesystem, upload_dir
from storage.images import list_images, write_digits
from storage.latent_dataset import LatentDataset

pytestmark = pytest.mark.usefixtures("prefect_harness")
THREADS = {"workers": 2, "processes": False}  # a real LocalCluster, workers as threads: quick to start


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("src") / "digits")
    write_digits(path)
    return path


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3 classes x 4 RGB JPEGs of assorted sizes, the ImageNet shape of a source."""
    root = tmp_path_factory.mktemp("src") / "rgb"
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(["n01", "n02", "n03"]):
        (root / wnid).mkdir(parents=True)
        for k in range(4):
            arr = rng.integers(0, 256, (20 + 4 * k, 24 + 2 * c, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / wnid / f"{wnid}_{k}.JPEG", quality=90)
    return str(root)


def _encoded() -> int:
    return autoencoders.ENCODE_STATS["images"]


def _shard_keys(url: str, array: str) -> set[str]:
    fs, path = filesystem(url)
    return {p[len(path) + len(array) + 2 :] for p in fs.find(f"{path}/{array}")} - {"zarr.json"}


def test_local_build_round_trip_and_rerun_encodes_nothing(digits_dir: str, tmp_path) -> None:
    store = str(tmp_path / "latents" / "digits.zarr")
    before = _encoded()
    summary = run_build_latents(digits_dir, store, resolution=8, shard_size=256, **THREADS)
    assert summary.num_rows == 1797 and summary.shards_encoded == 8
    assert _encoded() - before == 1797  # every image encoded exactly once (with its mirror, in one call)
    # no two tasks wrote the same shard: exactly one object per shard and array
    assert _shard_keys(store, "mean") == {f"c/{i}/0/0/0/0" for i in range(8)}
    assert _shard_keys(store, "label") == {f"c/{i}" for i in range(8)}
    assert _shard_keys(store, "std") == set()  # pixels: std is all zeros, which zarr does not store
    assert os.listdir(tmp_path / "cache" / "results")  # persisted task results beside the store

    group = zarr.open_group(store, mode="r")  # plain zarr
    digits = load_digits()
    index = [int(s.split("/")[1][:-4]) for s in group["source"][:].tolist()]
    expected = np.round(digits.images[index] * 255 / 16).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(group["mean"][:, 0, 0], expected)
    np.testing.assert_array_equal(group["mean"][:, 1, 0], expected[:, :, ::-1])  # axis 1: the mirror image
    np.testing.assert_array_equal(group["label"][:], digits.target[index])
    attrs = group.attrs.asdict()
    assert attrs["complete"] and attrs["image_channels"] == 1 and attrs["latent_shape"] == [1, 8, 8]
    assert attrs["crop"] == "adm_center_crop" and attrs["class_names"] == [str(d) for d in range(10)]

    before = _encoded()
    again = run_build_latents(digits_dir, store, resolution=8, shard_size=256, **THREADS)
    assert again.shards_encoded == 0 and _encoded() == before


def test_interrupted_build_resumes_only_the_missing_shards(digits_dir: str, tmp_path) -> None:
    src = str(tmp_path / "digits")
    shutil.copytree(digits_dir, src)
    store = str(tmp_path / "latents" / "digits.zarr")
    victim_row = 5 * 256 + 17  # a row of shard 5
    victim = os.path.join(src, list_images(src).files[victim_row].relpath)
    good_bytes = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(b"\0" * len(good_bytes))  # same size: the source fingerprint does not change
    with pytest.raises(Exception, match=re.escape(os.path.relpath(victim, src))):
        run_build_latents(src, store, resolution=8, shard_size=256, **THREADS)
    records = latents.shard_records(store)
    assert [i for i, r in enumerate(records) if r is None] == [5]
    assert not latents.is_complete(store)
    # and a crash between shard 2's data and its record: the record is the commit marker, so it is redone
    zarr.open_group(store, mode="r+")["shard_records"][2:3] = np.array([""], dtype=object)

    with open(victim, "wb") as f:
        f.write(good_bytes)
    before = _encoded()
    summary = run_build_latents(src, store, resolution=8, shard_size=256, **THREADS)
    assert summary.shards_encoded == 2 and _encoded() - before == 2 * 256  # shards 2 and 5 only
    assert summary.shards_cached == 6  # the others hit the Prefect cache (inputs + task source)
    after = latents.shard_records(store)
    for i in (0, 1, 3, 4, 6, 7):  # finished shards untouched
        assert after[i] == records[i]
    assert latents.is_complete(store) and all(latents.verify_shard(store, i) is None for i in range(8))
    reference = str(tmp_path / "reference.zarr")
    run_build_latents(digits_dir, reference, resolution=8, shard_size=256, **THREADS)
    assert [r["checksum"] for r in after] == [r["checksum"] for r in latents.shard_records(reference)]


def test_corrupt_jpeg_fails_naming_it_then_skip_lists_it(rgb_dir: str, tmp_path) -> None:
    src = str(tmp_path / "rgb")
    shutil.copytree(rgb_dir, src)
    with open(os.path.join(src, "n02", "n02_9.JPEG"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + os.urandom(300))  # a JPEG header, then noise
    store = str(tmp_path / "latents" / "rgb.zarr")
    with pytest.raises(Exception, match=r"n02/n02_9\.JPEG"):
        run_build_latents(src, store, resolution=16, shard_size=4, **THREADS)
    summary = run_build_latents(src, store, resolution=16, shard_size=4, on_bad_image="skip", **THREADS)
    report = summary.report
    assert report["num_skipped"] == 1 and report["num_valid"] == 12
    (skipped,) = report["skipped"]
    assert skipped["source"] == "n02/n02_9.JPEG" and skipped["row"] == 8
    group = zarr.open_group(store, mode="r")
    assert group["label"][8] == -1 and group.attrs["report"]["skipped"] == [skipped]
    assert group["mean"].shape == (13, 2, 3, 16, 16) and group.attrs["image_channels"] == 3
    assert LatentDataset(store).num_samples == 12


def test_s3_source_and_store_round_trip(rgb_dir: str, s3_bucket: str, moto_endpoint: str) -> None:
    upload_dir(rgb_dir, f"{s3_bucket}/train")
    store = f"{s3_bucket}/latents/rgb.zarr"
    summary = run_build_latents(f"{s3_bucket}/train", store, resolution=16, shard_size=4, **THREADS)
    assert summary.num_rows == 12 and summary.shards_encoded == 3
    assert _shard_keys(store, "mean") == {f"c/{i}/0/0/0/0" for i in range(3)}
    fs, _ = filesystem(s3_bucket)
    assert fs.find(f"{s3_bucket[5:]}/cache/results")  # the result cache lives on the same root
    group = zarr.open_group(store, mode="r", storage_options={"endpoint_url": moto_endpoint})
    assert group.attrs["complete"] and group["source"][:].tolist()[0] == "n01/n01_0.JPEG"
    assert group["mean"][0, 0].shape == (3, 16, 16) and group["mean"][:].std() > 0.1
    x, y = LatentDataset(store, seed=0).global_batch(0, 4)
    assert x.shape == (4, 3, 16, 16) and set(y.tolist()) <= {0, 1, 2}
    before = _encoded()
    assert run_build_latents(f"{s3_bucket}/train", store, resolution=16, shard_size=4).shards_encoded == 0
    assert _encoded() == before


@pytest.mark.slow  # ~27 CPU s: Dask worker processes that each load the VAE
def test_sd_vae_in_worker_processes(rgb_dir: str, tiny_vae_dir: str, tmp_path) -> None:
    store = str(tmp_path / "latents" / "vae.zarr")
    summary = run_build_latents(
        rgb_dir,
        store,
        autoencoder="sd-vae",
        vae=tiny_vae_dir,
        resolution=16,
        shard_size=4,
        latent_dtype="float16",
        workers=2,
        processes=True,  # the default: one process per worker
    )
    assert summary.shards_encoded == 3
    group = zarr.open_group(store, mode="r")
    attrs = group.attrs.asdict()
    assert attrs["latent_shape"] == [4, 8, 8] and attrs["latent_scale"] == autoencoders.SD_VAE_LATENT_SCALE
    assert attrs["autoencoder"]["name"] == "sd-vae" and attrs["autoencoder"]["revision"] == "local"
    assert attrs["autoencoder"]["weights_digest"].startswith("sha256:")
    pids = {r["pid"] for r in attrs["shards"]}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # encoded in the worker processes
    std = group["std"][:].astype(np.float32)
    assert group["mean"].dtype == np.float16 and (std > 0).all()
    # row 0 equals a direct encode of the same crop by the same model
    ae = autoencoders.get_autoencoder(autoencoders.AutoencoderSpec("sd-vae", tiny_vae_dir), "cpu")
    x = Image.open(os.path.join(rgb_dir, "n01", "n01_0.JPEG")).convert("RGB")
    from storage.images import adm_center_crop

    pixels = torch.from_numpy(np.asarray(adm_center_crop(x, 16), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    mean, _ = ae.encode(pixels[None])
    np.testing.assert_allclose(group["mean"][0, 0].astype(np.float32), mean[0].numpy(), atol=2e-3, rtol=1e-2)
    z, _ = LatentDataset(store, seed=0).global_batch(0, 4)
    assert ae.decode(z).shape == (4, 3, 16, 16)


def test_missing_vae_says_what_to_place_where(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = autoencoders.AutoencoderSpec
    with pytest.raises(autoencoders.AutoencoderUnavailable, match=r"no AutoencoderKL directory at \./nowhere"):
        autoencoders.describe(spec("sd-vae", "./nowhere"), 3, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(autoencoders.AutoencoderUnavailable, match="config.json.*place a diffusers AutoencoderKL"):
        autoencoders.describe(spec("sd-vae", str(tmp_path / "empty")), 3, 16)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(autoencoders.AutoencoderUnavailable, match=r"hf download nobody/no-vae.*--vae DIR"):
        autoencoders.describe(spec("sd-vae", "nobody/no-vae"), 3, 16)
    with pytest.raises(ValueError, match="needs --vae"):
        spec("sd-vae")


def test_cli_make_digits_and_build_latents_on_an_existing_cluster(tmp_path, capsys) -> None:
    from distributed import LocalCluster

    from flows.cli import build_parser, main

    assert main(["make-digits", str(tmp_path / "digits"), "--upscale", "2"]) == 0
    assert "wrote 1797 digits (16x16 grey PNG)" in capsys.readouterr().out
    help_text = build_parser()._subparsers._group_actions[0].choices["build-latents"].format_help()
    assert "--dask-address" in help_text and "--on-bad-image" in help_text
    store = str(tmp_path / "latents" / "d.zarr")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", dashboard_address=None) as c:
        code = main(
            [
                "build-latents",
                str(tmp_path / "digits"),
                store,
                "--autoencoder",
                "pixels",
                "--resolution",
                "8",
                "--shard-size",
                "600",
                "--dask-address",
                c.scheduler_address,
            ]
        )
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert summary["num_rows"] == 1797 and summary["shards_encoded"] == 3
    info = latents.open_store(store)
    assert info.complete and info.num_shards == 3
    # 16x16 digits (pixel repetition) box-halved to 8x8 by the ADM crop give back the 8x8 originals exactly
    group = zarr.open_group(store, mode="r")
    index = [int(s.split("/")[1][:-4]) for s in group["source"][:].tolist()]
    expected = np.round(load_digits().images[index] * 255 / 16).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(group["mean"][:, 0, 0], expected)


def test_pixels_decode_is_identity() -> None:
    ae = autoencoders.get_autoencoder(autoencoders.AutoencoderSpec("pixels"))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    mean, std = ae.encode(x)
    assert torch.equal(ae.decode(mean), x) and torch.count_nonzero(std) == 0


def test_retries_are_for_io_errors_only() -> None:
    from prefect.states import Failed

    from storage.images import BadImageError
    from tasks.encode import _retry_on_io_error

    assert _retry_on_io_error(None, None, Failed(data=ConnectionResetError(104, "connection reset by peer")))
    assert not _retry_on_io_error(None, None, Failed(data=BadImageError("a/b.JPEG", "corrupt")))
    assert not _retry_on_io_error(None, None, Failed(data=ValueError("a bug")))
