"""Numerics of the u-target: relative error of its derivative term (t - r) du/dt against an fp64 JVP.

    python bench/numerics.py                           # the table: trained demo checkpoint + XL-width stack
    python bench/numerics.py --parts xl                # one part: demo (needs --checkpoint), xl, cost
    python bench/numerics.py --config imagenet256-xl2  # the preset's own training setting; exit 1 above 5%

The error of one setting is ||term - ref|| / ||ref|| over a batch, where ``term`` is what the objective's
code computes for the u-target (dumo_model.objectives: finite_difference_dudt / jvp_dudt, or with --config
the whole Objective call) and ``ref`` is a JVP in float64 on a float64 copy of the very weights the setting
holds (bf16 weights upcast for the bf16 engine), on the same problem (x_t, t, r, y, w).

Precisions: ``fp32``; ``bf16-engine`` (the network held in bf16, as DeepSpeed's bf16 engine holds it: that
engine's forward is the module's forward on bf16 weights; tests/test_numerics.py runs the real engine);
``bf16-autocast`` (fp32 weights under torch.autocast). Derivatives: central and forward finite differences
at several eps, JVP, and ``fd-fp32-copy``: the central difference evaluated on an fp32 copy of the weights
(upcast of the bf16 ones, or autocast off), the ``FD passes in fp32`` option.

Networks: the trained demo checkpoint (its own time_scale), and a stack of DuMo-XL/2-width blocks (hidden
1152, 16 heads, 32x32x4 latents = 256 tokens) at random init whose zero-initialised layers (adaLN
modulations, both heads) are drawn N(0, 0.02), so t and r reach the output; at time_scale 1 and 1000.
Step cost: forward + backward of one training step, x flow matching in the same precision, timed
round-robin on the demo's network at batch 64 (CPU bf16 timings say little about a GPU). Prints tables and
writes JSON (bench/results/numerics.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from dumo_model import Objective, ObjectiveConfig, build_model
from dumo_model.dit import DualHeadDiT
from dumo_model.objectives import finite_difference_dudt, flow_map, jvp_dudt

PRECISIONS = ("fp32", "bf16-engine", "bf16-autocast")
LIMIT = 0.05  # tasks.config.MAX_DERIVATIVE_ERROR


def nonzero_init(model: DualHeadDiT, seed: int = 0, std: float = 0.02) -> DualHeadDiT:
    """The model's own init, with every all-zero trainable tensor (adaLN modulations, heads) drawn N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def held(model: DualHeadDiT, precision: str, device: str | torch.device = "cpu") -> DualHeadDiT:
    """The network as the precision holds it, on ``device``."""
    dtype = torch.bfloat16 if precision == "bf16-engine" else torch.float32
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def autocast(precision: str, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16-autocast" else nullcontext()


def problem(model: DualHeadDiT, batch: int, seed: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A training problem as the dumo objective draws it, with w = v = e - x (float32); drawn on the CPU
    (the same problem on every device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    c, h = model.cfg.in_channels, model.cfg.input_size
    x = torch.randn(batch, c, h, h, generator=gen)
    e = torch.randn(batch, c, h, h, generator=gen)
    t, r = Objective(ObjectiveConfig(), model.cfg.num_classes).sample_times(batch, x.device, False, gen)
    t = t.clamp(0.05, 0.95)  # away from the ends, where a central difference turns one-sided
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * e
    y = torch.randint(0, model.cfg.num_classes, (batch,), generator=gen)
    p = {"x_t": x_t, "t": t, "r": r, "y": y, "w": e - x}
    return {k: v.to(device) for k, v in p.items()}


def _dt(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return (p["t"] - p["r"]).reshape(-1, 1, 1, 1)


def reference(net: DualHeadDiT, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """(t - r) du/dt by JVP in float64 on a float64 copy of ``net``'s weights."""
    net64 = copy.deepcopy(net).double()
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in p.items()}
    with torch.no_grad(), net64.attention_impl("math"):
        _, dudt = jvp_dudt(flow_map(net64, d["y"]), d["x_t"], d["t"], d["r"], d["w"])
    return _dt(d) * dudt


def term(net: DualHeadDiT, precision: str, derivative: str, eps: float, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """(t - r) du/dt as the objective's code computes it in this precision."""
    u_fn = flow_map(net, p["y"])
    args = (p["x_t"], p["t"], p["r"], p["w"])
    with torch.no_grad():
        if derivative == "fd-fp32-copy":  # the difference on an fp32 copy of the held weights, autocast off
            dudt = finite_difference_dudt(flow_map(copy.deepcopy(net).float(), p["y"]), *args, eps)
        else:
            with autocast(precision, p["x_t"].device.type):
                if derivative == "jvp":
                    with net.attention_impl("math"):
                        _, dudt = jvp_dudt(u_fn, *args)
                elif derivative == "forward":
                    dudt = finite_difference_dudt(u_fn, *args, eps, u_here=u_fn(*args[:3]).float())
                else:
                    dudt = finite_difference_dudt(u_fn, *args, eps)
    return _dt(p) * dudt.double()


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


DERIVATIVES = [("central", 0.001), ("central", 0.005), ("central", 0.02), ("central", 0.05)]
DERIVATIVES += [("forward", 0.005), ("forward", 0.02), ("jvp", None), ("fd-fp32-copy", 0.005)]


def measure(
    label: str, model: DualHeadDiT, batch: int, derivatives=DERIVATIVES, seed: int = 0, device: str = "cpu"
) -> list[dict]:
    rows = []
    p = problem(model, batch, seed, device)
    for precision in PRECISIONS:
        net = held(model, precision, device)
        ref = reference(net, p)
        for derivative, eps in derivatives:
            if derivative == "fd-fp32-copy" and precision == "fp32":
                continue  # the same as central in fp32
            t0 = time.perf_counter()
            err = rel_error(term(net, precision, derivative, eps or 0.0, p), ref)
            row = {
                "network": label,
                "time_scale": model.cfg.time_scale,
                "precision": precision,
                "derivative": derivative,
                "eps": eps,
                "rel_error": err,
                "seconds": time.perf_counter() - t0,
                "device": str(device),
                "batch": batch,
            }
            rows.append(row)
            print(
                f"  {label:<22}{model.cfg.time_scale:>6g}  {precision:<14}{derivative:<13}{eps or '':>6}"
                f"{100 * err:>10.3f}%",
                flush=True,
            )
    return rows


# -------------------------------------------------------------------------------------------- step cost

COST_VARIANTS = {  # name: (objective, derivative, fd_scheme)
    "flow_matching": ("flow_matching", "finite_difference", "central"),
    "dumo-fd-central": ("dumo", "finite_difference", "central"),
    "dumo-fd-forward": ("dumo", "finite_difference", "forward"),
    "dumo-jvp": ("dumo", "jvp", "central"),
    "dumo-fd-fp32-copy": ("dumo", "finite_difference", "central"),
}


def step_costs(base: DualHeadDiT, batch: int, steps: int) -> list[dict]:
    """Forward + backward of one training step, median of round-robin steps, x flow matching per precision."""
    rows = []
    for precision in PRECISIONS:
        cases = {}
        for name, (objective, derivative, scheme) in COST_VARIANTS.items():
            if name == "dumo-fd-fp32-copy" and precision == "fp32":
                continue
            heads = {"flow_matching": "v"}.get(objective, "dual")
            model = held(nonzero_init(DualHeadDiT(replace(base.cfg, heads=heads))), precision)
            model.train()
            obj = Objective(ObjectiveConfig(name=objective, derivative=derivative, fd_scheme=scheme), 10)
            copy32 = copy.deepcopy(model).float() if name == "dumo-fd-fp32-copy" else None
            cases[name] = (model, obj, copy32)
        gen = torch.Generator().manual_seed(0)
        c, h = base.cfg.in_channels, base.cfg.input_size
        x, y = torch.randn(batch, c, h, h, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

        for case in cases.values():
            timed_step(*case, precision, x, y, gen)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(steps):
            for name, case in cases.items():
                times[name].append(timed_step(*case, precision, x, y, gen))
        base_ms = statistics.median(times["flow_matching"])
        for name in cases:
            med = statistics.median(times[name])
            rows.append(
                {"precision": precision, "variant": name, "batch": batch, "ms": 1000 * med, "x_fm": med / base_ms}
            )
            print(f"  {precision:<14}{name:<20}{1000 * med:>9.1f} ms{med / base_ms:>7.2f}x", flush=True)
    return rows


def timed_step(model, obj: Objective, copy32, precision: str, x, y, gen) -> float:
    t0 = time.perf_counter()
    with autocast(precision):
        if copy32 is None:
            loss = obj(model, x, y, gen)["loss"]
        else:  # the trained pass in the held precision, the difference on a refreshed fp32 copy
            with torch.no_grad():
                for a, b in zip(copy32.parameters(), model.parameters()):
                    a.copy_(b)
            loss = fp32_copy_loss(obj, model, copy32, x, y, gen)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def fp32_copy_loss(obj: Objective, model, copy32, x, y, gen) -> torch.Tensor:
    """dumo's loss with the central difference taken on ``copy32`` (no autocast)."""
    from dumo_model.objectives import u_target

    n = x.shape[0]
    e = torch.randn(x.shape, generator=gen)
    t, r = obj.sample_times(n, x.device, False, gen)
    tb = t.reshape(-1, 1, 1, 1)
    x_t, v = (1 - tb) * x + tb * e, e - x
    out = model(x_t, t, r, y)
    with torch.autocast("cpu", enabled=False):
        u_tgt = u_target(flow_map(copy32, y), x_t, t, r, v, "finite_difference", obj.cfg.fd_eps)
    return obj.combine(out.v, v, out.u, u_tgt)["loss"]


# -------------------------------------------------------------------------------------------- --config


def check_preset(name: str, depth: int, batch: int, device: str = "cpu") -> int:
    """The preset's training setting (derivative, eps, scheme, time_scale, precision, guidance, width and
    latent shape; ``depth`` blocks instead of the preset's, for the CPU) through the whole Objective call."""
    from tasks.config import load_config

    cfg = load_config(name)
    d = cfg.data
    shape = (4, d.resolution // 8, d.resolution // 8) if d.autoencoder == "sd-vae" else (1, d.resolution, d.resolution)
    overrides = {**cfg.model.overrides, "time_scale": cfg.time_scale}
    if depth:  # 0: the preset's own depth
        overrides["depth"] = depth
    model = nonzero_init(
        build_model(cfg.model.preset, **overrides, heads=cfg.heads, input_size=shape[1], in_channels=shape[0])
    )
    precision = "bf16-engine" if cfg.train.precision == "bf16" else "fp32"
    net = held(model, precision, device)
    obj = Objective(cfg.objective, net.cfg.num_classes)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen, device=device)
    y = torch.randint(0, net.cfg.num_classes, (batch,), generator=gen, device=device)
    seen: dict[str, torch.Tensor] = {}
    obj(net, x, y, gen, inspect=seen)
    p = {k: seen[k] for k in ("x_t", "t", "r", "y", "w")}
    got = seen["w"].double() - seen["u_tgt"].double()  # the derivative term (clamp_derivative is off)
    keep = p["t"] > p["r"]  # meanflow's r = t rows have no derivative term
    ref = reference(net, p)
    err = rel_error(got[keep], ref[keep])
    o = cfg.objective
    full_depth = build_model(cfg.model.preset).cfg.depth
    print(
        f"{name}: {cfg.model.preset} width {net.cfg.hidden_size} ({net.cfg.depth} of {full_depth}"
        f" blocks), latents {shape}, {device}, {cfg.train.precision} ({precision}), derivative {o.derivative}"
        f" (eps {o.fd_eps}, {o.fd_scheme}), time_scale {cfg.time_scale:g}, guidance omega {o.guidance_omega}"
        f" kappa {o.guidance_kappa}: derivative-term error {100 * err:.2f}% (limit {100 * LIMIT:.0f}%)"
    )
    return 0 if err <= LIMIT else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="measure this preset's training setting and exit 1 above 5%")
    ap.add_argument("--checkpoint", default="demo-root/runs/demo/checkpoints", help="a trained checkpoint URL")
    ap.add_argument("--depth", type=int, default=2, help="blocks of the wide stack (--config too); 0: the preset's")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the networks run (xl, --config)")
    ap.add_argument("--presets", nargs="+", default=["DuMo-XL/2"], help="widths of the xl part (e.g. DuMo-B/2)")
    ap.add_argument("--time-scales", nargs="+", type=float, default=[1.0, 1000.0], help="time scales of the xl part")
    ap.add_argument("--batch", type=int, default=2, help="batch of the wide stack (--config too)")
    ap.add_argument("--cost-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parts", nargs="+", default=["demo", "xl", "cost"], choices=["demo", "xl", "cost"])
    ap.add_argument("--out", default="bench/results/numerics.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config:
        return check_preset(args.config, args.depth, args.batch, args.device)

    rows: list[dict] = []
    cost: list[dict] = []
    print("relative error of (t - r) du/dt against an fp64 JVP")
    url = args.checkpoint
    if not url.rstrip("/").split("/")[-1].startswith("step-"):
        steps = sorted(p.name for p in Path(url).glob("step-*"))
        url = f"{url}/{steps[-1]}" if steps else url
    demo = build_model("debug", hidden_size=128, depth=4, num_heads=4, time_scale=1.0)  # configs/demo.yaml's
    if "demo" in args.parts:
        from tasks.sample import load_checkpoint_model  # storage: only for the trained checkpoint

        demo = load_checkpoint_model(url, "ema", torch.device("cpu"))  # the EMA weights, as evaluation loads them
    if "demo" in args.parts:
        rows += measure(f"demo trained ({Path(url).name})", demo, 64)
        for ts in (1.0, 1000.0):
            rows += measure("demo net, random", nonzero_init(DualHeadDiT(replace(demo.cfg, time_scale=ts))), 64)
    if "xl" in args.parts:
        short = [dv for dv in DERIVATIVES if dv[1] in (None, 0.005, 0.05)]
        for preset in args.presets:
            for ts in args.time_scales:
                depth = {"depth": args.depth} if args.depth else {}
                wide = nonzero_init(build_model(preset, **depth, input_size=32, in_channels=4, time_scale=ts))
                label = f"{preset.split('-')[-1]} width, {wide.cfg.depth} blocks"
                rows += measure(label, wide, args.batch, short, device=args.device)
                del wide
    if "cost" in args.parts:
        print("step cost: forward + backward, x flow matching in the same precision (demo network)")
        cost = step_costs(demo, 64, args.cost_steps)  # at random init: the weights do not change the cost
    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    machine += f", torch {torch.__version__}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "checkpoint": url, "errors": rows, "step_cost": cost}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
