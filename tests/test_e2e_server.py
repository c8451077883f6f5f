"""End to end against a real Prefect server on 127.0.0.1, with the same steps as `make serve`
(tasks.local_server.LocalPrefect): server -> process pool -> `prefect deploy --all` from prefect.yaml.

Then `prefect deployment run dumo/full-pipeline` with a tiny config, executed by `prefect worker start
--run-once`; the checkpoint events of that run's training, and one more emitted here, must start flow runs of
`evaluate-checkpoint/on-checkpoint` with the payload as parameters, which a second worker executes.

Tests in this module share the server and run in file order. Cost on 2 busy cores: ~1 min of setup, the
pipeline run (most of it one-time work per root: the digits tree, the store, DeepSpeed's first init, the
evaluation classifier) and ~30 s for the evaluations.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from storage.layout import Root
from tasks.local_server import PROJECT_DIR, LocalPrefect, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

RUN = "e2e"
NUM_STEPS, CHECKPOINT_EVERY = 8, 4
TINY = [  # on top of configs/demo.yaml
    f"train.num_steps={NUM_STEPS}",
    f"train.checkpoint_every={CHECKPOINT_EVERY}",
    "train.keep_last=2",
    "model.hidden_size=32",
    "model.depth=1",
    "model.num_heads=2",
    "eval.num_samples=50",
    "eval.batch_size=50",
    "data.shard_size=600",
    "data.workers=1",
]
EVALUATE = "evaluate-checkpoint/on-checkpoint"
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 1.0) -> T:
    """Poll ``probe`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if result := probe():
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def client(local: LocalPrefect) -> Iterator[Any]:
    """A synchronous Prefect client for the test server (this process's own settings stay as they were)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: local.api_url}), get_client(sync_client=True) as c:
        yield c


def flow_run_logs(local: LocalPrefect, flow_run_id: Any, last: int = 40) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client(local) as c:
        logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(f"{entry.level} {entry.message}" for entry in logs[-last:])


def runs_of(local: LocalPrefect, deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with client(local) as c:
        dep = c.read_deployment_by_name(deployment)
        return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def assert_completed(local: LocalPrefect, flow_run_id: Any, worker_output: str = "") -> Any:
    with client(local) as c:
        run = c.read_flow_run(flow_run_id)
    if run.state is None or not run.state.is_completed():
        pytest.fail(
            f"flow run {run.name} ({flow_run_id}) ended {run.state_name}: {run.state and run.state.message}\n"
            f"--- its logs:\n{flow_run_logs(local, flow_run_id)}\n--- worker:\n{worker_output[-3000:]}"
        )
    return run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-server")


@pytest.fixture(scope="module")
def local(workdir: Path) -> Iterator[LocalPrefect]:
    """Server + pool + deployments, as `make serve` makes them (without the long-running worker: the tests
    run `--run-once` workers). Stopped by PID at the end, whatever happened."""
    lp = LocalPrefect(
        state_dir=workdir / "serve",
        port=free_port(),
        root=str(workdir / "root"),
        env={"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3"},
    )
    try:
        t0 = time.monotonic()
        lp.start_server(timeout=240)
        lp.create_pool()
        deployed = lp.deploy()
        print(f"server, pool and {len(deployed)} deployments in {time.monotonic() - t0:.0f} s")
        yield lp
    finally:
        lp.stop()


@pytest.fixture(scope="module")
def tiny_config(workdir: Path) -> Path:
    """configs/demo.yaml with the TINY overrides and a root in the temp dir, as a YAML file: what a user
    passes as `--param config=<path>`."""
    from tasks.config import apply_overrides, load_config

    data = yaml.safe_load((PROJECT_DIR / "configs" / "demo.yaml").read_text())
    data = apply_overrides(data, [f"name={RUN}", f"root={workdir / 'root'}", *TINY])
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    load_config(str(path))  # fails here, not in the flow run, if an override no longer validates
    return path


@pytest.fixture(scope="module")
def pipeline_run(local: LocalPrefect, tiny_config: Path) -> dict[str, Any]:
    """`prefect deployment run dumo/full-pipeline --param config=<tiny>`, then one `--run-once` worker."""
    out = local.cli("deployment", "run", "dumo/full-pipeline", "--param", f"config={tiny_config}").stdout
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, f"no flow run id in the output of `prefect deployment run`:\n{out}"
    t0 = time.monotonic()
    worker_output = local.run_worker_once(timeout=1500)
    print(f"full-pipeline flow run executed by a --run-once worker in {time.monotonic() - t0:.0f} s")
    return {"id": match.group(1), "worker_output": worker_output}


def test_deployments_from_prefect_yaml(local: LocalPrefect) -> None:
    with client(local) as c:
        deployments = {
            name: c.read_deployment_by_name(name)
            for name in (
                "dumo/full-pipeline",
                "build-latents/default",
                "train/default",
                EVALUATE,
                "reevaluate-checkpoints/nightly",
            )
        }
        automations = c.read_resource_related_automations(f"prefect.deployment.{deployments[EVALUATE].id}")
    for name, dep in deployments.items():
        assert dep.work_pool_name == local.pool, name
        # The pull step prefect deploy recorded: flow runs start in the repository, wherever the worker runs.
        assert dep.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_DIR)}}
        ], name
    assert deployments["dumo/full-pipeline"].parameters == {"config": "demo"}

    (nightly,) = deployments["reevaluate-checkpoints/nightly"].schedules
    assert (nightly.schedule.cron, nightly.schedule.timezone, nightly.active) == ("0 3 * * *", "UTC", True)
    assert deployments["reevaluate-checkpoints/nightly"].parameters == {"root": local.root}  # from DUMO_ROOT

    (automation,) = automations
    assert automation.enabled and automation.trigger.expect == {"dumo.checkpoint.saved"}
    (action,) = automation.actions
    assert action.deployment_id == deployments[EVALUATE].id
    assert action.parameters == {
        "checkpoint_url": "{{ event.payload.checkpoint_url }}",
        "step": "{{ event.payload.step }}",
    }


def test_full_pipeline_run_completes(local: LocalPrefect, pipeline_run: dict[str, Any], workdir: Path) -> None:
    run = assert_completed(local, pipeline_run["id"], pipeline_run["worker_output"])
    assert run.parameters["config"].endswith("tiny.yaml")
    eval_dir = workdir / "root" / "runs" / RUN / "evals" / f"step-{NUM_STEPS:07d}"
    metrics_files = list(eval_dir.glob("*/metrics.json"))
    assert metrics_files, f"no metrics.json under {eval_dir}"
    record = json.loads(metrics_files[0].read_text())
    assert (record["run"], record["step"]) == (RUN, NUM_STEPS)


def test_checkpoint_events_start_evaluate_checkpoint(
    local: LocalPrefect, pipeline_run: dict[str, Any], workdir: Path
) -> None:
    run_layout = Root(str(workdir / "root")).run(RUN)
    steps = list(range(CHECKPOINT_EVERY, NUM_STEPS + 1, CHECKPOINT_EVERY))

    def params(step: int) -> dict[str, Any]:
        return {"checkpoint_url": run_layout.checkpoint(step), "step": step}

    # 1. Training, run by the worker against this server, emitted one event per committed checkpoint, and
    #    the trigger in prefect.yaml turned each into a flow run with the payload as parameters (step an int).
    def from_training() -> list[Any] | None:
        runs = runs_of(local, EVALUATE)
        found = [next((r for r in runs if r.parameters == params(s)), None) for s in steps]
        return found if all(found) else None

    triggered = wait_for(
        f"{EVALUATE} runs with parameters {[params(s) for s in steps]}; have "
        f"{[r.parameters for r in runs_of(local, EVALUATE)]}",
        from_training,
        timeout=60,
    )

    # 2. An event emitted here, by the training code's own emitter, against the live server.
    before = {r.id for r in runs_of(local, EVALUATE)}
    emit = (
        "from tasks.train import emit_checkpoint_event; "
        f"emit_checkpoint_event({RUN!r}, {run_layout.checkpoint(steps[0])!r}, {steps[0]})"
    )
    subprocess.run(
        [sys.executable, "-c", emit],
        env=local.command_env(),
        cwd=PROJECT_DIR,
        check=True,
        timeout=120,
        capture_output=True,
    )
    new = wait_for(
        f"a new {EVALUATE} run for the emitted event",
        lambda: [r for r in runs_of(local, EVALUATE) if r.id not in before],
        timeout=60,
    )
    assert [r.parameters for r in new] == [params(steps[0])]

    # 3. A worker executes them all (the step-8 one is a cache hit of the pipeline's final evaluation).
    t0 = time.monotonic()
    output = local.run_worker_once(timeout=900)
    print(f"{len(triggered) + len(new)} evaluate-checkpoint runs executed in {time.monotonic() - t0:.0f} s")
    for run in [*triggered, *new]:
        assert_completed(local, run.id, output)
    for step in steps:
        metrics_files = list((workdir / "root" / "runs" / RUN / "evals" / f"step-{step:07d}").glob("*/metrics.json"))
        assert metrics_files, f"no metrics.json for step {step}"
        assert json.loads(metrics_files[0].read_text())["step"] == step


def test_the_nightly_schedule_evaluates_a_checkpoint_left_without_metrics(
    local: LocalPrefect, pipeline_run: dict[str, Any], workdir: Path
) -> None:
    """The server's scheduler turns the cron of prefect.yaml into scheduled runs; one of them, made due now
    (the test cannot wait for 03:00 UTC), evaluates the checkpoint whose metrics were lost, and only that."""
    import shutil
    from datetime import UTC, datetime

    from prefect.states import Scheduled

    evals = workdir / "root" / "runs" / RUN / "evals"
    lost, kept = evals / f"step-{CHECKPOINT_EVERY:07d}", evals / f"step-{NUM_STEPS:07d}"
    kept_metrics = sorted(kept.glob("*/metrics.json"))
    assert kept_metrics and list(lost.glob("*/metrics.json")), "the earlier tests should have evaluated both steps"
    kept_before = {p: p.read_bytes() for p in kept_metrics}
    shutil.rmtree(lost)

    def scheduled() -> list[Any]:
        return [r for r in runs_of(local, "reevaluate-checkpoints/nightly") if r.state and r.state.is_scheduled()]

    runs = wait_for("the scheduler to create runs of reevaluate-checkpoints/nightly", scheduled, timeout=120)
    for r in runs:  # the cron of prefect.yaml: every day at 03:00 UTC, in the future
        start = r.expected_start_time.astimezone(UTC)
        assert (start.hour, start.minute) == (3, 0) and start > datetime.now(UTC), start
        assert r.parameters == {"root": local.root}
    first = min(runs, key=lambda r: r.expected_start_time)
    with client(local) as c:
        c.set_flow_run_state(first.id, Scheduled(scheduled_time=datetime.now(UTC)), force=True)
    output = local.run_worker_once(timeout=900)
    assert_completed(local, first.id, output)

    (record_file,) = lost.glob("*/metrics.json")
    assert json.loads(record_file.read_text())["step"] == CHECKPOINT_EVERY
    assert {p: p.read_bytes() for p in kept_metrics} == kept_before  # the evaluated step was left alone
