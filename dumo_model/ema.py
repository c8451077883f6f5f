"""Exponential moving average of weights, kept in float32, used for sampling."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of a model's trainable parameters: p_ema <- d p_ema + (1 - d) p.

    With ``warmup`` (a lineage habit, as in TensorFlow's and timm's EMA with an update count), the decay
    of update n is d = min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the
    initial weights: with decay 0.999 and no warm-up, 600 updates still leave 0.999^600 = 55% of the
    (zero-output) initialisation in the average, and the digits demo's EMA samples are at chance while
    the raw weights reach 99% class accuracy.

    diffusers' ``EMAModel`` (use_ema_warmup=False) applies the same decay formula; this class stays because
    (1) its shadow is float32 whatever the training precision, while EMAModel clones the parameters in their
    own dtype: under bf16 training an update of (1 - 0.9999) x delta is below bf16's resolution (8 bits of
    mantissa) and the average would stop moving; (2) exact resume sets ``num_updates`` to the resumed step,
    and the shadow is saved as a plain safetensors dict of the model's parameter names, which evaluation
    loads into the network with no diffusers object in between; (3) dumo_model imports nothing but torch."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), weight)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int | None = None) -> None:
        """Restore the averages; ``num_updates`` (the training step) continues the warm-up exactly."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
        if num_updates is not None:
            self.num_updates = num_updates

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (frozen parameters such as positions stay)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))
