"""What a user meets on a mistake: the real ``dumo`` command in subprocesses, one line on stderr naming the bad
input, exit status 1, nothing on stdout, no Prefect server started, nothing left behind; ``--debug`` and
``DUMO_DEBUG=1`` bring the traceback back. The formatting itself is checked in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli_errors import is_expected, one_line

PROJECT = Path(__file__).resolve().parent.parent


def _start(args: list[str], tmp: Path, **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "DUMO_DEBUG"))}
    environ.update(PREFECT_HOME=str(tmp / "prefect-home"), **env)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=PROJECT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_five_bad_inputs_print_one_line_each_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cases = {  # name: (argv, what the one line must say)
        "bad --set value": (
            ["train", "--config", "demo", "--set", f"root={root}", "--set", "train.num_steps=-3"],
            "config: train.num_steps: Input should be greater than or equal to 1 (got -3)",
        ),
        "batch arithmetic": (
            ["train", "--config", "demo", "--set", f"root={root}", "--set", "train.num_processes=3"],
            "global batch 128 != micro 42 x accumulation 1 x world 3",
        ),
        "missing config file": (["run", str(tmp_path / "nope.yaml")], "no config file"),
        "no latent store": (["train", "--config", "demo", "--set", f"root={root}"], "no latent store at"),
        "not a checkpoint": (
            ["evaluate", str(root / "runs" / "demo" / "checkpoints" / "step-0000010")],
            "is not a committed checkpoint (no COMMITTED marker); committed steps of run demo: none",
        ),
        "missing image tree": (
            ["build-latents", str(tmp_path / "no-images"), str(root / "latents" / "x.zarr"), "--autoencoder"]
            + ["pixels", "--resolution", "8", "--shard-size", "4"],
            "image tree",
        ),
    }
    bad_set = cases["bad --set value"][0]
    procs = {name: _start(argv, tmp_path) for name, (argv, _) in cases.items()}
    procs["--debug"] = _start([*bad_set, "--debug"], tmp_path)
    procs["DUMO_DEBUG=1"] = _start(bad_set, tmp_path, DUMO_DEBUG="1")
    done = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    for name, (argv, words) in cases.items():
        code, out, err = done[name]
        command = argv[0]
        assert code == 1, (name, err)
        assert out == "", (name, out)
        assert err.splitlines() == [err.strip()], (name, err)  # exactly one line: no traceback, no Prefect
        assert err.startswith(f"dumo {command}: error: ") and words in err, (name, err)
    for name in ("--debug", "DUMO_DEBUG=1"):
        code, _, err = done[name]
        assert code == 1 and "Traceback (most recent call last)" in err and "ValidationError" in err, (name, err)
    assert not (root / "runs").exists()  # a refused command leaves nothing behind


def test_one_line_formats_pydantic_and_multiline_errors() -> None:
    from tasks.config import load_config

    with pytest.raises(ValueError) as info:
        load_config("demo", ["train.bogus=1", "eval.num_samples=0"])
    line = one_line(info.value)
    assert "\n" not in line and "errors.pydantic.dev" not in line
    assert line == (
        "config: train.bogus: Extra inputs are not permitted (got 1);"
        " eval.num_samples: Input should be greater than or equal to 1 (got 0)"
    )
    assert one_line(ValueError("first\n  second")) == "first second"
    assert is_expected(FileNotFoundError("x")) and is_expected(ValueError("x"))
    assert not is_expected(RuntimeError("a bug")) and not is_expected(ZeroDivisionError())


@pytest.mark.slow
def test_evaluate_without_a_server_starts_none_and_shows_its_progress(tmp_path: Path) -> None:
    """No PREFECT_API_URL: `dumo evaluate` runs the evaluation directly (no temporary server, seconds
    sooner), logs what it does at INFO (real images, classifier, sampling), logs no error (no telemetry
    offline), and prints the table once with plain paths."""
    from storage import images
    from storage.layout import Root
    from tasks.config import PipelineConfig
    from tests.stores import pixels_store
    from tests.test_evaluate import _checkpoint

    root = Root(str(tmp_path / "root"))
    pixels_store(root.latent_store("digits-8"), images.write_digits(root.images("digits")))
    cfg = PipelineConfig.model_validate(
        {"name": "cli", "root": root.url, "data": {"store_name": "digits-8"}, "eval": {"num_samples": 50}}
    )
    url = _checkpoint(root, cfg, 10)
    proc = _start(["evaluate", url], tmp_path)
    out, err = proc.communicate(timeout=1500)  # ~1 min on a quiet machine; 11 min was seen at load 20
    assert proc.returncode == 0, err
    assert "Starting temporary server" not in err and "ERROR" not in err, err
    for line in ("evaluating cli step 10 under protocol default", "real images: reading", "feature classifier"):
        assert line in err, err
    assert out.count("| 1-step |") == 1 and "file://" not in out
    assert f"metrics and sample grid: {tmp_path}/root/runs/cli/evals/step-0000010/default" in out


def test_single_process_commands_use_prefect_only_where_a_server_is_configured(monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli_setup import STARTUP_ENV, prepare_environment, use_prefect

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # no server in the settings either (a test harness earlier in the session puts its own there)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert use_prefect(None) is False and use_prefect(True) is True
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert use_prefect(None) is True and use_prefect(False) is False
    for key in STARTUP_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # the user's value wins
    prepare_environment()
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "300"
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and os.environ["DO_NOT_TRACK"] == "1"
