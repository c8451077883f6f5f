"""The ``dumo`` command's help: shown without loading torch, Prefect, zarr or pydantic (what makes it slow), and
derived from where each list is declared: the config presets on disk in configs/, the model presets and the
objectives in the library, so that a new preset shows up in the help without anyone editing it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import tasks.config_files
from dumo_model.dit import PRESETS
from flows.cli import build_parser

PROJECT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "prefect", "zarr", "pydantic", "fsspec")


def _commands() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices


def test_help_and_parsing_load_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from flows.cli import build_parser\n"
        "parser = build_parser()\n"
        "parser.format_help()\n"
        "parser.parse_args(['train', '--config', 'demo', '--set', 'train.num_steps=2'])\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_config_help_lists_the_presets_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no preset name broken at a hyphen
    for name in ("tiny-a", "tiny-b"):
        (tmp_path / f"{name}.yaml").write_text("name: x\n")
    monkeypatch.setattr(tasks.config_files, "CONFIG_DIR", tmp_path)
    commands = _commands()
    for command in ("train", "run", "compare"):
        assert "a preset name in configs/ (tiny-a, tiny-b) or a YAML path" in commands[command].format_help()


def test_model_info_offers_the_declared_presets_and_objectives(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setitem(PRESETS, "DuMo-T/2", dict(hidden_size=32, depth=1, num_heads=2))
    info = _commands()["model-info"]
    text = info.format_help()
    assert f"model preset: {', '.join(PRESETS)}" in text and "DuMo-T/2" in text
    assert "(dumo, meanflow, flow_matching; default dumo)" in text
    assert info.parse_args(["DuMo-T/2", "--objective", "meanflow"]).preset == "DuMo-T/2"
    with pytest.raises(SystemExit) as exit_info:
        info.parse_args(["DuMo-Z/9"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'DuMo-Z/9' (choose from 'DuMo-B/2'," in capsys.readouterr().err


def test_every_choice_list_is_read_from_its_declaration() -> None:
    """No ``choices=[...]`` written into flows/: each closed choice is declared once (a registry or a
    Literal type) and the command line reads it from there, so the two cannot drift apart."""
    import ast
    import typing

    from dumo_model.dit import RInput
    from dumo_model.samplers import SamplerName
    from storage.images import BadImagePolicy
    from storage.latents import LatentDtype
    from tasks.config import Device
    from tasks.sample import Weights

    written = []
    for path in sorted((PROJECT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "choices" and not isinstance(node.value, ast.Call):
                written.append(f"{path.name}:{node.value.lineno}")
    assert written == []
    commands = _commands()

    def offered(command: str, option: str) -> list[str]:
        action = next(a for a in commands[command]._actions if option in a.option_strings)
        return list(action.choices)

    assert offered("build-latents", "--device") == list(typing.get_args(Device))
    assert offered("build-latents", "--on-bad-image") == list(typing.get_args(BadImagePolicy))
    assert offered("build-latents", "--latent-dtype") == list(typing.get_args(LatentDtype))
    assert offered("sample", "--sampler") == list(typing.get_args(SamplerName))
    assert offered("sample", "--weights") == offered("export", "--weights") == list(typing.get_args(Weights))
    assert offered("model-info", "--r-input") == list(typing.get_args(RInput))
