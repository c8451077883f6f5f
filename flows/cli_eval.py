"""``dumo evaluate``: evaluate one committed checkpoint and print the results table."""

from __future__ import annotations

import argparse

from flows.cli_common import DeferredChoices, add_prefect_switch
from tasks.cli_support import feature_extractor_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="sample a committed checkpoint and compute its metrics (FID, class accuracy, ...)",
        description="Generate class-balanced samples from the EMA weights of a committed checkpoint with each "
        "sampler of the protocol (by default the run config's eval section: 1-step and 2-step), decode them with "
        "the latent store's autoencoder and score them against the dataset's real images. Writes metrics.json, "
        "grid.png and samples.npz under <root>/runs/<run>/evals/step-N/<protocol>/ and prints a table. A "
        "checkpoint already evaluated under the same protocol (same weights digest, same protocol settings) is "
        "not sampled again: its record is printed. A record made under other settings of the same protocol name "
        "is replaced.",
    )
    p.add_argument(
        "checkpoint_url",
        metavar="CHECKPOINT_URL",
        help="a committed checkpoint directory: <root>/runs/<run>/checkpoints/step-XXXXXXX (any URL)",
    )
    p.add_argument(
        "--protocol",
        help="protocol name, i.e. the evals/step-N/<protocol>/ directory (default: the run config's eval.protocol)",
    )
    p.add_argument("--num-samples", type=int, metavar="N", help="samples per sampler, balanced over classes")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="sampling batch size (not part of the protocol: changes speed, not what is measured)",
    )
    p.add_argument(
        "--feature-extractor",
        choices=DeferredChoices(feature_extractor_names),
        metavar="NAME",
        help="classifier: a small CNN trained once on the dataset's labelled images (offline; FID in "
        "its feature space, class accuracy); inception-v3-compat: torch-fidelity's Inception-v3 (FID, "
        "IS, KID), needs its weights file",
    )
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="torch-fidelity Inception-v3 weights file (default: "
        "$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth; never downloaded)",
    )
    p.add_argument(
        "--reference-npz",
        metavar="PATH",
        help="ADM-style reference statistics (mu, sigma) for FID, "
        "e.g. VIRTUAL_imagenet256_labeled.npz, instead of statistics computed from the real images",
    )
    p.add_argument("--seed", type=int, help="noise seed of the protocol")
    add_prefect_switch(p, "evaluation function", "no flow run, no artifacts, no retries")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    overrides = {
        "protocol": args.protocol,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "feature_extractor": args.feature_extractor,
        "inception_weights": args.inception_weights,
        "reference_npz": args.reference_npz,
        "seed": args.seed,
    }
    from flows.cli_setup import plain_logging, use_prefect
    from tasks.evaluate import check_protocol, evaluate_checkpoint, resolve_protocol

    # The checkpoint and the protocol are checked before Prefect starts: one error, with or without a flow
    eval_cfg = resolve_protocol(args.checkpoint_url, **overrides)
    check_protocol(eval_cfg)
    if not use_prefect(args.prefect):
        plain_logging()
        record = evaluate_checkpoint(args.checkpoint_url, eval_cfg)
    else:
        from flows.cli_errors import quiet_prefect_tracebacks
        from flows.evaluate import evaluate_checkpoint_flow

        quiet_prefect_tracebacks()
        record = evaluate_checkpoint_flow(checkpoint_url=args.checkpoint_url, **overrides)
    if args.json:
        print(json.dumps(record.to_json(), indent=1))
        return 0
    from tasks.cli_support import display, results_table

    print(results_table(record.to_json()))
    print(f"\nmetrics and sample grid: {display(record.eval_dir)}")
    return 0
