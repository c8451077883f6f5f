"""Config presets validate; bad configs fail before any work with a message that names the problem."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from dumo_model.objectives import HEADS_OF_OBJECTIVE, ObjectiveName
from storage.autoencoders import AUTOENCODERS, AutoencoderName
from tasks.config import (
    CONFIG_DIR,
    PipelineConfig,
    config_from_yaml_text,
    config_of,
    load_config,
    resolve,
    revalidate,
)


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_validates_and_round_trips(preset):
    cfg = load_config(preset)
    assert config_from_yaml_text(cfg.to_yaml()) == cfg


def test_the_three_required_presets_exist_with_their_settings():
    demo, b2, xl2 = (load_config(n) for n in ("demo", "imagenet256-b2", "imagenet256-xl2"))
    assert demo.data.autoencoder == "pixels" and demo.data.source == "builtin:digits" and demo.train.device == "cpu"
    for cfg, preset in ((b2, "DuMo-B/2"), (xl2, "DuMo-XL/2")):
        assert cfg.model.preset == preset
        assert cfg.data.autoencoder == "sd-vae" and cfg.root.startswith("s3://") and cfg.data.dask_address
        assert cfg.train.num_processes == 8 and cfg.train.zero_stage == 2 and cfg.train.precision == "bf16"
        assert cfg.eval.num_samples == 50_000 and cfg.eval.feature_extractor == "inception-v3-compat"
        assert cfg.eval.reference_npz.endswith("VIRTUAL_imagenet256_labeled.npz")
    assert (xl2.objective.guidance_omega, xl2.objective.guidance_kappa) == (0.2, 0.92)


def test_batch_invariant_message_has_the_arithmetic():
    with pytest.raises(ValidationError, match=r"global batch 256 != micro 32 x accumulation 2 x world 2"):
        load_config(
            "demo",
            [
                "train.batch_size_global=256",
                "train.micro_batch_size=32",
                "train.grad_accum_steps=2",
                "train.num_processes=2",
            ],
        )


@pytest.mark.parametrize(
    "override,needle",
    [
        ("objective.name=dumoo", "objective.name"),
        ("model.hiddn_size=3", "hiddn_size"),
        ("model.preset=DuMo-Q/2", "DuMo-Q/2"),
        ("model.num_classes=3", "derived"),
        ("train.zero_stage=4", "zero_stage"),
        ("data.autoencoder=sd-vae", "data.vae"),
        ("eval.samplers=[three_step]", "three_step"),
        ("bogus.key=1", "bogus"),
        ("name=a/b", "run name"),
        ("model.depth=abc", "depth 'abc': Input should be a valid integer"),
        ("model.hidden_size=1.5", "hidden_size 1.5: Input should be a valid integer"),
        ("model.attention=bogus", "attention 'bogus': Input should be 'sdpa' or 'math'"),
    ],
)
def test_bad_values_are_named(override, needle):
    with pytest.raises(ValidationError, match=needle.replace(".", r"\.").replace("/", "/")):
        load_config("demo", [override])


def test_model_overrides_take_the_types_of_the_network_fields():
    cfg = load_config("demo", ["model.depth=6.0", "model.mlp_ratio=3", "model.grad_checkpointing=true"])
    assert cfg.model.overrides["depth"] == 6 and type(cfg.model.overrides["depth"]) is int
    assert type(cfg.model.overrides["mlp_ratio"]) is float and cfg.model.overrides["grad_checkpointing"] is True
    assert load_config("demo", ["model.time_scale=null"]).model.overrides["time_scale"] is None  # unset: the default


def test_overrides_parse_yaml_values_and_missing_preset_lists_presets():
    cfg = load_config("demo", ["train.betas=[0.8, 0.9]", "compare.seeds=[3]", "eval.samplers=[one_step]"])
    assert cfg.train.betas == (0.8, 0.9) and cfg.compare.seeds == (3,) and len(cfg.eval.samplers) == 1
    with pytest.raises(FileNotFoundError, match="demo"):
        load_config("no-such-preset")
    assert PipelineConfig().name == "demo"


def test_a_parsed_config_is_used_as_it_is_and_a_name_is_parsed_once():
    cfg = load_config("demo", ["train.num_steps=7"])
    assert config_of(cfg) is cfg  # what the CLI hands a flow: not parsed again
    assert config_of("demo", ["train.num_steps=7"]) == cfg  # what a deployment run hands it
    assert config_of(cfg, ["train.seed=3"]).train.seed == 3 and cfg.train.seed == 0
    with pytest.raises(ValidationError, match="global batch 128 != micro 42"):
        config_of(cfg, ["train.num_processes=3"])


def test_revalidate_checks_every_invariant_again_and_resolve_makes_the_root_absolute(tmp_path):
    cfg = load_config("demo", [f"root={tmp_path}/r"])
    changed = revalidate(cfg, {"name": "other", "train.seed": 5})
    assert (changed.name, changed.train.seed, changed.model.overrides) == ("other", 5, cfg.model.overrides)
    with pytest.raises(ValidationError, match="global batch 128 != micro 42 x accumulation 1 x world 3"):
        revalidate(cfg, {"train.num_processes": 3})
    assert resolve(load_config("demo", ["root=rel-root"])).root == (Path.cwd() / "rel-root").as_uri()


def test_closed_choices_derive_from_their_registries():
    assert set(get_args(ObjectiveName)) == set(HEADS_OF_OBJECTIVE)
    assert set(get_args(AutoencoderName)) == set(AUTOENCODERS)
    for objective, heads in HEADS_OF_OBJECTIVE.items():
        assert load_config("demo", [f"objective.name={objective}", "objective.derivative=jvp"]).heads == heads
    with pytest.raises(ValidationError, match="pixels"):  # the error lists the registry's names
        load_config("demo", ["data.autoencoder=sdvae"])
    with pytest.raises(ValidationError, match="compare.arms"):
        load_config("demo", ["compare.arms=[dumo, dumoo]"])
