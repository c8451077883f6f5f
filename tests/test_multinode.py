"""Multi-node training the way clusters launch it: two "nodes" on 127.0.0.1, each a torchrun launcher
(``dumo train --nnodes 2 --node-rank K ...``) started by the ``train-nodes`` flow, train one run to committed
checkpoints; a resume on one node then trains on exactly the batches an unbroken run would have seen."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

from flows.train_nodes import train_nodes_flow
from storage import checkpoints as ckpts
from storage.latent_dataset import LatentDataset
from storage.layout import Root, RunLayout
from storage.train_log import read_train_log
from tasks.train import NodeLaunch, launch_command, train_run
from tasks.train_nodes import node_argv
from tests.stores import TINY_STORE, digits_store
from tests.test_train import config


def test_node_launch_command_and_config() -> None:
    node = NodeLaunch(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400)
    cfg = config("/tmp/root", "x", "train.num_processes=4", "train.batch_size_global=64", *node.config_overrides())
    assert cfg.train.world_size == 8 and cfg.train.launcher == "torchrun"
    argv, env = launch_command(cfg.train, RunLayout(Root(cfg.root), cfg.name), 1234, node=node)
    assert argv[1:3] == ["-m", "torch.distributed.run"] and env == {}
    for flag, value in (("--nnodes", "2"), ("--node_rank", "1"), ("--nproc_per_node", "4")):
        assert argv[argv.index(flag) + 1] == value
    assert argv[argv.index("--master_addr") + 1] == "10.0.0.1" and argv[argv.index("--master_port") + 1] == "29400"
    cmd = node_argv("c.yaml", ["train.num_steps=9"], node)
    assert cmd[1:4] == ["train", "--config", "c.yaml"] and cmd[cmd.index("--node-rank") + 1] == "1"
    with pytest.raises(ValueError, match="node rank 2 not in"):
        NodeLaunch(2, 2, "h", 1)
    with pytest.raises(ValueError, match="needs train.hostfile .* or one launcher per node"):
        config("/tmp/root", "x", "train.num_nodes=2", "train.batch_size_global=32")


def _traced_batches(trace: str) -> dict[int, tuple[int, torch.Tensor, torch.Tensor]]:
    """step -> (world size, x, y) of the global batch the ranks trained on, rank parts in rank order."""
    parts: dict[int, list[tuple[int, int, str]]] = {}
    for path in glob.glob(os.path.join(trace, "step-*.npz")):
        _, step, _, rank, _, world = os.path.basename(path)[:-4].split("-")
        parts.setdefault(int(step), []).append((int(rank), int(world), path))
    out = {}
    for step, ranks in parts.items():
        ranks.sort()
        (world,) = {w for _, w, _ in ranks}
        assert [r for r, _, _ in ranks] == list(range(world)), f"step {step}: ranks {ranks}"
        data = [np.load(p) for _, _, p in ranks]
        x = torch.from_numpy(np.concatenate([d["x"] for d in data]))
        y = torch.from_numpy(np.concatenate([d["y"] for d in data]))
        out[step] = (world, x, y)
    return out


@pytest.mark.slow
def test_two_nodes_then_resume_on_one(prefect_harness, tmp_path, monkeypatch) -> None:
    root = str(tmp_path / "root")
    store = digits_store(root)
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv("DUMO_BATCH_TRACE", str(trace))  # inherited by the launchers and their ranks
    monkeypatch.setenv("DUMO_NO_PROGRESS", "1")
    monkeypatch.delenv("DUMO_STAGING_DIR", raising=False)  # each node keeps its own scratch
    # ZeRO-0: the optimizer state is whole, so it carries over to another world size as it is
    common = ["train.zero_stage=0", "train.checkpoint_every=2", "train.torch_threads=1"]
    cfg = config(root, "nodes", *common, "train.num_steps=4")
    path = tmp_path / "nodes.yaml"
    path.write_text(cfg.to_yaml())

    result = train_nodes_flow(config=str(path), nnodes=2, timeout_s=600, poll_s=0.5)
    run = Root(root).run("nodes")
    assert result.step == 4 and result.checkpoint_url == run.checkpoint(4)
    assert ckpts.committed_steps(run) == [2, 4]
    assert ckpts.read_marker(run.checkpoint(4))["trainer"]["world_size"] == 2

    # the same run resumed on one node, one process: step 4 onwards
    resumed = train_run(config(root, "nodes", *common, "train.num_steps=6"))
    assert resumed.step == 6
    log = read_train_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["world_size"] for r in log] == [2, 2, 2, 2, 1, 1]

    # the batches: those of an unbroken run (the reader's pure function of seed and step), bit for bit
    seen = _traced_batches(str(trace))
    assert sorted(seen) == list(range(6)) and [seen[s][0] for s in range(6)] == [2, 2, 2, 2, 1, 1]
    reader = LatentDataset(store, seed=cfg.train.seed, flip=cfg.data.hflip)
    for step in range(6):
        x, y = reader.global_batch(step, cfg.train.batch_size_global)
        assert torch.equal(seen[step][1], x) and torch.equal(seen[step][2], y), f"step {step}"
    assert Root(root).latent_store(TINY_STORE) == store
