"""``verify-store``: check every shard of a latent store against its record, and re-encode the bad ones
from the source when it is still there (the same source listing, the same autoencoder weights).

    report = verify_store(url)                    # {"url", "num_shards", "bad": [{"shard", "problem"}]}
    report = repair_store(url, source_url=None)   # re-encodes the bad shards, then finalizes again
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from storage import images, latents
from storage.autoencoders import AutoencoderSpec, describe, encode_shard


def verify_store(url: str, threads: int = 8) -> dict[str, Any]:
    """Every shard re-read and checked against its record's checksum."""
    info = latents.open_store(url)
    bad = latents.verify(url, threads)
    return {"url": url, "num_shards": info.num_shards, "bad": [{"shard": i, "problem": p} for i, p in bad]}


def repair_store(url: str, source_url: str | None = None, vae: str | None = None, threads: int = 8) -> dict[str, Any]:
    """Re-encode the shards that fail verification from the store's source (``source_url`` overrides the
    one the store recorded), with the autoencoder it was built with, then finalize the store again.
    Raises StoreError in words when the source or the autoencoder is no longer the one the store was
    built from: then only a rebuild helps."""
    report = verify_store(url, threads)
    if not report["bad"]:
        return {**report, "repaired": []}
    info = latents.open_store(url)
    source_url = source_url or info.attrs.get("source_url")
    if not source_url:
        raise latents.StoreError(f"{url} does not record its source (built by an older version): pass --source URL")
    source = images.list_images(source_url)
    if source.fingerprint != info.attrs["dataset_fingerprint"]:
        raise latents.StoreError(
            f"the images at {source_url} are not the ones {url} was built from (fingerprint {source.fingerprint},"
            f" the store's {info.attrs['dataset_fingerprint']}): restore them, or delete the store and build it again"
        )
    identity = info.attrs["autoencoder"]
    spec = AutoencoderSpec(identity["name"], vae or (identity.get("id") if identity["name"] != "pixels" else None))
    found = describe(spec, int(info.attrs["image_channels"]), int(info.attrs["resolution"])).identity
    if found.get("weights_digest") != identity.get("weights_digest"):
        raise latents.StoreError(
            f"the autoencoder {spec.vae} has weights digest {found.get('weights_digest')}, the store was encoded"
            f" with {identity.get('weights_digest')}: pass --vae with the original weights, or rebuild the store"
        )
    records = latents.shard_records(url)
    repaired = []
    for bad in report["bad"]:
        index = bad["shard"]
        start, stop = info.shard_rows(index)
        files = source.files[start:stop]
        policy = "skip" if (records[index] or {}).get("skipped") else "fail"  # as it was built
        extra = {"source_fingerprint": images.fingerprint(files), "repaired_at": datetime.now(UTC).isoformat()}
        encode_shard(url, index, source_url, files, spec, policy, None, extra)
        repaired.append(index)
    latents.finalize(url, threads)  # every shard checked again; complete only if all pass
    return {**report, "repaired": repaired}
