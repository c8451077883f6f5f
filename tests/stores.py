"""The one builder of small latent stores for tests: images encoded with the ``pixels`` autoencoder and
written with the store's own stage functions (create -> encode_shard per shard -> finalize), the path an
encode task takes, so a test store is what build-latents would have written for the same files.

For stores of random latents at benchmark sizes, use ``storage.latents.write_synthetic``.
"""

from __future__ import annotations

from collections.abc import Sequence

from storage import images, latents
from storage.autoencoders import AutoencoderSpec, describe, encode_shard
from storage.layout import Root

TINY_STORE = "digits-tiny"
TINY_IMAGES = 128


def pixels_store(
    url: str,
    source: images.ImageSource,
    files: Sequence[images.ImageFile] | None = None,
    shard_size: int | None = None,
    channels: int = 1,
    record_source: bool = False,
) -> str:
    """A complete float32 store at ``url`` of ``files`` (default: all of ``source``) at 8x8 with
    ``channels`` image channels, in shards of ``shard_size`` rows (default: one shard).

    ``record_source``: record ``source.url`` in the attributes, as build-latents does, so that
    ``verify-store --repair`` can re-encode from it (only right when ``files`` is the whole source)."""
    files = tuple(source.files if files is None else files)
    shard_size = shard_size or len(files)
    spec = AutoencoderSpec("pixels")
    info = describe(spec, image_channels=channels, resolution=8)
    attrs = {
        "autoencoder": info.identity,
        "latent_scale": info.latent_scale,
        "latent_shift": info.latent_shift,
        "pixel_range": list(images.PIXEL_RANGE),
        "crop": images.CROP_RECIPE,
        "resolution": 8,
        "image_channels": channels,
        "flip": "stored",
        "class_names": list(source.class_names),
        "dataset_fingerprint": images.fingerprint(files),
    }
    if record_source:
        attrs["source_url"] = source.url
    latents.create(url, len(files), info.latent_shape, "float32", shard_size, attrs)
    for index, lo in enumerate(range(0, len(files), shard_size)):
        encode_shard(url, index, source.url, files[lo : lo + shard_size], spec)
    latents.finalize(url)
    return url


def digits_store(root: str, num_images: int = TINY_IMAGES, shard_size: int = 64, name: str = TINY_STORE) -> str:
    """The digits as a class-folder tree under ``root`` and a store ``name`` of ``num_images`` of them
    (every k-th, so all ten classes), as the training tests use it. Returns the store's URL."""
    source = images.write_digits(Root(root).images("digits"))
    files = source.files[:: len(source.files) // num_images][:num_images]
    return pixels_store(Root(root).latent_store(name), source, files, shard_size)
