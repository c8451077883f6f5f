"""Training-step cost of the objectives on one backbone, in one run, as ratios to flow matching.

    python bench/step_cost.py                 # CPU: debug and DuMo-B/2 at small batch
    python bench/step_cost.py --device cuda   # adds B/2 and XL/2 in bf16 with images/s and MFU

A step is forward + backward + AdamW update on a random batch. Variants are timed round-robin (one step
of each in turn), so a slow moment of a noisy machine falls on all of them alike; the table gives the
median. Prints a table and writes JSON (bench/results/step_cost.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dumo_model import Objective, ObjectiveConfig, build_model
from dumo_model.info import train_step_flops

VARIANTS = {  # name: (objective, derivative, heads); "-forward" = one-sided finite difference
    "flow_matching": ("flow_matching", "finite_difference", "v"),
    "meanflow-fd": ("meanflow", "finite_difference", "u"),
    "meanflow-jvp": ("meanflow", "jvp", "u"),
    "dumo-fd": ("dumo", "finite_difference", "dual"),
    "dumo-jvp": ("dumo", "jvp", "dual"),
    "dumo-fd-forward": ("dumo", "finite_difference", "dual"),
}
# MFU counts the FLOPs the algorithm does: dumo_model.info.train_step_flops (forward-pass equivalents x
# forward FLOPs; a JVP's tangent pass counted as one forward plus attention's products once more).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def latent_shape(preset: str) -> tuple[int, int, int]:
    return (1, 8, 8) if preset == "debug" else (4, 32, 32)


def make_case(preset: str, variant: str, batch: int, device: str, bf16: bool):
    name, derivative, heads = VARIANTS[variant]
    torch.manual_seed(0)
    c, h, _ = latent_shape(preset)
    kw = {} if preset == "debug" else {"input_size": h, "in_channels": c}
    model = build_model(preset, heads=heads, **kw).to(device)
    scheme = "forward" if variant.endswith("-forward") else "central"
    obj = Objective(ObjectiveConfig(name=name, derivative=derivative, fd_scheme=scheme), model.cfg.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, c, h, h, device=device, generator=gen)
    y = torch.randint(0, model.cfg.num_classes, (batch,), device=device, generator=gen)

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = obj(model, x, y, gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return model, step, obj.cfg


def bench_preset(preset: str, batch: int, steps: int, device: str, bf16: bool, variants: list[str]) -> list[dict]:
    cases = {v: make_case(preset, v, batch, device, bf16) for v in variants}
    for _, step, _ in cases.values():  # warm-up (allocations, kernels)
        step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(steps):
        for v, (_, step, _) in cases.items():
            times[v].append(step())
    rows = []
    base = statistics.median(times["flow_matching"]) if "flow_matching" in times else None
    for v in variants:
        model = cases[v][0]
        med = statistics.median(times[v])
        row = {
            "preset": preset,
            "variant": v,
            "batch": batch,
            "device": device,
            "bf16": bf16,
            "step_ms": 1000 * med,
            "images_per_s": batch / med,
            "ratio_to_flow_matching": med / base if base else None,
            "steps_timed": steps,
        }
        if device == "cuda":
            flops = train_step_flops(model.cfg, cases[v][2]) * batch / med
            peak = next((p for k, p in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
            row["tflops"] = flops / 1e12
            row["mfu"] = flops / (peak * 1e12) if peak else None
        rows.append(row)
        del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 5 CPU, 20 GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: all cores)")
    ap.add_argument("--presets", nargs="+", default=None, help="only these presets (e.g. debug)")
    ap.add_argument("--out", default="bench/results/step_cost.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    steps = args.steps or (20 if gpu else 5)
    plan = [("debug", 64, False), ("DuMo-B/2", 2, False)]
    if gpu:
        plan = [("DuMo-B/2", 64, True), ("DuMo-XL/2", 32, True)]
    if args.presets:
        plan = [p for p in plan if p[0] in args.presets]
    rows = []
    for preset, batch, bf16 in plan:
        rows += bench_preset(preset, batch, steps, args.device, bf16, list(VARIANTS))
    machine = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()} CPU"
    machine += f", {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    print(f"\nTraining-step cost by objective ({machine}); median of {steps} round-robin steps")
    header = f"{'preset':<10}{'variant':<15}{'batch':>6}{'ms/step':>10}{'img/s':>9}{'x flow_matching':>17}"
    print(header + ("  TFLOP/s   MFU" if gpu else ""))
    for r in rows:
        line = (
            f"{r['preset']:<10}{r['variant']:<15}{r['batch']:>6}{r['step_ms']:>10.1f}{r['images_per_s']:>9.1f}"
            f"{r['ratio_to_flow_matching']:>17.2f}"
        )
        if gpu and r.get("mfu") is not None:
            line += f"{r['tflops']:>9.1f}{100 * r['mfu']:>6.1f}%"
        print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
