"""``dumo train``: train a run from a config file, resuming from its newest committed checkpoint."""

from __future__ import annotations

import argparse

from flows.cli_common import add_overrides, add_prefect_switch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a run with DeepSpeed from its latent store (resumes if checkpoints exist)",
        description="Train the run described by --config (a YAML path or a preset name in configs/) with "
        "DeepSpeed ZeRO from the run's latent store, writing committed checkpoints under "
        "<root>/runs/<name>/checkpoints/. Running the same command again continues from the newest committed "
        "checkpoint. With train.launcher=auto: train.num_processes=1 runs one process without a launcher, more "
        "run under torchrun, and train.num_nodes > 1 uses the deepspeed launcher with train.hostfile.",
    )
    p.add_argument("--config", required=True, help="YAML file or preset name (e.g. demo)")
    add_overrides(p, "train.num_steps=200")
    add_prefect_switch(p, "training function", "no dumo.checkpoint.saved events")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from flows.cli_errors import quiet_prefect_tracebacks
    from flows.cli_setup import plain_logging, use_prefect
    from tasks.config import load_config
    from tasks.train import preflight, resolve

    cfg = load_config(args.config, args.overrides)
    preflight(resolve(cfg))  # config, store and resume checked before Prefect or any process starts
    if use_prefect(args.prefect):
        from flows.train import train_flow

        quiet_prefect_tracebacks()
        result = train_flow(config=args.config, overrides=args.overrides)
    else:
        from tasks.train import train_run

        plain_logging()
        result = train_run(cfg)
    print(json.dumps(result, indent=1))
    return 0
