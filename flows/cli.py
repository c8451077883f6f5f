"""The ``dumo`` command. Thin: each subcommand's arguments live in a ``flows.cli_*`` module whose
``register(subparsers)`` adds them; handlers import their heavy dependencies only when run, so
``dumo --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
