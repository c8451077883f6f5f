"""What the ``dumo`` command (flows/cli_*.py) asks of storage/ and the model library, so that flows/ imports
only flows and tasks (tests/test_layout_rules.py).

Plain functions, no Prefect: a command calls them before any flow starts (to refuse a bad input in one line)
and after (to print what a flow wrote). Each imports what it needs when called: the argument parser reads
the choice lists below only when a command's help or a choice is checked, so ``dumo --help`` loads neither
torch nor zarr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, get_args

if TYPE_CHECKING:
    from tasks.config import DataConfig


# --- choices the command line offers, read from where each is declared ---------------------------------
def model_presets() -> list[str]:
    """The model presets of ``dumo_model.dit.PRESETS`` (DuMo-B/2 ... and the tiny ``debug``)."""
    from dumo_model.dit import PRESETS

    return list(PRESETS)


def objective_names() -> list[str]:
    """The training objectives, in the order the config declares their heads."""
    from tasks.config import HEADS_OF_OBJECTIVE

    return list(HEADS_OF_OBJECTIVE)


def autoencoder_names() -> list[str]:
    """The autoencoders a latent store can be built with (storage.autoencoders.AUTOENCODERS, the one list)."""
    from storage.autoencoders import AUTOENCODERS

    return list(AUTOENCODERS)


def feature_extractor_names() -> list[str]:
    """The feature extractors an evaluation can score in (dumo_model.features.FEATURE_EXTRACTORS, the one list)."""
    from dumo_model.features import FEATURE_EXTRACTORS

    return list(FEATURE_EXTRACTORS)


def literal_choices(option: str) -> list[str]:
    """The values of the Literal type that declares ``option``'s closed choice: ``device``
    (tasks.config.Device), ``on_bad_image`` (storage.images.BadImagePolicy), ``latent_dtype``
    (storage.latents.LatentDtype), ``sampler`` (dumo_model.samplers.SamplerName), ``weights``
    (tasks.sample.Weights), ``r_input`` (dumo_model.dit.RInput)."""
    from dumo_model.dit import RInput
    from dumo_model.samplers import SamplerName
    from storage.images import BadImagePolicy
    from storage.latents import LatentDtype
    from tasks.config import Device
    from tasks.sample import Weights

    declared = {
        "device": Device,
        "on_bad_image": BadImagePolicy,
        "latent_dtype": LatentDtype,
        "sampler": SamplerName,
        "weights": Weights,
        "r_input": RInput,
    }
    return list(get_args(declared[option]))


# --- refusing a bad input before any flow starts -------------------------------------------------------
def is_refused_store(exc: BaseException) -> bool:
    """A latent store that is absent, incomplete or built differently (storage's StoreError)."""
    from storage.latents import StoreError

    return isinstance(exc, StoreError)


def require_image_tree(url: str) -> None:
    """FileNotFoundError when nothing is at ``url`` (the full listing of the tree is the build flow's)."""
    from storage import fs

    if not fs.exists(url):
        raise FileNotFoundError(f"image tree {url} does not exist: give a folder SOURCE/<class>/<image>")


def latent_store_is_complete(root: str, data: DataConfig) -> bool:
    """Whether the latent store of ``data`` under ``root`` is built and finalized (then training's own checks
    can run early)."""
    from storage import latents
    from storage.layout import Root

    return latents.is_complete(Root(root).latent_store(data.store_name))


# --- the work of the single-process commands -----------------------------------------------------------
def write_digit_tree(url: str, upscale: int = 1) -> tuple[int, int]:
    """scikit-learn's labelled 8x8 digits as ``url/<digit>/<NNNN>.png``; (images written, classes)."""
    from storage.images import write_digits

    source = write_digits(url, upscale=upscale)
    return len(source), len(source.class_names)


def check_latent_store(
    url: str, repair: bool = False, source: str | None = None, vae: str | None = None, threads: int = 8
) -> dict[str, Any]:
    """Every shard of the store checked against its checksum; with ``repair``, the bad ones re-encoded from
    the source (storage.store_repair). Keys: url, num_shards, bad [{shard, problem}] and, on repair, repaired."""
    from storage.store_repair import repair_store, verify_store

    if repair:
        return repair_store(url, source_url=source, vae=vae, threads=threads)
    return verify_store(url, threads=threads)


def model_info(preset: str, objective: str, r_input: str) -> str:
    """Parameters by part and forward GFLOPs per image of a model preset, built on the meta device (no
    memory), as the lines ``dumo model-info`` prints."""
    import torch

    from dumo_model.dit import build_model
    from dumo_model.info import forward_flops, parameters_by_part
    from tasks.config import HEADS_OF_OBJECTIVE

    with torch.device("meta"):
        model = build_model(preset, heads=HEADS_OF_OBJECTIVE[objective], r_input=r_input)
    cfg = model.cfg
    lines = [
        f"{preset} ({objective}, r_input={cfg.r_input}): hidden {cfg.hidden_size}, depth {cfg.depth}, "
        f"heads {cfg.num_heads}, patch {cfg.patch_size}, {cfg.num_tokens} tokens of {cfg.in_channels}x"
        f"{cfg.input_size}x{cfg.input_size} latents, {cfg.num_classes} classes",
        f"{'part':<26}{'parameters':>16}",
    ]
    lines += [f"{part:<26}{n:>16,d}  ({n / 1e6:.2f}M)" for part, n in parameters_by_part(model).items()]
    lines.append(f"{'forward':<26}{'GFLOPs / image':>16}")
    lines += [f"{part:<26}{f / 1e9:>16.2f}" for part, f in forward_flops(cfg).items()]
    return "\n".join(lines)


# --- printing what a flow wrote ------------------------------------------------------------------------
def display(url: str) -> str:
    """A URL as a person types it: the plain path of a local file, any other URL as it is."""
    from storage import fs

    return fs.display(url)


def results_table(record: dict[str, Any]) -> str:
    """An evaluation record as the markdown table of its metrics (storage.metrics)."""
    from storage.metrics import format_table

    return format_table(record)


def evaluation_files(eval_dir: str) -> dict[str, str]:
    """The sample grid and the metrics file of an evaluation directory, as paths a shell can open."""
    from storage import fs
    from storage.metrics import GRID_FILE, METRICS_FILE

    return {
        "grid": fs.display(fs.join(eval_dir, GRID_FILE)),
        "metrics": fs.display(fs.join(eval_dir, METRICS_FILE)),
    }
