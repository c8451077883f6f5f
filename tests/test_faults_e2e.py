"""The pipeline under injected S3 faults: 15% of requests answered 503/500 or dropped before or after moto
applied them (tests/fault_proxy.py), across an encode and a training run that is SIGKILLed in the middle of
writing a checkpoint. Every stage completes, the store is byte-identical to a local build, and the resumed
run's losses and weights are those of an unbroken local run."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import s3fs
import zarr

from flows.build_latents import run_build_latents
from storage import checkpoints as ckpts
from storage import fs, images, latents
from storage.layout import Root
from tasks.train import train_run
from tests.fault_proxy import FaultProxy
from tests.test_train import config, losses

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
NUM_IMAGES, SHARD = 128, 32
FIGURES: dict[str, object] = {}  # printed at the end: faults injected, stages completed, bytes compared


def _digits(path: str) -> str:
    """The first 128 digits as a class-folder tree (a small source: four encode tasks)."""
    full = images.write_digits(f"{path}-all")
    fsys, _ = fs.filesystem(path)
    for f in full.files[:NUM_IMAGES]:
        fsys.pipe_file(f"{fs.filesystem(path)[1]}/{f.relpath}", fs.read_bytes(fs.join(full.url, f.relpath)))
    return path


def _build(source: str, root: str) -> str:
    store = Root(root).latent_store("digits-tiny")
    run_build_latents(source, store, resolution=8, shard_size=SHARD, workers=2, processes=False)
    return store


def _arrays_equal(a: str, b: str) -> int:
    """Assert two stores hold the same rows and records; return the bytes compared."""
    ga, gb = (
        zarr.open_group(latents.zarr_store(a, True), mode="r"),
        zarr.open_group(latents.zarr_store(b, True), mode="r"),
    )
    compared = 0
    for name in ("mean", "std", "label"):
        x, y = ga[name][:], gb[name][:]
        np.testing.assert_array_equal(x, y)
        compared += x.nbytes
    assert ga["source"][:].tolist() == gb["source"][:].tolist()
    assert [r["checksum"] for r in latents.shard_records(a)] == [r["checksum"] for r in latents.shard_records(b)]
    return compared


def _worker(root: str, run_name: str) -> psutil.Process | None:
    """The rank training ``run_name`` on ``root`` (the root too: another test, in this pytest or beside it,
    may train a run of the same name, and its rank is not ours to kill)."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "tasks.ranks" in cmd and run_name in cmd and any(root in arg for arg in cmd):
            return p
    return None


def test_encode_and_a_killed_training_run_survive_15_percent_s3_faults(
    tmp_path,
    s3_bucket,
    moto_endpoint,
    monkeypatch,
    caplog,
):
    caplog.set_level(logging.INFO, logger="dumo.train")
    monkeypatch.setenv("DUMO_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("DUMO_NO_PROGRESS", "1")
    local_root, s3_root = str(tmp_path / "local"), f"{s3_bucket}/root"
    source = _digits(str(tmp_path / "digits"))
    local_store = _build(source, local_root)
    steps = ("train.num_processes=1", "train.launcher=inline", "train.zero_stage=1", "train.num_steps=6")
    steps += ("train.checkpoint_every=2", "train.keep_last=5")
    train_run(config(local_root, "e2e", *steps))  # the unbroken reference

    direct = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True)  # beside the proxy
    with FaultProxy(moto_endpoint, fault_rate=0.15, max_faults=2000, latency_s=0.02, seed=1, lifetime_s=900) as proxy:
        monkeypatch.setenv("DUMO_S3_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        s3_store = _build(source, s3_root)  # the source stays local; the store goes through the proxy
        stages = ["encode"]

        # Train on S3 and SIGKILL the rank while it writes the checkpoint of step 4 (files there, no marker)
        cfg = config(s3_root, "e2e", *steps)
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(r=_call(train_run, cfg)), daemon=True)
        thread.start()
        step4 = f"{s3_root[5:]}/runs/e2e/checkpoints/step-0000004"
        deadline, killed = time.monotonic() + 600, False
        while not killed:
            assert time.monotonic() < deadline and thread.is_alive(), f"never caught step 4 mid-write: {outcome}"
            try:
                names = [os.path.basename(p) for p in direct.find(step4, refresh=True)]
            except FileNotFoundError:
                names = []
            if names and ckpts.MARKER not in names and (worker := _worker(s3_root, "e2e")) is not None:
                os.killpg(worker.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.01)
        thread.join(120)
        assert "killed by SIGKILL" in str(outcome["r"]), outcome
        run = Root(s3_root).run("e2e")
        assert ckpts.latest(run) == 2  # the half-written step 4 is not a checkpoint

        caplog.clear()
        result = train_run(cfg)  # resumes from step 2, through the same faults
        stages.append("train (killed, resumed)")
        assert "resuming at step 2 from" in caplog.text and result.step == 6
        assert ckpts.committed_steps(run) == [2, 4, 6] and all(ckpts.verify(run.checkpoint(s)) == [] for s in (2, 4, 6))
        faults = dict(proxy.counts)
        requests = proxy.requests

    monkeypatch.setenv("DUMO_S3_ENDPOINT_URL", moto_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    compared = _arrays_equal(local_store, s3_store)
    expected, got = losses(local_root, "e2e"), losses(s3_root, "e2e")
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
    for name in ("ema.safetensors", "model.json"):
        a = fs.read_bytes(fs.join(Root(local_root).run("e2e").checkpoint(6), name))
        b = fs.read_bytes(fs.join(Root(s3_root).run("e2e").checkpoint(6), name))
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), name
        compared += len(a)
    assert sum(faults.values()) >= 20 and all(faults.get(k, 0) > 0 for k in ("503", "500", "drop_before", "drop_after"))
    FIGURES.update(faults=faults, requests=requests, stages=stages, bytes_compared=compared)
    print(f"\nfault figures: {FIGURES}")


def _call(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # expected: the rank was killed
        return exc
