"""The training log: what a crash leaves behind is read and trimmed correctly, locally and on an object store."""

from __future__ import annotations

import json
import math

import pytest

from storage import fs
from storage.layout import Root
from storage.train_log import TrainLog, read_train_log

NAN = math.nan


def rows(*steps: int) -> list:
    return [(s, [1.0 / s, 0.5 / s, None], 2.0, 1e-3) for s in steps]


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_a_resumed_log_drops_the_steps_past_the_checkpoint_and_keeps_one_record_per_step(tmp_path, scheme):
    root = Root(str(tmp_path) if scheme == "local" else f"memory://dumo-train-log-{tmp_path.name}")
    run = root.run("r")
    log = TrainLog(run, keep_until=0)
    last = log.add(rows(1, 2, 3, 4), images_per_s=100.0, world=2)
    assert last["step"] == 4 and last["loss_u"] is None and last["loss_v"] == pytest.approx(0.125)
    log.flush()  # what a checkpoint does (an object store is otherwise rewritten at most once a minute)
    assert [r["step"] for r in read_train_log(run)] == [1, 2, 3, 4]

    # resumed from the checkpoint at step 2: steps 3 and 4 are redone, their old records dropped
    log = TrainLog(run, keep_until=2)
    assert [r["step"] for r in read_train_log(run)] == [1, 2]
    log.add(rows(3), images_per_s=50.0, world=1)
    log.flush()
    records = read_train_log(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["world_size"] == 1 and records[-1]["images_per_s"] == 50.0


def test_a_half_written_last_line_is_ignored_and_a_redone_step_keeps_its_later_record(tmp_path):
    run = Root(str(tmp_path)).run("r")
    lines = [json.dumps({"step": 1, "loss": 2.0}), json.dumps({"step": 1, "loss": 1.0}), '{"step": 2, "lo']
    fs.write_text(run.train_log, "\n".join(lines))
    assert read_train_log(run) == [{"step": 1, "loss": 1.0}]


def test_nan_and_inf_are_recorded_distinctly_from_no_such_term_as_strict_json(tmp_path):
    run = Root(str(tmp_path)).run("r")
    log = TrainLog(run, keep_until=0)
    log.add([(1, [NAN, math.inf, None], -math.inf, 1e-3), (2, [1.0, 0.5, None], NAN, 1e-3)], 10.0, 1)
    lines = fs.read_text(run.train_log).splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) for line in lines]
    assert strict[0]["loss"] == "NaN" and strict[0]["loss_v"] == "Infinity" and strict[0]["loss_u"] is None
    assert strict[0]["grad_norm"] == "-Infinity" and strict[1]["grad_norm"] == "NaN"
    first, second = read_train_log(run)
    assert math.isnan(first["loss"]) and first["loss_v"] == math.inf and first["loss_u"] is None
    assert first["grad_norm"] == -math.inf and second["loss"] == 1.0 and math.isnan(second["grad_norm"])
