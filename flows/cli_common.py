"""Arguments shared by several ``dumo`` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator


class LazyChoices:
    """argparse ``choices`` taken from a registry in a module that imports torch: ``load`` runs when a value
    is checked or the subcommand's help is printed, not when the parser is built, so ``dumo --help`` stays
    fast and the registry stays the one list of names. Give the argument a ``metavar`` (argparse formats
    the choices into one when the argument is added) and put ``%(choices)s`` in its help."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._load()))

    def __contains__(self, value: object) -> bool:
        return value in list(self._load())


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
