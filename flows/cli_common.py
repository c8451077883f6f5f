"""Arguments shared by several ``dumo`` subcommands, and choice lists read from where they are declared."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence

from tasks.cli_support import literal_choices
from tasks.config_files import config_presets


class DeferredChoices(Sequence[str]):
    """``choices=`` for argparse, read from their declaration the first time argparse looks at them: when a
    value is checked or a subcommand's help is printed, not when ``dumo`` starts (the declarations live in
    modules that import torch, seconds that ``dumo --help`` should not wait). Give the argument a metavar:
    without one, argparse lists the choices in the usage line while the parser is being built."""

    def __init__(self, load: Callable[..., Sequence[str]], *args: str) -> None:
        self._load, self._args = load, args
        self._items: list[str] | None = None

    def _all(self) -> list[str]:
        if self._items is None:
            self._items = list(self._load(*self._args))
        return self._items

    def __getitem__(self, index):  # type: ignore[override]  # Sequence's int/slice overloads
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()


def add_choice(
    parser: argparse.ArgumentParser, flag: str, declared: str, help: str, default: str | None = None
) -> None:
    """``flag`` taking one of the values of the Literal type that declares ``declared`` (a key of
    tasks.cli_support.literal_choices), read when argparse first looks; ``%(choices)s`` in ``help`` lists them."""
    parser.add_argument(
        flag, metavar=declared.upper(), choices=DeferredChoices(literal_choices, declared), default=default, help=help
    )


def add_config(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """The config argument: positional ``config`` without ``flags``, else e.g. ``--config``. Its help names
    the presets in configs/ as they are on disk."""
    presets = ", ".join(config_presets())
    parser.add_argument(*(flags or ("config",)), help=f"a preset name in configs/ ({presets}) or a YAML path", **kwargs)


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
