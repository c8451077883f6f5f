"""Outputs others can use without knowing the project: the latent store opens in xarray, a checkpoint
consolidates with DeepSpeed's stock zero_to_fp32 (no --tag), a reference npz of the wrong width is refused in
words, and evaluation gives the same error for a path that is not a checkpoint with or without Prefect."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dumo_model.features import FEATURE_EXTRACTORS
from storage import checkpoints as ckpts
from storage import fs
from storage.layout import Root
from storage.reference_stats import read_reference_npz
from tests.stores import TINY_STORE, digits_store
from tests.test_train import config


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("outputs-root"))
    digits_store(root)
    return root


def test_xarray_opens_the_latent_store(tiny_root: str) -> None:
    import xarray as xr

    path = fs.local_path(Root(tiny_root).latent_store(TINY_STORE))
    ds = xr.open_zarr(path, consolidated=True)  # consolidated metadata present: one read lists every array
    assert ds["mean"].dims == ("sample", "flip", "channel", "y", "x")
    assert ds["std"].dims == ds["mean"].dims
    assert ds["label"].dims == ("sample",) and ds["source"].dims == ("sample",)
    assert ds["shard_records"].dims == ("shard",)
    assert dict(ds.sizes) == {"sample": 128, "flip": 2, "channel": 1, "y": 8, "x": 8, "shard": 2}
    group = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(ds["label"].values, group["label"][:])
    np.testing.assert_array_equal(ds["mean"][5:9].values, group["mean"][5:9])
    assert ds.attrs["complete"] is True


def test_a_reference_npz_of_another_width_is_refused_in_words(tmp_path: Path) -> None:
    npz = str(tmp_path / "ref-64.npz")
    np.savez(npz, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"holds statistics of 64-d features .* gives 128-d features"):
        read_reference_npz(npz, FEATURE_EXTRACTORS["classifier"].width, "classifier")
    with pytest.raises(ValueError, match="gives 2048-d features"):
        read_reference_npz(npz, FEATURE_EXTRACTORS["inception-v3-compat"].width, "inception-v3-compat")
    np.savez(str(tmp_path / "other.npz"), mean=np.zeros(3))
    with pytest.raises(ValueError, match="not an npz with arrays mu and sigma"):
        read_reference_npz(str(tmp_path / "other.npz"), 128, "classifier")
    mu, sigma, _ = read_reference_npz(npz, 64, "classifier")
    assert mu.shape == (64,) and sigma.shape == (64, 64)


@pytest.mark.usefixtures("prefect_harness")
def test_evaluate_gives_one_error_for_a_non_checkpoint_with_and_without_prefect(tmp_path: Path) -> None:
    from flows.evaluate import evaluate_checkpoint_flow
    from tasks.evaluate import evaluate_checkpoint

    for bad in (str(tmp_path / "runs" / "r" / "checkpoints" / "step-0000010"), str(tmp_path)):
        with pytest.raises((FileNotFoundError, ValueError)) as plain:
            evaluate_checkpoint(bad)
        with pytest.raises(type(plain.value)) as flow:
            evaluate_checkpoint_flow(checkpoint_url=bad)
        assert str(flow.value) == str(plain.value)
        assert "not a committed checkpoint" in str(plain.value) or "not a checkpoint URL" in str(plain.value)


@pytest.mark.slow
def test_stock_zero_to_fp32_consolidates_a_checkpoint_without_tag(
    tiny_root: str, tmp_path: Path, monkeypatch, caplog
) -> None:
    import logging

    from tasks.ranks.distributed import deepspeed_config
    from tasks.train import train_run

    monkeypatch.setenv("DUMO_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.delenv("DUMO_NO_PROGRESS", raising=False)  # as a user has it: the parent turns the bar off
    caplog.set_level(logging.INFO, logger="dumo.train")
    cfg = config(tiny_root, "z2-stock", "train.num_steps=2", "train.checkpoint_every=2", "train.ema_decay=0")
    result = train_run(cfg)  # ZeRO-2, one rank; EMA decay 0: the EMA is the weights
    url = result.checkpoint_url
    # No progress bar drawn into the parent's pipe (each refresh was a log line); the headline loss is unweighted
    assert "step/s]" not in caplog.text and "%|" not in caplog.text
    assert "training done at step 2: loss_v " in caplog.text and "(weighted loss " in caplog.text
    assert result.final_loss_v > 0 and result.final_loss_u > 0
    ckpt_dir = fs.local_path(url)
    assert Path(ckpt_dir, "latest").read_text() == ckpts.TRAINER_DIR
    files = ckpts.read_marker(url)["files"]
    assert {"latest", "ds_config.json"} <= set(files)  # listed in the marker like every other file
    assert fs.read_text(fs.join(url, "ds_config.json")).strip().startswith("{")
    assert json.loads(fs.read_text(fs.join(url, "ds_config.json"))) == deepspeed_config(cfg.train)
    out = tmp_path / "fp32"
    cmd = [sys.executable, "-m", "deepspeed.utils.zero_to_fp32", ckpt_dir, str(out)]  # no --tag
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    state = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    _, ema = ckpts.load_weights(url)
    assert set(ema) <= set(state)
    for k in ema:
        torch.testing.assert_close(state[k].float(), ema[k], rtol=0, atol=0)


@pytest.mark.parametrize("remote", ["memory://dir-copy/ckpt/trainer", "local"])
def test_directory_copy_round_trips_and_repeats_in_place(remote: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "x.pt").write_bytes(b"x" * 10)
    (src / "a" / "b" / "y.pt").write_bytes(b"y")
    url = str(tmp_path / "remote" / "trainer") if remote == "local" else remote
    for _ in range(2):  # a second upload lands in the same place, not in a nested copy
        fs.upload_dir(str(src), url)
        fsys, path = fs.filesystem(url)
        assert sorted(p[len(path.rstrip("/")) + 1 :] for p in fsys.find(path)) == ["a/b/y.pt", "x.pt"]
    out = tmp_path / "out" / "trainer"
    fs.download_dir(url, str(out))
    assert (out / "x.pt").read_bytes() == b"x" * 10 and (out / "a" / "b" / "y.pt").read_bytes() == b"y"


def test_grid_places_every_sample_and_labels_samplers_and_classes() -> None:
    from PIL import Image

    from storage.metrics import grid_png

    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 255, (10, 8, 8, 8, 3), dtype=np.uint8) for _ in range(2)]
    plain = np.asarray(Image.open(io.BytesIO(grid_png(blocks))))
    labelled = np.asarray(Image.open(io.BytesIO(grid_png(blocks, ["1-step", "2-step"], list("0123456789")))))
    cell, gap = 32, 4  # 8 px enlarged 4x to reach 32 px; make_grid's padding
    grid_w = gap + 8 * (cell + gap)
    for canvas, top, left in ((plain, 0, 0), (labelled, 14, 8 + 7)):
        assert canvas.shape == (top + gap + 10 * (cell + gap), left + 2 * grid_w + 16, 3)
        for b, (r, c) in [(0, (0, 0)), (0, (9, 7)), (1, (3, 5))]:
            y, x = top + gap + r * (cell + gap), left + b * (grid_w + 16) + gap + c * (cell + gap)
            expected = blocks[b][r, c].repeat(4, axis=0).repeat(4, axis=1)
            np.testing.assert_array_equal(canvas[y : y + cell, x : x + cell], expected)
    assert (labelled[:14, 8 + 7 :] > 200).any() and (labelled[14:, :15] > 200).any()  # titles, class names (white)


@pytest.mark.usefixtures("prefect_harness")
def test_pictures_reach_the_ui_embedded_in_markdown_artifacts() -> None:
    import base64
    import re

    from PIL import Image
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.artifacts import MAX_WIDTH_PX, publish_png

    wide = io.BytesIO()
    Image.new("RGB", (2 * MAX_WIDTH_PX, 300), (10, 200, 30)).save(wide, format="PNG")

    @flow(name="publish-picture")
    def publish() -> None:
        publish_png("test-picture", wide.getvalue(), "a picture", "/somewhere/grid.png", "test")

    publish()
    publish_png("outside-a-run", wide.getvalue(), "x", "/x", "x")  # outside a run: nothing, no error
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["test-picture"])))
        outside = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["outside-a-run"])))
    assert len(found) == 1 and found[0].type == "markdown" and outside == []
    text = found[0].data
    assert "file://" not in text and "Full size: `/somewhere/grid.png`" in text
    data = re.search(r"!\[a picture\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert data is not None
    shown = Image.open(io.BytesIO(base64.b64decode(data[1])))
    assert shown.size == (MAX_WIDTH_PX, 150) and shown.getpixel((5, 5))[:3] == (10, 200, 30)
