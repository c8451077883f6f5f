"""``dumo model-info``: parameters by part and forward FLOPs of a model preset."""

from __future__ import annotations

import argparse

from flows.cli_common import LazyChoices


def _objectives() -> list[str]:
    from dumo_model.objectives import HEADS_OF_OBJECTIVE

    return sorted(HEADS_OF_OBJECTIVE)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model-info",
        help="parameters per part and forward GFLOPs per image of a model preset",
        description="Build PRESET on the meta device (no memory) and print parameters by part and the forward "
        "FLOPs per image (2 FLOPs per multiply-add). Presets: DuMo-B/2, DuMo-M/2, DuMo-L/2, DuMo-XL/2, debug.",
    )
    p.add_argument("preset", help="model preset, e.g. DuMo-XL/2")
    p.add_argument(
        "--objective",
        choices=LazyChoices(_objectives),
        metavar="NAME",
        default="dumo",
        help="which variant, one of %(choices)s: dumo (two heads), meanflow (u head on t, r), flow_matching (plain"
        " DiT)",
    )
    p.add_argument("--r-input", choices=["interval", "zero"], default="interval", help="the r_input switch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dumo_model.dit import build_model
    from dumo_model.info import forward_flops, parameters_by_part
    from dumo_model.objectives import HEADS_OF_OBJECTIVE

    with torch.device("meta"):
        model = build_model(args.preset, heads=HEADS_OF_OBJECTIVE[args.objective], r_input=args.r_input)
    cfg = model.cfg
    print(
        f"{args.preset} ({args.objective}, r_input={cfg.r_input}): hidden {cfg.hidden_size}, depth {cfg.depth}, "
        f"heads {cfg.num_heads}, patch {cfg.patch_size}, {cfg.num_tokens} tokens of {cfg.in_channels}x"
        f"{cfg.input_size}x{cfg.input_size} latents, {cfg.num_classes} classes"
    )
    print(f"{'part':<26}{'parameters':>16}")
    for part, n in parameters_by_part(model).items():
        print(f"{part:<26}{n:>16,d}  ({n / 1e6:.2f}M)")
    flops = forward_flops(cfg)
    print(f"{'forward':<26}{'GFLOPs / image':>16}")
    for part, f in flops.items():
        print(f"{part:<26}{f / 1e9:>16.2f}")
    return 0
