"""Start a DuMo model from a released DiT or SiT checkpoint: pure tensor work on state dicts.

Both projects release one state dict per model (``DiT-XL-2-256x256.pt``, ``SiT-XL-2-256x256.pt``; their
training scripts' checkpoints hold it under ``"ema"``), with timm's key names, a label table of
``num_classes + 1`` rows (the last is the null class) and, trained with ``learn_sigma``, a final linear layer
with 2C output channels per patch position, in (p, q, c) order, of which the first C are the prediction.

Conventions (ALGORITHM.md: x_t = (1 - t) x + t e, t = 1 noise, v = e - x):
- **SiT** (linear interpolant, velocity model) is trained on x_s = s x + (1 - s) e with s = 1 - t, feeds raw s
  to its time embedder and predicts x - e = -v. So v(x_t, t) = -SiT(x_t, 1 - t). The sinusoidal features of
  1 - t are, frequency by frequency, a fixed 2x2 map of those of t:
  [cos f(1 - t), sin f(1 - t)] = [[cos f, sin f], [sin f, -cos f]] [cos ft, sin ft],
  so the map folds exactly into the first layer of the time MLP; the head is negated; ``time_scale`` is 1.
- **DiT** predicts noise on a variance-preserving path at integer timesteps 0..999 (999 noise), embedded
  raw, which DuMo's ``time_scale`` 1000 reproduces at t = step / 1000. A noise prediction is not a velocity
  on the linear path: a DiT checkpoint only initialises the backbone. Its final layer can still seed the v
  head (``v_head="checkpoint"``, so the loaded network gives DiT's outputs) or the head can start at zero.

Never a partial load: every key and shape is checked before the model is touched, and the model is then
loaded whole (strict). On load the interval embedder's output layer starts at zero (so emb_h(t - r) adds
nothing at step 0) and the u head starts as a copy of the v head, or at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from dumo_model.dit import DualHeadDiT, sincos_pos_embed_2d

SourceFormat = Literal["dit", "sit"]
VHeadInit = Literal["checkpoint", "zero"]
UHeadInit = Literal["copy", "zero"]
# The time scale under which each format's time embedder is reproduced exactly.
TIME_SCALE = {"dit": 1000.0, "sit": 1.0}
FREQ_DIM = 256  # DiT's and SiT's frequency_embedding_size


class PretrainedError(ValueError):
    """A checkpoint that does not fit the model: raised before any weight is changed."""


@dataclass(frozen=True)
class InitReport:
    """What a load mapped, for the log."""

    source_format: str
    tensors_mapped: int
    parameters_mapped: int
    output_channels_kept: str  # e.g. "4 of 8 (learn_sigma)"
    time_fold: bool
    head_negated: bool
    v_head: str
    u_head: str
    zeroed: tuple[str, ...]

    def line(self) -> str:
        return (
            f"{self.source_format} checkpoint: {self.tensors_mapped} tensors ({self.parameters_mapped:,d} parameters)"
            f" mapped; output channels {self.output_channels_kept}; time t -> 1 - t folded: {self.time_fold};"
            f" head negated: {self.head_negated}; v head {self.v_head}; u head {self.u_head};"
            f" zeroed {', '.join(self.zeroed) or 'nothing'}"
        )


def unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file: the released dict itself, or the ``ema`` (else ``model``) entry of
    a training checkpoint; a ``module.`` prefix (DDP) is dropped."""
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError("the file holds no state dict of tensors (nor one under 'ema' or 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def released_shapes(model: DualHeadDiT, learn_sigma: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the DiT/SiT state dict released for a network of ``model``'s size."""
    cfg = model.cfg
    d, p, c, k = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.num_classes
    h = int(d * cfg.mlp_ratio)
    out = p * p * c * (2 if learn_sigma else 1)
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj.weight": (d, c, p, p),
        "x_embedder.proj.bias": (d,),
        "pos_embed": (1, cfg.num_tokens, d),
        "t_embedder.mlp.0.weight": (d, FREQ_DIM),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (k + 1, d),
        "final_layer.linear.weight": (out, d),
        "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        for name, shape in {
            "attn.qkv.weight": (3 * d, d),
            "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d),
            "attn.proj.bias": (d,),
            "mlp.fc1.weight": (h, d),
            "mlp.fc1.bias": (h,),
            "mlp.fc2.weight": (d, h),
            "mlp.fc2.bias": (d,),
            "adaLN_modulation.1.weight": (6 * d, d),
            "adaLN_modulation.1.bias": (6 * d,),
        }.items():
            shapes[b + name] = shape
    return shapes


def _target_name(key: str, head: str) -> str | None:
    """The DuMo name of a released key (None: pos_embed, checked and rebuilt, never loaded)."""
    if key == "pos_embed":
        return None
    if key.startswith("final_layer."):
        return head + key[len("final_layer") :]
    return key.replace("y_embedder.embedding_table.", "y_embedder.").replace(".fc1.", ".0.").replace(".fc2.", ".2.")


def fold_reversed_time(weight: torch.Tensor, freq_dim: int = FREQ_DIM) -> torch.Tensor:
    """W' with W' feat(t) = W feat(1 - t) for the sinusoidal features feat = [cos ft, sin ft] (time scale 1):
    (D, freq_dim) -> (D, freq_dim), computed in float64."""
    half = freq_dim // 2
    # the very frequencies dit.timestep_features uses (float32), then widened
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).double()
    cos, sin = torch.cos(freqs).to(weight.device), torch.sin(freqs).to(weight.device)
    w = weight.double()
    w_cos, w_sin = w[:, :half], w[:, half:]
    return torch.cat([w_cos * cos + w_sin * sin, w_cos * sin - w_sin * cos], dim=1).to(weight.dtype)


def convert(
    state: dict[str, torch.Tensor], model: DualHeadDiT, source: SourceFormat, v_head: VHeadInit = "checkpoint"
) -> tuple[dict[str, torch.Tensor], InitReport]:
    """The released ``state`` as tensors named for ``model`` (backbone, and the head unless ``v_head`` is
    "zero"); raises PretrainedError, naming the key or shape, when it does not fit."""
    cfg = model.cfg
    if source not in TIME_SCALE:
        raise PretrainedError(f"unknown checkpoint format {source!r}: choose 'dit' or 'sit'")
    if cfg.time_scale != TIME_SCALE[source]:
        raise PretrainedError(
            f"a {source.upper()} checkpoint needs model.time_scale={TIME_SCALE[source]:g} (the model has"
            f" {cfg.time_scale:g}): its time embedder was trained on that scale"
        )
    if cfg.pos_embed_axes != "xy":
        raise PretrainedError("DiT and SiT checkpoints need model.pos_embed_axes='xy' (their position table)")
    fc = state.get("final_layer.linear.bias")
    learn_sigma = fc is not None and fc.ndim == 1 and fc.shape[0] == 2 * cfg.patch_size**2 * cfg.in_channels
    expected = released_shapes(model, learn_sigma)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise PretrainedError(
            f"not a {source.upper()} checkpoint of this model's layout (depth {cfg.depth}, hidden {cfg.hidden_size}):"
            f" missing {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)}), unexpected"
            f" {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''} ({len(unexpected)})"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise PretrainedError(f"{key} has shape {tuple(state[key].shape)}, this model needs {shape}")
    pos = state["pos_embed"]
    if pos.device.type != "meta":
        table = sincos_pos_embed_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size, "xy")
        err = (pos[0].double().cpu() - table.double()).abs().max().item()
        if err > 1e-4:
            raise PretrainedError(f"pos_embed differs from DiT's sin-cos table by up to {err:.3g}: another table")
    head = "head_v" if model.head_v is not None else "head_u"
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = _target_name(key, head)
        if name is None or (v_head == "zero" and name.startswith(head + ".")):
            continue
        out[name] = value
    c, p2 = cfg.in_channels, cfg.patch_size**2
    if f"{head}.linear.weight" in out and learn_sigma:  # keep the prediction, channels (p, q, c): c < C
        out[f"{head}.linear.weight"] = out[f"{head}.linear.weight"].reshape(p2, 2 * c, -1)[:, :c].reshape(p2 * c, -1)
        out[f"{head}.linear.bias"] = out[f"{head}.linear.bias"].reshape(p2, 2 * c)[:, :c].reshape(p2 * c)
    negate = source == "sit" and f"{head}.linear.weight" in out
    if source == "sit":  # v(x_t, t) = -SiT(x_t, 1 - t)
        out["t_embedder.mlp.0.weight"] = fold_reversed_time(out["t_embedder.mlp.0.weight"])
        if negate:
            out[f"{head}.linear.weight"] = -out[f"{head}.linear.weight"]
            out[f"{head}.linear.bias"] = -out[f"{head}.linear.bias"]
    report = InitReport(
        source_format=source,
        tensors_mapped=len(out),
        parameters_mapped=sum(v.numel() for v in out.values()),
        output_channels_kept=f"{c} of {2 * c} (learn_sigma)" if learn_sigma else f"{c} of {c}",
        time_fold=source == "sit",
        head_negated=negate,
        v_head=v_head,
        u_head="",
        zeroed=(),
    )
    return out, report


@torch.no_grad()
def init_from_released(
    model: DualHeadDiT,
    state: dict[str, torch.Tensor],
    source: SourceFormat,
    v_head: VHeadInit = "checkpoint",
    u_head: UHeadInit = "copy",
) -> InitReport:
    """Load a released DiT/SiT state dict into ``model`` whole, or raise PretrainedError and change nothing.
    The interval embedder's output layer is zeroed; a dual model's u head becomes a copy of its v head
    (``u_head="copy"``) or zero; a one-head model (heads "v" or "u") takes the checkpoint's head."""
    mapped, report = convert(unwrap(state), model, source, v_head)
    full = dict(model.state_dict())
    zeroed = []
    for name, value in mapped.items():
        full[name] = value.to(dtype=full[name].dtype, device=full[name].device)
    if model.h_embedder is not None:  # emb_h(t - r) adds nothing at step 0
        for name in ("h_embedder.mlp.2.weight", "h_embedder.mlp.2.bias"):
            full[name] = torch.zeros_like(full[name])
        zeroed.append("h_embedder.mlp.2")
    u_how = "none"
    if model.head_v is not None and model.head_u is not None:
        u_how = u_head
        for name in [n for n in full if n.startswith("head_u.")]:
            source_value = full["head_v." + name[len("head_u.") :]]
            full[name] = source_value.clone() if u_head == "copy" else torch.zeros_like(source_value)
        if u_head == "zero":
            zeroed.append("head_u")
    elif model.head_u is not None:
        u_how = "checkpoint" if v_head == "checkpoint" else "zero"
    if v_head == "zero":
        zeroed.append("head_v" if model.head_v is not None else "head_u")
    model.load_state_dict(full, strict=True)
    return replace(report, u_head=u_how, zeroed=tuple(zeroed))
