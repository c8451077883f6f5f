"""One training rank: ``python -m tasks.train_worker ROOT RUN`` (started by tasks.train).

Reads the resolved config from ``runs/<run>/config.yaml``, trains with DeepSpeed ZeRO from the latent store
and writes committed checkpoints under the run; run again, it continues from the newest committed one.
Imports no Prefect: the parent (tasks.train) reads the machine-readable lines rank 0 prints on stdout:

    DUMO_CHECKPOINT {"url", "step"}                                                after each commit
    DUMO_DONE {"step", "final_loss", "final_loss_v", "final_loss_u", "steps_per_s", "checkpoint_url",
               "resumed_from"}                                                 at the end

Exact resume: the batch of step S is a function of (seed, S) (LatentDataset.global_batch) and the objective's
noise, times and label dropout come from a generator seeded by (seed, S, rank, micro step), so a run resumed
at S sees what an uninterrupted one saw. Environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
(set by tasks.train, torchrun or the deepspeed launcher); DUMO_STAGING_DIR (node-local scratch, default under
the temp dir); DUMO_ERROR_DIR (a failing rank writes its traceback there); DUMO_NO_PROGRESS (no tqdm bar);
DUMO_BATCH_TRACE (a directory: each rank saves the batch it trains on at each step there, for tests that
check which batches a resumed or re-sized run saw; small runs only).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dumo_model.dit import DualHeadDiT
from dumo_model.ema import EMA
from dumo_model.objectives import Objective
from storage import checkpoints as ckpts
from storage import fs
from storage.latent_dataset import LatentDataset
from storage.layout import Root, RunLayout
from storage.train_log import TrainLog, loss_headline, read_train_log
from tasks.config import PipelineConfig, TrainConfig, config_from_yaml_text
from tasks.modeling import dit_config, init_from_pretrained, resume_config

CHECKPOINT_LINE = "DUMO_CHECKPOINT"
DONE_LINE = "DUMO_DONE"
TAG = ckpts.TRAINER_DIR  # DeepSpeed's tag: its files land in <dir>/trainer/, the checkpoint's trainer/ folder


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


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses or gradients on more steps than allowed; nothing after the last
    committed checkpoint is kept."""

    def __init__(self, step: int, count: int, allowed: int, resume_step: int | None):
        resume = f"step {resume_step}" if resume_step is not None else "step 0 (no checkpoint yet)"
        super().__init__(
            f"step {step}: the loss or gradient norm is NaN or infinite ({count} such step(s), more than"
            f" train.max_nonfinite_steps={allowed}); training stopped before committing it. Likely causes:"
            " corrupt latents (check the store with dumo verify-store), a learning rate too high (lower train.lr"
            f" or set train.grad_clip), or bf16 overflow. The last committed checkpoint, {resume}, stays the"
            " resume point"
        )
        self.step, self.count, self.allowed, self.resume_step = step, count, allowed, resume_step

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.count, self.allowed, self.resume_step))


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


def check_resumable(state: dict[str, Any], train: TrainConfig, model: dict[str, Any], saved_model: dict, url: str):
    """Raise ValueError, in words, when the checkpoint at ``url`` cannot continue under ``train``; return
    True when it needs DeepSpeed's universal format (ZeRO 1/2 at another world size), else False."""
    if saved_model != model:
        diff = sorted(k for k in set(model) | set(saved_model) if model.get(k) != saved_model.get(k))
        raise ValueError(
            f"{url} holds another network (differs in {diff}): this run cannot continue from it. Use a new run"
            " name (--set name=NEW) or delete the run's directory to start it again"
        )
    for key in ("zero_stage", "precision"):
        if state.get(key) != getattr(train, key):
            raise ValueError(
                f"{url} was written with {key}={state.get(key)}, this run has {key}="
                f"{getattr(train, key)}: DeepSpeed state does not carry over; keep it or use a new run"
            )
    was, now = state.get("world_size"), train.world_size
    if was == now or train.zero_stage == 0:  # ZeRO-0 keeps the whole optimizer state in one file
        return False
    if train.zero_stage == 3:
        raise ValueError(
            f"{url} was written by {was} ranks with ZeRO-3 and this run has {now}: ZeRO-3 state cannot be"
            f" re-partitioned (it would load wrong weights). Run with {was} ranks; to take the weights"
            " elsewhere, tasks.train_worker.consolidated_weights(url) gathers them into one fp32 state dict"
        )
    return True


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The objective's randomness for one micro step: a pure function of (seed, step, rank, micro)."""
    words = np.random.SeedSequence([seed % 2**63, step, rank, micro]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(words[0]) | int(words[1]) << 32)


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


# ---------------------------------------------------------------------------------------------------------
# Train log and loss curve (rank 0)


def plot_loss_curve(layout: RunLayout, records: list[dict[str, Any]]) -> None:
    """loss.png in the run directory against the step, log scale: the unweighted loss_v and loss_u (what
    shows learning) on the left axis, the weighted loss the optimizer sees (near-constant under adaptive
    weighting) on a right axis of its own, so its flat line does not read as a failed run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=100)
    lines = []
    for key in ("loss_v", "loss_u"):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            lines += ax.plot(*zip(*points), label=key, linewidth=1)
    ax.set(xlabel="step", ylabel="unweighted loss (batch mean)", yscale="log", title=layout.name)
    weighted = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    if weighted and lines:
        right = ax.twinx()
        lines += right.plot(*zip(*weighted), label="weighted loss (right)", color="0.6", linewidth=0.8)
        right.set(ylabel="weighted loss")
    elif weighted:  # an objective without named terms: its loss is the headline
        lines += ax.plot(*zip(*weighted), label="loss", linewidth=1)
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    fs.write_bytes(layout.loss_curve, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, cfg: PipelineConfig, layout: RunLayout, env: RankEnv):
        self.cfg, self.t, self.layout, self.env = cfg, cfg.train, layout, env
        if env.world_size != self.t.world_size:
            raise ValueError(f"launched with {env.world_size} ranks, the config says {self.t.world_size}")
        self.is_main = env.rank == 0
        base = os.environ.get("DUMO_STAGING_DIR") or os.path.join(tempfile.gettempdir(), "dumo-staging")
        self.staging = os.path.join(base, hashlib.sha1(layout.url.encode()).hexdigest()[:16])  # same on a node
        if self.t.device == "cuda":
            self.device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs: TF32 tensor cores; bf16 is unaffected
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(self.t.torch_threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
        self.ds = LatentDataset(
            Root(cfg.root).latent_store(cfg.data.store_name),
            seed=self.t.seed,
            in_memory=cfg.data.in_memory,
            flip=cfg.data.hflip,
        )
        self.ds.steps_per_epoch(self.t.batch_size_global)  # fails now if the store is smaller than a batch
        self.model_cfg = dit_config(cfg, self.ds.latent_shape, self.ds.num_classes)
        self.config_yaml = fs.read_text(layout.config)
        self.bar: Any = None

    def log(self, msg: str) -> None:
        if self.bar is not None and sys.stderr.isatty():
            self.bar.write(msg, file=sys.stdout)  # keeps the bar intact on a terminal
        else:  # into a pipe, a bar redrawn after every line would double the log
            print(msg, flush=True)

    def barrier(self) -> None:
        torch.distributed.barrier()

    # -- resume -------------------------------------------------------------------------------------------
    def resume_point(self, verify: bool = False) -> tuple[int, str | None, bool]:
        """(step, checkpoint URL or None, whether it needs DeepSpeed's universal format). ``verify`` (a
        collective): rank 0 checks every file's digest and passes over corrupt checkpoints to the newest
        intact one; every rank takes its answer."""
        if verify:
            choice: list[int | None] = [None]
            if self.is_main:
                choice[0] = ckpts.latest_intact(self.layout, on_corrupt=self.passed_over)
            torch.distributed.broadcast_object_list(choice, src=0)
            step = choice[0]
        else:
            step = ckpts.latest(self.layout)
        if step is None:
            return 0, None, False
        url = self.layout.checkpoint(step)
        saved_model = json.loads(fs.read_text(fs.join(url, ckpts.MODEL_FILE)))
        self.model_cfg, saved_model = resume_config(self.cfg, self.model_cfg, saved_model)
        state = ckpts.read_marker(url).get("trainer", {})
        return step, url, check_resumable(state, self.t, asdict(self.model_cfg), saved_model, url)

    def passed_over(self, step: int, problems: list[str]) -> None:
        url = self.layout.checkpoint(step)
        self.log(f"checkpoint step {step} at {url} is corrupt ({'; '.join(problems[:3])}): resuming from an older one")

    def fetch(self, url: str, universal: bool) -> str:
        """A local directory whose trainer/ holds the checkpoint's DeepSpeed state, ready to load."""
        load_dir = fs.local_path(url) if fs.is_local(url) else os.path.join(self.staging, "resume")
        out = os.path.join(self.staging, "universal")
        if self.env.local_rank == 0:
            if not fs.is_local(url):
                shutil.rmtree(load_dir, ignore_errors=True)
                fs.download_dir(ckpts.trainer_state_url(url), os.path.join(load_dir, TAG))
            if universal:  # ZeRO 1/2 at another world size: DeepSpeed's world-size-free format
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state"]
                cmd += ["--input_folder", os.path.join(load_dir, TAG), "--output_folder", os.path.join(out, TAG)]
                cmd += ["--num_extract_workers", "1", "--num_merge_workers", "1"]  # small, and no CPU to spare
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"ds_to_universal failed on {url}:\n{done.stderr[-3000:]}")
        self.barrier()
        return out if universal else load_dir

    # -- checkpoint ---------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """DeepSpeed state to local staging, copied to trainer/; EMA, model.json, config.yaml; marker last."""
        url = self.layout.checkpoint(step)
        stage_dir = os.path.join(self.staging, "save")
        if self.is_main:  # a half-written one from a crash at this step, or a corrupt one passed over at resume
            ckpts.clear(url)
        if self.env.local_rank == 0:
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.makedirs(stage_dir)
        self.barrier()
        state = trainer_state(self.t, step)
        self.engine.save_checkpoint(stage_dir, tag=TAG, client_state={"dumo": state}, save_latest=False)
        self.barrier()
        digests = {}  # this node's DeepSpeed files, hashed before the upload; commit hashes other nodes' files
        if self.is_main:
            digests = ckpts.local_digests(os.path.join(stage_dir, TAG), prefix=f"{TAG}/")
        if self.env.local_rank == 0:  # each node uploads the partitions its ranks wrote
            fs.upload_dir(os.path.join(stage_dir, TAG), ckpts.trainer_state_url(url))
            shutil.rmtree(stage_dir, ignore_errors=True)
        self.barrier()
        if self.is_main:
            digests |= ckpts.write_weights(url, self.ema.state_dict(), asdict(self.model_cfg), self.config_yaml)
            ckpts.write_deepspeed_files(url, deepspeed_config(self.t))  # stock zero_to_fp32 needs no --tag
            self.train_log.flush()
            plot_loss_curve(self.layout, self.train_log.records)
            ckpts.commit(url, step, extra={"trainer": state}, digests=digests)  # the marker, last
            removed = ckpts.apply_retention(self.layout, self.t.keep_last, self.t.keep_every)
            self.log(f"checkpoint step {step} committed at {url}" + (f"; removed steps {removed}" if removed else ""))
            print(f"{CHECKPOINT_LINE} {json.dumps({'url': url, 'step': step})}", flush=True)

    # -- training -----------------------------------------------------------------------------------------
    def build(self, start_url: str | None, universal: bool) -> None:
        import deepspeed

        torch.manual_seed(self.t.seed)  # every rank builds the same initial weights
        model = DualHeadDiT(self.model_cfg).to(self.device)  # the EMA must live where the weights will
        if start_url is None and self.cfg.model.init_from:  # a new run from a released DiT/SiT checkpoint
            message = init_from_pretrained(model, self.cfg.model)
            if self.is_main:
                self.log(message)
        self.num_params = sum(p.numel() for p in model.parameters())
        # Only rank 0 writes the EMA, so only rank 0 keeps one (an XL/2 copy is 2.7 GB)
        self.ema = EMA(model, self.t.ema_decay, warmup=self.t.ema_warmup) if self.is_main else None
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.t.lr, betas=tuple(self.t.betas), weight_decay=self.t.weight_decay)
        warmup = self.t.lr_warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.engine, _, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(self.t, universal)
        )
        if start_url is not None:
            load_dir = self.fetch(start_url, universal)
            path, _ = self.engine.load_checkpoint(load_dir, tag=TAG)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no state to load under {load_dir}/{TAG}")
            self.barrier()
            if self.env.local_rank == 0:  # downloaded or converted copies: every rank has loaded them
                for name in ("resume", "universal"):
                    shutil.rmtree(os.path.join(self.staging, name), ignore_errors=True)
            if self.ema is not None:
                self.ema.load_state_dict(ckpts.load_weights(start_url)[1])  # checks the digest in the marker
        self.objective = Objective(self.cfg.objective, self.ds.num_classes)

    def update_ema(self) -> None:
        if self.t.zero_stage == 3:  # parameters are partitioned: gather them (a collective: every rank joins)
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                if self.ema is not None:
                    self.ema.update(self.engine.module)
        elif self.ema is not None:
            self.ema.update(self.engine.module)

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One optimizer step over the micro batches: (mean [loss, loss_v, loss_u] on this rank, grad norm)."""
        engine, t = self.engine, self.t
        sums = torch.zeros(3, device=self.device)
        nan = torch.tensor(float("nan"), device=self.device)
        grad_norm = None
        micro_x, micro_y = x.split(t.micro_batch), y.split(t.micro_batch)
        for m, (xm, ym) in enumerate(zip(micro_x, micro_y)):
            out = self.objective(engine, xm, ym, gen=step_generator(t.seed, step, self.env.rank, m, self.device))
            self.terms = ("loss_v" in out, "loss_u" in out)  # the objective's terms; NaN fills the others
            engine.backward(out["loss"])
            if m == len(micro_x) - 1 and t.zero_stage == 0 and t.precision == "fp32":
                # DeepSpeed computes no norm in this mode; gradients are all-reduced now and step() zeroes them
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in engine.module.parameters() if p.grad is not None])
                )
            engine.step()
            sums += torch.stack([out["loss"].detach().float(), out.get("loss_v", nan), out.get("loss_u", nan)])
        return sums / len(micro_x), engine.get_global_grad_norm() if grad_norm is None else grad_norm

    def nonfinite(self, losses: torch.Tensor, grad_norm: Any) -> torch.Tensor:
        """1.0 when this step's loss or gradient norm is NaN or infinite, else 0.0 (on the device: no sync)."""
        bad = ~torch.isfinite(losses[0])
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32, device=self.device))
        return bad.float()

    def check_finite(self, steps: list[int], flags: list[float]) -> None:
        """Stop (on every rank alike: ``flags`` are all-reduced) once more steps than
        train.max_nonfinite_steps had a non-finite loss or gradient, before anything is committed."""
        bad = [s for s, f in zip(steps, flags) if f > 0]
        if not bad:
            return
        self.nonfinite_steps += bad
        if self.is_main:
            self.log(f"step {bad[0]}: non-finite loss or gradient norm ({len(bad)} step(s) in this window)")
        if len(self.nonfinite_steps) > self.t.max_nonfinite_steps:
            if self.is_main:
                self.train_log.flush()
            count, resume = len(self.nonfinite_steps), ckpts.latest(self.layout)
            raise NonFiniteLossError(self.nonfinite_steps[0], count, self.t.max_nonfinite_steps, resume)

    def run(self) -> None:
        t, env = self.t, self.env
        start, start_url, universal = self.resume_point()
        if start >= t.num_steps:
            if self.is_main:
                log = read_train_log(self.layout)
                self.log(f"nothing to do: the run is at step {start} >= train.num_steps {t.num_steps}")
                self.done(start, log[-1] if log else None, 0.0, start)
            return
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if t.device == "cpu" else "nccl")
        start, start_url, universal = self.resume_point(verify=True)
        self.build(start_url, universal)
        if self.ema is not None:
            self.ema.num_updates = start  # one EMA update per optimizer step: the warm-up goes on exactly
        if self.is_main:
            how = " (ZeRO state re-partitioned through DeepSpeed's universal checkpoint)" if universal else ""
            self.log(f"resuming at step {start} from {start_url}{how}" if start_url else "starting at step 0")
            self.log(
                f"{self.num_params / 1e6:.3f}M parameters, {t.world_size} ranks, ZeRO-{t.zero_stage},"
                f" {t.precision}, micro batch {t.micro_batch} x accumulation {t.grad_accum_steps}"
            )
            self.train_log = TrainLog(self.layout, keep_until=start)
            if not os.environ.get("DUMO_NO_PROGRESS"):
                from tqdm import tqdm

                interval = 0.5 if sys.stderr.isatty() else 10.0  # into a pipe every refresh is a line: fewer
                self.bar = tqdm(total=t.num_steps, initial=start, unit="step", file=sys.stderr, mininterval=interval)
        pool = ThreadPoolExecutor(1)  # the next batch is read while this one trains
        batch = lambda s: self.ds.global_batch(s, t.batch_size_global, env.rank, env.world_size)
        future = pool.submit(batch, start)
        pending: list[tuple] = []
        self.nonfinite_steps: list[int] = []
        t_start = t_window = time.perf_counter()
        last: dict[str, Any] = {}
        trace = os.environ.get("DUMO_BATCH_TRACE")
        for step in range(start, t.num_steps):
            x, y = future.result()
            if step + 1 < t.num_steps:
                future = pool.submit(batch, step + 1)
            if trace:
                name = f"step-{step:07d}-rank-{env.rank}-of-{env.world_size}.npz"
                np.savez(os.path.join(trace, name), x=x.numpy(), y=y.numpy())
            lr = self.sched.get_last_lr()[0]  # the rate this step uses (the step advances the schedule)
            losses, grad_norm = self.train_step(step, x.to(self.device), y.to(self.device))
            self.update_ema()
            done = step + 1
            pending.append((done, losses, grad_norm, lr, self.nonfinite(losses, grad_norm)))
            if self.bar is not None:
                self.bar.update(1)
            checkpoint = done % t.checkpoint_every == 0 or done == t.num_steps
            if done % t.log_every == 0 or checkpoint:  # one all-reduce per window: losses averaged over ranks
                window = torch.stack([torch.cat([p[1], p[4][None]]) for p in pending])  # (steps, 3 + flag)
                torch.distributed.all_reduce(window)
                means = (window[:, :3] / env.world_size).tolist()
                now = time.perf_counter()
                if self.is_main:
                    terms = (True, *self.terms)
                    rows = [
                        (s, [v if has else None for v, has in zip(m, terms)], gn, rate)
                        for (s, _, gn, rate, _), m in zip(pending, means)
                    ]
                    last = self.train_log.add(rows, t.batch_size_global * len(pending) / (now - t_window), t.world_size)
                    self.log(self.format(last))
                self.check_finite([p[0] for p in pending], window[:, 3].tolist())
                pending, t_window = [], now
            if checkpoint:
                self.save(done)
                t_window = time.perf_counter()  # images/s measures training, not checkpoint writing
        pool.shutdown()
        if self.is_main:
            if self.bar is not None:
                self.bar.close()
            self.done(t.num_steps, last, (t.num_steps - start) / (time.perf_counter() - t_start), start)

    def format(self, r: dict[str, Any]) -> str:
        f = lambda key, spec: "n/a" if r[key] is None else format(r[key], spec)
        left = (self.t.num_steps - r["step"]) * self.t.batch_size_global / max(r["images_per_s"], 1e-9)
        return (
            f"step {r['step']}/{self.t.num_steps} ({100 * r['step'] / self.t.num_steps:.0f}%, about {left:.0f} s"
            f" left) {loss_headline(r, 5)} grad_norm {f('grad_norm', '.4f')}"
            f" lr {r['lr']:.3g} images/s {r['images_per_s']:.1f}"
        )

    def done(self, step: int, last: dict[str, Any] | None, steps_per_s: float, resumed_from: int) -> None:
        latest = ckpts.latest(self.layout)
        last = last or {}
        result = {
            "step": step,
            "final_loss": last.get("loss"),  # weighted, as optimised
            "final_loss_v": last.get("loss_v"),  # unweighted: what shows learning
            "final_loss_u": last.get("loss_u"),
            "steps_per_s": steps_per_s,
            "resumed_from": resumed_from,
            "checkpoint_url": None if latest is None else self.layout.checkpoint(latest),
        }
        self.log(f"training done at step {step}: {loss_headline(last)}, {steps_per_s:.3f} steps/s this attempt")
        print(f"{DONE_LINE} {json.dumps(result)}", flush=True)


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when its launcher dies. torchrun starts ranks in sessions of their own, so
    without this a killed launcher leaves ranks training (and committing) unsupervised beside a re-run."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the launcher died before prctl took effect
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train_worker", description=__doc__.split("\n")[0])
    # Positional: launchers read option-like words after the module name as abbreviations of their own
    parser.add_argument("root", help="storage root URL of the run")
    parser.add_argument("run", help="run name (<root>/runs/<run>/config.yaml must exist)")
    args = parser.parse_args(argv)
    _die_with_parent()
    env = RankEnv.from_environ()
    sys.stdout.reconfigure(line_buffering=True)
    try:
        layout = Root(args.root).run(args.run)
        cfg = config_from_yaml_text(fs.read_text(layout.config))
        os.environ.setdefault("DS_ACCELERATOR", cfg.train.device)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown the trainer's
        Trainer(cfg, layout, env).run()
    except BaseException:
        if os.environ.get("DUMO_ERROR_DIR"):  # the parent quotes the first failing rank's traceback
            os.makedirs(os.environ["DUMO_ERROR_DIR"], exist_ok=True)
            with open(os.path.join(os.environ["DUMO_ERROR_DIR"], f"rank-{env.rank}.txt"), "w") as f:
                f.write(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
