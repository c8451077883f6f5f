"""``dumo run``, ``dumo demo`` and ``dumo compare``: the whole pipeline from the command line."""

from __future__ import annotations

import argparse
import os

from flows.cli_common import add_config, add_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the full pipeline (build-latents -> train -> evaluate) for a config",
        description="Run the flow `dumo` in this process (an ephemeral Prefect API unless PREFECT_API_URL is set): "
        "build the latent store unless it is complete, train (resuming from the newest committed checkpoint), "
        "evaluate the final checkpoint, print the results table and the paths of the sample grid, the metrics "
        "and the loss curve.",
    )
    add_config(p)
    add_overrides(p, "train.num_steps=2000")
    p.set_defaults(func=run)

    d = sub.add_parser(
        "demo",
        help="the embedded demo: digits -> latent store -> DeepSpeed on CPU -> 1- and 2-step samples -> metrics",
        description="Run configs/demo.yaml offline on the CPU (3 min 35 s on a quiet 2-core machine, README) and "
        "print the results table and the paths of the sample grid, the metrics and the loss curve. Running it "
        "again reuses the store and the finished run.",
    )
    d.add_argument("--root", default="demo-root", help="local directory (or URL) for everything (default demo-root)")
    add_overrides(d)
    d.set_defaults(func=demo)

    c = sub.add_parser(
        "compare",
        help="equal-budget ablation: flow_matching vs meanflow vs dumo on one store, table and plot",
        description="Train every arm of the config's `compare` section (same store, backbone, batch and optimiser; "
        "budgets in steps, compare.budgets, or in forward-equivalent passes, compare.compute_budgets; the resolved "
        "configs are checked to differ only in objective, seed, steps, samplers and the meanflow arm's derivative), "
        "evaluate each "
        "(1- and 2-step; multi-step Euler for flow matching) and write table.md, results.json and plot.png "
        "under <root>/comparisons/<name>/.",
    )
    add_config(c)
    add_overrides(c, "compare.seeds=[0,1,2]")
    c.set_defaults(func=compare)


def _offline_defaults() -> None:
    # Prefect's start-up settings are flows.cli_setup's, for every command; the pipeline presets' autoencoder
    # is found offline (a hub lookup without a network wastes ~23 s before failing)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pipeline(config: str, overrides: list[str]) -> dict:
    _offline_defaults()
    from tasks.config import load_config

    cfg = load_config(config, overrides)  # parsed once: a bad config fails here, before Prefect starts
    from tasks.cli_support import latent_store_is_complete
    from tasks.train import preflight

    if latent_store_is_complete(cfg.root, cfg.data):  # built: training's checks too
        preflight(cfg)  # (batch vs store, a run that cannot resume) before Prefect starts
    from flows.cli_errors import quiet_prefect_tracebacks
    from flows.pipeline import full_pipeline

    quiet_prefect_tracebacks()
    return full_pipeline(config=cfg)


def _print_results(summary: dict) -> None:
    """The results once (the flow logs no copy of them), with plain paths a shell can open."""
    from tasks.cli_support import display, evaluation_files

    files = evaluation_files(summary["eval_dir"])
    print("\n" + summary["table"])
    print(f"\nsample grid: {files['grid']}")
    print(f"metrics:     {files['metrics']}")
    print(f"loss curve:  {display(summary['loss_curve'])}")


def run(args: argparse.Namespace) -> int:
    _print_results(_pipeline(args.config, args.overrides))
    return 0


def demo(args: argparse.Namespace) -> int:
    _print_results(_pipeline("demo", [f"root={args.root}", *args.overrides]))
    return 0


def compare(args: argparse.Namespace) -> int:
    _offline_defaults()
    from tasks.config import load_config

    cfg = load_config(args.config, args.overrides)  # parsed once: a bad config fails before Prefect starts
    from flows.cli_errors import quiet_prefect_tracebacks
    from flows.compare import compare_objectives

    quiet_prefect_tracebacks()
    written = compare_objectives(config=cfg)
    print("\n" + written["table"])
    print(f"comparison: {written['dir']} (table.md, results.json, plot.png)")
    return 0
