"""DuMo model library: pure PyTorch, no device, distributed, orchestration or storage code."""

from dumo_model.dit import PRESETS, DiTConfig, DualHeadDiT, DualOutput, build_model, model_config
from dumo_model.ema import EMA
from dumo_model.objectives import Objective, ObjectiveConfig
from dumo_model.samplers import SamplerConfig, sample

__all__ = [
    "PRESETS",
    "DiTConfig",
    "DualHeadDiT",
    "DualOutput",
    "build_model",
    "model_config",
    "EMA",
    "Objective",
    "ObjectiveConfig",
    "SamplerConfig",
    "sample",
]
