"""Typed pipeline configuration: YAML presets in configs/ plus ``key=value`` overrides, validated before
any work starts, resolved once and written into the run directory. Whoever starts the work parses the
preset once (the CLI with load_config, a deployment's flow run through config_of) and hands the typed config
down; a config derived from another (the resolved one, a comparison arm) goes through revalidate.

The objective and sampler sections are the model library's own dataclasses (validated by pydantic), so
no option exists in two places. This module imports no Prefect: the training ranks import it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from dumo_model.dit import DiTConfig, model_config
from dumo_model.features import FeatureExtractorName
from dumo_model.objectives import HEADS_OF_OBJECTIVE, Derivative, ObjectiveConfig, ObjectiveName
from dumo_model.pretrained import TIME_SCALE
from dumo_model.samplers import SamplerConfig
from storage.autoencoders import AutoencoderName
from storage.images import BadImagePolicy
from storage.latents import LatentDtype
from storage.layout import Root
from tasks.config_files import CONFIG_DIR, config_presets

Device = Literal["cpu", "cuda"]
# time_scale of a network with a u head when model.time_scale is unset: raw t (MeanFlow's official code).
# bench/numerics.py: a finite difference at DiT's 1000 is ~100% off even in fp32 (docs/model.md).
U_HEAD_TIME_SCALE = 1.0
MAX_DERIVATIVE_ERROR = 0.05  # relative error of the u-target's derivative term that validation accepts


def check_u_target_numerics(objective: ObjectiveConfig, precision: str, time_scale: float, zero_stage: int) -> None:
    """Refuse a u-target derivative whose error, measured by bench/numerics.py against an fp64 JVP
    (bench/RESULTS.md), is above MAX_DERIVATIVE_ERROR, naming the figure and the setting to use instead."""
    if objective.name == "flow_matching":
        return
    if objective.derivative == "jvp":
        if zero_stage == 3:
            raise ValueError(
                "objective.derivative jvp runs forward-mode AD on the unwrapped network, which ZeRO-3's"
                " partitioned weights break; use train.zero_stage=2 (or 0/1)"
            )
        return
    way_out = "use objective.derivative=jvp (within 1.3% in bf16, exact in fp32)"
    if precision == "bf16":
        raise ValueError(
            "objective.derivative finite_difference on bf16 outputs is 5.0-378% off in its derivative term"
            f" (bench/numerics.py, eps 0.001-0.05); {way_out}"
        )
    if time_scale != 1.0:
        raise ValueError(
            f"objective.derivative finite_difference at model.time_scale {time_scale:g} is 11-119% off in its"
            f" derivative term (bench/numerics.py at 1000, fp32, eps 0.001-0.05); {way_out} or set"
            " model.time_scale=1"
        )
    if objective.fd_eps > (0.05 if objective.fd_scheme == "central" else 0.005):
        raise ValueError(
            f"objective.fd_eps {objective.fd_eps:g} ({objective.fd_scheme} difference) is above the largest eps"
            " measured within 5% on the trained demo (central 0.05: 4.4%; forward 0.005: 1.7%, 0.02: 6.6%;"
            " bench/numerics.py); use fd_eps=0.005"
        )


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    """Where images come from and how they become a latent store."""

    # A class-folder image tree URL (ImageNet's train/<wnid>/*.JPEG); "builtin:digits" writes the 1,797
    # scikit-learn digits under <root>/images/digits first.
    source: str = "builtin:digits"
    store_name: str = "digits-8"
    autoencoder: AutoencoderName = "pixels"
    vae: str | None = None  # local directory or hub id of the SD-VAE
    resolution: int = Field(8, ge=2)
    upscale: int = Field(1, ge=1)  # builtin:digits only: integer upscale of the 8x8 images
    shard_size: int = Field(256, ge=1)
    latent_dtype: LatentDtype = "float32"
    on_bad_image: BadImagePolicy = "fail"
    workers: int | None = Field(None, ge=1)  # Dask workers of the LocalCluster; None = sized to the machine
    dask_address: str | None = None  # an existing Dask scheduler instead of a LocalCluster
    # Of the autoencoder (None: cuda when the worker sees one); cuda: each encode task takes 1 GPU resource
    device: Device | None = None
    dask_dashboard: str | None = None  # the LocalCluster's dashboard address (":8787"); None: no dashboard
    in_memory: Literal["auto", True, False] = "auto"  # reader keeps the whole store in memory
    # Train on the stored horizontal flips too (ImageNet, the lineage's habit). Off for data whose mirror
    # image is another thing: a mirrored digit is not a digit.
    hflip: bool = True

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.autoencoder == "sd-vae" and not self.vae:
            raise ValueError("data.autoencoder 'sd-vae' needs data.vae (a local directory or a hub id)")
        return self


class ModelSection(BaseModel):
    """A preset name plus overrides of any DiTConfig field (hidden_size, depth, patch_size, r_input,
    time_scale, attention, grad_checkpointing, ...). input_size, in_channels and num_classes come from
    the latent store; heads come from the objective."""

    model_config = ConfigDict(extra="allow", frozen=True)
    preset: str = "debug"
    # Start a new run from a released DiT or SiT checkpoint (path or fsspec URL of the .pt/.safetensors file;
    # docs/pretrained.md). None: random init. Resumed runs load their own checkpoint instead.
    init_from: str | None = None
    init_format: Literal["auto", "dit", "sit"] = "auto"  # auto: from the file name (DiT-... or SiT-...)
    init_v_head: Literal["checkpoint", "zero"] = "checkpoint"  # the checkpoint's final layer, or zero
    init_u_head: Literal["copy", "zero"] = "copy"  # a copy of the loaded v head, or zero

    @model_validator(mode="before")
    @classmethod
    def _typed_overrides(cls, data: Any) -> Any:
        """Each DiTConfig field set here checked against, and converted to, the field's type: extra="allow"
        alone takes any value (model.depth=abc would pass until the network is built)."""
        if not isinstance(data, dict):
            return data
        types = get_type_hints(DiTConfig)
        out = dict(data)
        for key, value in data.items():
            if key in types and key not in cls.model_fields and value is not None:
                try:
                    out[key] = TypeAdapter(types[key]).validate_python(value)
                except ValidationError as exc:
                    raise ValueError(f"{key} {value!r}: {exc.errors()[0]['msg']}") from None
        return out

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        model_config(self.preset, **self.overrides)  # raises on an unknown preset or field
        if self.init_from is not None:  # the format (from the file name) fixes the time scale it needs
            scale = TIME_SCALE[self.source_format]
            if model_config(self.preset, **self.overrides).time_scale != scale:
                raise ValueError(
                    f"model.init_from is a {self.source_format} checkpoint: set model.time_scale={scale:g}"
                )
        for derived in ("heads", "input_size", "in_channels", "num_classes"):
            if derived in self.overrides:
                raise ValueError(f"model.{derived} is derived (from the objective or the latent store); remove it")
        return self

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def time_scale_for(self, heads: str) -> float:
        """model.time_scale, or when unset: 1 for a network with a u head, the preset's (DiT's 1000) without."""
        if self.overrides.get("time_scale") is not None:
            return float(self.overrides["time_scale"])
        return U_HEAD_TIME_SCALE if heads != "v" else model_config(self.preset).time_scale

    @property
    def source_format(self) -> Literal["dit", "sit"]:
        """The format of model.init_from: init_format, or told by the file name (SiT-XL-2-256x256.pt)."""
        if self.init_format != "auto":
            return self.init_format
        name = (self.init_from or "").rsplit("/", 1)[-1].lower()
        found = [f for f in ("dit", "sit") if name.startswith(f) or f"-{f}" in name or f"_{f}" in name]
        if len(found) != 1:
            raise ValueError(f"model.init_from {self.init_from!r}: set model.init_format to dit or sit")
        return found[0]


class TrainConfig(Section):
    num_steps: int = Field(600, ge=1)
    batch_size_global: int = Field(128, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)  # per rank; None = global / (accumulation x ranks)
    grad_accum_steps: int = Field(1, ge=1)
    num_processes: int = Field(1, ge=1)  # ranks per node
    num_nodes: int = Field(1, ge=1)
    hostfile: str | None = None  # multi-node through the deepspeed launcher (else launcher torchrun per node)
    launcher: Literal["auto", "inline", "torchrun", "deepspeed"] = "auto"
    device: Device = "cpu"
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16"] = "fp32"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    lr_warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_warmup: bool = True  # decay of update n = min(ema_decay, (1 + n) / (10 + n))
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    keep_last: int = Field(3, ge=1)
    keep_every: int | None = Field(None, ge=1)  # also keep every M-th step
    log_every: int = Field(10, ge=1)
    torch_threads: int | None = Field(None, ge=1)  # per rank on CPU; None = cores / ranks
    # Steps with a NaN/infinite loss or gradient norm tolerated; training stops at the next one, before it
    # commits anything (checked once per log window). 0: stop at the first.
    max_nonfinite_steps: int = Field(0, ge=0)

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_nodes

    @property
    def micro_batch(self) -> int:
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        return self.batch_size_global // (self.grad_accum_steps * self.world_size)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        micro, acc, world = self.micro_batch, self.grad_accum_steps, self.world_size
        if micro < 1 or micro * acc * world != self.batch_size_global:
            raise ValueError(
                f"global batch {self.batch_size_global} != micro {micro} x accumulation {acc} x world {world}"
                f" ({self.num_processes} processes x {self.num_nodes} nodes) = {micro * acc * world}"
            )
        if self.num_nodes > 1 and not self.hostfile and self.launcher != "torchrun":
            raise ValueError(
                f"train.num_nodes={self.num_nodes} needs train.hostfile for the deepspeed launcher, or one launcher"
                " per node: dumo train --nnodes N --node-rank K --master-addr HOST --master-port P"
            )
        if self.precision == "bf16" and self.device == "cpu" and self.zero_stage == 3:
            raise ValueError("bf16 with ZeRO-3 on the CPU is not supported; use fp32 or ZeRO 0-2")
        return self


class EvalConfig(Section):
    """The evaluation protocol. Its name keys the cache together with the checkpoint digest."""

    protocol: str = "default"
    samplers: tuple[SamplerConfig, ...] = (SamplerConfig("one_step"), SamplerConfig("two_step"))
    num_samples: int = Field(1000, ge=1)  # balanced over classes
    batch_size: int = Field(250, ge=1)
    feature_extractor: FeatureExtractorName = "classifier"  # a key of dumo_model.features.FEATURE_EXTRACTORS
    inception_weights: str | None = None  # path of pt_inception-2015-12-05 weights for inception-v3-compat
    reference_npz: str | None = None  # ADM-style npz with mu and sigma (e.g. VIRTUAL_imagenet256_labeled.npz)
    seed: int = 0
    every_checkpoints: int | None = Field(None, ge=1)  # inline evaluation during training (no server)

    @field_validator("samplers", mode="before")
    @classmethod
    def _samplers(cls, v: Any) -> Any:
        # Allow the short form ["one_step", "two_step"] beside full mappings.
        if isinstance(v, list | tuple):
            return [{"name": s} if isinstance(s, str) else s for s in v]
        return v


class CompareConfig(Section):
    """The equal-budget ablation (``dumo compare``): arms trained on the same store, backbone, seed, batch
    and steps, evaluated under one protocol. Flow matching is sampled with multi-step Euler."""

    arms: tuple[ObjectiveName, ...] = ("flow_matching", "meanflow", "dumo")
    seeds: tuple[int, ...] = (0, 1)
    budgets: tuple[int, ...] = ()  # training steps per arm; empty = train.num_steps
    euler_steps: tuple[int, ...] = (1, 2, 4, 8)  # sampling steps of the flow-matching arm
    # Equal compute: budgets in forward passes of the flow-matching network per training sample (800
    # flow-matching steps = 2400); each arm trains the steps that cost as many FLOPs.
    compute_budgets: tuple[int, ...] = ()
    meanflow_derivative: Derivative = "jvp"  # MeanFlow's official code: JVP

    @field_validator("arms", "seeds", "euler_steps")
    @classmethod
    def _non_empty(cls, v: tuple) -> tuple:
        if not v:
            raise ValueError("must list at least one value")
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {list(v)}")
        return v


class PipelineConfig(Section):
    name: str = "demo"  # run name: runs/<name>/
    root: str = "demo-root"  # local path, file://, s3://bucket/prefix, memory://
    data: DataConfig = DataConfig()
    model: ModelSection = ModelSection()
    objective: ObjectiveConfig = ObjectiveConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    compare: CompareConfig = CompareConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"run name {v!r} must be non-empty, without '/', not starting with '.'")
        return v

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        check_u_target_numerics(self.objective, self.train.precision, self.time_scale, self.train.zero_stage)
        guided = [s.label for s in self.eval.samplers if s.cfg_scale != 1.0]
        if guided and self.objective.label_dropout == 0:
            raise ValueError(
                f"samplers {guided} use classifier-free guidance, but objective.label_dropout 0 never trains the"
                " null class; set objective.label_dropout (0.1 is the lineage's) or cfg_scale 1"
            )
        return self

    @property
    def heads(self) -> str:
        return HEADS_OF_OBJECTIVE[self.objective.name]

    @property
    def time_scale(self) -> float:
        return self.model.time_scale_for(self.heads)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def resolve_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset in configs/ (``demo`` -> configs/demo.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    known = config_presets()
    raise FileNotFoundError(f"no config file {name_or_path!r} and no preset of that name; presets: {known}")


def _set(data: dict[str, Any], key: str, value: Any, item: str) -> None:
    """Set the dotted ``key`` of a nested dict; ``item`` names the change in errors."""
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        _set(out, key, yaml.safe_load(raw), item)
    return out


def load_config(
    name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict[str, Any] | None = None
) -> PipelineConfig:
    """Read a preset or YAML file (or start from ``base``), apply overrides, validate."""
    data: dict[str, Any] = dict(base or {})
    if name_or_path is not None:
        data = yaml.safe_load(resolve_path(name_or_path).read_text()) or {}
    return PipelineConfig.model_validate(apply_overrides(data, overrides))


def config_of(config: str | PipelineConfig, overrides: Sequence[str] | None = None) -> PipelineConfig:
    """A flow's ``config`` parameter as the typed config. Whoever starts the work parses it, once: a
    deployment run gives a preset name or YAML path (plus ``overrides``), parsed here; the CLI has parsed and
    checked it before Prefect starts, and passes the PipelineConfig, used as it is."""
    if not isinstance(config, PipelineConfig):
        return load_config(config, tuple(overrides or ()))
    return load_config(None, tuple(overrides), config.model_dump(mode="json")) if overrides else config


def revalidate(cfg: PipelineConfig, changes: Mapping[str, Any]) -> PipelineConfig:
    """``cfg`` with ``changes`` applied (dotted keys, values as the fields take them: ``{"train.seed": 1}``)
    and every invariant checked again: the one way to derive a config from another (``model_copy`` checks
    nothing)."""
    data = cfg.model_dump(mode="json")
    for key, value in changes.items():
        _set(data, key, value, key)
    return PipelineConfig.model_validate(data)


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """The config as its run records it (runs/<run>/config.yaml): re-validated (it may come from a
    ``model_copy``), the root made absolute."""
    return revalidate(cfg, {"root": Root(cfg.root).url})


def config_from_yaml_text(text: str) -> PipelineConfig:
    """Re-read a resolved config (as written into a run directory)."""
    return PipelineConfig.model_validate(yaml.safe_load(text))
