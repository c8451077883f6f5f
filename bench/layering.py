"""How far the config travels and how typed the stage boundaries are: the figures issue 12 asks for.

    python bench/layering.py                  # this checkout
    python bench/layering.py --root OTHER     # another checkout (e.g. a `git worktree add` of an older commit)

Static, from the source (ast), no imports of the project:
- config stops: following the config from ``flows.pipeline.full_pipeline`` through the call graph, each
  project function that receives it whole or a section of it (``cfg``, ``cfg.data``, an arm's config, the
  result of ``resolve``/``revalidate``/``config_of``...) is a stop; plus the files those functions are in.
  The config also crosses storage: a function that parses it (``config_from_yaml_text`` of the run's or a
  checkpoint's config.yaml) holds it from there on, and a stop that launches a project module with a
  ``main`` (``-m tasks.ranks``, named as a string by the stop or by any function below it) hands the
  config to that ``main``, which reads the run's config back;
- whole-config stops: the same, following only the whole PipelineConfig (a section handed on ends the trail:
  the issue's target, "build_latents takes the data section");
- functions taking the whole PipelineConfig (by annotation), and the files holding them;
- parse sites: calls of ``load_config``, ``config_from_yaml_text`` and ``PipelineConfig.model_validate``;
- ``dict[str, Any]`` annotations in the library.
Prints a table and writes JSON (bench/results/layering.json).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("flows", "tasks", "storage", "dumo_model")
SECTIONS = {"data", "train", "eval", "model", "compare", "config", "objective"}  # attributes that hand on config
CONFIG_CALLS = {"config_of", "load_config", "resolve", "revalidate", "model_copy", "arm_config", "arm_configs"}
PARSE_CALLS = {"load_config", "config_from_yaml_text"}  # a config read back from storage starts a trail
PREFECT_CALLS = {"submit", "fn", "map", "with_options"}  # task.submit(cfg) is a call of task


@dataclass
class Module:
    path: str
    funcs: dict[str, ast.FunctionDef] = field(default_factory=dict)
    classes: dict[str, dict[str, ast.FunctionDef]] = field(default_factory=dict)
    aliases: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # name -> (module, attribute)


def read_modules(root: Path) -> dict[str, Module]:
    mods: dict[str, Module] = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            rel = p.relative_to(root).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            tree = ast.parse(p.read_text())
            mod = Module(str(p.relative_to(root)))
            for node in tree.body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    mod.funcs[node.name] = node
                elif isinstance(node, ast.ClassDef):
                    methods = [n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
                    mod.classes[node.name] = {n.name: n for n in methods}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if node.module.split(".")[0] in PACKAGES:
                        for a in node.names:
                            sub = f"{node.module}.{a.name}"
                            is_module = (root / (sub.replace(".", "/") + ".py")).exists()
                            mod.aliases[a.asname or a.name] = (sub, None) if is_module else (node.module, a.name)
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] in PACKAGES:
                            mod.aliases[a.asname or a.name] = (a.name, None)
            mods[name] = mod
    return mods


def call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def handed_names(expr: ast.expr, sections: set[str] = SECTIONS) -> set[str]:
    """Names whose config an argument hands on: ``cfg``, ``cfg.data`` (an attribute in ``sections``),
    ``resolve(cfg)``, ``(a, b)``; ``"*"`` for a config parsed right here."""
    if isinstance(expr, ast.Name):
        return {expr.id}
    if isinstance(expr, ast.Attribute) and expr.attr in sections:
        return handed_names(expr.value, sections)
    if isinstance(expr, ast.Call):
        f = expr.func
        name = call_name(expr)
        if name in PARSE_CALLS:
            return {"*"}
        if name in CONFIG_CALLS:
            out = set().union(*(handed_names(a, sections) for a in [*expr.args, *(k.value for k in expr.keywords)]))
            return out | (handed_names(f.value, sections) if isinstance(f, ast.Attribute) else set())
    if isinstance(expr, ast.Tuple | ast.List):
        return set().union(*(handed_names(e, sections) for e in expr.elts))
    return set()


def bound_names(target: ast.expr) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def follow_config(
    mods: dict[str, Module], start: tuple[str, str], params: set[str], sections: set[str] = SECTIONS
) -> list[str]:
    stops: list[str] = []
    seen: set[tuple[str, str]] = set()

    def resolve(mod: str, f: ast.expr) -> tuple[str, str, ast.FunctionDef, bool] | None:
        m = mods[mod]
        if isinstance(f, ast.Attribute) and f.attr in PREFECT_CALLS:
            f = f.value
        if isinstance(f, ast.Name):
            if f.id in m.funcs:
                return mod, f.id, m.funcs[f.id], False
            if "__init__" in m.classes.get(f.id, {}):
                return mod, f"{f.id}.__init__", m.classes[f.id]["__init__"], True
            target, attr = m.aliases.get(f.id, (None, None))
            if attr and target in mods:
                return resolve(target, ast.Name(attr))
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in m.aliases:
            target, attr = m.aliases[f.value.id]
            target = target if attr is None else f"{target}.{attr}"
            if target in mods:
                return resolve(target, ast.Name(f.attr))
        return None

    def launched(mod: str, node: ast.FunctionDef, seen: set[int] | None = None) -> set[str]:
        """Project modules with a ``main`` named as a string (``-m tasks.ranks``) by ``node`` or by any project
        function it calls, config or not: a stage that writes the run's config and then calls a launcher."""
        seen = set() if seen is None else seen
        if id(node) in seen:
            return set()
        seen.add(id(node))
        out = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                names = (f"{n.value}.__main__", n.value)
                out |= {m for m in names if "main" in getattr(mods.get(m), "funcs", {})}
            elif isinstance(n, ast.Call) and (callee := resolve(mod, n.func)):
                out |= launched(callee[0], callee[2], seen)
        return out

    def visit(mod: str, qual: str, node: ast.FunctionDef, tainted: set[str], method: bool) -> None:
        if (mod, qual) in seen:
            return
        seen.add((mod, qual))
        stops.append(f"{mods[mod].path}:{qual}")
        tainted = set(tainted) | {"*"}  # "*": a config parsed in this function
        for _ in range(2):  # assignments and loops that carry the config on, in any order
            for n in ast.walk(node):
                if isinstance(n, ast.Assign) and handed_names(n.value, sections) & tainted:
                    tainted |= set().union(*(bound_names(t) for t in n.targets))
                if isinstance(n, ast.For | ast.comprehension) and handed_names(n.iter, sections) & tainted:
                    tainted |= bound_names(n.target)
        for entry in launched(mod, node):  # a process it starts (-m tasks.ranks) reads the config back
            visit(entry, "main", mods[entry].funcs["main"], set(), False)
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            hits = [i for i, a in enumerate(call.args) if handed_names(a, sections) & tainted]
            kw = [k.arg for k in call.keywords if k.arg and handed_names(k.value, sections) & tainted]
            callee = (hits or kw) and resolve(mod, call.func)
            if callee:
                cmod, cqual, cnode, cmethod = callee
                cparams = [a.arg for a in cnode.args.args][1 if cmethod else 0 :]
                visit(cmod, cqual, cnode, {cparams[i] for i in hits if i < len(cparams)} | set(kw), cmethod)

    mod, func = start
    visit(mod, func, mods[mod].funcs[func], params, False)
    return stops


def measure(root: Path) -> dict:
    mods = read_modules(root)
    start = ("flows.pipeline", "full_pipeline")
    stops = follow_config(mods, start, {"config", "overrides"})
    whole_stops = follow_config(mods, start, {"config", "overrides"}, sections={"config"})
    whole: list[str] = []
    parse_sites = any_dicts = 0
    for m in mods.values():
        src = (root / m.path).read_text()
        any_dicts += src.count("dict[str, Any]")
        parse_sites += len(re.findall(r"\b(load_config|config_from_yaml_text|PipelineConfig\.model_validate)\(", src))
        parse_sites -= len(re.findall(r"def (load_config|config_from_yaml_text)\(", src))
        funcs = list(m.funcs.items()) + [(f"{c}.{k}", f) for c, ms in m.classes.items() for k, f in ms.items()]
        for name, f in funcs:
            args = f.args.args + f.args.kwonlyargs
            if any(a.annotation is not None and "PipelineConfig" in ast.unparse(a.annotation) for a in args):
                whole.append(f"{m.path}:{name}")
    return {
        "config_stops": len(stops),
        "config_files": len({s.split(":")[0] for s in stops}),
        "whole_config_stops": len(whole_stops),
        "whole_config_stop_files": len({s.split(":")[0] for s in whole_stops}),
        "whole_config_functions": len(whole),
        "whole_config_files": len({s.split(":")[0] for s in whole}),
        "parse_sites": parse_sites,
        "dict_str_any": any_dicts,
        "stops": stops,
        "whole_stops": whole_stops,
        "whole_functions": whole,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="checkout to measure")
    ap.add_argument("--out", default="bench/results/layering.json")
    ap.add_argument("--stops", action="store_true", help="also list the stops")
    args = ap.parse_args()
    r = measure(Path(args.root))
    print(f"{'measure':<44}{'value':>8}")
    print(f"{'config from full_pipeline: stops':<44}{r['config_stops']:>8}")
    print(f"{'  ... in files':<44}{r['config_files']:>8}")
    print(f"{'  whole config only: stops':<44}{r['whole_config_stops']:>8}")
    print(f"{'  ... in files':<44}{r['whole_config_stop_files']:>8}")
    print(f"{'functions taking the whole PipelineConfig':<44}{r['whole_config_functions']:>8}")
    print(f"{'  ... in files':<44}{r['whole_config_files']:>8}")
    print(f"{'config parse sites':<44}{r['parse_sites']:>8}")
    print(f"{'dict[str, Any] in the library':<44}{r['dict_str_any']:>8}")
    if args.stops:
        print("\nconfig stops:\n  " + "\n  ".join(r["stops"]))
        print("whole-config stops:\n  " + "\n  ".join(r["whole_stops"]))
        print("functions taking the whole PipelineConfig:\n  " + "\n  ".join(r["whole_functions"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", args.root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    Path(args.out).write_text(json.dumps({"root": args.root, "commit": commit.stdout.strip(), **r}, indent=1))


if __name__ == "__main__":
    main()
