"""Autoencoders that turn pixels into latents for the store, and latents back into pixels for evaluation.

    pixels   identity: mean = pixels, std = 0, scale 1, shift 0 (the demo's 8x8 digits need no autoencoder)
    sd-vae   diffusers AutoencoderKL (Stable Diffusion's VAE) from a local directory or a hub id; the posterior
             mean and std are stored, so the reader can sample ``mean + std * noise`` (DiT's recipe)

Scaled latents, as the reader yields them and ``decode`` takes them: ``z = (latent - shift) * scale``.
A model is loaded once per worker process (module cache). Nothing is downloaded unless a hub id is given,
HF_HUB_OFFLINE is not set and a network is there; otherwise a missing model says what to place where.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from storage import latents
from storage.images import BadImageError, BadImagePolicy, ImageFile, load_images

# Rombach et al. 2022 (sec. 4.3.2, D.1): unit-variance scaling of SD-VAE latents. The one place it is written;
# a VAE whose config names another scaling_factor (e.g. SDXL's) uses its own.
SD_VAE_LATENT_SCALE = 0.18215
_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")

# Rows encoded and models loaded by this process, for progress and for tests that check a re-run encodes
# nothing and that a worker process loads its autoencoder once for all its tasks.
ENCODE_STATS = {"calls": 0, "images": 0, "loads": 0}
_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str | None, str], Autoencoder] = {}
_DIGESTS: dict[tuple[str, int, float], str] = {}


class AutoencoderUnavailable(FileNotFoundError):
    """The requested VAE weights are not where they were looked for (the message says where to put them)."""


@dataclass(frozen=True)
class AutoencoderSpec:
    """What a task needs to load an autoencoder: small and picklable."""

    name: AutoencoderName
    vae: str | None = None  # sd-vae: a local diffusers directory or a hub id

    def __post_init__(self) -> None:
        if self.name not in AUTOENCODERS:
            raise ValueError(f"autoencoder must be one of {tuple(AUTOENCODERS)}, got {self.name!r}")
        if self.name == "sd-vae" and not self.vae:
            raise ValueError("the sd-vae autoencoder needs --vae: a local AutoencoderKL directory or a hub id")


@dataclass(frozen=True)
class AutoencoderInfo:
    """What a store records about its autoencoder, known without loading the model."""

    identity: dict[str, Any]  # {"name", "id", "revision", "weights_digest"}
    latent_shape: tuple[int, int, int]  # (C, h, w) for the requested resolution
    latent_scale: float
    latent_shift: float
    image_channels: int


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_vae_dir(vae: str) -> tuple[str, str]:
    """(local directory, revision) of an AutoencoderKL given as a directory or a hub id."""
    if os.path.isdir(vae):
        missing = [f for f in _VAE_FILES if not os.path.exists(os.path.join(vae, f))]
        if missing:
            raise AutoencoderUnavailable(
                f"{vae} has no {', '.join(missing)}: place a diffusers AutoencoderKL folder there (what"
                " `AutoencoderKL.save_pretrained(dir)` writes, or `hf download stabilityai/sd-vae-ft-mse"
                f" config.json diffusion_pytorch_model.safetensors --local-dir {vae}` on a machine with network)"
            )
        return os.path.abspath(vae), "local"
    looks_like_hub_id = vae.count("/") == 1 and not vae.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise AutoencoderUnavailable(
            f"no AutoencoderKL directory at {vae}: place a diffusers AutoencoderKL folder there"
            f" ({' + '.join(_VAE_FILES)}), or pass a hub id such as stabilityai/sd-vae-ft-mse"
        )
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(vae, allow_patterns=list(_VAE_FILES), local_files_only=_offline())
    except Exception as exc:  # offline cache miss, no network, unknown repo: all need the same advice
        raise AutoencoderUnavailable(
            f"cannot get {vae} ({type(exc).__name__}; HF_HUB_OFFLINE={'1' if _offline() else '0'}): download"
            f" it where there is a network (`hf download {vae} {' '.join(_VAE_FILES)} --local-dir DIR`), copy"
            " DIR here and pass --vae DIR, or put it in this machine's Hugging Face cache"
            f" ({os.environ.get('HF_HOME', '~/.cache/huggingface')}/hub)"
        ) from exc
    return path, os.path.basename(os.path.normpath(path))  # snapshots/<commit sha>


def file_digest(path: str) -> str:
    """sha256 of a file, cached per process by (path, size, mtime): weights are hundreds of MB."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = "sha256:" + h.hexdigest()
    return _DIGESTS[key]


def describe(spec: AutoencoderSpec, image_channels: int, resolution: int) -> AutoencoderInfo:
    """Identity, latent shape, scale and shift for ``spec`` at ``resolution``, from files only."""
    if spec.name == "pixels":
        identity = {"name": "pixels", "id": "pixels", "revision": "1", "weights_digest": None}
        return AutoencoderInfo(identity, (image_channels, resolution, resolution), 1.0, 0.0, image_channels)
    assert spec.vae is not None
    path, revision = resolve_vae_dir(spec.vae)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    factor = 2 ** (len(config.get("block_out_channels", [0])) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    h.update(file_digest(os.path.join(path, _VAE_FILES[1])).encode())
    identity = {"name": "sd-vae", "id": spec.vae, "revision": revision, "weights_digest": "sha256:" + h.hexdigest()}
    side = resolution // factor
    return AutoencoderInfo(
        identity=identity,
        latent_shape=(int(config.get("latent_channels", 4)), side, side),
        latent_scale=float(config.get("scaling_factor") or SD_VAE_LATENT_SCALE),
        latent_shift=float(config.get("shift_factor") or 0.0),
        image_channels=int(config.get("in_channels", 3)),
    )


class Autoencoder:
    """The interface: ``encode`` pixels (B, C, H, W) in [-1, 1] -> posterior (mean, std) (B, c, h, w), both
    float32 on the CPU; ``decode`` scaled latents z (B, c, h, w) -> pixels (B, C, H, W)."""

    latent_scale: float = 1.0
    latent_shift: float = 0.0
    default_batch_size: int = 1024

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelsAutoencoder(Autoencoder):
    def __init__(self, vae: str | None = None, device: torch.device | None = None) -> None:
        pass  # the identity: no weights, no device

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        return x, torch.zeros_like(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class SDVAE(Autoencoder):
    default_batch_size = 16

    def __init__(self, vae: str | None, device: torch.device):
        from diffusers import AutoencoderKL

        path, _ = resolve_vae_dir(vae or "")
        self.device = device
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
        self.latent_scale = float(self.vae.config.scaling_factor or SD_VAE_LATENT_SCALE)
        self.latent_shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def _autocast(self) -> Any:
        # bf16 halves encode time on GPUs; on the CPU autocast is slower than fp32 for these convolutions
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            posterior = self.vae.encode(x.to(self.device)).latent_dist
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            x = self.vae.decode(z.to(self.device) / self.latent_scale + self.latent_shift).sample
        return x.float().clamp(-1, 1).cpu()


# The autoencoders by name, each with its class (constructed with the spec's vae and a device): the one list
# of names, from which the config's Literal and the CLI's choices derive.
AUTOENCODERS: dict[str, type[Autoencoder]] = {"pixels": PixelsAutoencoder, "sd-vae": SDVAE}
AutoencoderName = Literal[tuple(AUTOENCODERS)]  # type: ignore[valid-type]


def get_autoencoder(spec: AutoencoderSpec, device: str | torch.device | None = None) -> Autoencoder:
    """The autoencoder for ``spec``, loaded once per process and device."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (spec.name, spec.vae, str(dev))
    with _LOCK:  # threads of one Dask worker share the model
        if key not in _MODELS:
            _MODELS[key] = AUTOENCODERS[spec.name](spec.vae, dev)
            ENCODE_STATS["loads"] += 1
        return _MODELS[key]


@dataclass
class EncodedRows:
    mean: np.ndarray  # (B, 2, c, h, w) float32, axis 1 = [original, hflip]
    std: np.ndarray  # (B, 2, c, h, w)
    label: np.ndarray  # (B,) int32, -1 for skipped rows
    source: list[str]  # (B,) relative paths
    skipped: list[dict[str, Any]]  # {"row", "source", "error"}
    conversions: dict[str, dict[str, Any]] | None = None  # kind -> {"count", "examples"}: storage.images.CONVERSIONS


def encode_files(
    source_url: str,
    files: Sequence[ImageFile],
    spec: AutoencoderSpec,
    info: AutoencoderInfo,
    resolution: int,
    first_row: int,
    on_bad_image: BadImagePolicy = "fail",
    batch_size: int | None = None,
    device: str | None = None,
) -> EncodedRows:
    """Load, crop and encode ``files`` (rows ``first_row`` onwards), each image and its mirror image.

    A bad file raises BadImageError naming it, or with ``on_bad_image="skip"`` becomes a row of zeros with
    label -1 listed in ``skipped``.
    """
    ae = get_autoencoder(spec, device)
    rows = len(files)
    mean = np.zeros((rows, 2, *info.latent_shape), dtype=np.float32)
    std = np.zeros_like(mean)
    label = np.array([f.label for f in files], dtype=np.int32)
    skipped: list[dict[str, Any]] = []
    conversions: dict[str, dict[str, Any]] = {}
    step = batch_size or ae.default_batch_size
    for lo in range(0, rows, step):
        batch = files[lo : lo + step]
        notes: list[list[str]] = []
        images = load_images(source_url, batch, resolution, info.image_channels, notes)
        for f, kinds in zip(batch, notes):
            for kind in kinds:
                entry = conversions.setdefault(kind, {"count": 0, "examples": []})
                entry["count"] += 1
                if len(entry["examples"]) < 5:
                    entry["examples"].append(f.relpath)
        good = []
        for j, item in enumerate(images):
            if isinstance(item, BadImageError):
                if on_bad_image == "fail":
                    raise item
                label[lo + j] = -1
                skipped.append({"row": first_row + lo + j, "source": batch[j].relpath, "error": item.reason})
            else:
                good.append(j)
        if not good:
            continue
        x = torch.from_numpy(np.stack([images[j] for j in good]))  # (b, C, H, W)
        m, s = ae.encode(torch.cat([x, x.flip(-1)]))  # one call for both flips: (2b, c, h, w)
        b = len(good)
        idx = np.asarray(good) + lo
        mean[idx] = torch.stack([m[:b], m[b:]], dim=1).numpy()
        std[idx] = torch.stack([s[:b], s[b:]], dim=1).numpy()
        with _LOCK:
            ENCODE_STATS["calls"] += 1
            ENCODE_STATS["images"] += b
    return EncodedRows(mean, std, label, [f.relpath for f in files], skipped, conversions)


def encode_shard(
    store_url: str,
    shard_index: int,
    source_url: str,
    files: Sequence[ImageFile],
    spec: AutoencoderSpec,
    on_bad_image: BadImagePolicy = "fail",
    batch_size: int | None = None,
    extra: dict[str, Any] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The stage function of one encode task: encode ``files`` (the shard's rows, in order) with the crop,
    channels and latent geometry that the store's attributes name, write them as the whole shard
    ``shard_index``, then its record (with ``extra``, the encode time, host, pid and how many autoencoders
    this process has loaded so far). ``device``: cpu or cuda (default: cuda when visible). Safe to redo."""
    t0 = time.perf_counter()
    info = latents.open_store(store_url)
    start, stop = info.shard_rows(shard_index)
    if len(files) != stop - start:
        raise ValueError(f"shard {shard_index} holds rows [{start}, {stop}), got {len(files)} files")
    ae_info = AutoencoderInfo(
        identity=info.attrs["autoencoder"],
        latent_shape=info.latent_shape,
        latent_scale=float(info.attrs["latent_scale"]),
        latent_shift=float(info.attrs["latent_shift"]),
        image_channels=int(info.attrs["image_channels"]),
    )
    rows = encode_files(
        source_url, files, spec, ae_info, int(info.attrs["resolution"]), start, on_bad_image, batch_size, device
    )
    facts = {
        "encode_seconds": round(time.perf_counter() - t0, 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "conversions": rows.conversions or {},
        "autoencoder_loads": ENCODE_STATS["loads"],  # 1 on every shard of a worker that kept its model
    }
    return latents.write_shard(
        store_url, shard_index, rows.mean, rows.std, rows.label, rows.source, rows.skipped, {**(extra or {}), **facts}
    )
