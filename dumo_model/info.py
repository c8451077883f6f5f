"""Parameter and FLOP accounting of a DualHeadDiT, by part. FLOPs count 2 per multiply-add
(DiT's paper reports multiply-adds: its 118.6 "Gflops" for XL/2 are 237.2 GFLOPs here)."""

from __future__ import annotations

from torch import nn

from dumo_model.dit import DiTConfig, DualHeadDiT
from dumo_model.objectives import ObjectiveConfig, forward_equivalents


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameters_by_part(model: DualHeadDiT) -> dict[str, int]:
    parts = {
        "patch embed + positions": count(model.x_embedder) + model.pos_embed.numel(),
        "time embedder t": count(model.t_embedder),
        "time embedder t - r": count(model.h_embedder),
        "label embedder": count(model.y_embedder),
        "backbone blocks": count(model.blocks),
        "head v": count(model.head_v),
        "head u": count(model.head_u),
    }
    parts["total"] = count(model)
    return parts


def forward_flops(cfg: DiTConfig) -> dict[str, float]:
    """Forward FLOPs per image (2 per multiply-add) of the matmuls, by part, for the given heads."""
    d, t, p, c = cfg.hidden_size, cfg.num_tokens, cfg.patch_size, cfg.in_channels
    mlp = int(d * cfg.mlp_ratio)
    per_block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * mlp + 2 * d * 6 * d
    head = 2 * t * d * p * p * c + 2 * d * 2 * d
    embed = 2 * 256 * d + 2 * d * d  # one time-embedder MLP
    n_embed = 2 if cfg.has_interval_embedder else 1
    n_heads = {"dual": 2, "v": 1, "u": 1}[cfg.heads]
    out = {
        "patch embed": 2.0 * t * p * p * c * d,
        "embedders": float(n_embed * embed),
        "backbone blocks": float(cfg.depth * per_block),
        "heads": float(n_heads * head),
    }
    out["total"] = sum(out.values())
    return out


def train_step_flops(cfg: DiTConfig, objective: ObjectiveConfig) -> float:
    """Training FLOPs per image of one step of ``objective`` on this network: its forward-pass equivalents
    (dumo_model.objectives.forward_equivalents) times the forward FLOPs. Attention's token-by-token products
    are passed as their share of the forward, since a JVP's tangent costs them twice."""
    t, d = cfg.num_tokens, cfg.hidden_size
    total = forward_flops(cfg)["total"]
    attention = cfg.depth * 2 * 2 * t * t * d
    return forward_equivalents(objective, attention / total) * total
