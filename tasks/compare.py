"""The equal-budget ablation: DuMo against MeanFlow's split batch and plain flow matching.

Plain functions (arm configs, the identical-settings check, the table and the plot) and thin Prefect tasks.
Every arm is the run config with only these changed: the run name, ``objective.name`` (which also decides
the model's heads), ``train.seed``, ``train.num_steps``, the samplers of the protocol and, for the meanflow
arm, the derivative of its official code (``compare.meanflow_derivative``, JVP). The check compares the
resolved configs, so a difference anywhere else stops the comparison before anything trains.

Two kinds of budget: ``compare.budgets`` in training steps (equal steps), and ``compare.compute_budgets``
in forward-equivalent passes per training sample (equal compute): each arm then trains as many steps as
that many forward passes of the flow-matching network cost in FLOPs, counted from the model and the
objective (dumo_model.info.train_step_flops), not from wall time.
"""

from __future__ import annotations

import io
import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dumo_model.info import forward_flops, train_step_flops
from dumo_model.metrics import Scores
from dumo_model.samplers import SamplerConfig
from storage import fs
from storage.layout import Root
from tasks.config import U_HEAD_TIME_SCALE, PipelineConfig, revalidate
from tasks.eval_record import EvalRecord
from tasks.modeling import dit_config

METRICS = (("class_accuracy", "class acc", True), ("fid", "FID", False), ("spread_ratio", "spread", True))
# Keys that may differ between arms; everything else of the resolved config must be equal.
ARM_KEYS = {
    ("name",),
    ("objective", "name"),
    ("train", "seed"),
    ("train", "num_steps"),
    ("eval", "samplers"),
    ("eval", "protocol"),
    ("objective", "derivative"),  # the meanflow arm's is its official code's (compare.meanflow_derivative)
}


@dataclass(frozen=True)
class Arm:
    """One run of the comparison: an objective at one seed and budget, and its resolved config."""

    arm: str  # the objective: flow_matching, meanflow or dumo
    seed: int
    steps: int  # training steps
    budget: str  # "<n> steps" or "<n> passes"
    config: PipelineConfig


@dataclass(frozen=True)
class ArmResult:
    """An arm after training and evaluation."""

    arm: Arm
    checkpoint_url: str
    record: EvalRecord
    train_seconds: float | None = None


def samplers_of(arm: str, euler_steps: tuple[int, ...]) -> tuple[SamplerConfig, ...]:
    """Flow matching has only a velocity: Euler with each of ``euler_steps``. The u-head arms: 1 and 2 steps."""
    if arm == "flow_matching":
        return tuple(SamplerConfig("euler", num_steps=n) for n in euler_steps)
    return (SamplerConfig("one_step"), SamplerConfig("two_step"))


def store_shape(store_url: str) -> tuple[int, int, int]:
    """(C, H, W) of the latent store at ``store_url``."""
    from storage import latents

    return latents.open_store(store_url).latent_shape


def arm_config(cfg: PipelineConfig, arm: str, seed: int, steps: int) -> PipelineConfig:
    """The run config with only the arm's keys changed. An unset time_scale is pinned to the u-head
    default for every arm, so the flow-matching arm gets the same backbone as the others."""
    changes: dict[str, Any] = {
        "name": f"{cfg.name}-{arm.replace('_', '-')}-s{seed}-n{steps}",
        "objective.name": arm,
        "train.seed": seed,
        "train.num_steps": steps,
        "eval.samplers": samplers_of(arm, cfg.compare.euler_steps),
        "eval.protocol": f"{cfg.eval.protocol}-compare",
    }
    if arm == "meanflow":
        changes["objective.derivative"] = cfg.compare.meanflow_derivative
    if cfg.model.overrides.get("time_scale") is None:
        changes["model.time_scale"] = U_HEAD_TIME_SCALE
    return revalidate(cfg, changes)


def steps_for_compute(cfg: PipelineConfig, arm: str, passes: int, latent_shape: tuple[int, int, int]) -> int:
    """Training steps of ``arm`` that cost ``passes`` forward passes of the flow-matching network per sample,
    in FLOPs (heads, embedders, the objective's extra passes and a JVP's attention tangents counted)."""
    num_classes = 10  # the label table's FLOPs are none: any count gives the same network cost

    def flops(c: PipelineConfig) -> float:
        return train_step_flops(dit_config(c.model, c.heads, latent_shape, num_classes), c.objective)

    fm = arm_config(cfg, "flow_matching", 0, 1)
    ref = forward_flops(dit_config(fm.model, fm.heads, latent_shape, num_classes))["total"]
    return max(1, round(passes * ref / flops(arm_config(cfg, arm, 0, 1))))


def arm_configs(cfg: PipelineConfig, latent_shape: tuple[int, int, int] | None = None) -> list[Arm]:
    """One arm per (budget, seed, objective), with its resolved config. Compute budgets need the latent
    store's shape (C, H, W), since FLOPs depend on the token count."""
    plan = [(f"{steps} steps", {arm: steps for arm in cfg.compare.arms}) for steps in cfg.compare.budgets]
    if not cfg.compare.budgets and not cfg.compare.compute_budgets:
        plan = [(f"{cfg.train.num_steps} steps", {arm: cfg.train.num_steps for arm in cfg.compare.arms})]
    for passes in cfg.compare.compute_budgets:
        if latent_shape is None:
            raise ValueError("compare.compute_budgets needs the latent store's shape to count FLOPs")
        plan.append(
            (f"{passes} passes", {a: steps_for_compute(cfg, a, passes, latent_shape) for a in cfg.compare.arms})
        )
    return [
        Arm(arm, seed, steps_of_arm[arm], budget, arm_config(cfg, arm, seed, steps_of_arm[arm]))
        for budget, steps_of_arm in plan
        for seed in cfg.compare.seeds
        for arm in cfg.compare.arms
    ]


def _flatten(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, (*prefix, k)))
        else:
            flat[(*prefix, k)] = v
    return flat


def check_identical(arms: list[Arm]) -> None:
    """Raise if two arms differ in anything but the arm's own keys (ARM_KEYS)."""
    if not arms:
        raise ValueError("no arms to compare")
    ref = _flatten(arms[0].config.model_dump(mode="json"))
    for arm in arms[1:]:
        flat = _flatten(arm.config.model_dump(mode="json"))
        diff = sorted(".".join(k) for k in set(ref) | set(flat) if k not in ARM_KEYS and ref.get(k) != flat.get(k))
        if diff:
            raise ValueError(f"arm {arm.config.name} differs from {arms[0].config.name} in {diff}")


def steps_of(label: str) -> int:
    """Network evaluations of a sampler label: 1-step -> 1, 2-step -> 2, euler-8 -> 8."""
    head = label.split("-cfg")[0]
    return int(head.split("-")[0]) if head[0].isdigit() else int(head.rsplit("-", 1)[1])


def _budget_order(budget: str) -> tuple[int, int]:
    number, kind = budget.split(" ", 1)
    return (0 if kind == "steps" else 1, int(number))


@dataclass(frozen=True)
class SeedRange:
    mean: float
    min: float
    max: float


@dataclass(frozen=True)
class Row:
    """One row of the comparison table (and of results.json): an arm's sampler at one budget, over seeds."""

    budget: str
    arm: str
    train_steps: int
    sampler: str  # its label
    nfe: int  # network evaluations per sample
    seeds: int
    class_accuracy: SeedRange | None  # the METRICS, each None where no seed measured it
    fid: SeedRange | None
    spread_ratio: SeedRange | None


def summarize(results: list[ArmResult]) -> list[Row]:
    """Rows per (budget, arm, sampler): mean and min/max over seeds of each metric."""
    groups: dict[tuple[str, str, str], list[Scores]] = {}
    train_steps: dict[tuple[str, str], int] = {}
    for res in results:
        budget, arm = res.arm.budget, res.arm.arm
        train_steps[(budget, arm)] = res.arm.steps
        for label, m in res.record.samplers.items():
            groups.setdefault((budget, arm, label), []).append(m.scores)
    rows = []
    order = sorted(groups.items(), key=lambda kv: (_budget_order(kv[0][0]), kv[0][1], steps_of(kv[0][2])))
    for (budget, arm, label), ms in order:
        ranges = {}
        for key, _, _ in METRICS:
            vals = [getattr(m, key) for m in ms if getattr(m, key) is not None]
            ranges[key] = SeedRange(statistics.fmean(vals), min(vals), max(vals)) if vals else None
        rows.append(Row(budget, arm, train_steps[(budget, arm)], label, steps_of(label), len(ms), **ranges))
    return rows


def markdown_table(rows: list[Row], real: Scores | None = None) -> str:
    head = ["budget", "arm", "train steps", "sampler", "NFE", "seeds"] + [name for _, name, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.budget, r.arm, str(r.train_steps), r.sampler, str(r.nfe), str(r.seeds)]
        for key, _, _ in METRICS:
            s = getattr(r, key)
            cells.append("" if s is None else f"{s.mean:.3f} [{s.min:.3f}, {s.max:.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    note = "Each cell: mean over seeds [min, max]."
    if real:
        note += (
            " Real data against itself: "
            + ", ".join(f"{n} {getattr(real, k):.3f}" for k, n, _ in METRICS if getattr(real, k) is not None)
            + "."
        )
    return "\n".join(lines) + "\n\n" + note + "\n"


def winner(rows: list[Row], nfe: int = 1, metric: str = "class_accuracy") -> str | None:
    """The arm with the best mean ``metric`` at ``nfe`` network evaluations, last budget of the table."""
    if not rows:
        return None
    budget = max((r.budget for r in rows), key=_budget_order)
    higher = {k: h for k, _, h in METRICS}[metric]
    cands = [r for r in rows if r.budget == budget and r.nfe == nfe and getattr(r, metric) is not None]
    if not cands:
        return None
    best = (max if higher else min)(cands, key=lambda r: getattr(r, metric).mean)
    return best.arm


def plot_png(rows: list[Row]) -> bytes:
    """Metric against sampling steps, one line per arm (last budget of the table), error bars = seed range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = max((r.budget for r in rows), key=_budget_order)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for ax, (key, name, _) in zip(axes, METRICS):
        for arm in dict.fromkeys(r.arm for r in rows):
            pts = sorted(
                ((r.nfe, getattr(r, key)) for r in rows if r.arm == arm and r.budget == budget),
                key=lambda p: p[0],
            )
            pts = [p for p in pts if p[1] is not None]
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1].mean for p in pts]
            err = [[p[1].mean - p[1].min for p in pts], [p[1].max - p[1].mean for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps (network evaluations)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"equal budget: {budget} per arm")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_comparison(root: str, name: str, arms: list[Arm], results: list[ArmResult]) -> dict:
    """table.md, results.json, plot.png and each arm's resolved config under <root>/comparisons/<name>/."""
    out = Root(root).comparison(name)
    rows = summarize(results)
    real = results[0].record.real if results else None
    table = markdown_table(rows, real)
    fs.write_text(fs.join(out, "table.md"), table)
    fs.write_bytes(fs.join(out, "plot.png"), plot_png(rows))
    for a in arms:
        fs.write_text(fs.join(out, "configs", f"{a.config.name}.yaml"), a.config.to_yaml())
    payload = {
        "name": name,
        "rows": [asdict(r) for r in rows],
        "real": None if real is None else asdict(real),
        "winner_1_step_class_accuracy": winner(rows),
        "runs": [
            {
                "arm": r.arm.arm,
                "seed": r.arm.seed,
                "steps": r.arm.steps,
                "budget": r.arm.budget,
                "checkpoint_url": r.checkpoint_url,
                "eval_dir": r.record.eval_dir,
                "train_seconds": r.train_seconds,
            }
            for r in results
        ],
        "configs": {a.config.name: a.config.model_dump(mode="json") for a in arms},
    }
    fs.write_text(fs.join(out, "results.json"), json.dumps(payload, indent=1))
    return {"dir": out, "table": table, "rows": rows, "winner": payload["winner_1_step_class_accuracy"]}


@task(name="publish-comparison", cache_policy=NO_CACHE)
def publish_comparison_task(root: str, name: str, arms: list[Arm], results: list[ArmResult]) -> dict:
    """The comparison ``name`` written under ``root`` (write_comparison) and published as an artifact."""
    from prefect.artifacts import create_markdown_artifact

    written = write_comparison(root, name, arms, results)
    key = "dumo-compare-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower())
    create_markdown_artifact(
        markdown=f"## Equal-budget comparison `{name}`\n\n{written['table']}\n"
        f"Plot: `{fs.join(written['dir'], 'plot.png')}`",
        key=key,
    )
    return {k: v for k, v in written.items() if k != "rows"}
