"""A small CNN classifier whose penultimate layer is the feature space of the offline ``classifier`` metrics.

Legend for shapes: N batch, C image channels (1 grey or 3 RGB), R x R resolution (about 8 to 64),
D feature width, K classes. Inputs are pixels in [-1, 1], the range the latent store's images use.

Why a classifier and not Inception: the demo's 8x8 digits mean nothing to an ImageNet network, and
Inception weights are a download. A classifier trained on the dataset's own labelled images gives a feature
space for FID and spread, and logits for the class accuracy of conditional samples, fully offline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

RECIPE_VERSION = 1  # bump when the architecture or training recipe changes: it keys cached references


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int
    resolution: int
    num_classes: int
    width: int = 32
    feature_dim: int = 128

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.resolution < 4:
            raise ValueError(f"resolution must be >= 4, got {self.resolution}")
        if self.num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {self.num_classes}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ClassifierOutput(NamedTuple):
    features: torch.Tensor  # (N, D) penultimate activations: the metric feature space
    logits: torch.Tensor  # (N, K)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class FeatureClassifier(nn.Module):
    """Stride-2 convolutions bring any input down to at most 8x8, then two convolutions, a 2x2 pool and a
    projection to D channels, averaged over space: that average is the feature vector."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [_conv(cfg.in_channels, cfg.width)]
        size, ch = cfg.resolution, cfg.width
        while size > 8:  # (N, ch, size, size) -> (N, 2ch, size/2, size/2)
            nxt = min(2 * ch, 4 * cfg.width)
            layers.append(_conv(ch, nxt, stride=2))
            size, ch = math.ceil(size / 2), nxt
        layers += [_conv(ch, 2 * cfg.width), _conv(2 * cfg.width, 2 * cfg.width)]
        if size >= 4:
            layers.append(nn.AvgPool2d(2))
        layers += [_conv(2 * cfg.width, cfg.feature_dim), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        features = self.body(x)  # (N, D)
        return ClassifierOutput(features=features, logits=self.head(features))


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edges replicated): cheap augmentation that
    keeps the classifier from memorising the few hundred images a small dataset gives it."""
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def train_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ClassifierConfig,
    num_epochs: int = 30,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> FeatureClassifier:
    """Train on images x (N, C, R, R) in [-1, 1] with labels y (N,): AdamW, cosine decay, random shifts of
    up to R/8 pixels. Deterministic for a given seed, thread count and device. Returns the model in eval mode.
    ``on_step(done, total)`` is called after each optimizer step (progress reporting)."""
    torch.manual_seed(seed)  # initial weights
    gen = torch.Generator().manual_seed(seed)
    model = FeatureClassifier(cfg).to(x.device)
    num_steps = max(100, math.ceil(num_epochs * x.shape[0] / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=num_steps, pct_start=0.1)
    max_shift = max(1, cfg.resolution // 8)
    model.train()
    for step in range(num_steps):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen)
        batch = _random_shift(x[idx].cpu(), max_shift, gen).to(x.device)
        loss = F.cross_entropy(model(batch).logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step + 1, num_steps)
    return model.eval()
