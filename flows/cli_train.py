"""``dumo train``: train a run from a config file, resuming from its newest committed checkpoint."""

from __future__ import annotations

import argparse

from flows.cli_common import add_config, add_overrides, add_prefect_switch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a run with DeepSpeed from its latent store (resumes if checkpoints exist)",
        description="Train the run described by --config (a YAML path or a preset name in configs/) with "
        "DeepSpeed ZeRO from the run's latent store, writing committed checkpoints under "
        "<root>/runs/<name>/checkpoints/. Running the same command again continues from the newest committed "
        "checkpoint. With train.launcher=auto: train.num_processes=1 runs one process without a launcher, more "
        "run under torchrun, and train.num_nodes > 1 uses the deepspeed launcher with train.hostfile, unless each "
        "node starts its own launcher (--nnodes, below).",
    )
    add_config(p, "--config", required=True)
    add_overrides(p, "train.num_steps=200")
    add_prefect_switch(p, "training function", "no dumo.checkpoint.saved events")
    node = p.add_argument_group(
        "one launcher per node (SLURM srun, a Kubernetes PyTorchJob): run this same command on every node, each "
        "with its own --node-rank; torchrun's rendezvous meets at --master-addr:--master-port (node 0). Node 0 "
        "runs the train flow (events), the others train without a flow run"
    )
    node.add_argument("--nnodes", type=int, metavar="N", help="nodes in the job (sets train.num_nodes)")
    node.add_argument("--node-rank", type=int, default=0, metavar="K", help="this node's rank, 0..N-1 (default 0)")
    node.add_argument("--master-addr", default="127.0.0.1", metavar="HOST", help="node 0's address")
    node.add_argument("--master-port", type=int, default=29500, metavar="P", help="free TCP port on node 0")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from flows.cli_errors import quiet_prefect_tracebacks
    from flows.cli_setup import plain_logging, use_prefect
    from tasks.config import load_config
    from tasks.train import preflight

    node, overrides = None, list(args.overrides)
    if args.nnodes is not None:
        from tasks.train import NodeLaunch

        node = NodeLaunch(args.nnodes, args.node_rank, args.master_addr, args.master_port)
        overrides += node.config_overrides()
    cfg = load_config(args.config, overrides)  # parsed once, here
    preflight(cfg, node)  # config, store and resume checked before Prefect or any process starts
    # Node 0 runs the train flow (events); the other nodes train without a flow run.
    if use_prefect(args.prefect) and (node is None or node.node_rank == 0):
        from flows.train import train_flow

        quiet_prefect_tracebacks()
        node_args = None if node is None else asdict(node)
        result = train_flow(config=cfg, node=node_args)
    else:
        from tasks.train import train_run

        plain_logging()
        result = train_run(cfg, node=node)
    print(json.dumps(asdict(result), indent=1))
    return 0
