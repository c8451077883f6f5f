"""The equal-budget ablation: arms differ only where they should, the table is filled, the flow runs."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dumo_model.metrics import Scores
from dumo_model.samplers import SamplerConfig
from storage import fs
from storage.layout import Root
from tasks.compare import (
    Arm,
    ArmResult,
    SeedRange,
    arm_configs,
    check_identical,
    markdown_table,
    plot_png,
    steps_of,
    summarize,
    winner,
)
from tasks.config import load_config
from tasks.eval_record import EvalRecord, SamplerResult


def test_arms_share_everything_but_objective_seed_and_steps():
    cfg = load_config("demo", ["compare.seeds=[0, 1]", "compare.budgets=[10, 20]"])
    arms = arm_configs(cfg)
    assert len(arms) == 3 * 2 * 2 and len({a.config.name for a in arms}) == 12
    check_identical(arms)
    fm = next(a for a in arms if a.arm == "flow_matching")
    assert all(s.name == "euler" for s in fm.config.eval.samplers)
    assert fm.config.heads == "v" and arms[2].config.heads == "dual"


def test_the_meanflow_arm_is_the_faithful_baseline_and_every_arm_shares_the_time_scale():
    cfg = load_config("demo", ["compare.seeds=[0]", "model.time_scale=null"])
    arms = {a.arm: a.config for a in arm_configs(cfg)}
    assert arms["meanflow"].objective.derivative == "jvp"  # MeanFlow's official code
    assert arms["dumo"].objective.derivative == cfg.objective.derivative == "finite_difference"
    assert {c.time_scale for c in arms.values()} == {1.0}  # flow matching alone would default to DiT's 1000


def test_equal_compute_gives_each_arm_the_steps_of_the_same_flops():
    from dumo_model.info import forward_flops, train_step_flops
    from tasks.modeling import dit_config

    cfg = load_config("demo", ["compare.seeds=[0]", "compare.budgets=[800]", "compare.compute_budgets=[2400]"])
    with pytest.raises(ValueError, match="latent store's shape"):
        arm_configs(cfg)
    arms = arm_configs(cfg, (1, 8, 8))
    compute = {a.arm: a for a in arms if a.budget == "2400 passes"}
    assert compute["flow_matching"].steps == 800  # 3 forward-equivalents a step
    fm = compute["flow_matching"].config
    fm_forward = forward_flops(dit_config(fm.model, fm.heads, (1, 8, 8), 10))["total"]
    for arm in ("meanflow", "dumo"):
        c = compute[arm].config
        spent = compute[arm].steps * train_step_flops(dit_config(c.model, c.heads, (1, 8, 8), 10), c.objective)
        assert spent == pytest.approx(2400 * fm_forward, rel=0.002), arm
    # dumo's central difference: 5 forward-equivalents and a second head, so fewer than 800 * 3/5 steps
    assert compute["dumo"].steps < 480 < compute["meanflow"].steps < 800
    assert {a.steps for a in arms if a.budget == "800 steps"} == {800}
    check_identical(arms)


def test_a_difference_outside_the_arm_keys_is_refused():
    cfg = load_config("demo", ["compare.seeds=[0]"])
    arms = arm_configs(cfg)
    data = arms[1].config.model_dump(mode="python")
    data["train"]["lr"] = 0.5
    arms[1] = dataclasses.replace(arms[1], config=type(arms[1].config).model_validate(data))
    with pytest.raises(ValueError, match=r"train\.lr"):
        check_identical(arms)


def fake_results():
    cfg = load_config("demo")

    def result(arm, seed, acc, fid):
        samplers = {
            label: SamplerResult(SamplerConfig(name), Scores(100, f, a, spread_ratio=s), 1.0, "samples.npz", "x")
            for label, name, a, f, s in (
                ("1-step", "one_step", acc, fid, 0.7),
                ("2-step", "two_step", acc + 0.01, fid - 1, 0.9),
            )
        }
        fields = {f.name: None for f in dataclasses.fields(EvalRecord)}
        record = EvalRecord(**fields | {"samplers": samplers, "real": Scores(100, 1.0, 0.99)})
        return ArmResult(Arm(arm, seed, 10, "10 steps", cfg), "ckpt", record)

    return [
        result("dumo", 0, 0.9, 5.0),
        result("dumo", 1, 0.8, 7.0),
        result("meanflow", 0, 0.5, 20.0),
        result("meanflow", 1, 0.6, 18.0),
    ]


def test_summary_table_and_winner():
    rows = summarize(fake_results())
    dumo1 = next(r for r in rows if r.arm == "dumo" and r.sampler == "1-step")
    assert dumo1.seeds == 2 and dumo1.class_accuracy == SeedRange(pytest.approx(0.85), 0.8, 0.9)
    table = markdown_table(rows, Scores(100, fid=1.0, class_accuracy=0.99))
    assert (
        "class acc 0.990, FID 1.000." in table
        and "0.850 [0.800, 0.900]" in table
        and "| 10 steps | meanflow | 10 | 2-step | 2 | 2 |" in table
    )
    assert winner(rows) == "dumo" and winner(rows, metric="fid") == "dumo"
    assert plot_png(rows)[:8] == b"\x89PNG\r\n\x1a\n"
    assert [steps_of(s) for s in ("1-step", "2-step", "euler-8", "euler-16-cfg2")] == [1, 2, 8, 16]


@pytest.mark.slow
def test_compare_flow_runs_all_three_arms_and_fills_every_cell(prefect_harness, tmp_path):
    from flows.compare import compare_objectives

    overrides = [
        f"root={tmp_path / 'root'}",
        "name=cmp",
        "model.hidden_size=32",
        "model.depth=1",
        "model.num_heads=2",
        "train.num_steps=4",
        "train.checkpoint_every=4",
        "train.batch_size_global=32",
        "train.log_every=2",
        "eval.num_samples=20",
        "eval.batch_size=20",
        "compare.seeds=[0]",
        "compare.euler_steps=[1, 2]",
        "data.shard_size=600",
    ]
    written = compare_objectives(config="demo", overrides=overrides)
    out = Root(str(tmp_path / "root")).comparison("cmp")
    assert written["dir"] == out
    payload = json.loads(fs.read_text(fs.join(out, "results.json")))
    arms = {r["arm"] for r in payload["rows"]}
    assert arms == {"flow_matching", "meanflow", "dumo"}
    assert len(payload["rows"]) == 2 + 2 + 2  # euler-1/2, 1-step/2-step, 1-step/2-step
    for row in payload["rows"]:
        for key in ("class_accuracy", "fid", "spread_ratio"):
            assert row[key] is not None and row[key]["mean"] == row[key]["mean"], (row["arm"], row["sampler"], key)
    assert len(payload["configs"]) == 3
    table = fs.read_text(fs.join(out, "table.md"))
    assert table.count("\n| 4 steps |") == 6 and "||" not in table.replace("|---|", "")
    assert fs.read_bytes(fs.join(out, "plot.png"))[:4] == b"\x89PNG"
