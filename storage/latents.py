"""The latent store: a Zarr v3 group that holds autoencoder latents, written in parallel, one shard per task.

Schema (docs/latent-store.md is the reader's guide; ``N`` rows in sorted source order):

    mean, std       (N, 2, C, h, w) float16|float32   axis 1 = [original, horizontally flipped]
    label           (N,) int32                          class index; -1 marks a row excluded as a bad file
    source          (N,) string                         relative path of the source image
    shard_records   (S,) string                         one JSON completion record per shard, one object each

One Zarr shard of ``mean``/``std`` (and one chunk of ``label``/``source``) holds exactly ``shard_size`` rows,
the rows of one encode task: no two writers ever touch the same object, since partial-shard writes from
parallel writers lose data (zarr-python #3682). A shard's record is written after its data, so a record is
the commit marker of its shard; ``finalize`` re-reads every shard, checks it against its record's checksum and
only then sets ``complete: true``. Readers check them again when they first read a shard (``read_shard``):
no corrupt byte is trained on, and a bad shard is named with the way out (``dumo verify-store``).

Stage functions (pangeo-forge style): ``create`` -> ``write_shard`` (a region write, safe to redo) ->
``finalize``. They run the same under Prefect, Dask, or a plain loop.
"""

from __future__ import annotations

import hashlib
import json
import platform
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Literal, get_args

import numpy as np
import zarr
import zarr.storage

from storage.fs import exists, is_local, join, local_path, normalize, storage_options

SCHEMA_VERSION = 1
LatentDtype = Literal["float16", "float32"]  # of the stored mean and std
LATENT_DTYPES: tuple[str, ...] = get_args(LatentDtype)
# Keys a caller must give to create(); the store adds schema_version, store_id, shape and software versions.
REQUIRED_ATTRS = (
    "autoencoder",  # {"name", "id", "revision", "weights_digest"}
    "latent_scale",  # z = (latent - latent_shift) * latent_scale
    "latent_shift",
    "pixel_range",  # [-1.0, 1.0]
    "crop",  # "adm_center_crop"
    "resolution",  # pixels, square
    "image_channels",  # 1 (grey) or 3 (RGB)
    "flip",  # the flip policy, in words
    "class_names",  # in class-index order
    "dataset_fingerprint",  # storage.images.fingerprint of the whole source
)
_CHUNK_TARGET_BYTES = 64 * 1024  # inner chunks: small enough that a random read fetches little else


class StoreError(RuntimeError):
    """A store that is missing, incompatible with a request, or fails verification."""


class StoreCorruptError(StoreError):
    """A shard whose bytes do not decode, or decode to rows that do not match its record's checksum."""

    def __init__(self, url: str, shard: int, problem: str):
        super().__init__(
            f"latent store {url}: shard {shard} {problem}. Run `dumo verify-store {url} --repair` to re-encode"
            " the bad shards from the source (while it is still there), or delete the store and build it again"
        )
        self.url, self.shard, self.problem = url, shard, problem

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (Dask, Prefect results)
        return (type(self), (self.url, self.shard, self.problem))


@dataclass(frozen=True)
class StoreInfo:
    """What a store's ``zarr.json`` says about it."""

    url: str
    attrs: dict[str, Any]

    @property
    def num_rows(self) -> int:
        return int(self.attrs["num_rows"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self.attrs["latent_shape"]
        return int(c), int(h), int(w)

    @property
    def dtype(self) -> str:
        return str(self.attrs["latent_dtype"])

    @property
    def shard_size(self) -> int:
        return int(self.attrs["shard_size"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    @property
    def store_id(self) -> str:
        return str(self.attrs["store_id"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    def shard_rows(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range: the store has {self.num_shards} shards")
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_rows)


def zarr_store(url: str, read_only: bool) -> Any:
    """A zarr store for ``url``: zarr's own LocalStore for local paths (fastest), else an FsspecStore
    (s3fs with the configured endpoint, memory://, ...)."""
    if is_local(url):
        return zarr.storage.LocalStore(local_path(url), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(normalize(url), storage_options=storage_options(url), read_only=read_only)


def _open_group(url: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(zarr_store(url, read_only=mode == "r"), mode=mode, zarr_format=3)
    except FileNotFoundError as exc:
        raise StoreError(f"no latent store at {url}") from exc


def software_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("dumo", "numpy", "zarr", "torch", "diffusers", "pillow", "fsspec", "s3fs"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def chunk_rows(shard_size: int, row_bytes: int) -> int:
    """The largest divisor of ``shard_size`` whose chunk stays under the target size (at least 1 row)."""
    best = 1
    for rows in range(1, shard_size + 1):
        if shard_size % rows == 0 and rows * row_bytes <= _CHUNK_TARGET_BYTES:
            best = rows
    return best


def create(
    url: str,
    num_rows: int,
    latent_shape: tuple[int, int, int],
    dtype: str,
    shard_size: int,
    attrs: dict[str, Any],
    overwrite: bool = False,
) -> StoreInfo:
    """Create an empty store for ``num_rows`` latents of ``latent_shape`` (C, h, w). Fails if one exists,
    unless ``overwrite``. ``attrs`` must hold every key of REQUIRED_ATTRS."""
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"latent store attributes missing: {missing}")
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}, got {dtype!r}")
    if num_rows < 1 or shard_size < 1:
        raise ValueError(f"need num_rows >= 1 and shard_size >= 1, got {num_rows} and {shard_size}")
    c, h, w = (int(s) for s in latent_shape)
    num_shards = -(-num_rows // shard_size)
    try:
        group = _open_group(url, mode="w" if overwrite else "w-")
    except FileExistsError as exc:
        raise StoreError(f"a latent store already exists at {url}; delete it or pass overwrite=True") from exc
    row_shape = (2, c, h, w)
    rows = chunk_rows(shard_size, int(np.prod(row_shape)) * np.dtype(dtype).itemsize)
    for name in ("mean", "std"):
        group.create_array(
            name,
            shape=(num_rows, *row_shape),
            dtype=dtype,
            chunks=(rows, *row_shape),
            shards=(shard_size, *row_shape),
            fill_value=0,
            dimension_names=("sample", "flip", "channel", "y", "x"),
        )
    # One chunk per shard: labels and paths are small, and one object per task keeps writers apart.
    # dimension_names on every array (xarray needs them to open the store; docs/latent-store.md)
    sample = {"dimension_names": ("sample",)}
    group.create_array("label", shape=(num_rows,), dtype="int32", chunks=(shard_size,), fill_value=-1, **sample)
    group.create_array("source", shape=(num_rows,), dtype=str, chunks=(shard_size,), fill_value="", **sample)
    group.create_array(
        "shard_records", shape=(num_shards,), dtype=str, chunks=(1,), fill_value="", dimension_names=("shard",)
    )
    full = {
        "schema_version": SCHEMA_VERSION,
        "store_id": uuid.uuid4().hex,
        **attrs,
        "num_rows": num_rows,
        "latent_shape": [c, h, w],
        "latent_dtype": dtype,
        "shard_size": shard_size,
        "num_shards": num_shards,
        "software": software_versions(),
        "created_at": _now(),
        "shards": [],
        "report": None,
        "complete": False,
    }
    group.attrs.update(full)
    return StoreInfo(url=url, attrs=full)


def open_store(url: str) -> StoreInfo:
    return StoreInfo(url=url, attrs=dict(_open_group(url).attrs))


def store_exists(url: str) -> bool:
    return exists(join(url, "zarr.json"))


def is_complete(url: str) -> bool:
    return store_exists(url) and open_store(url).complete


def checksum(mean: np.ndarray, std: np.ndarray, label: np.ndarray, source: Sequence[str]) -> str:
    """sha256 over the rows as stored (little-endian bytes of mean, std, label; source paths joined by \\n).
    Codecs do not enter it: what is checked is what a reader decodes."""
    h = hashlib.sha256()
    for arr in (mean, std, label):
        a = np.asarray(arr)
        h.update(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).tobytes())
    h.update("\n".join(str(s) for s in source).encode("utf-8"))
    return "sha256:" + h.hexdigest()


def write_shard(
    url: str,
    shard_index: int,
    mean: np.ndarray,
    std: np.ndarray,
    label: np.ndarray,
    source: Sequence[str],
    skipped: Sequence[dict[str, Any]] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the rows of one whole shard, then its completion record. Safe to redo: every object of the
    shard is replaced, and the record (the commit marker) is written last.

    ``skipped``: ``{"row", "source", "error"}`` for rows excluded by the bad-image policy (label -1).
    ``extra``: more JSON-able facts for the record (source fingerprint, encode time, host...).
    """
    group = _open_group(url, mode="r+")
    info = StoreInfo(url=url, attrs=dict(group.attrs))
    start, stop = info.shard_rows(shard_index)
    rows = stop - start
    dtype = np.dtype(info.dtype)
    mean = np.asarray(mean, dtype=dtype)
    std = np.asarray(std, dtype=dtype)
    label = np.asarray(label, dtype=np.int32)
    expected = (rows, 2, *info.latent_shape)
    if mean.shape != expected or std.shape != expected or label.shape != (rows,) or len(source) != rows:
        raise ValueError(
            f"shard {shard_index} holds rows [{start}, {stop}): expected mean/std {expected}, label ({rows},)"
            f" and {rows} sources; got {mean.shape}, {std.shape}, {label.shape}, {len(source)}"
        )
    group["mean"][start:stop] = mean
    group["std"][start:stop] = std
    group["label"][start:stop] = label
    group["source"][start:stop] = np.array(list(source), dtype=object)
    record = {
        "index": shard_index,
        "start": start,
        "stop": stop,
        "checksum": checksum(mean, std, label, source),
        "skipped": list(skipped),
        "written_at": _now(),
        **(extra or {}),
    }
    group["shard_records"][shard_index : shard_index + 1] = np.array([json.dumps(record)], dtype=object)
    return record


def shard_records(url: str) -> list[dict[str, Any] | None]:
    """Every shard's completion record, None where a shard has not been written."""
    return parse_records(_open_group(url)["shard_records"][:])


def shard_record(url: str, shard_index: int) -> dict[str, Any] | None:
    """One shard's completion record, None if the shard has not been written."""
    raw = str(_open_group(url)["shard_records"][shard_index])
    return json.loads(raw) if raw else None


def read_shard(
    group: zarr.Group, info: StoreInfo, shard_index: int, record: dict[str, Any] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, label) of one whole shard, checked against its record's checksum; raises
    StoreCorruptError naming the store and the shard when the bytes do not decode or do not match."""
    start, stop = info.shard_rows(shard_index)
    where = f"(rows {start}-{stop})"
    if record is None:
        raise StoreCorruptError(info.url, shard_index, f"{where}: no completion record")
    if (record.get("start"), record.get("stop")) != (start, stop):
        problem = f"record covers rows {record.get('start')}-{record.get('stop')}, not {start}-{stop}"
        raise StoreCorruptError(info.url, shard_index, problem)
    try:
        mean, std = group["mean"][start:stop], group["std"][start:stop]
        label, source = group["label"][start:stop], [str(s) for s in group["source"][start:stop]]
    except Exception as exc:  # a codec rejecting the bytes: one line, not the codec's stack
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        problem = f"{where}: does not decode ({type(exc).__name__}: {first})"
        raise StoreCorruptError(info.url, shard_index, problem) from exc
    found = checksum(mean, std, label, source)
    if found != record["checksum"]:
        raise StoreCorruptError(info.url, shard_index, f"{where}: checksum {found} != recorded {record['checksum']}")
    return mean, std, label


def parse_records(raw: Any) -> list[dict[str, Any] | None]:
    """The ``shard_records`` array as dicts (None where a shard has no record, or an unreadable one)."""
    out: list[dict[str, Any] | None] = []
    for r in raw:
        try:
            out.append(json.loads(str(r)) if str(r) else None)
        except json.JSONDecodeError:
            out.append(None)
    return out


def verify_shard(url: str, shard_index: int, record: dict[str, Any] | None = None) -> str | None:
    """None if the shard's data matches its record, else what is wrong (in words)."""
    group = _open_group(url)
    info = StoreInfo(url=url, attrs=dict(group.attrs))
    if record is None:
        record = parse_records(group["shard_records"][shard_index : shard_index + 1])[0]
    try:
        read_shard(group, info, shard_index, record)
    except StoreCorruptError as exc:
        return f"shard {shard_index} {exc.problem}"
    return None


def verify(url: str, threads: int = 8) -> list[tuple[int, str]]:
    """``(shard index, what is wrong)`` for every shard that does not match its record (empty: all good)."""
    records = shard_records(url)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # I/O bound on object stores
        found = pool.map(lambda i: verify_shard(url, i, records[i]), range(len(records)))
        return [(i, p) for i, p in enumerate(found) if p]


def finalize(url: str, threads: int = 8) -> dict[str, Any]:
    """Check every shard against its record (re-reading all data), then write the report and set
    ``complete: true``. Raises StoreError listing the bad or missing shards, leaving the store incomplete."""
    info = open_store(url)
    records = shard_records(url)
    problems = [p for _, p in verify(url, threads)]
    if problems:
        shown = "; ".join(sorted(problems)[:10])
        raise StoreError(f"latent store {url} failed verification ({len(problems)} shard(s)): {shown}")
    skipped = [s for r in records for s in r["skipped"]]  # type: ignore[index]
    conversions: dict[str, dict[str, Any]] = {}  # content-changing image conversions, summed over shards
    for r in records:
        for kind, entry in sorted(((r or {}).get("conversions") or {}).items()):
            total = conversions.setdefault(kind, {"count": 0, "examples": []})
            total["count"] += int(entry["count"])
            total["examples"] = (total["examples"] + list(entry["examples"]))[:5]
    report = {
        "num_rows": info.num_rows,
        "num_valid": info.num_rows - len(skipped),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "conversions": conversions,
        "finalized_at": _now(),
    }
    group = _open_group(url, mode="r+")
    group.attrs.update({"shards": records, "report": report, "complete": True})
    # Consolidated metadata (one read lists every array, as xarray and dask expect), written once the store
    # is complete: nothing changes the arrays' metadata after this. zarr warns that v3 has it only as an
    # extension; zarr, xarray and dask all read it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(zarr_store(url, read_only=False))
    return report


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_synthetic(
    url: str,
    num_rows: int,
    latent_shape: tuple[int, int, int] = (4, 32, 32),
    shard_size: int = 1024,
    num_classes: int = 10,
    seed: int = 0,
    latent_shift: float = 0.0,
    excluded_rows: Sequence[int] = (),
) -> StoreInfo:
    """A complete store of random float16 latents with SD-VAE's attributes (id ``synthetic``), for benchmarks
    and tests of the reader: shard ``i`` is drawn from ``(seed, i)``; ``excluded_rows`` get label -1, as rows
    whose image was skipped."""
    attrs = {
        "autoencoder": {"name": "sd-vae", "id": "synthetic", "revision": "0", "weights_digest": None},
        "latent_scale": 0.18215,
        "latent_shift": latent_shift,
        "pixel_range": [-1.0, 1.0],
        "crop": "adm_center_crop",
        "resolution": 8 * latent_shape[-1],
        "image_channels": 3,
        "flip": "stored",
        "class_names": [f"c{k}" for k in range(num_classes)],
        "dataset_fingerprint": "synthetic",
    }
    info = create(url, num_rows, latent_shape, "float16", shard_size, attrs)

    def write(index: int) -> None:
        start, stop = info.shard_rows(index)
        rng = np.random.default_rng([seed, index])
        mean = rng.standard_normal((stop - start, 2, *latent_shape), dtype=np.float32).astype(np.float16)
        std = rng.uniform(0.01, 0.5, mean.shape).astype(np.float16)
        label = rng.integers(0, num_classes, stop - start).astype(np.int32)
        label[[r - start for r in excluded_rows if start <= r < stop]] = -1
        write_shard(url, index, mean, std, label, [f"c{label[r - start]}/{r}.JPEG" for r in range(start, stop)])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, range(info.num_shards)))
    finalize(url)
    return info
