"""``dumo sample`` and ``dumo export``: a committed checkpoint as images, or as a directory another team
loads with ``DualHeadDiT.from_pretrained``. Single-process library calls: no Prefect server or flow run."""

from __future__ import annotations

import argparse

from flows.cli_common import add_choice


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="images from a committed checkpoint: a PNG grid and an npz",
        description="Sample a committed checkpoint with the project's samplers and decode the latents with the "
        "autoencoder its latent store recorded (pixels, or the SD-VAE found offline). Writes OUT.png (one row "
        "per class) and OUT.npz (images (N, H, W, 3) uint8, labels (N,)).",
    )
    p.add_argument("checkpoint_url", metavar="CHECKPOINT", help="<root>/runs/<run>/checkpoints/step-XXXXXXX")
    p.add_argument("--classes", help="comma-separated class indices, e.g. 0,3,7 (default: every class)")
    p.add_argument("--per-class", type=int, default=8, metavar="N", help="images per class (default 8)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    add_choice(
        p,
        "--sampler",
        "sampler",
        "%(choices)s (default %(default)s). one_step: x0 = e - u(e, 1, 0); two_step: through --t-mid; "
        "euler: --steps Euler steps of the v head; renoise: the consistency sampler of r_input=zero models",
        default="one_step",
    )
    p.add_argument("--steps", type=int, default=1, metavar="N", help="steps of euler and renoise (default 1)")
    p.add_argument("--t-mid", type=float, default=0.5, help="intermediate time of two_step (default 0.5)")
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance scale (1 = off, the default); needs a run trained with label dropout",
    )
    _weights_option(p)
    p.add_argument(
        "--out", metavar="PREFIX", help="output prefix: PREFIX.png, PREFIX.npz (default <run>-step<N>-<sampler>)"
    )
    p.add_argument("--vae", metavar="DIR", help="the SD-VAE directory, when it is not where the run found it")
    p.add_argument("--batch-size", type=int, default=256, help="sampling batch size (does not change the images)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=run_sample)

    e = sub.add_parser(
        "export",
        help="a committed checkpoint as safetensors + config.json + model card, for DualHeadDiT.from_pretrained",
        description="Write DIR/model.safetensors (EMA weights by default), DIR/config.json and a README.md model "
        "card (the run's metrics records, the latent store's autoencoder). Load it anywhere with "
        "dumo_model.DualHeadDiT.from_pretrained(DIR, device=..., dtype=...), without the project's config or store.",
    )
    e.add_argument("checkpoint_url", metavar="CHECKPOINT", help="<root>/runs/<run>/checkpoints/step-XXXXXXX")
    e.add_argument("out_dir", metavar="DIR", help="output directory (any URL)")
    _weights_option(e)
    e.add_argument("--drop-v-head", action="store_true", help="leave out the v head: 1- and 2-step sampling only")
    e.set_defaults(func=run_export)


def _weights_option(parser: argparse.ArgumentParser) -> None:
    add_choice(
        parser,
        "--weights",
        "weights",
        "%(choices)s: EMA (default) or raw DeepSpeed weights",
        default="ema",
    )


def run_sample(args: argparse.Namespace) -> int:
    # A mistake (ValueError, a missing file or autoencoder) is reported in one line by flows.cli.main.
    from flows.cli_setup import plain_logging
    from tasks.sample import SamplerConfig, SampleRequest, sample_checkpoint

    plain_logging()
    classes = None if not args.classes else tuple(int(c) for c in args.classes.split(","))
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    sampler = SamplerConfig(args.sampler, num_steps=args.steps, t_mid=args.t_mid, cfg_scale=args.cfg_scale)
    request = SampleRequest(classes, args.per_class, args.seed, sampler, args.weights, args.batch_size, args.vae)
    result = sample_checkpoint(args.checkpoint_url, request, args.out, args.device)
    png, npz = (u.removeprefix("file://") for u in (result["png"], result["npz"]))
    print(f"{result['num_images']} images: {png} {npz}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from flows.cli_setup import plain_logging
    from tasks.export import export_checkpoint

    plain_logging()
    result = export_checkpoint(args.checkpoint_url, args.out_dir, args.weights, args.drop_v_head)
    files = " ".join(u.removeprefix("file://") for u in result["files"])
    print(f"{result['num_parameters']:,d} parameters exported: {files}")
    return 0
