"""Training step of the trainer (DeepSpeed engine + objective + EMA), one rank: step time, images/s, MFU.

    python bench/train.py                  # CPU: debug and DuMo-B/2 at small batch, fp32, ZeRO-2
    python bench/train.py --device cuda    # B/2 and XL/2 in bf16, with model FLOP utilisation

Each case builds the engine exactly as tasks.ranks.trainer does (DeepSpeed JSON from the typed TrainConfig,
client torch AdamW, the dumo objective with its per-step generator, EMA update after the step) on a random
batch of the preset's latent shape, and times the same step without DeepSpeed (plain AdamW) beside it, so
the table also shows what the engine costs. Steps are timed round-robin between the two; medians are shown.

MFU = model FLOPs per second / peak dense bf16 FLOPs of the GPU. Model FLOPs per image = forward FLOPs
(dumo_model.info.forward_flops, 2 per multiply-add) x the objective's forward-pass equivalents
(dumo_model.objectives.forward_equivalents: 3 for the trained forward + backward, plus 1 tangent pass for
JVP, the default, or 2 no-grad passes for a central finite difference; more with training-time guidance).
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dumo_model.dit import build_model
from dumo_model.ema import EMA
from dumo_model.info import train_step_flops
from dumo_model.objectives import Objective, ObjectiveConfig
from tasks.config import TrainConfig
from tasks.ranks.distributed import deepspeed_config
from tasks.ranks.trainer import step_generator

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM data sheets


def make_case(preset: str, batch: int, device: str, precision: str, zero_stage: int, use_engine: bool):
    import deepspeed

    torch.manual_seed(0)
    shape = (1, 8, 8) if preset == "debug" else (4, 32, 32)  # 8x8 digits; 256 px SD-VAE latents
    model = build_model(preset, input_size=shape[1], in_channels=shape[0])
    obj_cfg = ObjectiveConfig()
    objective = Objective(obj_cfg, model.cfg.num_classes)
    train = TrainConfig(batch_size_global=batch, zero_stage=zero_stage, precision=precision, device=device)
    dev = torch.device(device)
    model = model.to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    ema = EMA(model, 0.9999)
    x = torch.randn(batch, *shape, device=dev)
    y = torch.randint(0, model.cfg.num_classes, (batch,), device=dev)
    if use_engine:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(train))
    else:
        engine = model
    bf16 = precision == "bf16"
    counter = iter(range(10**9))

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen = step_generator(0, next(counter), 0, 0, dev)
        if use_engine:  # DeepSpeed holds bf16 weights itself
            loss = objective(engine, x, y, gen=gen)["loss"]
            engine.backward(loss)
            engine.step()
            ema.update(engine.module)
        else:  # the plain loop: autocast for bf16
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                loss = objective(engine, x, y, gen=gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(engine)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    flops = train_step_flops(model.cfg, obj_cfg)
    return step, flops, sum(p.numel() for p in model.parameters())


def bench(preset: str, batch: int, steps: int, device: str, precision: str, zero_stage: int) -> dict:
    cases = {
        mode: make_case(preset, batch, device, precision, zero_stage, mode == "deepspeed")
        for mode in ("deepspeed", "bare")
    }
    for step, _, _ in cases.values():  # warm-up: allocations, kernel choice
        step()
    times: dict[str, list[float]] = {mode: [] for mode in cases}
    for _ in range(steps):
        for mode, (step, _, _) in cases.items():
            times[mode].append(step())
    _, flops, params = cases["deepspeed"]
    med = statistics.median(times["deepspeed"])
    bare = statistics.median(times["bare"])
    row = {
        "preset": preset,
        "params_m": params / 1e6,
        "batch": batch,
        "device": device,
        "precision": precision,
        "zero_stage": zero_stage,
        "step_ms": 1000 * med,
        "images_per_s": batch / med,
        "bare_step_ms": 1000 * bare,
        "engine_overhead": med / bare - 1,
        "train_gflops_per_image": flops / 1e9,
        "tflops": flops * batch / med / 1e12,
        "mfu": None,
        "steps_timed": steps,
    }
    if device == "cuda":
        peak = next((p for k, p in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        row["mfu"] = row["tflops"] / peak if peak and precision == "bf16" else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 3 CPU, 20 GPU)")
    ap.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: all cores)")
    ap.add_argument(
        "--cases", nargs="+", default=None, help="PRESET:BATCH:PRECISION each (default: the device's plan below)"
    )
    ap.add_argument("--out", default="bench/results/train.json")
    args = ap.parse_args()
    # One rank without a launcher (what tasks.train's inline launcher sets)
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
        "DS_ACCELERATOR": args.device,
    }.items():
        os.environ.setdefault(key, value)
    import deepspeed

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    steps = args.steps or (20 if gpu else 3)
    plan = (
        [("DuMo-B/2", 64, "bf16"), ("DuMo-XL/2", 32, "bf16")]
        if gpu
        else [("debug", 64, "fp32"), ("DuMo-B/2", 4, "fp32")]
    )
    if args.cases:
        plan = [(p, int(b), prec) for p, b, prec in (c.split(":") for c in args.cases)]
    rows = []
    for preset, batch, precision in plan:
        try:
            rows.append(bench(preset, batch, steps, args.device, precision, args.zero_stage))
        except torch.cuda.OutOfMemoryError as exc:  # a batch too large for the card: the other cases still run
            print(f"{preset} batch {batch}: out of memory ({str(exc).splitlines()[0]})", flush=True)
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    machine = torch.cuda.get_device_name() if gpu else f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU"
    machine += f", {torch.get_num_threads()} threads, torch {torch.__version__}, DeepSpeed {deepspeed.__version__}"
    machine += f", load average {os.getloadavg()[0]:.1f} at the end" if not gpu else ""
    print(f"\nTrainer step, 1 rank, ZeRO-{args.zero_stage}, dumo objective ({machine}); median of {steps} steps")
    print(
        f"{'preset':<10}{'params':>8}{'batch':>6}{'prec':>6}{'ms/step':>10}{'img/s':>9}{'bare ms':>9}"
        f"{'engine +%':>10}{'GFLOP/img':>10}{'TFLOP/s':>9}{'MFU':>7}"
    )
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(
            f"{r['preset']:<10}{r['params_m']:>7.1f}M{r['batch']:>6}{r['precision']:>6}{r['step_ms']:>10.1f}"
            f"{r['images_per_s']:>9.2f}{r['bare_step_ms']:>9.1f}{100 * r['engine_overhead']:>10.1f}"
            f"{r['train_gflops_per_image']:>10.1f}{r['tflops']:>9.3f}{mfu:>7}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "zero_stage": args.zero_stage, "rows": rows}, indent=1))
    print(f"wrote {out}")
    torch.distributed.destroy_process_group()  # else NCCL warns at exit of leaked resources


if __name__ == "__main__":
    main()
