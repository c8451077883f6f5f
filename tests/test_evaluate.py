"""Evaluation of checkpoints: the files and record it writes, the cache, concurrency, metrics that can fail,
the Inception path, and the flows under a Prefect API.

Fixtures are real and small: scikit-learn's digits as a class-folder tree, a ``pixels`` latent store built
with the storage functions, and checkpoints of the ``debug`` DiT (perturbed from its zero-initialised heads
so that samples depend on the weights) written and committed with the checkpoint store. No training here:
whether a trained model scores well is the demo's business; here the metrics must respond to quality.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from dumo_model import EMA, build_model
from dumo_model.features import extract
from dumo_model.metrics import frechet_distance, real_baseline, score
from storage import checkpoints, fs, images, metrics, reference_stats
from storage.layout import Root
from tasks.config import EvalConfig, PipelineConfig
from tasks.eval_record import EvalRecord
from tasks.evaluate import (
    SAMPLING_STATS,
    evaluate_checkpoint,
    find_unevaluated,
    protocol_hash,
)
from tasks.modeling import config_dict
from tasks.reference import load_real_images, prepare
from tests.stores import pixels_store

RUN = "tiny"
N = 200  # samples per sampler: 20 per digit


def _checkpoint(root: Root, cfg: PipelineConfig, step: int, **model_options) -> str:
    torch.manual_seed(step)
    model = build_model("debug", **model_options)
    with torch.no_grad():  # leave the zero init so that outputs depend on the weights (and 1 != 2 steps)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    url = root.run(cfg.name).checkpoint(step)
    checkpoints.write_weights(url, EMA(model, 0.99).state_dict(), config_dict(model), cfg.to_yaml())
    checkpoints.commit(url, step)
    return url


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Root, PipelineConfig]:
    root = Root(str(tmp_path_factory.mktemp("eval") / "root"))
    pixels_store(root.latent_store("digits-8"), images.write_digits(root.images("digits")))
    cfg = PipelineConfig.model_validate(
        {
            "name": RUN,
            "root": root.url,
            "data": {"store_name": "digits-8"},
            "eval": {"num_samples": N, "batch_size": 100},
        }
    )
    return root, cfg


def _sha(url: str) -> str:
    return "sha256:" + hashlib.sha256(fs.read_bytes(url)).hexdigest()


def test_evaluation_writes_the_documented_record_and_files(digits) -> None:
    root, cfg = digits
    url = _checkpoint(root, cfg, 100)
    record = evaluate_checkpoint(url).to_json()
    eval_dir = root.run(RUN).eval_dir(100, "default")
    assert json.loads(fs.read_text(fs.join(eval_dir, "metrics.json"))) == record
    assert EvalRecord.from_json(record).to_json() == record  # the typed record round-trips its JSON
    assert record["checkpoint_digest"] == checkpoints.digest(url)
    assert record["protocol_hash"] == protocol_hash(cfg.eval)
    assert (record["run"], record["step"], record["num_samples"], record["num_classes"]) == (RUN, 100, N, 10)
    assert list(record["samplers"]) == ["1-step", "2-step"]
    # the classifier learned the digits, so its feature space and accuracy mean something
    assert record["feature_extractor"]["classifier_holdout_accuracy"] > 0.9
    real = record["real"]
    assert real["class_accuracy"] > 0.9 and real["spread_ratio"] == pytest.approx(1.0, abs=0.2)
    assert 0 < real["fid"] < 10 and real["nn_l2_train"] > 0.3
    for label, name in (("1-step", "samples.npz"), ("2-step", "samples-2-step.npz")):
        m = record["samplers"][label]
        assert m["samples_file"] == name
        assert record["files"][name] == m["samples_sha256"] == _sha(fs.join(eval_dir, name))
        assert 0 <= m["class_accuracy"] <= 1 and m["fid"] > real["fid"] and m["spread_ratio"] > 0
        with np.load(io.BytesIO(fs.read_bytes(fs.join(eval_dir, name)))) as z:
            imgs, labels = z["images"], z["labels"]
        assert imgs.shape == (N, 8, 8, 3) and imgs.dtype == np.uint8 and labels.shape == (N,)
        assert np.array_equal(np.bincount(labels), np.full(10, N // 10))  # balanced over classes
        assert np.array_equal(imgs[..., 0], imgs[..., 2])  # grey, repeated into RGB
    one, two = (
        np.load(io.BytesIO(fs.read_bytes(fs.join(eval_dir, f))))["images"]
        for f in ("samples.npz", "samples-2-step.npz")
    )
    assert not np.array_equal(one, two)
    assert record["files"]["grid.png"] == _sha(fs.join(eval_dir, "grid.png"))
    grid = Image.open(io.BytesIO(fs.read_bytes(fs.join(eval_dir, "grid.png"))))
    assert grid.size[0] > grid.size[1] > 10 * 32  # two blocks of 8 columns side by side, 10 class rows
    # the reference cache: real images and one classifier bundle, under references/<key>/
    ref_dirs = fs.listdir(root.join("references"))
    assert len(ref_dirs) == 1
    assert set(fs.listdir(root.references(ref_dirs[0]))) == {"real-images.npz", "classifier-v1.npz"}
    table = metrics.format_table(record)
    assert "| 1-step |" in table and "| 2-step |" in table


def test_rerun_is_a_cache_hit_that_samples_nothing(digits) -> None:
    root, cfg = digits
    url = _checkpoint(root, cfg, 150)
    first = evaluate_checkpoint(url)
    eval_dir = fs.local_path(root.run(RUN).eval_dir(150, "default"))
    mtimes = {f: os.stat(os.path.join(eval_dir, f)).st_mtime_ns for f in os.listdir(eval_dir)}
    before = dict(SAMPLING_STATS)
    assert evaluate_checkpoint(url) == first
    assert SAMPLING_STATS == before
    assert {f: os.stat(os.path.join(eval_dir, f)).st_mtime_ns for f in os.listdir(eval_dir)} == mtimes
    assert url not in find_unevaluated(root.url, RUN)
    # another protocol definition is another cache key
    assert url in find_unevaluated(root.url, RUN, overrides={"num_samples": 100})
    assert url in find_unevaluated(root.url, RUN, overrides={"protocol": "other"})


_CHILD = textwrap.dedent("""
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from tasks.evaluate import SAMPLING_STATS, evaluate_checkpoint
    url, barrier, me = sys.argv[1], sys.argv[2], sys.argv[3]
    open(os.path.join(barrier, me), "w").close()
    while len(os.listdir(barrier)) < 2:  # start both evaluations at the same moment
        time.sleep(0.05)
    record = evaluate_checkpoint(url)
    print(json.dumps({"id": record.evaluation_id, "sampled": SAMPLING_STATS["images"]}))
""")


def test_two_concurrent_evaluations_leave_one_consistent_record(digits, tmp_path) -> None:
    root, cfg = digits
    url = _checkpoint(root, cfg, 200)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, str(barrier), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["id"] == outs[1]["id"]  # both return the one record
    assert sorted(o["sampled"] for o in outs) == [0, 2 * N]  # and only one of them sampled
    eval_dir = root.run(RUN).eval_dir(200, "default")
    record = metrics.read_record(eval_dir)
    assert record is not None and record["evaluation_id"] == outs[0]["id"]
    for name, sha in record["files"].items():  # every file comes from that evaluation
        assert _sha(fs.join(eval_dir, name)) == sha
    assert not fs.exists(fs.join(eval_dir, metrics.LOCK_FILE))


def test_metrics_separate_real_noise_and_copies(digits) -> None:
    root, _ = digits
    store = root.latent_store("digits-8")
    real = load_real_images(root, store, [root.images("digits")])
    extractor, reference = prepare(root, real, EvalConfig(feature_extractor="classifier"), 10, torch.device("cpu"))
    n = len(real.holdout_index)
    baseline = real_baseline(reference, real.images, real.holdout_index, n)

    def scores(imgs: np.ndarray, labels: np.ndarray, self_index: np.ndarray | None = None):
        f, cl, il = extract(extractor, imgs)
        return score(f, cl, il, labels, imgs, reference, real.images, nn_self_index=self_index)

    held = real.holdout_index
    # held-out real images scored as if generated: exactly the baseline
    assert scores(real.images[held], real.labels[held], held).fid == pytest.approx(baseline.fid)
    noise = np.random.default_rng(0).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    bad = scores(noise, np.arange(n) % 10)
    assert bad.fid > 20 * baseline.fid and bad.class_accuracy < 0.3
    assert bad.nn_l2_train > 2 * baseline.nn_l2_train
    # copies of training images: perfect accuracy, but the nearest training image is at distance 0
    copies = scores(real.images[held], real.labels[held])
    assert copies.nn_l2_train == 0 and baseline.nn_l2_train > 0.3
    # mode collapse: one image per class; FID alone barely notices, the spread ratio does
    protos = np.stack([real.images[real.labels == c][0] for c in range(10)])
    collapsed = scores(protos[np.arange(n) % 10], np.arange(n) % 10)
    assert collapsed.spread_ratio < 1e-3 and collapsed.class_accuracy == 1


# -- inception-v3-compat --------------------------------------------------------------------------------
def _random_inception(path: str) -> None:
    """torch-fidelity's Inception-v3 at He init with identity BatchNorm (a random net whose features still
    differ between images: with default BN init every FID is ~0). Tests only; real weights are a download."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.reset_parameters()
            m.reset_running_stats()  # mean 0, var 1, weight 1, bias 0: identity
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory) -> tuple[Root, PipelineConfig, str, str]:
    """Three classes of 6 coloured 8x8 images each, a pixels store, one checkpoint, random Inception weights."""
    tmp = tmp_path_factory.mktemp("inception")
    root = Root(str(tmp / "root"))
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((220, 40, 40), (40, 200, 60), (50, 60, 230))):
        for i in range(6):
            img = np.clip(np.array(colour) + rng.normal(0, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            img[i] = 255 - img[i]  # a stripe, so images of a class differ
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            fs.write_bytes(fs.join(root.images("rgb"), f"c{c}", f"{i:02d}.png"), buf.getvalue())
    pixels_store(root.latent_store("rgb-8"), images.list_images(root.images("rgb")), channels=3)
    weights = str(tmp / "inception.pth")
    _random_inception(weights)
    cfg = PipelineConfig.model_validate(
        {
            "name": "rgb",
            "root": root.url,
            "data": {"source": root.images("rgb"), "store_name": "rgb-8"},
            "eval": {
                "samplers": ["one_step"],
                "num_samples": 9,
                "batch_size": 9,
                "feature_extractor": "inception-v3-compat",
                "inception_weights": weights,
            },
        }
    )
    url = _checkpoint(root, cfg, 10, in_channels=3, num_classes=3)
    return root, cfg, url, weights


@pytest.mark.slow  # ~60 CPU s: Inception-v3 at 299 px on the CPU, twice
def test_inception_path_gives_fid_is_kid_and_takes_an_npz(rgb_run, tmp_path) -> None:
    root, cfg, url, weights = rgb_run
    record = evaluate_checkpoint(url).to_json()
    m, real = record["samplers"]["1-step"], record["real"]
    assert record["feature_extractor"]["name"] == "inception-v3-compat"
    assert m["class_accuracy"] is None  # Inception's classes are not the dataset's
    assert m["fid"] > 0 and m["inception_score"] > 1 and m["kid"] is not None and m["nn_l2_train"] > 0
    assert 0 < real["fid"] < m["fid"]  # real held-out images are closer to the real reference than samples
    # ADM-style reference statistics: FID against them; KID needs features an npz does not have
    ref = np.load(io.BytesIO(fs.read_bytes(record["reference"]["source"].split(":", 1)[1])))
    npz = str(tmp_path / "ref.npz")
    np.savez(npz, mu=ref["mu"], sigma=ref["sigma"])
    other = evaluate_checkpoint(url, cfg.eval.model_copy(update={"protocol": "adm", "reference_npz": npz})).to_json()
    assert other["reference"]["source"] == f"npz:{npz}"
    assert other["samplers"]["1-step"]["fid"] == pytest.approx(m["fid"], rel=1e-6)
    assert other["samplers"]["1-step"]["kid"] is None


def test_missing_inception_weights_error_names_the_file(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    expected = os.path.join(str(tmp_path / "torch-home"), "hub", "checkpoints", reference_stats.INCEPTION_FILE)
    with pytest.raises(FileNotFoundError) as err:
        reference_stats.inception_weights_path(None)
    assert expected in str(err.value) and "--inception-weights" in str(err.value)
    with pytest.raises(FileNotFoundError, match="/nowhere/inception.pth"):
        reference_stats.inception_weights_path("/nowhere/inception.pth")


# -- flows and CLI --------------------------------------------------------------------------------------
@pytest.mark.usefixtures("prefect_harness")
def test_flows_evaluate_and_reevaluate(digits) -> None:
    from prefect.client.orchestration import get_client

    from flows.evaluate import evaluate_checkpoint_flow, reevaluate_checkpoints_flow

    root, cfg = digits
    url = _checkpoint(root, cfg, 300)
    with pytest.raises(ValueError, match="does not match"):
        evaluate_checkpoint_flow(checkpoint_url=url, step=301)
    record = evaluate_checkpoint_flow(checkpoint_url=url, step=300, num_samples=100, protocol="quick")
    assert record.protocol == "quick" and record.num_samples == 100
    later = _checkpoint(root, cfg, 400)
    done = reevaluate_checkpoints_flow(root=root.url, run=RUN, num_samples=100, protocol="quick")
    assert {"run": RUN, "step": 400, "protocol": "quick", "eval_dir": root.run(RUN).eval_dir(400, "quick")} in done
    assert 300 not in [d["step"] for d in done]  # already evaluated under "quick"
    assert find_unevaluated(root.url, RUN, overrides={"num_samples": 100, "protocol": "quick"}) == {}
    assert metrics.read_record(root.run(RUN).eval_dir(400, "quick"))["checkpoint_url"] == later
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"eval-tiny-quick", "eval-tiny-quick-grid"} <= keys


def test_cli_evaluate_prints_the_table(digits, capsys) -> None:
    from flows.cli import main

    root, cfg = digits
    url = _checkpoint(root, cfg, 500)
    t0 = time.perf_counter()
    assert main(["evaluate", url, "--no-prefect", "--num-samples", "50", "--protocol", "cli"]) == 0
    out = capsys.readouterr().out
    assert "| 1-step |" in out and "FID (real-vs-real)" in out and "evals/step-0000500/cli" in out
    assert time.perf_counter() - t0 < 120
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "inception-v3-compat" in capsys.readouterr().out


def test_the_feature_extractor_choices_are_the_registry_keys() -> None:
    from typing import get_args

    from prefect.utilities.callables import parameter_schema

    from dumo_model.features import FEATURE_EXTRACTORS
    from flows.evaluate import evaluate_checkpoint_flow

    names = tuple(FEATURE_EXTRACTORS)
    assert names == ("classifier", "inception-v3-compat")
    assert get_args(EvalConfig.model_fields["feature_extractor"].annotation) == names
    schema = parameter_schema(evaluate_checkpoint_flow.fn).model_dump()["properties"]["feature_extractor"]
    assert tuple(schema["anyOf"][0]["enum"]) == names
    with pytest.raises(ValueError, match="feature_extractor"):
        EvalConfig(feature_extractor="inception-v4")


def test_frechet_distance_matches_torch_fidelity() -> None:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 40)), rng.normal(0.3, 1.5, size=(200, 40)) @ rng.normal(size=(40, 40))
    stats = [{"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)} for x in (a, b)]
    expected = fid_statistics_to_metric(stats[0], stats[1], False)[KEY_METRIC_FID]
    found = frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])
    assert found == pytest.approx(expected, rel=1e-8)


# -- storage pieces on every kind of root ---------------------------------------------------------------
def _root_url(kind: str, tmp_path, request) -> str:
    if kind == "local":
        return str(tmp_path / "root")
    if kind == "memory":
        return f"memory://eval-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue("s3_bucket") + "/root"


@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_lock_serialises_holders_and_breaks_stale_ones(kind, tmp_path, request) -> None:
    lock = fs.join(_root_url(kind, tmp_path, request), "evals", metrics.LOCK_FILE)
    events: list[str] = []

    a_holds = threading.Event()

    def hold(name: str, seconds: float) -> None:
        with metrics.exclusive(lock, poll_s=0.05, heartbeat_s=0.1):
            events.append(f"{name} in")
            a_holds.set()
            time.sleep(seconds)
            events.append(f"{name} out")

    first = threading.Thread(target=hold, args=("a", 0.6))
    first.start()
    assert a_holds.wait(60)  # "a" holds it now, however slow the store is to answer (S3 under load)
    time.sleep(0.3)  # and has refreshed it at least once
    hold("b", 0)
    first.join()
    assert events == ["a in", "a out", "b in", "b out"]
    assert not fs.exists(lock)
    # a holder that died long ago: its lock is broken instead of waited for
    fs.write_text(lock, json.dumps({"token": "dead", "host": "h", "pid": 1, "heartbeat": time.time() - 1000}))
    t0 = time.monotonic()
    with metrics.exclusive(lock, stale_after_s=60, poll_s=0.05):
        assert json.loads(fs.read_text(lock))["token"] != "dead"
    assert time.monotonic() - t0 < 5 and not fs.exists(lock)
    # records round-trip on this root too
    eval_dir = fs.join(_root_url(kind, tmp_path, request), "runs", "r", "evals", "step-0000001", "p")
    metrics.write_record(eval_dir, {"checkpoint_digest": "d", "protocol_hash": "h", "x": 1})
    assert metrics.cached_record(eval_dir, "d", "h")["x"] == 1
    assert metrics.cached_record(eval_dir, "d", "other") is None


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_samples_writer_streams_a_loadable_npz(kind, tmp_path, request) -> None:
    url = fs.join(_root_url(kind, tmp_path, request), "samples.npz")
    labels = np.arange(10) % 3
    batches = [np.random.default_rng(i).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8) for i in range(2)]
    writer = metrics.SamplesWriter(url, labels, 4, 6)
    for b in batches:
        writer.write(b)
    digest = writer.close()
    assert digest == _sha(url)
    with np.load(io.BytesIO(fs.read_bytes(url))) as z:
        assert np.array_equal(z["images"], np.concatenate(batches)) and np.array_equal(z["labels"], labels)
    short = metrics.SamplesWriter(fs.join(_root_url(kind, tmp_path, request), "short.npz"), labels, 4, 6)
    short.write(batches[0])
    with pytest.raises(ValueError, match="wrote 5 of 10"):
        short.close()
    short.abort()
