"""The ``dumo`` command. Thin: each subcommand's arguments live in a ``flows.cli_*`` module whose
``register(subparsers)`` adds them; handlers import their heavy dependencies only when run, and choice lists
declared in torch modules are read when first needed (flows.cli_common.DeferredChoices), so ``dumo --help``
stays fast."""

from __future__ import annotations

import argparse
import sys

from flows import cli_data, cli_eval, cli_model, cli_pipeline, cli_sample, cli_store, cli_train
from flows.cli_errors import DEBUG_ENV, debug_requested, is_expected, report
from flows.cli_setup import prepare_environment

# Each module defines register(subparsers) -> None and sets a ``func`` default on its parsers; this order is
# the order of ``dumo --help``.
COMMAND_MODULES = (
    cli_model,  # model-info
    cli_data,  # make-digits, build-latents
    cli_train,  # train
    cli_eval,  # evaluate
    cli_pipeline,  # run, demo, compare
    cli_sample,  # sample, export
    cli_store,  # verify-store
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dumo",
        description="Train and evaluate Duality Models: images -> latent store -> DeepSpeed training -> FID.",
        epilog=f"A mistake (bad input, bad config, missing file, refused store) prints one line and exits 1; "
        f"--debug or {DEBUG_ENV}=1 shows its traceback.",
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of every error (or set {DEBUG_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    for command in sub.choices.values():  # `dumo train ... --debug` as well as `dumo --debug train ...`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    # One start-up setting for every command, first: before anything (a choice list read while parsing
    # included) can import Prefect, which reads its settings once.
    prepare_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = debug_requested(args.debug)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"dumo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every subcommand, including those other modules register, ends up here
        if debug or not is_expected(exc):
            raise
        return report(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
