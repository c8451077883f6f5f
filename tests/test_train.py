"""Training with DeepSpeed on the CPU (gloo): real ranks as processes, a real latent store, checkpoints on a
local root and on an S3 endpoint (moto), SIGKILL and resume.

The store is 128 of scikit-learn's 8x8 digits encoded with the ``pixels`` autoencoder, built once per session;
the network is the ``debug`` preset shrunk to 62k parameters. DeepSpeed's first start on a machine builds a
communication op (~30 s, then cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from pydantic import ValidationError

from storage import checkpoints as ckpts
from storage import fs, latents
from storage.layout import Root
from storage.train_log import read_train_log
from tasks import train as train_mod
from tasks.config import load_config
from tasks.ranks.distributed import consolidated_weights, deepspeed_config
from tasks.ranks.trainer import step_generator
from tasks.train import launch_command, train_run
from tests.stores import TINY_IMAGES, TINY_STORE, digits_store

STORE, NUM_IMAGES = TINY_STORE, TINY_IMAGES


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("train-root"))
    digits_store(root)
    return root


@pytest.fixture(autouse=True)
def _staging(tmp_path, monkeypatch):
    monkeypatch.setenv("DUMO_STAGING_DIR", str(tmp_path / "staging"))  # inherited by the ranks
    monkeypatch.setenv("DUMO_NO_PROGRESS", "1")


def config(root: str, name: str, *overrides: str):
    return load_config(
        None,
        [
            f"root={root}",
            f"name={name}",
            f"data.store_name={STORE}",
            "model.preset=debug",
            "model.hidden_size=32",
            "model.depth=2",
            "model.num_heads=2",
            "train.batch_size_global=16",
            "train.lr=1e-3",
            "train.log_every=1",
            *overrides,
        ],
    )


def losses(root: str, name: str) -> dict[int, tuple[float, float, float]]:
    return {r["step"]: (r["loss"], r["loss_v"], r["loss_u"]) for r in read_train_log(Root(root).run(name))}


# -- fast: configuration ------------------------------------------------------------------------------------


def test_deepspeed_json_comes_from_the_typed_config(store_root):
    cfg = config(
        store_root,
        "x",
        "train.num_processes=2",
        "train.grad_accum_steps=2",
        "train.zero_stage=3",
        "objective.derivative=finite_difference",  # JVP is refused with ZeRO-3
        "train.precision=fp32",
        "train.grad_clip=1.0",
    )
    ds = deepspeed_config(cfg.train)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False
    assert "optimizer" not in ds  # the client torch.optim.AdamW: no DeepSpeed op to build
    run = Root(store_root).run("x")
    argv, env = launch_command(config(store_root, "x").train, run, 29500)
    assert argv[1:3] == ["-m", "tasks.ranks"] and env["WORLD_SIZE"] == "1"  # inline, no launcher
    assert argv[3:] == [run.root.url, "x"]
    argv, _ = launch_command(cfg.train, run, 29500)
    assert "torch.distributed.run" in argv and argv[argv.index("--nproc_per_node") + 1] == "2"
    nodes = config(store_root, "x", "train.num_nodes=2", "train.num_processes=4", "train.hostfile=/etc/hosts")
    argv, env = launch_command(nodes.train, run, 29500, env_file="/tmp/env")
    assert argv[1:3] == ["-m", "deepspeed.launcher.runner"] and env == {"DS_ENV_FILE": "/tmp/env"}
    assert argv[argv.index("--hostfile") + 1] == "/etc/hosts" and argv[argv.index("--num_nodes") + 1] == "2"
    assert argv[argv.index("--num_gpus") + 1] == "4" and argv[-4:-2] == ["--module", "tasks.ranks"]


def test_rank_entry_point_imports_no_prefect():
    code = "import sys, tasks.ranks.__main__; sys.exit(any(m.split('.')[0] == 'prefect' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=train_mod.PROJECT_DIR).returncode == 0


def test_objective_randomness_is_a_function_of_seed_step_rank():
    draw = lambda *key: torch.randn(4, generator=step_generator(*key, torch.device("cpu")))
    assert torch.equal(draw(0, 5, 1, 0), draw(0, 5, 1, 0))
    assert not torch.equal(draw(0, 5, 1, 0), draw(0, 6, 1, 0))
    assert not torch.equal(draw(0, 5, 1, 0), draw(0, 5, 0, 0))
    assert not torch.equal(draw(0, 5, 1, 0), draw(1, 5, 1, 0))


def test_bad_config_fails_before_any_process_starts(store_root, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(train_mod.subprocess, "Popen", no_launch)
    with pytest.raises(ValidationError, match=r"global batch 16 != micro 5 x accumulation 1 x world 3"):
        config(store_root, "bad", "train.num_processes=3")
    good = config(store_root, "bad")
    broken = good.model_copy(update={"train": good.train.model_copy(update={"num_processes": 3})})  # unvalidated
    with pytest.raises(ValidationError, match="global batch 16 != micro"):
        train_run(broken)
    with pytest.raises(latents.StoreError, match="no latent store"):
        train_run(config(store_root, "bad", "data.store_name=missing"))
    with pytest.raises(ValueError, match=f"global batch 256 > {NUM_IMAGES} samples"):
        train_run(config(store_root, "bad", "train.batch_size_global=256"))
    assert not fs.exists(Root(store_root).run("bad").config)  # nothing written either


def _fake_commit(run, step: int, value: float = 0.0) -> None:
    """A committed checkpoint of ``step`` (no DeepSpeed state: what the parent reads is the marker)."""
    url = run.checkpoint(step)
    ckpts.clear(url)
    digests = ckpts.write_weights(url, {"w": torch.full((2,), value)}, {"hidden_size": 8}, "name: w\n")
    ckpts.commit(url, step, extra={"attempt": {"resumed_from": 0, "steps_per_s": 2.5}}, digests=digests)


def test_the_parent_learns_of_commits_from_their_markers_once_each_in_step_order(tmp_path):
    run = Root(str(tmp_path)).run("watch")
    _fake_commit(run, 2)
    _fake_commit(run, 4)
    commits = train_mod.CommitWatcher(run, every_s=0)
    assert commits.new() == []  # committed before the watch began
    _fake_commit(run, 4, value=1.0)  # step 4 was corrupt: the ranks resumed from 2 and wrote it again
    _fake_commit(run, 6)
    assert commits.new() == [4, 6] and commits.due() == []
    _fake_commit(run, 8)
    assert ckpts.apply_retention(run, keep_last=1, keep_every=None) == [2, 4, 6]
    assert commits.due() == [8]


def test_the_train_result_is_read_from_the_run_in_storage(tmp_path):
    run = Root(str(tmp_path)).run("result")
    assert train_mod.TrainResult.of_run(run) == train_mod.TrainResult(run.url, None, None, None, None, None, None)
    _fake_commit(run, 3)
    records = [{"step": s, "loss": 2.0 / s, "loss_v": 1.0 / s, "loss_u": None} for s in (1, 2, 3)]
    fs.write_text(run.train_log, "".join(json.dumps(r) + "\n" for r in records))
    result = train_mod.TrainResult.of_run(run)
    assert result == train_mod.TrainResult(run.url, run.checkpoint(3), 3, 2.0 / 3, 1.0 / 3, None, 2.5)
    assert train_mod.TrainResult.of_run(run, steps_per_s=0.0).steps_per_s == 0.0  # an attempt with nothing to do


# -- slow: real ranks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero2_run(store_root, tmp_path_factory):
    """An uninterrupted 2-process ZeRO-2 run: 10 steps, checkpoints at 4, 8, 10, keeping the last 2."""
    calls: list[tuple[str, int]] = []
    cfg = config(
        store_root,
        "z2",
        "train.num_processes=2",
        "train.zero_stage=2",
        "train.num_steps=10",
        "train.checkpoint_every=4",
        "train.keep_last=2",
    )
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:  # what the function-scoped _staging fixture does for a test
        mp.setenv("DUMO_STAGING_DIR", str(tmp_path_factory.mktemp("staging")))
        mp.setenv("DUMO_NO_PROGRESS", "1")
        result = train_run(cfg, on_checkpoint=lambda url, step: calls.append((url, step)))
    return {"cfg": cfg, "result": result, "calls": calls, "seconds": time.perf_counter() - t0}


@pytest.mark.slow
def test_two_ranks_zero2_from_the_store(zero2_run, store_root):
    run = Root(store_root).run("z2")
    result = zero2_run["result"]
    assert result.step == 10 and result.run_url == run.url
    assert result.checkpoint_url == run.checkpoint(10) and math.isfinite(result.final_loss)
    assert [s for _, s in zero2_run["calls"]] == [4, 8, 10]
    assert ckpts.committed_steps(run) == [8, 10]  # retention: the last 2
    marker = ckpts.read_marker(run.checkpoint(10))
    assert marker["trainer"]["world_size"] == 2 and marker["trainer"]["precision"] == "fp32"
    assert marker["files"] == [
        "config.yaml",
        "ds_config.json",  # with "latest": what DeepSpeed's own tools look for
        "ema.safetensors",
        "latest",
        "model.json",
        "trainer/mp_rank_00_model_states.pt",
        "trainer/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "trainer/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    model, ema = ckpts.load_weights(run.checkpoint(10))
    assert model["hidden_size"] == 32 and model["heads"] == "dual" and model["num_classes"] == 10
    assert all(torch.isfinite(v).all() for v in ema.values())
    log = read_train_log(run)
    assert [r["step"] for r in log] == list(range(1, 11)) and {r["world_size"] for r in log} == {2}
    assert all(r["grad_norm"] > 0 and r["images_per_s"] > 0 and r["loss_v"] > 0 for r in log)
    assert log[-1]["loss_v"] < log[0]["loss_v"]  # lr 1e-3 moves it within 10 steps
    assert fs.read_bytes(run.loss_curve)[:4] == b"\x89PNG"


def _worker_processes(root: str, run_name: str) -> list[psutil.Process]:
    found = []  # matched on the root too: a run of the same name elsewhere (another pytest) is not ours
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "tasks.ranks" in cmd and run_name in cmd and any(root in arg for arg in cmd):
            found.append(p)
    return found


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(zero2_run, store_root, caplog):
    caplog.set_level(logging.INFO, logger="dumo.train")
    cfg = zero2_run["cfg"].model_copy(update={"name": "z2-killed"})
    run = Root(store_root).run("z2-killed")
    outcome: dict = {}

    def target():
        try:
            train_run(cfg)
        except Exception as exc:  # expected: the ranks were killed
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 180
    while not any(r["step"] >= 5 for r in read_train_log(run)):  # past the commit at 4, before the one at 8
        assert time.monotonic() < deadline and thread.is_alive(), "the run never reached step 5"
        time.sleep(0.05)
    (launcher,) = [p for p in psutil.Process().children() if "torch.distributed.run" in p.cmdline()]
    os.killpg(launcher.pid, signal.SIGKILL)
    thread.join(60)
    assert "killed by SIGKILL" in str(outcome["error"])
    deadline = time.monotonic() + 20
    while _worker_processes(store_root, "z2-killed"):  # the ranks die with their launcher (PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, "ranks outlived their killed launcher"
        time.sleep(0.2)

    assert ckpts.latest(run) == 4
    # A crash in the middle of writing step 8: files there, no marker. It must not be chosen.
    half = fs.local_path(run.checkpoint(8))
    shutil.copytree(fs.local_path(run.checkpoint(4)), half, dirs_exist_ok=True)
    os.remove(os.path.join(half, ckpts.MARKER))
    assert ckpts.latest(run) == 4

    caplog.clear()
    result = train_run(cfg)
    assert "resuming at step 4 from" in caplog.text
    assert result.step == 10 and ckpts.committed_steps(run) == [8, 10]
    expected, got = losses(store_root, "z2"), losses(store_root, "z2-killed")
    assert sorted(got) == list(range(1, 11))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), f"step {step}"
    _, ema_a = ckpts.load_weights(Root(store_root).run("z2").checkpoint(10))
    _, ema_b = ckpts.load_weights(run.checkpoint(10))
    for k in ema_a:
        torch.testing.assert_close(ema_b[k], ema_a[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_zero2_resumes_at_another_world_size(zero2_run, store_root, caplog):
    src = fs.local_path(Root(store_root).run("z2").url)
    shutil.copytree(src, fs.local_path(Root(store_root).run("z2-w1").url))
    caplog.set_level(logging.INFO, logger="dumo.train")
    cfg = config(
        store_root, "z2-w1", "train.zero_stage=2", "train.num_steps=12", "train.checkpoint_every=4", "train.keep_last=2"
    )
    result = train_run(cfg)
    assert result.step == 12
    assert "universal checkpoint" in caplog.text and "resuming at step 10" in caplog.text
    log = read_train_log(Root(store_root).run("z2-w1"))
    assert [r["world_size"] for r in log] == [2] * 10 + [1] * 2
    # Other noise at 1 rank, the same weights and optimizer state: the loss stays where it was
    assert log[10]["loss_v"] == pytest.approx(log[9]["loss_v"], rel=0.5)
    assert ckpts.read_marker(Root(store_root).run("z2-w1").checkpoint(12))["trainer"]["world_size"] == 1


@pytest.mark.slow
def test_zero3_save_consolidate_and_refuse_another_world_size(store_root, monkeypatch):
    cfg = config(
        store_root,
        "z3",
        "train.num_processes=2",
        "train.zero_stage=3",
        "objective.derivative=finite_difference",  # JVP is refused with ZeRO-3
        "train.num_steps=4",
        "train.checkpoint_every=4",
        "train.ema_decay=0",
    )  # EMA = the weights, to compare with
    assert train_run(cfg).step == 4
    url = Root(store_root).run("z3").checkpoint(4)
    files = ckpts.read_marker(url)["files"]
    assert "trainer/zero_pp_rank_1_mp_rank_00_model_states.pt" in files  # ZeRO-3: parameters partitioned
    gathered = consolidated_weights(url)
    _, ema = ckpts.load_weights(url)
    assert set(ema) <= set(gathered)
    for k in ema:  # the EMA was updated from gathered partitions; zero_to_fp32 gathers the saved ones
        torch.testing.assert_close(gathered[k].float(), ema[k], rtol=0, atol=0)
    monkeypatch.setattr(train_mod.subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ValueError, match="written by 2 ranks with ZeRO-3 and this run has 1"):
        train_run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_processes": 1})}))


@pytest.mark.slow
def test_checkpoints_on_s3_and_resume_from_them(store_root, s3_bucket, monkeypatch):
    root = f"{s3_bucket}/root"
    fs.upload_dir(fs.local_path(Root(store_root).latent_store(STORE)), Root(root).latent_store(STORE))
    events: list[tuple] = []
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # "reachable": events are emitted
    monkeypatch.setattr(train_mod, "emit_checkpoint_event", lambda *args: events.append(args))
    overrides = ("train.zero_stage=1", "train.precision=bf16", "train.checkpoint_every=3")
    first = train_run(config(root, "s3", *overrides, "train.num_steps=6"))
    run = Root(root).run("s3")
    assert first.checkpoint_url == run.checkpoint(6) and run.checkpoint(6).startswith("s3://")
    assert events == [("s3", run.checkpoint(3), 3), ("s3", run.checkpoint(6), 6)]
    before = losses(root, "s3")
    second = train_run(config(root, "s3", *overrides, "train.num_steps=9"))  # resumes from S3 at step 6
    assert second.step == 9 and ckpts.committed_steps(run) == [3, 6, 9]
    after = losses(root, "s3")
    assert sorted(after) == list(range(1, 10)) and all(after[s] == before[s] for s in before)
    marker = ckpts.read_marker(run.checkpoint(9))
    assert marker["trainer"]["precision"] == "bf16" and any(f.startswith("trainer/") for f in marker["files"])
    _, ema = ckpts.load_weights(run.checkpoint(9))
    assert all(torch.isfinite(v).all() for v in ema.values())
    assert fs.exists(run.loss_curve) and fs.exists(run.config)


@pytest.mark.slow
def test_a_failing_rank_fails_the_task_with_its_error(zero2_run, store_root):
    src = fs.local_path(Root(store_root).run("z2").url)
    dst = fs.local_path(Root(store_root).run("z2-bad").url)
    shutil.copytree(src, dst)
    # Bytes DeepSpeed cannot load, under a marker that vouches for them (a digest mismatch would not fail:
    # resume passes over it to the previous checkpoint), so rank 0 fails while loading
    ckpt = os.path.join(dst, "checkpoints", "step-0000010")
    with open(os.path.join(ckpt, "trainer", "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"not a torch file")
    marker = json.loads(open(os.path.join(ckpt, ckpts.MARKER)).read())
    marker["sha256"]["trainer/mp_rank_00_model_states.pt"] = hashlib.sha256(b"not a torch file").hexdigest()
    with open(os.path.join(ckpt, ckpts.MARKER), "w") as f:
        json.dump(marker, f)
    cfg = zero2_run["cfg"].model_copy(update={"name": "z2-bad"})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_steps": 12})})
    with pytest.raises(RuntimeError, match=r"(?s)rank-\d raised:.*(PytorchStreamReader|UnpicklingError|load key)"):
        train_run(cfg)


@pytest.mark.slow
def test_train_flow_emits_checkpoint_events(prefect_harness, store_root, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    from flows.train import train_flow

    # Flows of earlier tests leave the process-wide events worker behind; its websocket may be gone. Stop
    # it, so this flow's emits start a fresh one, and drain it after the flow so every event is sent.
    EventsWorker.drain_all(at_exit=False)
    path = tmp_path / "train.yaml"
    path.write_text(config(store_root, "flow", "train.checkpoint_every=1").to_yaml())
    result = train_flow(config=str(path), overrides=["train.num_steps=2"])
    EventsWorker.drain_all(at_exit=False)
    run = Root(store_root).run("flow")
    assert result.step == 2 and result.checkpoint_url == run.checkpoint(2)
    wanted = EventFilter(
        event=EventNameFilter(name=[train_mod.EVENT]), resource=EventResourceFilter(id=["dumo.run.flow"])
    )
    deadline = time.monotonic() + 30
    while True:  # the server stores events asynchronously
        with get_client(sync_client=True) as client:
            events = client.read_events(filter=wanted, limit=50).events
        if len(events) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    payloads = sorted((e.payload["step"], e.payload["checkpoint_url"]) for e in events)
    assert payloads == [(1, run.checkpoint(1)), (2, run.checkpoint(2))]


def test_a_checkpoint_of_another_network_is_refused_with_the_difference_and_the_way_out():
    """E.g. a demo root left by an older configs/demo.yaml: the error names the changed field and says what
    to do, instead of loading weights into the wrong network."""
    cfg = load_config("demo")
    model = {"hidden_size": 128, "depth": 4, "time_scale": 1.0}
    state = {"zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision, "world_size": 1}
    assert ckpts.check_resumable(state, cfg.train, model, dict(model), "file:///r/checkpoints/step-1") is False
    with pytest.raises(ValueError, match=r"differs in \['time_scale'\].*--set name=NEW"):
        ckpts.check_resumable(state, cfg.train, model, {**model, "time_scale": 1000.0}, "file:///r/checkpoints/step-1")
