"""The run layout: every path of the project is built here, on one root URL.

<root>/latents/<name>.zarr                           latent store (see docs/latent-store.md)
<root>/runs/<run>/config.yaml                        resolved config
<root>/runs/<run>/checkpoints/step-XXXXXXX/          DeepSpeed state, EMA safetensors, COMMITTED marker
<root>/runs/<run>/evals/step-XXXXXXX/<protocol>/     metrics.json, grid.png, samples.npz
<root>/references/<key>/                             reference statistics and feature extractors
<root>/cache/results/                                Prefect persisted task results (shared by a cluster)
<root>/images/<name>/                                image trees written by the project (demo digits)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from storage.fs import join, normalize

STEP_DIGITS = 7
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a ``step-XXXXXXX`` name, or None for anything else (temporary names included)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Root:
    """One storage root (local path, file://, s3://, memory://)."""

    url: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize(self.url))

    def join(self, *parts: str) -> str:
        return join(self.url, *parts)

    def latent_store(self, name: str) -> str:
        return self.join("latents", f"{name}.zarr")

    def images(self, name: str) -> str:
        return self.join("images", name)

    def digits_images(self, upscale: int = 1) -> str:
        """Where the builtin digits tree is written (each upscale factor its own tree)."""
        return self.images("digits" if upscale == 1 else f"digits-x{upscale}")

    @property
    def runs(self) -> str:
        return self.join("runs")

    def run(self, name: str) -> RunLayout:
        return RunLayout(self, name)

    def references(self, key: str) -> str:
        return self.join("references", key)

    @property
    def result_cache(self) -> str:
        return self.join("cache", "results")

    @property
    def comparisons(self) -> str:
        return self.join("comparisons")

    def comparison(self, name: str) -> str:
        return self.join("comparisons", name)


@dataclass(frozen=True)
class RunLayout:
    root: Root
    name: str

    @classmethod
    def of_url(cls, run_url: str) -> RunLayout:
        """The layout of ``<root>/runs/<name>`` (a ``RunLayout.url``)."""
        parts = normalize(run_url).split("/")
        if len(parts) < 3 or parts[-2] != "runs" or not parts[-1]:
            raise ValueError(f"not a run URL of the run layout (…/runs/<run>): {run_url}")
        return cls(Root("/".join(parts[:-2])), parts[-1])

    @property
    def url(self) -> str:
        return self.root.join("runs", self.name)

    @property
    def config(self) -> str:
        return join(self.url, "config.yaml")

    @property
    def checkpoints(self) -> str:
        return join(self.url, "checkpoints")

    def checkpoint(self, step: int) -> str:
        return join(self.checkpoints, step_dirname(step))

    @property
    def evals(self) -> str:
        return join(self.url, "evals")

    def eval_dir(self, step: int, protocol: str) -> str:
        return join(self.evals, step_dirname(step), protocol)

    @property
    def loss_curve(self) -> str:
        return join(self.url, "loss.png")

    @property
    def train_log(self) -> str:
        return join(self.url, "train-log.jsonl")


def run_of_checkpoint(checkpoint_url: str) -> tuple[Root, str, int]:
    """(root, run name, step) of a checkpoint URL built by ``RunLayout.checkpoint``."""
    url = normalize(checkpoint_url)
    parts = url.split("/")
    if len(parts) < 5 or parts[-2] != "checkpoints" or parts[-4] != "runs":
        raise ValueError(f"not a checkpoint URL of the run layout (…/runs/<run>/checkpoints/step-N): {url}")
    step = parse_step_dirname(parts[-1])
    if step is None:
        raise ValueError(f"not a checkpoint directory name: {parts[-1]!r} in {url}")
    return Root("/".join(parts[:-4])), parts[-3], step


def root_of_latent_store(store_url: str) -> Root:
    """The root a latent store belongs to: ``<root>`` for ``<root>/latents/<name>.zarr``; for a store placed
    anywhere else, the folder that holds it (so its Prefect result cache still lives beside it)."""
    parts = normalize(store_url).split("/")
    if len(parts) >= 3 and parts[-2] == "latents" and parts[-1].endswith(".zarr"):
        return Root("/".join(parts[:-2]))
    return Root("/".join(parts[:-1]))
