"""``dumo model-info``: parameters by part and forward FLOPs of a model preset."""

from __future__ import annotations

import argparse

from flows.cli_common import DeferredChoices, add_choice
from tasks.cli_support import model_info, model_presets, objective_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model-info",
        help="parameters per part and forward GFLOPs per image of a model preset",
        description="Build PRESET on the meta device (no memory) and print parameters by part and the forward "
        "FLOPs per image (2 FLOPs per multiply-add).",
    )
    p.add_argument("preset", metavar="PRESET", choices=DeferredChoices(model_presets), help="model preset: %(choices)s")
    p.add_argument(
        "--objective",
        metavar="OBJECTIVE",
        choices=DeferredChoices(objective_names),
        default="dumo",
        help="which variant (%(choices)s; default %(default)s): dumo has two heads, meanflow a u head on (t, r), "
        "flow_matching is a plain DiT",
    )
    add_choice(
        p,
        "--r-input",
        "r_input",
        "the r_input switch: %(choices)s (default %(default)s)",
        default="interval",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(model_info(args.preset, args.objective, args.r_input))
    return 0
