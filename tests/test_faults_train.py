"""Training never continues from corrupt bytes: a flipped checkpoint file is passed over for the newest
intact checkpoint, and non-finite losses stop the run before anything is committed.

One rank (inline launcher) on the tiny digits store of test_train.py; each run is a few DeepSpeed steps.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import zarr

from storage import checkpoints as ckpts
from storage import fs, latents
from storage.latent_dataset import LatentDataset
from storage.layout import Root
from storage.train_log import read_train_log
from tasks.train import train_run
from tests.stores import digits_store
from tests.test_train import config, losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("faults-train"))
    digits_store(root)
    return root


@pytest.fixture(autouse=True)
def _staging(tmp_path, monkeypatch):
    monkeypatch.setenv("DUMO_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("DUMO_NO_PROGRESS", "1")


def one_rank(root: str, name: str, *overrides: str):
    return config(root, name, "train.num_processes=1", "train.launcher=inline", "train.zero_stage=1", *overrides)


def test_a_flipped_trainer_file_is_passed_over_for_the_newest_intact_checkpoint(root, caplog):
    caplog.set_level(logging.INFO, logger="dumo.train")
    steps = ("train.checkpoint_every=2", "train.keep_last=5")
    train_run(one_rank(root, "flip", "train.num_steps=4", *steps))
    before = losses(root, "flip")
    run = Root(root).run("flip")
    assert ckpts.committed_steps(run) == [2, 4]
    # 4 flipped bytes in the DeepSpeed model state of step 4 (the case that resumed silently before)
    path = fs.local_path(fs.join(ckpts.trainer_state_url(run.checkpoint(4)), "mp_rank_00_model_states.pt"))
    raw = bytearray(open(path, "rb").read())
    for k in range(4):
        raw[len(raw) // 2 + 64 * k] ^= 0xFF
    open(path, "wb").write(raw)

    caplog.clear()
    result = train_run(one_rank(root, "flip", "train.num_steps=6", *steps))
    assert "checkpoint step 4" in caplog.text and "is corrupt (trainer/mp_rank_00_model_states.pt" in caplog.text
    assert "resuming at step 2 from" in caplog.text
    assert result.step == 6 and ckpts.committed_steps(run) == [2, 4, 6]
    assert ckpts.verify(run.checkpoint(4)) == []  # step 4 was written again, whole
    after = losses(root, "flip")
    for step in (3, 4):  # redone from step 2: exactly what the unbroken run computed
        assert after[step] == pytest.approx(before[step], rel=1e-5, abs=1e-7), step


def test_non_finite_losses_stop_training_before_a_commit_and_are_logged_as_strict_json(root, tmp_path):
    # A store whose checksums are right but whose data holds one enormous value, met first at step 4
    bad_root = str(tmp_path / "bad-root")
    url = digits_store(bad_root)
    ds = LatentDataset(url)
    row = int(ds.permutation(0)[3 * 16])  # global batch index 3 = the 4th step
    group = zarr.open_group(fs.local_path(url), mode="r+")
    info = latents.open_store(url)
    shard = row // info.shard_size
    start, stop = info.shard_rows(shard)
    mean = group["mean"][start:stop]
    mean[row - start] = 3e38
    latents.write_shard(url, shard, mean, group["std"][start:stop], group["label"][start:stop],
                        [str(s) for s in group["source"][start:stop]])  # fmt: skip
    latents.finalize(url)

    cfg = one_rank(bad_root, "nan", "train.num_steps=8", "train.checkpoint_every=2", "train.max_nonfinite_steps=0")
    with pytest.raises(RuntimeError) as info_:
        train_run(cfg)
    message = str(info_.value)
    assert "NonFiniteLossError: step 4: the loss or gradient norm is NaN or infinite" in message
    assert "train.max_nonfinite_steps=0" in message and "The last committed checkpoint, step 2" in message
    run = Root(bad_root).run("nan")
    assert ckpts.committed_steps(run) == [2]  # nothing past the last finite step was committed
    lines = fs.read_text(run.train_log).splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[3]["loss"] in ("NaN", "Infinity") and all(isinstance(r["loss"], float) for r in records[:3])
    assert math.isnan(read_train_log(run)[3]["loss"]) or math.isinf(read_train_log(run)[3]["loss"])
    assert np.isfinite([r["loss_v"] for r in records[:3]]).all()
