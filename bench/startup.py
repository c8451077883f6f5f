"""Seconds from typing a ``dumo`` command to its first work, and what a bad input prints.

Runs the real CLI in subprocesses on the demo's digits (a fresh root and a fresh PREFECT_HOME, so the first
command pays Prefect's database set-up as a new user's does) and timestamps each line of its output:

    command                      first work = the first line that matches
    build-latents (fresh store)  the source listing ("source ... images")
    train (20 steps)             the launch of the ranks ("launching:")
    evaluate (a checkpoint)      the start of the evaluation ("evaluating "); then stopped
    train --set bad              (fails) seconds to exit, lines on stdout + stderr

    python bench/startup.py [--python .venv/bin/python] [--project CHECKOUT] [--out bench/results/startup.json]

Prints a table and writes JSON. Environment as a user would have it, plus HF_HUB_OFFLINE=1; the Prefect
variables of the calling shell are removed, so each command decides for itself how Prefect starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def timed_run(
    argv: list[str], env: dict[str, str], first_work: str | None, project: Path, stop_at_work: bool = False
) -> dict:
    """Run ``argv``; seconds to the first output line matching ``first_work``, to exit, and the lines.
    ``stop_at_work``: end the command (its process group) once its first work is seen."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines: list[tuple[float, str, str]] = []

    def pump(stream, name: str) -> None:
        for line in stream:
            lines.append((time.perf_counter() - t0, name, line.rstrip("\n")))
            if stop_at_work and first_work and re.search(first_work, line):
                os.killpg(proc.pid, signal.SIGTERM)

    threads = [threading.Thread(target=pump, args=(s, n)) for s, n in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for t in threads:
        t.start()
    code = proc.wait(timeout=1800)
    for t in threads:
        t.join()
    total = time.perf_counter() - t0
    hit = next((t for t, _, line in sorted(lines) if first_work and re.search(first_work, line)), None)
    return {
        "argv": argv[2:],
        "exit_code": code,
        "seconds_to_first_work": None if hit is None else round(hit, 2),
        "seconds_total": None if stop_at_work else round(total, 2),
        "lines_stdout": sum(1 for _, n, _ in lines if n == "out"),
        "lines_stderr": sum(1 for _, n, _ in lines if n == "err"),
        "stderr_tail": [line for _, n, line in lines if n == "err"][-3:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter with dumo installed")
    parser.add_argument("--out", default=str(PROJECT / "bench" / "results" / "startup.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary root")
    parser.add_argument("--project", default=str(PROJECT), help="checkout to run the commands in (e.g. main's)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dumo-startup-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(tmp / "ext"))
    env.setdefault("DUMO_NO_PROGRESS", "1")
    root = tmp / "root"
    dumo = [args.python, "-m", "flows.cli"]
    project = Path(args.project)
    subprocess.run([*dumo, "make-digits", str(root / "images" / "digits")], env=env, cwd=project, check=True)
    store = str(root / "latents" / "digits-8.zarr")
    sets = ["--set", f"root={root}", "--set", "train.num_steps=20", "--set", "train.checkpoint_every=20"]
    runs = {
        "build-latents": timed_run(
            [*dumo, "build-latents", str(root / "images" / "digits"), store, "--autoencoder", "pixels"]
            + ["--resolution", "8", "--shard-size", "256"],
            env,
            r"source .* images",
            project,
        ),
        "train": timed_run([*dumo, "train", "--config", "demo", *sets], env, r"launching: ", project),
    }
    ckpt = str(root / "runs" / "demo" / "checkpoints" / "step-0000020")
    runs["evaluate"] = timed_run([*dumo, "evaluate", ckpt], env, r"evaluating ", project, stop_at_work=True)
    bad = [*dumo, "train", "--config", "demo", *sets, "--set", "train.num_steps=-3"]
    runs["bad --set"] = timed_run(bad, env, None, project)
    print(f"{'command':<16}{'exit':>6}{'first work (s)':>16}{'total (s)':>11}{'stdout':>8}{'stderr':>8}")
    for name, r in runs.items():
        first = "-" if r["seconds_to_first_work"] is None else f"{r['seconds_to_first_work']:.1f}"
        total = "-" if r["seconds_total"] is None else f"{r['seconds_total']:.1f}"
        print(f"{name:<16}{r['exit_code']:>6}{first:>16}{total:>11}{r['lines_stdout']:>8}{r['lines_stderr']:>8}")
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average": os.getloadavg(),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
