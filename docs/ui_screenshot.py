"""What a user sees in the Prefect UI after the demo: start a local Prefect server, run ``dumo demo`` against
it, and photograph the flow run's artifacts with headless Chromium (Debian's ``chromium`` package).

    python docs/ui_screenshot.py [--steps 800] [--set KEY=VALUE ...] [--out docs/ui-artifacts.png]

Not part of ``make test``: it needs Chromium and takes the demo's few minutes. Everything (server state, demo
root) lives in a temporary directory that is removed afterwards; the server is stopped by PID. Writes the
flow run's page to ``--out`` (3.8.8's UI opens it on its Logs tab whatever the ``tab`` query says) and the
sample-grid artifact, rendered, beside it (``-grid.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from tasks.local_server import LocalPrefect, free_port  # noqa: E402


def api(url: str, path: str, body: dict) -> list | dict:
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def shoot(chromium: str, page: str, out: Path, height: int) -> None:
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    argv += [f"--window-size=1400,{height}", "--virtual-time-budget=30000", f"--screenshot={out}", page]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    print(f"wrote {out} ({page})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="train.num_steps (default: the demo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more demo --set KEY=VALUE")
    parser.add_argument("--out", default=str(PROJECT / "docs" / "ui-artifacts.png"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dumo-ui-"))
    local = LocalPrefect(state_dir=tmp / "serve", port=free_port(), root=str(tmp / "root"))
    try:
        local.start_server()
        env = local.command_env()
        env.update(HF_HUB_OFFLINE="1", DUMO_NO_PROGRESS="1")
        argv = [sys.executable, "-m", "flows.cli", "demo", "--root", str(tmp / "root")]
        argv += ["--set", f"train.num_steps={args.steps}"] if args.steps else []
        argv += [word for item in args.overrides for word in ("--set", item)]
        subprocess.run(argv, cwd=PROJECT, env=env, check=True, timeout=3600)
        runs = api(local.api_url, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 20})
        run = next(r for r in runs if r["name"] and r["state_type"] == "COMPLETED" and r["parent_task_run_id"] is None)
        ui = local.api_url.removesuffix("/api")
        shoot(args.chromium, f"{ui}/runs/flow-run/{run['id']}?tab=Artifacts", Path(args.out), 1800)
        grids = api(local.api_url, "/artifacts/filter", {"artifacts": {"key": {"like_": "-grid"}}, "limit": 5})
        if grids:
            grid_png = Path(args.out).with_name(Path(args.out).stem + "-grid.png")
            shoot(args.chromium, f"{ui}/artifacts/artifact/{grids[0]['id']}", grid_png, 1300)
    finally:
        local.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
