"""``dumo make-digits`` and ``dumo build-latents``: the data side of the pipeline."""

from __future__ import annotations

import argparse
import json

from flows.cli_common import DeferredChoices, add_choice
from tasks.cli_support import autoencoder_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-digits",
        help="write scikit-learn's 1,797 labelled 8x8 digits as a class-folder PNG tree",
        description="Write scikit-learn's 1,797 labelled handwritten digits (load_digits, shipped with the "
        "package: nothing is downloaded) as DIR/<digit>/<NNNN>.png, greyscale, 8x8 unless --upscale enlarges "
        "them by pixel repetition. DIR may be a local path or any fsspec URL (s3://...).",
    )
    p.add_argument("dir", metavar="DIR", help="where to write the tree (local path or URL)")
    p.add_argument("--upscale", type=int, default=1, metavar="K", help="integer enlargement factor (default 1)")
    p.set_defaults(func=run_make_digits)

    p = sub.add_parser(
        "build-latents",
        help="encode a class-folder image tree into a Zarr v3 latent store (Prefect flow on Dask)",
        description="Encode SOURCE/<class>/<image> into the latent store STORE (see docs/latent-store.md): "
        "ADM center crop to --resolution, the autoencoder on each image and its mirror image, one Dask task "
        "per shard of --shard-size rows. A complete STORE built with the same settings is left as it is (one "
        "built differently is an error); a half-built one is resumed and only its missing shards are encoded. "
        "SOURCE and STORE may be local paths or URLs (s3:// uses DUMO_S3_ENDPOINT_URL and the usual AWS "
        "credentials).",
    )
    p.add_argument("source", metavar="SOURCE", help="image tree: SOURCE/<class>/<image>")
    p.add_argument("store", metavar="STORE", help="latent store URL, normally <root>/latents/<name>.zarr")
    p.add_argument(
        "--autoencoder",
        choices=DeferredChoices(autoencoder_names),
        metavar="NAME",
        required=True,
        help="one of %(choices)s. pixels: the cropped pixels themselves; sd-vae: a diffusers AutoencoderKL (needs"
        " --vae)",
    )
    p.add_argument(
        "--vae",
        metavar="PATH_OR_ID",
        help="sd-vae: a local AutoencoderKL directory, or a hub id (downloaded only when online and "
        "HF_HUB_OFFLINE is not set)",
    )
    p.add_argument("--resolution", type=int, required=True, metavar="R", help="square crop side in pixels")
    p.add_argument("--shard-size", type=int, required=True, metavar="N", help="rows per shard = per encode task")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Dask workers of the local cluster (default: one per CPU core / --threads-per-worker)",
    )
    p.add_argument("--threads-per-worker", type=int, default=1, metavar="T", help="threads per Dask worker")
    p.add_argument(
        "--dask-address",
        metavar="A",
        help="scheduler address of an existing Dask cluster to use instead of a local one",
    )
    add_choice(
        p,
        "--device",
        "device",
        "where the autoencoder runs, %(choices)s (default: cuda when a worker sees one); cuda makes each encode"
        " task take one GPU resource: start GPU workers with `dask worker ADDRESS --resources GPU=1`",
    )
    p.add_argument(
        "--dashboard-address",
        metavar="HOST:PORT",
        help="serve the local cluster's Dask dashboard there (e.g. :8787, or 127.0.0.1:0 for a free port); "
        "default: no dashboard",
    )
    add_choice(
        p,
        "--on-bad-image",
        "on_bad_image",
        "a file that does not decode (%(choices)s): fail its shard (default), or skip it and list it in the"
        " store's report",
        default="fail",
    )
    add_choice(
        p,
        "--latent-dtype",
        "latent_dtype",
        "dtype of the stored mean and std, %(choices)s (default %(default)s)",
        default="float32",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="images per autoencoder call (default: 16 for sd-vae, 1024 for pixels)",
    )
    p.set_defaults(func=run_build_latents)


def run_make_digits(args: argparse.Namespace) -> int:
    from tasks.cli_support import write_digit_tree

    num_images, num_classes = write_digit_tree(args.dir, upscale=args.upscale)
    side = 8 * args.upscale
    print(f"wrote {num_images} digits ({side}x{side} grey PNG) in {num_classes} classes to {args.dir}")
    return 0


def run_build_latents(args: argparse.Namespace) -> int:
    from tasks.cli_support import require_image_tree
    from tasks.config import DataConfig
    from tasks.encode import expected_attrs, store_status

    # What can be checked cheaply is checked before Prefect starts (the full listing of SOURCE is the flow's)
    if args.autoencoder == "sd-vae" and not args.vae:
        raise ValueError("--autoencoder sd-vae needs --vae PATH_OR_ID (a local AutoencoderKL directory or a hub id)")
    require_image_tree(args.source)
    data = DataConfig(
        source=args.source,
        autoencoder=args.autoencoder,
        vae=args.vae,
        resolution=args.resolution,
        shard_size=args.shard_size,
        latent_dtype=args.latent_dtype,
        on_bad_image=args.on_bad_image,
        workers=args.workers,
        dask_address=args.dask_address,
        device=args.device,
        dask_dashboard=args.dashboard_address,
    )
    store_status.fn(args.store, expected_attrs(data))
    from flows.build_latents import build_latents
    from flows.cli_errors import quiet_prefect_tracebacks

    quiet_prefect_tracebacks()
    summary = build_latents(
        args.source, args.store, data, threads_per_worker=args.threads_per_worker, batch_size=args.batch_size
    )
    print(json.dumps(summary.to_json(), indent=1))
    return 0
