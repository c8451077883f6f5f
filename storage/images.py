"""Image sources: a class-folder tree on any fsspec URL, read in a deterministic order.

    <root>/<class>/<file>.{JPEG,jpg,jpeg,png,bmp,webp,tif,tiff}     (ImageNet's train/<wnid>/*.JPEG)

Samples are the sorted relative paths ``<class>/<file>``; the class index is the position of the folder
name in the sorted list of class folders. Pixels come out as float32 ``(C, R, R)`` in ``[-1, 1]`` after
the ADM center crop (guided-diffusion's ``center_crop_arr``, which DiT and its successors use for ImageNet).

Images are taken as they are meant, and every conversion that changes content is named (``CONVERSIONS``)
so the store's report can count it:
- 16-bit (and 32-bit integer) grey is scaled to 8 bits (x 255/65535), not clipped; float images are read
  as [0, 1];
- alpha (RGBA, LA, palette transparency) is composited on ALPHA_BACKGROUND, white, as a viewer shows it;
- CMYK goes to RGB through its embedded ICC profile when it has one (LittleCMS, to sRGB), else PIL's
  formula; palette images are expanded to their colours;
- colour images in a grey store become luminance (ITU-R 601-2, PIL's "L");
- an image whose short side is below the crop resolution is enlarged by the bicubic resize ("upscaled").
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from storage.fs import filesystem, join

ALPHA_BACKGROUND = (255, 255, 255)  # what transparent pixels become: white
CONVERSIONS = (
    "scaled_16bit",  # 16/32-bit integer grey scaled to 8 bits
    "scaled_float",  # float image read as [0, 1]
    "alpha_composited",  # transparency composited on ALPHA_BACKGROUND
    "cmyk_icc",  # CMYK converted to sRGB through its ICC profile
    "cmyk_formula",  # CMYK without a profile: PIL's naive formula
    "colour_to_grey",  # colour in a grey store
    "other_mode",  # YCbCr, LAB, HSV... converted by PIL
    "upscaled",  # short side below the resolution: enlarged
)
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
CROP_RECIPE = "adm_center_crop"
BadImagePolicy = Literal["fail", "skip"]  # a file that does not decode fails its shard, or is skipped and listed
PIXEL_RANGE = (-1.0, 1.0)


class BadImageError(ValueError):
    """A source file that cannot be decoded as an image. A ValueError, not an OSError, so that I/O retries
    do not spin on a file that will never decode."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"bad image file {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: it crosses Dask workers and Prefect results
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class ImageFile:
    relpath: str  # "<class>/<file>", relative to the source root
    size: int  # bytes
    label: int  # class index


@dataclass(frozen=True)
class ImageSource:
    """A listed class-folder tree."""

    url: str
    class_names: tuple[str, ...]
    files: tuple[ImageFile, ...]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.files)

    def __len__(self) -> int:
        return len(self.files)


def fingerprint(files: Sequence[ImageFile]) -> str:
    """sha256 over the sorted ``relpath<TAB>size`` lines: changes when a file is added, removed, renamed or
    resized. Also used per shard, on that shard's files."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relpath):
        h.update(f"{f.relpath}\t{f.size}\n".encode())
    return "sha256:" + h.hexdigest()


def list_images(url: str) -> ImageSource:
    """List ``<url>/<class>/<image>`` in sorted order, with sizes, in one recursive listing."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"image source {url} is not a directory")
    found = fs.find(root, detail=True)
    entries: list[tuple[str, int]] = []
    for path, info in found.items():
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else path
        parts = rel.split("/")
        if len(parts) != 2 or parts[0].startswith(".") or parts[1].startswith("."):
            continue  # only <class>/<file>; hidden files and deeper trees are not samples
        if os.path.splitext(parts[1])[1].lower() not in IMAGE_EXTENSIONS:
            continue
        entries.append((rel, int(info.get("size") or 0)))
    if not entries:
        raise FileNotFoundError(
            f"no images under {url}: expected <class>/<file> with extension in {sorted(IMAGE_EXTENSIONS)}"
        )
    entries.sort()
    class_names = tuple(sorted({rel.split("/", 1)[0] for rel, _ in entries}))
    index = {name: i for i, name in enumerate(class_names)}
    files = tuple(ImageFile(rel, size, index[rel.split("/", 1)[0]]) for rel, size in entries)
    return ImageSource(url=url, class_names=class_names, files=files)


@dataclass(frozen=True)
class ShardPlan:
    """One shard = one encode task: its rows and, when planned from a listed source, its files."""

    index: int
    start: int  # first row (inclusive)
    stop: int  # last row (exclusive)
    files: tuple[ImageFile, ...] = ()  # the source files of rows start..stop, in row order
    fingerprint: str | None = None  # fingerprint(files): stands for them in records and cache keys


@dataclass(frozen=True)
class SourcePlan:
    """A listed source cut into shards: everything the store and its encode tasks are made from."""

    source_url: str
    num_rows: int
    class_names: tuple[str, ...]
    fingerprint: str  # of the whole source
    image_channels: int  # 1 (grey) or 3, as probe_channels found them
    shards: tuple[ShardPlan, ...]


def plan_shards(num_rows: int, shard_size: int) -> list[ShardPlan]:
    """Rows ``[0, num_rows)`` cut into consecutive shards of ``shard_size`` rows (the last may be short)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [
        ShardPlan(i, start, min(start + shard_size, num_rows)) for i, start in enumerate(range(0, num_rows, shard_size))
    ]


def plan_source(source: ImageSource, shard_size: int) -> SourcePlan:
    """``source`` cut into shards of ``shard_size`` rows, each with its files and their fingerprint."""
    shards = []
    for s in plan_shards(len(source), shard_size):
        files = source.files[s.start : s.stop]
        shards.append(ShardPlan(s.index, s.start, s.stop, files, fingerprint(files)))
    return SourcePlan(
        source_url=source.url,
        num_rows=len(source),
        class_names=source.class_names,
        fingerprint=source.fingerprint,
        image_channels=probe_channels(source),
        shards=tuple(shards),
    )


def adm_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's crop: halve with a box filter while the short side is >= 2x the target (cheap and alias-free),
    then one bicubic resize so the short side equals the target, then a center crop to a square."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = tuple(round(s * scale) for s in image.size)
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _to_8bit(im: Image.Image, notes: list[str]) -> Image.Image:
    """Grey or colour 8-bit (modes L, LA, RGB, RGBA) from whatever PIL decoded."""
    mode = im.mode
    if mode.startswith("I"):  # I;16, I;16B, I (16-bit PNGs, TIFFs): scale the 16-bit range, do not clip
        arr = np.asarray(im).astype(np.float64)
        notes.append("scaled_16bit")
        return Image.fromarray(np.clip(np.round(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8))
    if mode == "F":
        notes.append("scaled_float")
        return Image.fromarray(np.clip(np.round(np.asarray(im) * 255.0), 0, 255).astype(np.uint8))
    if mode == "CMYK":
        icc = im.info.get("icc_profile")
        if icc:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            notes.append("cmyk_icc")
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        notes.append("cmyk_formula")
        return im.convert("RGB")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        return im.convert("RGBA" if has_alpha else "RGB")
    if mode == "1":
        return im.convert("L")
    if mode in ("La", "RGBa"):
        return im.convert("LA" if mode == "La" else "RGBA")
    if mode not in ("L", "LA", "RGB", "RGBA"):
        notes.append("other_mode")
        return im.convert("RGB")
    return im


def _composite(im: Image.Image, notes: list[str]) -> Image.Image:
    """Drop alpha by compositing on ALPHA_BACKGROUND (counted only when some pixel is not opaque)."""
    if im.mode not in ("LA", "RGBA"):
        return im
    target = im.mode[:-1]  # "L" or "RGB"
    if im.getchannel("A").getextrema()[0] == 255:
        return im.convert(target)
    notes.append("alpha_composited")
    background = Image.new("RGBA", im.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, im.convert("RGBA")).convert(target)


def decode_image(data: bytes, path: str, resolution: int, channels: int, notes: list[str] | None = None) -> np.ndarray:
    """Encoded image bytes -> float32 ``(channels, resolution, resolution)`` in [-1, 1].

    Conversions that change content (see CONVERSIONS) are appended to ``notes`` when given.
    Raises BadImageError naming ``path`` for anything PIL cannot decode (corrupt, truncated, not an image).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    notes = [] if notes is None else notes
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode now, so a truncated file fails here and not later
            image = _composite(_to_8bit(im, notes), notes)
            if channels == 1 and image.mode == "RGB":
                r, g, b = image.split()
                if not (r.tobytes() == g.tobytes() == b.tobytes()):
                    notes.append("colour_to_grey")
            image = image.convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError as exc:
        raise BadImageError(path, "not an image PIL can identify (corrupt header or another format)") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImageError(path, f"{type(exc).__name__}: {exc}") from exc
    if min(image.size) < resolution:
        notes.append("upscaled")
    image = adm_center_crop(image, resolution)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1)) / 127.5 - 1.0


def probe_channels(source: ImageSource) -> int:
    """1 when the first image is greyscale, else 3: the channel count of a store of this source."""
    first = join(source.url, source.files[0].relpath)
    fs, path = filesystem(first)
    try:
        with Image.open(io.BytesIO(fs.cat_file(path))) as im:
            return 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(first, f"{type(exc).__name__}: {exc}") from exc


def load_images(
    source_url: str,
    files: Sequence[ImageFile],
    resolution: int,
    channels: int,
    notes: list[list[str]] | None = None,
) -> list[np.ndarray | BadImageError]:
    """Read and decode ``files`` (fetched concurrently where the filesystem is async, e.g. S3). A file that
    does not decode comes back as its BadImageError, for the caller's on_bad_image policy; I/O errors are
    raised (as OSError naming the file) so that the task's retries can deal with them. ``notes`` receives
    one list of content-changing conversions per file."""
    fs, root = filesystem(source_url)
    paths = [f"{root.rstrip('/')}/{f.relpath}" for f in files]
    blobs = fs.cat(paths, on_error="return") if paths else {}
    out: list[np.ndarray | BadImageError] = []
    for f, path in zip(files, paths):
        data = blobs.get(path)
        url = join(source_url, f.relpath)
        if isinstance(data, BaseException):
            raise OSError(f"reading {url}: {type(data).__name__}: {data}") from data
        if data is None:
            raise OSError(f"reading {url}: no data returned")
        file_notes: list[str] = []
        if notes is not None:
            notes.append(file_notes)
        try:
            out.append(decode_image(data, url, resolution, channels, file_notes))
        except BadImageError as exc:
            out.append(exc)
    return out


def write_digits(url: str, upscale: int = 1) -> ImageSource:
    """Write scikit-learn's 1,797 labelled 8x8 digits as ``<url>/<digit>/<NNNN>.png`` (grey PNG, native 8x8
    unless ``upscale`` > 1 enlarges them by pixel repetition). Returns the listed tree."""
    from sklearn.datasets import load_digits

    if upscale < 1:
        raise ValueError(f"upscale must be an integer >= 1, got {upscale}")
    digits = load_digits()
    # load_digits pixels are counts 0..16 of on-pixels in a 4x4 block of a 32x32 bitmap; 16 -> white (255)
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    fs, root = filesystem(url)
    root = root.rstrip("/")
    width = len(str(len(images) - 1))
    for i, (pixels, label) in enumerate(zip(images, digits.target)):
        if upscale > 1:
            pixels = np.kron(pixels, np.ones((upscale, upscale), dtype=np.uint8))
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        fs.pipe_file(f"{root}/{int(label)}/{i:0{width}d}.png", buf.getvalue())
    return list_images(url)
