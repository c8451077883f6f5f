"""Arguments shared by several ``dumo`` subcommands."""

from __future__ import annotations

import argparse


def add_overrides(parser: argparse.ArgumentParser, example: str = "train.num_steps=2000") -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable; the value is read as YAML)",
    )


def add_prefect_switch(parser: argparse.ArgumentParser, what: str, without: str) -> None:
    """``--prefect`` / ``--no-prefect`` (``args.prefect``: True, False or None = decide by PREFECT_API_URL)."""
    parser.add_argument(
        "--prefect",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"--prefect: run as a Prefect flow (a temporary server when PREFECT_API_URL is unset, 20-30 s);"
        f" --no-prefect: call the {what} directly ({without}). Default: a flow when PREFECT_API_URL"
        " (or a Prefect profile) names a server, else directly",
    )
