"""Dual-head Diffusion Transformer: a DiT backbone with a velocity head and a flow-map head.

Legend for shapes: N batch, C latent channels, H x W latent size, p patch, T = (H/p)(W/p) tokens,
D hidden width, K classes (the label table has K + 1 rows; row K is the null class).

Time convention (ALGORITHM.md): x_t = (1 - t) x + t e, t = 1 is noise; v = e - x; the flow map
u(x_t, t, r) is the average velocity over [r, t], so x_r = x_t - (t - r) u.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Heads = Literal["dual", "v", "u"]
RInput = Literal["interval", "zero"]
AttentionImpl = Literal["sdpa", "math"]
PosEmbedAxes = Literal["xy", "yx"]


@dataclass(frozen=True)
class DiTConfig:
    """Architecture. ``heads``: ``dual`` (DuMo: v and u heads), ``v`` (flow matching: plain DiT),
    ``u`` (MeanFlow: one head on (t, r)). ``r_input``: ``interval`` feeds t - r through a second time
    embedder (default, as DuMo's 679M parameter count implies); ``zero`` means r = 0 always and no
    second embedder (the LLaDA2.0-Uni formula)."""

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    heads: Heads = "dual"
    r_input: RInput = "interval"
    # t is multiplied by this inside the sinusoidal embedding: 1 (MeanFlow/UCGM lineage) or 1000 (DiT).
    time_scale: float = 1000.0
    attention: AttentionImpl = "sdpa"  # "math" supports forward-mode AD (jvp) on every backend
    grad_checkpointing: bool = False
    # Which half of the sin-cos position channels encodes which axis: "xy" is DiT's and SiT's order (first
    # half the column, second the row), so their checkpoints load; "yx" is the order this project used
    # before November 2026. A model.json without this field was written then: LEGACY_CONFIG fills it in.
    pos_embed_axes: PosEmbedAxes = "xy"

    @property
    def has_interval_embedder(self) -> bool:
        return self.heads != "v" and self.r_input == "interval"

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


PRESETS: dict[str, dict] = {
    "DuMo-B/2": dict(hidden_size=768, depth=12, num_heads=12),
    "DuMo-M/2": dict(hidden_size=1024, depth=16, num_heads=16),
    "DuMo-L/2": dict(hidden_size=1024, depth=24, num_heads=16),
    "DuMo-XL/2": dict(hidden_size=1152, depth=28, num_heads=16),
    # Runs a training step on a CPU in well under a second: 8x8x1 inputs, 16 tokens.
    "debug": dict(input_size=8, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10),
}


# Fields a model.json written before the field existed lacks, with the value that network was built with.
LEGACY_CONFIG: dict[str, object] = {"pos_embed_axes": "yx"}


def config_from_dict(data: dict) -> DiTConfig:
    """A DiTConfig from a saved dict (model.json, config.json); fields it predates take their legacy value."""
    return DiTConfig(**{**LEGACY_CONFIG, **data})


def model_config(preset: str, **overrides) -> DiTConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = replace(DiTConfig(), **PRESETS[preset])
    unknown = set(overrides) - set(asdict(cfg))
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}; known: {sorted(asdict(cfg))}")
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.input_size % cfg.patch_size:
        raise ValueError(f"input_size {cfg.input_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of num_heads {cfg.num_heads}")
    return cfg


class DualOutput(NamedTuple):
    """Named outputs: ``v`` instantaneous velocity, ``u`` average velocity; None for an absent head."""

    v: torch.Tensor | None
    u: torch.Tensor | None


# ----------------------------------------------------------------------------------------------
# Embedders


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_features(t: torch.Tensor, dim: int, scale: float, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``scale * t``: (N,) -> (N, dim), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar time -> (N, D) through sinusoidal features and a 2-layer MLP (DiT)."""

    def __init__(self, hidden_size: int, scale: float, freq_dim: int = 256):
        super().__init__()
        self.scale, self.freq_dim = scale, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.freq_dim, self.scale)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


def sincos_pos_embed_2d(dim: int, grid: int, axes: PosEmbedAxes = "xy") -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (DiT/MAE): (grid*grid, dim), tokens in row-major order. ``axes`` "xy":
    channels [0, dim/2) encode the column, [dim/2, dim) the row (DiT's table); "yx": the other way round."""
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # row and column index of each token
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    first, second = (gx, gy) if axes == "xy" else (gy, gx)
    return torch.cat([one_axis(first), one_axis(second)], dim=1).float()


# ----------------------------------------------------------------------------------------------
# Transformer block and heads


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, impl: AttentionImpl):
        super().__init__()
        self.num_heads, self.impl = num_heads, impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, D/heads)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            out = weights.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class DiTBlock(nn.Module):
    """adaLN-Zero block: the condition c regresses shift, scale and gate of both sub-layers."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attention: AttentionImpl):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, attention)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """One output head: adaLN-modulated LayerNorm and a linear map from tokens to patches."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, p*p*C)


# ----------------------------------------------------------------------------------------------
# The model


class DualHeadDiT(nn.Module):
    """``model(x_t, t, r, y)`` -> DualOutput(v, u). One shared backbone; condition
    c = emb_t(t) + emb_h(t - r) + emb_y(y) (emb_h only with r_input="interval" and a u head)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p, ch = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        self.x_embedder = PatchEmbed(p, ch, d)
        self.t_embedder = TimestepEmbedder(d, cfg.time_scale)
        self.h_embedder = TimestepEmbedder(d, cfg.time_scale) if cfg.has_interval_embedder else None
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d)  # row num_classes = null class
        grid = cfg.input_size // p
        # Frozen parameter (not a buffer) so parameter counts match DiT's published ones.
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(d, grid, cfg.pos_embed_axes)[None], requires_grad=False
        )  # (1, T, D)
        self.blocks = nn.ModuleList(
            [DiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.attention) for _ in range(cfg.depth)]
        )
        self.head_v = FinalLayer(d, p, ch) if cfg.heads in ("dual", "v") else None
        self.head_u = FinalLayer(d, p, ch) if cfg.heads in ("dual", "u") else None
        self.initialize_weights()

    @classmethod
    def from_pretrained(
        cls, directory: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> DualHeadDiT:
        """The model of a directory written by ``dumo export`` (config.json + model.safetensors), on any
        device and dtype, in eval mode; no project config or latent store needed."""
        from dumo_model.exported import load_exported

        return load_exported(directory, device=device, dtype=dtype)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    @contextmanager
    def attention_impl(self, impl: AttentionImpl) -> Iterator[None]:
        """Temporarily run every attention layer with ``impl`` (the jvp objective needs "math":
        fused SDPA kernels have no forward-mode AD)."""
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        saved = [m.impl for m in layers]
        for m in layers:
            m.impl = impl
        try:
            yield
        finally:
            for m, old in zip(layers, saved):
                m.impl = old

    def initialize_weights(self) -> None:
        """DiT's recipe: xavier linears, patch embed as a linear, N(0, 0.02) label and time MLPs,
        zero adaLN modulation in every block and zero output layers in both heads, so the model starts
        as the identity map of its residual stream and outputs exactly zero."""

        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for emb in (self.t_embedder, self.h_embedder):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for head in (self.head_v, self.head_u):
            if head is not None:
                for layer in (head.adaLN_modulation[-1], head.linear):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.cfg.patch_size, self.cfg.in_channels
        g = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def condition(self, t: torch.Tensor, r: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        if self.h_embedder is not None:
            if r is None:
                raise ValueError("this model embeds t - r (r_input='interval'): pass r")
            c = c + self.h_embedder(t - r)
        return c

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        r: torch.Tensor | None,
        y: torch.Tensor,
        heads: tuple[str, ...] = ("v", "u"),
    ) -> DualOutput:
        """x_t (N, C, H, W), t and r (N,) in [0, 1], y (N,) int64 (num_classes = null).
        ``heads`` selects which of the present heads to evaluate (the rest come back as None)."""
        c = self.condition(t, r, y)
        x = self.x_embedder(x_t.to(self.pos_embed.dtype)) + self.pos_embed  # (N, T, D)
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        v = self.unpatchify(self.head_v(x, c)) if self.head_v is not None and "v" in heads else None
        u = self.unpatchify(self.head_u(x, c)) if self.head_u is not None and "u" in heads else None
        return DualOutput(v=v, u=u)


def build_model(preset: str = "DuMo-XL/2", **overrides) -> DualHeadDiT:
    """A model from a preset name and overrides of DiTConfig fields (e.g. heads="v", input_size=8)."""
    return DualHeadDiT(model_config(preset, **overrides))
