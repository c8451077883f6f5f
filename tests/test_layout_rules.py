"""The house rules of DESIGN.md that code can check: imports go flows -> tasks -> (storage, dumo_model), each
layer reaching only the one below it (flows reach storage and the model through tasks); the model library
knows nothing of devices, orchestration or storage. Imports inside functions count as much as those at the
top of a module: a handler that imports storage is the same dependency, only later."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"flows", "tasks", "storage", "dumo_model"}
ALLOWED = {  # package -> project packages it may import
    "dumo_model": {"dumo_model"},
    "storage": {"storage"},
    "tasks": {"tasks", "storage", "dumo_model"},
    "flows": {"flows", "tasks"},
}
MODEL_FORBIDDEN = {"prefect", "dask", "distributed", "zarr", "fsspec", "s3fs", "deepspeed", "storage", "tasks"}


def imports_of(path: Path) -> set[str]:
    """The top-level packages ``path`` imports, anywhere in it (ast.walk visits function bodies too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = (imports_of(path) & PROJECT) - ALLOWED[package]
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"imports against the flows -> tasks -> (storage, dumo_model) direction: {bad}"


def test_model_library_has_no_device_orchestration_or_storage_code():
    for path in sorted((ROOT / "dumo_model").rglob("*.py")):
        assert not imports_of(path) & MODEL_FORBIDDEN, path
        text = path.read_text()
        assert ".cuda(" not in text and "torch.distributed" not in text, path


def test_the_rank_entry_point_imports_no_prefect():
    """tasks/ranks/ (what each rank process runs) and every module of tasks/ it imports, followed through."""
    todo, seen = sorted((ROOT / "tasks" / "ranks").glob("*.py")), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        assert "prefect" not in imports_of(path), path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tasks."):
                target = ROOT.joinpath(*node.module.split("."))
                todo.append(target.with_suffix(".py") if target.with_suffix(".py").exists() else target / "__init__.py")
    assert {ROOT / "tasks" / "ranks" / "__main__.py", ROOT / "tasks" / "config.py"} <= seen


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from flows.pipeline import full_pipeline\nimport storage.fs\n")
    assert imports_of(bad) == {"flows", "storage"}


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    """A CLI handler that imports storage lazily is still a flows -> storage import."""
    handler = tmp_path / "cli_x.py"
    handler.write_text(
        "import argparse\n\n\n"
        "def run(args: argparse.Namespace) -> int:\n"
        "    if args.check:\n"
        "        from storage.fs import exists\n\n"
        "        return int(exists(args.url))\n"
        "    import dumo_model.dit\n\n"
        "    return 0\n"
    )
    assert imports_of(handler) == {"argparse", "storage", "dumo_model"}
    assert (imports_of(handler) & PROJECT) - ALLOWED["flows"] == {"storage", "dumo_model"}
