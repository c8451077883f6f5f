"""The checkpoint store: a step directory counts only once its marker is written, retention, digest check.

No DeepSpeed here: the trainer's own use of the store is covered in test_train.py.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from storage import checkpoints as ckpts
from storage import fs
from storage.layout import Root, RunLayout, run_of_checkpoint

MODEL = {"hidden_size": 8, "depth": 1}


def _layout(kind: str, tmp_path) -> RunLayout:
    root = str(tmp_path / "root") if kind == "local" else f"memory://ckpt-{uuid.uuid4().hex[:8]}"
    return Root(root).run("r")


def _write(run: RunLayout, step: int, commit: bool = True, value: float = 1.0) -> str:
    url = run.checkpoint(step)
    fs.write_bytes(fs.join(ckpts.trainer_state_url(url), "mp_rank_00_model_states.pt"), b"deepspeed state")
    ckpts.write_weights(url, {"w": torch.full((2, 3), value)}, MODEL, "name: r\n")
    if commit:
        ckpts.commit(url, step, extra={"trainer": {"world_size": 2, "zero_stage": 2, "precision": "fp32"}})
    return url


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_half_written_checkpoint_is_never_chosen(kind, tmp_path):
    run = _layout(kind, tmp_path)
    assert ckpts.latest(run) is None
    _write(run, 3)
    half = _write(run, 6, commit=False)  # a crash after the weights, before the marker
    fs.write_bytes(fs.join(run.checkpoint(9), "trainer", "zero_pp_rank_0_mp_rank_00_optim_states.pt"), b"part")
    fs.write_text(fs.join(run.checkpoints, "step-0000012.tmp-123", "ema.safetensors"), "junk")  # not a step name
    assert ckpts.committed_steps(run) == [3]
    assert ckpts.latest(run) == 3
    with pytest.raises(FileNotFoundError, match="not committed"):
        ckpts.load_weights(half)
    ckpts.clear_uncommitted(half)  # what the trainer does before writing step 6 again
    assert not fs.exists(half)
    ckpts.clear_uncommitted(run.checkpoint(3))  # a committed one stays
    assert ckpts.is_committed(run.checkpoint(3))


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_commit_records_files_and_digest(kind, tmp_path):
    run = _layout(kind, tmp_path)
    url = _write(run, 5, value=2.5)
    marker = ckpts.read_marker(url)
    assert marker["step"] == 5 and marker["trainer"]["world_size"] == 2
    assert marker["files"] == ["config.yaml", "ema.safetensors", "model.json", "trainer/mp_rank_00_model_states.pt"]
    model, state = ckpts.load_weights(url)
    assert model == MODEL and torch.equal(state["w"], torch.full((2, 3), 2.5))
    assert ckpts.digest(url) == marker["ema_sha256"]
    assert ckpts.read_config_yaml(url) == "name: r\n"


def _flip(url: str, offset: int = -1) -> None:
    raw = bytearray(fs.read_bytes(url))
    raw[offset] ^= 0xFF
    fs.write_bytes(url, bytes(raw))


def test_tampered_weights_fail_the_digest_check(tmp_path):
    run = _layout("local", tmp_path)
    url = _write(run, 4)
    _flip(fs.join(url, ckpts.EMA_FILE))  # one flipped byte in the tensor data
    with pytest.raises(ckpts.CheckpointCorruptError, match="ema.safetensors has sha256") as info:
        ckpts.load_weights(url)
    assert not isinstance(info.value, OSError)  # not an I/O error: no retry spins on it
    assert "delete it" in str(info.value) and url in str(info.value)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_every_file_has_a_digest_and_a_flip_in_any_of_them_falls_back_to_the_previous_checkpoint(kind, tmp_path):
    run = _layout(kind, tmp_path)
    _write(run, 2)
    url = _write(run, 4)
    marker = ckpts.read_marker(url)
    assert sorted(marker["sha256"]) == marker["files"]  # every file, whatever the trainer wrote
    assert ckpts.verify(url) == [] and ckpts.latest_intact(run) == 4
    for name in marker["files"]:
        original = fs.read_bytes(fs.join(url, name))
        _flip(fs.join(url, name), offset=len(original) // 2)
        assert [p.split(" ")[0] for p in ckpts.verify(url)] == [name]
        passed_over: list[int] = []
        assert ckpts.latest_intact(run, on_corrupt=lambda step, _, seen=passed_over: seen.append(step)) == 2
        assert passed_over == [4] and ckpts.latest(run) == 4  # still committed: named, not hidden
        fs.write_bytes(fs.join(url, name), original)
    fs.remove(fs.join(ckpts.trainer_state_url(url), "mp_rank_00_model_states.pt"))
    assert ckpts.verify(url) == ["trainer/mp_rank_00_model_states.pt is missing"]
    ckpts.clear(url)  # what the trainer does before writing step 4 again
    assert not fs.exists(url) and ckpts.latest_intact(run) == 2


def test_retention_keeps_the_last_k_and_every_mth():
    steps = [100, 200, 300, 400, 500, 600, 700]
    assert ckpts.retention(steps, keep_last=2, keep_every=None) == [100, 200, 300, 400, 500]
    assert ckpts.retention(steps, keep_last=2, keep_every=300) == [100, 200, 400, 500]
    assert ckpts.retention(steps[:2], keep_last=3, keep_every=None) == []


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_apply_retention_deletes_whole_directories(kind, tmp_path):
    run = _layout(kind, tmp_path)
    for step in (2, 4, 6, 8, 10):
        _write(run, step)
    half = _write(run, 12, commit=False)
    assert ckpts.apply_retention(run, keep_last=2, keep_every=4) == [2, 6]
    assert ckpts.committed_steps(run) == [4, 8, 10]
    assert not fs.exists(run.checkpoint(2)) and not fs.exists(run.checkpoint(6))
    assert fs.exists(half)  # uncommitted ones are the trainer's business (cleared before that step is rewritten)


@pytest.mark.parametrize("root", ["/tmp/dumo root", "s3://bucket/prefix", "memory://r"])
def test_a_run_and_its_checkpoints_are_found_again_from_their_urls(root):
    run = Root(root).run("demo")
    assert RunLayout.of_url(run.url) == run
    assert run_of_checkpoint(run.checkpoint(12)) == (run.root, "demo", 12)
    for bad in (run.root.url, run.checkpoints, Root(root).latent_store("x")):
        with pytest.raises(ValueError, match="not a run URL"):
            RunLayout.of_url(bad)
    with pytest.raises(ValueError, match="not a checkpoint URL"):
        run_of_checkpoint(run.checkpoints)
