"""Samplers. The state is integrated in float32 (or float64) even when the network runs in bf16.

Legend: e noise (N, C, H, W) at t = 1; y labels (N,); u(x_t, t, r) the flow map; v(x_t, t) the velocity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SamplerName = Literal["one_step", "two_step", "euler", "renoise"]
VInterval = Literal["half", "full", "zero"]


@dataclass(frozen=True)
class SamplerConfig:
    """``one_step``: x_0 = e - u(e, 1, 0). ``two_step``: through t_mid. ``euler``: num_steps Euler steps
    of the v head (flow-matching baseline, or DuMo's v head). ``renoise``: the consistency sampler for
    r_input="zero" (x0_hat = x_t - t u(x_t, t, 0), re-noised to the next time with fresh noise).
    ``cfg_scale`` 1 = no classifier-free guidance (DuMo's default: guidance is learned in training).
    ``v_interval``: the interval t - r at which a dual model's v head is queried (Euler, and guidance with
    it). The v head is conditioned on t - r through the shared condition and DuMo trains it only at
    t - r = t (1 - U), U ~ U(0, 1): ``half`` (t - r = t / 2, the median trained interval; default), ``full``
    (r = 0, the edge of the trained range) or ``zero`` (r = t, never trained by DuMo; the old behaviour).
    Models without an interval embedder ignore it; MeanFlow's u head at r = t is its velocity (trained)."""

    name: SamplerName = "one_step"
    num_steps: int = 1
    t_mid: float = 0.5
    cfg_scale: float = 1.0
    state_dtype: Literal["float32", "float64"] = "float32"
    v_interval: VInterval = "half"

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0 < self.t_mid < 1:
            raise ValueError(f"t_mid must be in (0, 1), got {self.t_mid}")

    @property
    def label(self) -> str:
        """A short stable name for tables and file names: 1-step, 2-step, euler-32, renoise-2."""
        steps = {"one_step": 1, "two_step": 2}.get(self.name, self.num_steps)
        base = f"{steps}-step" if self.name in ("one_step", "two_step") else f"{self.name}-{steps}"
        if self.name == "euler" and self.v_interval != "half":
            base += f"-v{self.v_interval}"
        return base if self.cfg_scale == 1.0 else f"{base}-cfg{self.cfg_scale:g}"


def _times(n: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n,), value, device=like.device, dtype=torch.float32)


def _guided(
    model, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor, head: str, cfg_scale: float
) -> torch.Tensor:
    """One head of the model, with classifier-free guidance when cfg_scale != 1 (2N batch)."""
    if cfg_scale == 1.0:
        return getattr(model(x, t, r, y, heads=(head,)), head).float()
    null = torch.full_like(y, model.null_class)
    both = getattr(
        model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]), torch.cat([y, null]), heads=(head,)),
        head,
    ).float()
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample(
    model, noise: torch.Tensor, y: torch.Tensor, cfg: SamplerConfig, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Samples x_0 from noise e at t = 1. ``model`` is a DualHeadDiT in eval mode."""
    dtype = torch.float64 if cfg.state_dtype == "float64" else torch.float32
    x = noise.to(dtype)
    n = x.shape[0]
    zero_r = model.cfg.r_input == "zero"
    if cfg.name in ("one_step", "two_step") and model.head_u is None:
        raise ValueError(f"sampler {cfg.name!r} needs a u head; this model has heads={model.cfg.heads!r}")
    if cfg.name in ("one_step", "two_step") and zero_r and cfg.name == "two_step":
        raise ValueError("r_input='zero' models sample with 'one_step' or 'renoise', not 'two_step'")

    def u(x_, t_, r_):
        return _guided(model, x_, _times(n, t_, x_), _times(n, r_, x_), y, "u", cfg.cfg_scale).to(dtype)

    if cfg.name == "one_step":
        return x - u(x, 1.0, 0.0)
    if cfg.name == "two_step":
        x_mid = x - (1 - cfg.t_mid) * u(x, 1.0, cfg.t_mid)
        return x_mid - cfg.t_mid * u(x_mid, cfg.t_mid, 0.0)
    if cfg.name == "euler":
        head = "v" if model.head_v is not None else "u"  # a u head at r = t is a velocity too
        r_of = {"half": 0.5, "full": 0.0, "zero": 1.0}[cfg.v_interval] if head == "v" else 1.0  # r = r_of * t
        ts = torch.linspace(1.0, 0.0, cfg.num_steps + 1).tolist()
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            tt = _times(n, t_cur, x)
            vel = _guided(model, x, tt, r_of * tt, y, head, cfg.cfg_scale).to(dtype)
            x = x + (t_next - t_cur) * vel
        return x
    if cfg.name == "renoise":
        ts = torch.linspace(1.0, 0.0, cfg.num_steps + 1).tolist()
        x0_hat = x
        for i, t_cur in enumerate(ts[:-1]):
            x0_hat = x - t_cur * u(x, t_cur, 0.0)
            t_next = ts[i + 1]
            if t_next > 0:
                fresh = torch.randn(x.shape, device=x.device, generator=gen, dtype=torch.float32).to(dtype)
                x = (1 - t_next) * x0_hat + t_next * fresh
        return x0_hat
    raise ValueError(f"unknown sampler {cfg.name!r}")
