"""The training loop of one rank: resume, build, train, checkpoint. Every rank runs the same code; what
differs between ranks lives in tasks.ranks.distributed (the collectives, who speaks) and tasks.ranks.report
(rank 0's train log and progress).

Exact resume: the batch of step S is a function of (seed, S) (LatentDataset.global_batch) and the objective's
noise, times and label dropout come from a generator seeded by (seed, S, rank, micro step), so a run resumed
at S sees what an uninterrupted one saw.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from dumo_model.dit import DualHeadDiT
from dumo_model.ema import EMA
from dumo_model.objectives import Objective
from storage import checkpoints as ckpts
from storage.latent_dataset import LatentDataset
from storage.layout import Root, RunLayout
from tasks.config import PipelineConfig
from tasks.modeling import dit_config, init_from_pretrained, resume_check
from tasks.ranks.distributed import Distributed, RankEnv, create_logger, deepspeed_config, trainer_state
from tasks.ranks.report import Window, create_report


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


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The objective's randomness for one micro step: a pure function of (seed, step, rank, micro)."""
    words = np.random.SeedSequence([seed % 2**63, step, rank, micro]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(words[0]) | int(words[1]) << 32)


class Trainer:
    def __init__(self, cfg: PipelineConfig, config_yaml: str, layout: RunLayout, env: RankEnv):
        """``cfg`` parsed from ``config_yaml``, the run's config.yaml, which each checkpoint carries as is."""
        self.cfg, self.t, self.layout, self.env = cfg, cfg.train, layout, env
        self.dist = Distributed(env, self.t, layout.url)
        self.device = self.dist.device
        self.log = create_logger(env.rank)
        self.ds = LatentDataset(
            Root(cfg.root).latent_store(cfg.data.store_name),
            seed=self.t.seed,
            in_memory=cfg.data.in_memory,
            flip=cfg.data.hflip,
        )
        self.ds.steps_per_epoch(self.t.batch_size_global)  # fails now if the store is smaller than a batch
        self.model_cfg = dit_config(cfg.model, cfg.heads, self.ds.latent_shape, self.ds.num_classes)
        self.config_yaml = config_yaml

    def run(self) -> None:
        t = self.t
        latest = ckpts.latest(self.layout)
        if latest is not None and latest >= t.num_steps:  # before any process group: nothing to train
            self.log.info(f"nothing to do: the run is at step {latest} >= train.num_steps {t.num_steps}")
            return

        # Resume point: the newest intact checkpoint (rank 0 checks the digests), the same on every rank
        self.dist.init()
        start, start_url, universal = self.resume_point()

        # Network, optimizer, EMA and DeepSpeed engine, loaded from the resume point
        self.build(start, start_url, universal)
        how = " (ZeRO state re-partitioned through DeepSpeed's universal checkpoint)" if universal else ""
        self.log.info(f"resuming at step {start} from {start_url}{how}" if start_url else "starting at step 0")
        self.log.info(
            f"{self.num_params / 1e6:.3f}M parameters, {t.world_size} ranks, ZeRO-{t.zero_stage},"
            f" {t.precision}, micro batch {t.micro_batch} x accumulation {t.grad_accum_steps}"
        )
        self.report = create_report(self.dist.is_main, self.layout, t, self.log, start)
        self.nonfinite_steps: list[int] = []

        # Training loop: one optimizer step per global batch; losses are all-reduced once per log window
        window: Window = []
        flags: list[torch.Tensor] = []
        t_start = t_window = time.perf_counter()
        for step, x, y in self.batches(start):
            lr = self.sched.get_last_lr()[0]  # the rate this step uses (the step advances the schedule)
            losses, grad_norm = self.train_step(step, x.to(self.device), y.to(self.device))
            self.update_ema()
            done = step + 1
            window.append((done, losses, grad_norm, lr))
            flags.append(self.nonfinite(losses, grad_norm))
            self.report.advance()
            checkpoint = done % t.checkpoint_every == 0 or done == t.num_steps

            # Log window: losses averaged over ranks into the train log; stop on non-finite ones
            if done % t.log_every == 0 or checkpoint:
                t_window = self.end_window(window, flags, t_window)
                window, flags = [], []

            # Checkpoint: committed by a marker written last, then old ones are removed
            if checkpoint:
                self.save(done, start, t_start)
                t_window = time.perf_counter()  # images/s measures training, not checkpoint writing
        self.report.done(t.num_steps, (t.num_steps - start) / (time.perf_counter() - t_start))

    # -- phases of the loop -------------------------------------------------------------------------------
    def resume_point(self) -> tuple[int, str | None, bool]:
        """(step, checkpoint URL or None, whether it needs DeepSpeed's universal format), agreed by every rank
        and checked against this run's config."""
        step = self.dist.latest_intact(self.layout, self.log)
        if step is None:
            return 0, None, False
        url = self.layout.checkpoint(step)
        self.model_cfg, universal = resume_check(self.t, self.cfg.model, self.model_cfg, url)
        return step, url, universal

    def build(self, start: int, start_url: str | None, universal: bool) -> None:
        import deepspeed

        torch.manual_seed(self.t.seed)  # every rank builds the same initial weights
        model = DualHeadDiT(self.model_cfg).to(self.device)  # the EMA must live where the weights will
        if start_url is None and self.cfg.model.init_from:  # a new run from a released DiT/SiT checkpoint
            self.log.info(init_from_pretrained(model, self.cfg.model))
        self.num_params = sum(p.numel() for p in model.parameters())
        # Only rank 0 writes the EMA, so only rank 0 keeps one (an XL/2 copy is 2.7 GB)
        self.ema = self.dist.main_only(lambda: EMA(model, self.t.ema_decay, warmup=self.t.ema_warmup))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.t.lr, betas=tuple(self.t.betas), weight_decay=self.t.weight_decay)
        warmup = self.t.lr_warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.engine, _, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(self.t, universal)
        )
        if start_url is not None:
            self.dist.load(self.engine, start_url, universal)
            if self.ema is not None:  # one EMA update per optimizer step: its warm-up goes on exactly
                self.ema.load_state_dict(ckpts.load_weights(start_url)[1], num_updates=start)  # digest checked
        self.objective = Objective(self.cfg.objective, self.ds.num_classes)

    def batches(self, start: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, x, y) of this rank for the steps from ``start`` on; the next batch is read while this one
        trains. DUMO_BATCH_TRACE (a directory): each batch is saved there too, for tests that check which
        batches a resumed or re-sized run saw (small runs only)."""
        t, env, trace = self.t, self.env, os.environ.get("DUMO_BATCH_TRACE")
        read = lambda s: self.ds.global_batch(s, t.batch_size_global, env.rank, env.world_size)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(read, start)
            for step in range(start, t.num_steps):
                x, y = future.result()
                if step + 1 < t.num_steps:
                    future = pool.submit(read, step + 1)
                if trace:
                    name = f"step-{step:07d}-rank-{env.rank}-of-{env.world_size}.npz"
                    np.savez(os.path.join(trace, name), x=x.numpy(), y=y.numpy())
                yield step, x, y

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One optimizer step over the micro batches: (mean [loss, loss_v, loss_u] on this rank, grad norm)."""
        engine, t = self.engine, self.t
        sums = torch.zeros(3, device=self.device)
        nan = torch.tensor(float("nan"), device=self.device)
        grad_norm = None
        micro_x, micro_y = x.split(t.micro_batch), y.split(t.micro_batch)
        for m, (xm, ym) in enumerate(zip(micro_x, micro_y)):
            out = self.objective(engine, xm, ym, gen=step_generator(t.seed, step, self.env.rank, m, self.device))
            self.terms = (True, "loss_v" in out, "loss_u" in out)  # the objective's terms; NaN fills the others
            engine.backward(out["loss"])
            if m == len(micro_x) - 1 and t.zero_stage == 0 and t.precision == "fp32":
                # DeepSpeed computes no norm in this mode; gradients are all-reduced now and step() zeroes them
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in engine.module.parameters() if p.grad is not None])
                )
            engine.step()
            sums += torch.stack([out["loss"].detach().float(), out.get("loss_v", nan), out.get("loss_u", nan)])
        return sums / len(micro_x), engine.get_global_grad_norm() if grad_norm is None else grad_norm

    def update_ema(self) -> None:
        if self.t.zero_stage == 3:  # parameters are partitioned: gather them (a collective: every rank joins)
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                if self.ema is not None:
                    self.ema.update(self.engine.module)
        elif self.ema is not None:
            self.ema.update(self.engine.module)

    def nonfinite(self, losses: torch.Tensor, grad_norm: Any) -> torch.Tensor:
        """1.0 when this step's loss or gradient norm is NaN or infinite, else 0.0 (on the device: no sync)."""
        bad = ~torch.isfinite(losses[0])
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32, device=self.device))
        return bad.float()

    def end_window(self, window: Window, flags: list[torch.Tensor], t_window: float) -> float:
        """Average the window's losses and non-finite flags over the ranks (one all-reduce), report them, and
        stop (on every rank alike) once more steps than train.max_nonfinite_steps had a non-finite loss or
        gradient, before anything is committed. Returns when the window was measured."""
        rows = torch.stack([torch.cat([losses, flag[None]]) for (_, losses, _, _), flag in zip(window, flags)])
        means = self.dist.mean(rows)  # (steps, 3 + flag)
        now = time.perf_counter()
        images_per_s = self.t.batch_size_global * len(window) / (now - t_window)
        self.report.window(window, means[:, :3].tolist(), self.terms, images_per_s)
        bad = [step for (step, *_), flag in zip(window, means[:, 3].tolist()) if flag > 0]
        if bad:
            self.nonfinite_steps += bad
            self.log.info(f"step {bad[0]}: non-finite loss or gradient norm ({len(bad)} step(s) in this window)")
        if len(self.nonfinite_steps) > self.t.max_nonfinite_steps:
            self.report.flush()
            count, resume = len(self.nonfinite_steps), ckpts.latest(self.layout)
            raise NonFiniteLossError(self.nonfinite_steps[0], count, self.t.max_nonfinite_steps, resume)
        return now

    def save(self, step: int, start: int, t_start: float) -> None:
        """Commit the checkpoint of ``step``: DeepSpeed state from every rank; then, on rank 0, EMA,
        model.json, config.yaml, DeepSpeed's own files, the train log and loss curve, and the marker last,
        which also records this attempt (the step it resumed from, its speed) for the parent's result."""
        url = self.layout.checkpoint(step)
        state = trainer_state(self.t, step)

        def commit(digests: dict[str, str]) -> None:  # on rank 0, which holds the EMA
            digests |= ckpts.write_weights(url, self.ema.state_dict(), asdict(self.model_cfg), self.config_yaml)
            ckpts.write_deepspeed_files(url, deepspeed_config(self.t))  # stock zero_to_fp32 needs no --tag
            self.report.checkpoint()
            attempt = {"resumed_from": start, "steps_per_s": (step - start) / (time.perf_counter() - t_start)}
            ckpts.commit(url, step, extra={"trainer": state, "attempt": attempt}, digests=digests)
            removed = ckpts.apply_retention(self.layout, self.t.keep_last, self.t.keep_every)
            self.log.info(
                f"checkpoint step {step} committed at {url}" + (f"; removed steps {removed}" if removed else "")
            )

        self.dist.save(self.engine, url, {"dumo": state}, commit)
