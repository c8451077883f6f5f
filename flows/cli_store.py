"""``dumo verify-store``: check a latent store's bytes against its per-shard checksums, and repair it."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify-store",
        help="re-read every shard of a latent store and check it against its recorded checksum",
        description="Re-read every shard of the latent store URL and check it against the checksum recorded "
        "when it was written. Lists the bad shards and exits 1 when there are any. --repair re-encodes them "
        "from the source the store was built from (or --source), provided the images and the autoencoder "
        "weights are still the same, then verifies the whole store again.",
    )
    p.add_argument("url", metavar="URL", help="the latent store, e.g. <root>/latents/<name>.zarr")
    p.add_argument("--repair", action="store_true", help="re-encode the bad shards from the source")
    p.add_argument("--source", metavar="SOURCE", help="the image tree, when it has moved since the build")
    p.add_argument("--vae", metavar="PATH_OR_ID", help="sd-vae: the weights, when they have moved since the build")
    p.add_argument("--threads", type=int, default=8, metavar="N", help="shards read at once (default 8)")
    p.set_defaults(func=run_verify_store)


def run_verify_store(args: argparse.Namespace) -> int:
    from tasks.cli_support import check_latent_store

    report = check_latent_store(args.url, args.repair, args.source, args.vae, args.threads)
    for bad in report["bad"]:
        print(f"bad {bad['problem']}", file=sys.stderr)
    n, total = len(report["bad"]), report["num_shards"]
    if args.repair and n:
        print(f"{args.url}: repaired {len(report['repaired'])} of {total} shards {report['repaired']}; all verified")
        return 0
    print(f"{args.url}: {total - n} of {total} shards match their checksums" + ("" if not n else f", {n} bad"))
    if n:
        print(f"repair: dumo verify-store {args.url} --repair", file=sys.stderr)
    return 1 if n else 0
