"""The ``dumo`` command. Thin: each subcommand's arguments live in a ``flows.cli_*`` module whose
``register(subparsers)`` adds them; handlers import their heavy dependencies only when run, so
``dumo --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from flows.cli_errors import DEBUG_ENV, debug_requested, is_expected, report

# Each module defines register(subparsers) -> None and sets a ``func`` default on its parsers.
COMMAND_MODULES = (
    "flows.cli_model",  # model-info
    "flows.cli_data",  # make-digits, build-latents
    "flows.cli_train",  # train
    "flows.cli_eval",  # evaluate
    "flows.cli_pipeline",  # run, demo, compare
    "flows.cli_sample",  # sample, export
    "flows.cli_store",  # verify-store
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
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet in this checkout
                continue
            raise
        module.register(sub)
    for command in sub.choices.values():  # `dumo train ... --debug` as well as `dumo --debug train ...`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from flows.cli_setup import prepare_environment

    prepare_environment()  # one start-up setting for every command, before anything imports Prefect
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
