"""The distributed side of a rank process, in one place: which rank this is and on which device, the
process group, who speaks (rank 0; the others are silent, as with DiT's ``create_logger``), and the
checkpoint collectives: agree on the newest intact checkpoint, load it, save one. The trainer calls these
on every rank alike and never asks which rank it is on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from storage import checkpoints as ckpts
from storage import fs
from storage.layout import RunLayout
from tasks.config import TrainConfig

TAG = ckpts.TRAINER_DIR  # DeepSpeed's tag: its files land in <dir>/trainer/, the checkpoint's trainer/ folder
T = TypeVar("T")


def deepspeed_config(train: TrainConfig, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the typed config so no value exists twice."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.device == "cuda" and train.zero_stage in (1, 2):
        zero.update(overlap_comm=True, contiguous_gradients=True)
    return {
        "train_batch_size": train.batch_size_global,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False},
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_allow_untested_optimizer": True,  # the client torch.optim.AdamW: no DeepSpeed op build
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own step lines would repeat it
        "checkpoint": {"load_universal": load_universal},
    }


def trainer_state(train: TrainConfig, step: int) -> dict[str, Any]:
    """What a checkpoint records (in its marker and DeepSpeed client state) about how it was trained."""
    import deepspeed

    keys = ("world_size", "zero_stage", "precision", "seed", "batch_size_global")
    return {
        "step": step,
        **{k: getattr(train, k) for k in keys},
        "deepspeed": deepspeed.__version__,
        "torch": torch.__version__,
    }


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_environ(cls) -> RankEnv:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("RANK and WORLD_SIZE are unset: start ranks with tasks.train, torchrun or deepspeed")
        world = int(os.environ["WORLD_SIZE"])
        local_world = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)), int(local_world))


class _StdoutHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        if not sys.stderr.isatty():  # into a pipe, a bar redrawn after every line would double the log
            super().emit(record)
            return
        from tqdm import tqdm

        tqdm.write(self.format(record), file=self.stream)  # keeps a progress bar on the terminal intact


def create_logger(rank: int) -> logging.Logger:
    """Rank 0's logger prints plain lines on stdout (the parent, tasks.train, logs them as they come); the
    other ranks get one that drops everything, so the trainer logs without asking which rank it is."""
    logger = logging.getLogger("dumo.rank")
    logger.propagate = False
    logger.handlers.clear()
    if rank == 0:
        handler = _StdoutHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


class Distributed:
    """This rank's place in the job and every collective the trainer needs."""

    def __init__(self, env: RankEnv, train: TrainConfig, run_url: str):
        if env.world_size != train.world_size:
            raise ValueError(f"launched with {env.world_size} ranks, the config says {train.world_size}")
        self.env, self.backend = env, "gloo" if train.device == "cpu" else "nccl"
        self.is_main = env.rank == 0
        self.is_node_main = env.local_rank == 0  # one rank per node owns the node's staging directory
        base = os.environ.get("DUMO_STAGING_DIR") or os.path.join(tempfile.gettempdir(), "dumo-staging")
        self.staging = os.path.join(base, hashlib.sha1(run_url.encode()).hexdigest()[:16])  # same on a node
        if train.device == "cuda":
            self.device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs: TF32 tensor cores; bf16 is unaffected
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(train.torch_threads or max(1, (os.cpu_count() or 1) // env.local_world_size))

    def init(self) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=self.backend)

    def close(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def barrier(self) -> None:
        torch.distributed.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over the ranks (an all-reduce: every rank joins)."""
        torch.distributed.all_reduce(values)
        return values / self.env.world_size

    def main_only(self, make: Callable[[], T]) -> T | None:
        """``make()`` on rank 0 alone; None elsewhere (no communication)."""
        return make() if self.is_main else None

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0, its answer on every rank (a broadcast)."""
        box: list[Any] = [compute() if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    # -- checkpoints --------------------------------------------------------------------------------------
    def latest_intact(self, run: RunLayout, log: logging.Logger) -> int | None:
        """The step of the run's newest committed checkpoint whose files all match their digests (None: none
        yet). Rank 0 reads the files, passing over corrupt checkpoints; every rank takes its answer."""

        def passed_over(step: int, problems: list[str]) -> None:
            url = run.checkpoint(step)
            log.info(
                f"checkpoint step {step} at {url} is corrupt ({'; '.join(problems[:3])}): resuming from an older one"
            )

        return self.from_main(lambda: ckpts.latest_intact(run, on_corrupt=passed_over))

    def load(self, engine: Any, url: str, universal: bool) -> None:
        """Load the DeepSpeed state of the checkpoint at ``url`` into ``engine`` on every rank; ``universal``:
        through DeepSpeed's world-size-free format (ZeRO 1/2 saved at another world size)."""
        load_dir = fs.local_path(url) if fs.is_local(url) else os.path.join(self.staging, "resume")
        out = os.path.join(self.staging, "universal")
        if self.is_node_main:
            if not fs.is_local(url):
                shutil.rmtree(load_dir, ignore_errors=True)
                fs.download_dir(ckpts.trainer_state_url(url), os.path.join(load_dir, TAG))
            if universal:
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state"]
                cmd += ["--input_folder", os.path.join(load_dir, TAG), "--output_folder", os.path.join(out, TAG)]
                cmd += ["--num_extract_workers", "1", "--num_merge_workers", "1"]  # small, and no CPU to spare
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"ds_to_universal failed on {url}:\n{done.stderr[-3000:]}")
        self.barrier()
        load_dir = out if universal else load_dir
        path, _ = engine.load_checkpoint(load_dir, tag=TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no state to load under {load_dir}/{TAG}")
        self.barrier()
        if self.is_node_main:  # downloaded or converted copies: every rank has loaded them
            for name in ("resume", "universal"):
                shutil.rmtree(os.path.join(self.staging, name), ignore_errors=True)

    def save(
        self, engine: Any, url: str, client_state: dict[str, Any], commit: Callable[[dict[str, str]], None]
    ) -> None:
        """Write a checkpoint at ``url``: each rank's DeepSpeed partitions to node-local staging, each node's
        uploaded to trainer/, then ``commit(digests of those files)`` on rank 0 writes the rest and the marker.
        Every rank returns once the marker is written."""
        stage_dir = os.path.join(self.staging, "save")
        if self.is_main:  # a half-written one from a crash at this step, or a corrupt one passed over at resume
            ckpts.clear(url)
        if self.is_node_main:
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.makedirs(stage_dir)
        self.barrier()
        engine.save_checkpoint(stage_dir, tag=TAG, client_state=client_state, save_latest=False)
        self.barrier()
        digests = {}  # this node's DeepSpeed files, hashed before the upload; commit hashes other nodes' files
        if self.is_main:
            digests = ckpts.local_digests(os.path.join(stage_dir, TAG), prefix=f"{TAG}/")
        if self.is_node_main:  # each node uploads the partitions its ranks wrote
            fs.upload_dir(os.path.join(stage_dir, TAG), ckpts.trainer_state_url(url))
            shutil.rmtree(stage_dir, ignore_errors=True)
        self.barrier()
        if self.is_main:
            commit(digests)
        self.barrier()  # so a launcher whose ranks have all returned finds the last checkpoint committed


def consolidated_weights(ckpt_url: str) -> dict[str, torch.Tensor]:
    """The fp32 module weights of a checkpoint's DeepSpeed state gathered from every ZeRO partition
    (DeepSpeed's zero_to_fp32): the way to carry a ZeRO-3 run's weights to another world size."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    stage = ckpts.read_marker(ckpt_url)["trainer"]["zero_stage"]
    with tempfile.TemporaryDirectory() as tmp:
        load_dir = fs.local_path(ckpt_url) if fs.is_local(ckpt_url) else tmp
        if not fs.is_local(ckpt_url):
            fs.download_dir(ckpts.trainer_state_url(ckpt_url), os.path.join(tmp, TAG))
        if stage == 0:  # no ZeRO partitions: the module state is whole
            return torch.load(os.path.join(load_dir, TAG, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
        return get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=TAG)
