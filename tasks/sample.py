"""``dumo sample``: images from a committed checkpoint, as a PNG grid and an npz. One process, no Prefect.

The network comes from the checkpoint (EMA weights, or the raw DeepSpeed weights on request), the sampler is
``dumo_model.samplers.sample`` (the same code the evaluation runs), and latents become images through the
autoencoder the run's latent store recorded (the ``pixels`` identity, or the very SD-VAE it was encoded
with, found offline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from dumo_model.dit import DualHeadDiT
from dumo_model.samplers import SamplerConfig, sample
from storage import checkpoints, fs, latents, outputs
from storage.autoencoders import Autoencoder, AutoencoderSpec, describe, get_autoencoder
from storage.layout import Root, run_of_checkpoint
from tasks.config import PipelineConfig, config_from_yaml_text
from tasks.modeling import model_from_dict

log = logging.getLogger("dumo.sample")
Weights = Literal["ema", "raw"]


def load_checkpoint_model(url: str, weights: Weights = "ema", device: str | torch.device = "cpu") -> DualHeadDiT:
    """The network of a committed checkpoint in eval mode: its EMA weights (checked against the marker's
    digest) or its raw weights gathered from the DeepSpeed state (every ZeRO partition, fp32)."""
    model_cfg, ema = checkpoints.load_weights(url)  # raises FileNotFoundError when not committed
    model = model_from_dict(model_cfg)
    if weights == "raw":
        from tasks.ranks.distributed import consolidated_weights

        if "trainer" not in checkpoints.read_marker(url):
            raise ValueError(f"{url} holds no DeepSpeed state (no raw weights): use the EMA weights")

        state = consolidated_weights(url)
    else:
        state = ema
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # frozen parameters (the position table) are rebuilt from model.json, which records their version
    if unexpected or trainable & set(missing):
        raise ValueError(
            f"{url}: {weights} weights do not fit the model in model.json (missing"
            f" {sorted(trainable & set(missing))[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.to(device).eval()


def run_context(url: str) -> tuple[Root, str, int, PipelineConfig]:
    root, run, step = run_of_checkpoint(fs.normalize(url))
    return root, run, step, config_from_yaml_text(checkpoints.read_config_yaml(url))


def store_attrs(root: Root, store_name: str) -> dict[str, Any]:
    store = root.latent_store(store_name)
    if not latents.store_exists(store):
        raise FileNotFoundError(
            f"the run's latent store {store} is not there: its attributes name the autoencoder that turns latents"
            " into images; sample on the root the run was trained on"
        )
    return dict(latents.open_store(store).attrs)


def store_autoencoder(attrs: dict[str, Any], vae: str | None = None) -> Autoencoder:
    """The autoencoder the store was encoded with. An SD-VAE is looked up offline (``vae``, the caller's or
    the run's data.vae, else the id the store recorded) and must have the recorded weights digest."""
    identity = attrs["autoencoder"]
    if identity["name"] == "pixels":
        return get_autoencoder(AutoencoderSpec("pixels"))
    spec = AutoencoderSpec("sd-vae", vae or identity.get("id"))
    found = describe(spec, int(attrs["image_channels"]), int(attrs["resolution"])).identity
    if found["weights_digest"] != identity["weights_digest"]:
        raise ValueError(
            f"VAE {spec.vae} is not the one the store was encoded with ({found['weights_digest']} !="
            f" {identity['weights_digest']}): pass --vae DIR of the recorded {identity.get('id')}"
        )
    return get_autoencoder(spec)


@dataclass(frozen=True)
class SampleRequest:
    classes: tuple[int, ...] | None = None  # None: every class
    per_class: int = 8
    seed: int = 0
    sampler: SamplerConfig = SamplerConfig("one_step")
    weights: Weights = "ema"
    batch_size: int = 256
    vae: str | None = None


def sample_checkpoint(url: str, request: SampleRequest, out: str | None = None, device: str | None = None) -> dict:
    """Sample ``request.per_class`` images of each class; write ``<out>.png`` (one row per class) and
    ``<out>.npz`` (``images`` (N, H, W, 3) uint8, ``labels`` (N,)). Returns the paths and counts."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    url = fs.normalize(url)
    checkpoints.read_marker(url)  # the one-line refusal of an uncommitted checkpoint, before anything else
    root, run, step, cfg = run_context(url)
    attrs = store_attrs(root, cfg.data.store_name)
    model = load_checkpoint_model(url, request.weights, dev)
    num_classes = model.cfg.num_classes
    classes = tuple(range(num_classes)) if request.classes is None else request.classes
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside 0..{num_classes - 1} of this model")
    if request.sampler.cfg_scale != 1.0 and cfg.objective.label_dropout <= 0:
        raise ValueError(
            f"guidance (cfg scale {request.sampler.cfg_scale:g}) needs the null class, which this run never trained"
            " (objective.label_dropout=0): sample without --cfg-scale"
        )
    ae = store_autoencoder(attrs, request.vae or cfg.data.vae)
    labels = np.repeat(np.asarray(classes, np.int64), request.per_class)  # class-major: rows of the grid
    images = generate(model, ae, labels, request, dev)
    block = images.reshape(len(classes), request.per_class, *images.shape[1:])
    png, npz = outputs.write_samples(out or f"{run}-step{step}-{request.sampler.label}", images, labels, block)
    log.info(f"{run} step {step}: {len(labels)} samples ({request.sampler.label}, {request.weights}) -> {png}, {npz}")
    return {"png": png, "npz": npz, "num_images": len(labels), "run": run, "step": step}


@torch.no_grad()
def generate(model: DualHeadDiT, ae: Autoencoder, labels: np.ndarray, request: SampleRequest, dev) -> np.ndarray:
    """(N, H, W, 3) uint8 images. The noise is drawn on the CPU from ``request.seed`` batch by batch, so a
    seed gives the same images on any device and batch size."""
    from dumo_model.metrics import to_uint8

    c, h = model.cfg.in_channels, model.cfg.input_size
    gen = torch.Generator().manual_seed(request.seed)
    noise = torch.randn((len(labels), c, h, h), generator=gen)
    out = []
    for lo in range(0, len(labels), request.batch_size):
        y = torch.from_numpy(labels[lo : lo + request.batch_size]).to(dev)
        x0 = sample(model, noise[lo : lo + len(y)].to(dev), y, request.sampler)
        pixels = to_uint8(ae.decode(x0.float())).cpu().numpy()  # (b, C, H, W)
        out.append(np.broadcast_to(pixels.transpose(0, 2, 3, 1), (len(y), *pixels.shape[2:], 3)))  # grey -> RGB
    return np.ascontiguousarray(np.concatenate(out))
