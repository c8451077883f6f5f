"""``dumo sample`` and ``dumo export`` on small checkpoints, checkpoints written before the position-table
switch, and a run started from a SiT-format file through the real trainer (DeepSpeed on the CPU).

The store is test_train's 128-digit ``pixels`` store; checkpoints are the ``debug`` DiT perturbed away from
its zero-initialised heads (so samples depend on every weight), written and committed by the checkpoint store.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from dumo_model import EMA, DualHeadDiT, SamplerConfig, build_model, sample
from dumo_model.dit import sincos_pos_embed_2d
from flows.cli import main as cli
from storage import checkpoints, fs, metrics
from storage.autoencoders import AutoencoderUnavailable
from storage.checkpoints import check_resumable
from storage.layout import Root
from tasks.config import load_config
from tasks.export import export_checkpoint
from tasks.modeling import config_dict, resume_config
from tasks.sample import SampleRequest, load_checkpoint_model, sample_checkpoint, store_autoencoder
from tests.stores import digits_store
from tests.test_pretrained import RefDiT
from tests.test_train import config

SMALL = dict(hidden_size=32, depth=2, num_heads=2)  # test_train's network: in_channels 1, 8x8, 10 classes


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("sample-root"))
    digits_store(url)
    return url


def _write_checkpoint(root: str, name: str, step: int, model: DualHeadDiT, *overrides: str, legacy=False) -> str:
    cfg = config(root, name, *[f"model.{k}={v}" for k, v in SMALL.items()], *overrides)
    url = Root(root).run(name).checkpoint(step)
    model_json = config_dict(model)
    if legacy:  # what the project wrote before pos_embed_axes existed
        model_json.pop("pos_embed_axes")
    checkpoints.write_weights(url, EMA(model, 0.99).state_dict(), model_json, cfg.to_yaml())
    checkpoints.commit(url, step)
    return url


def _model(seed: int = 0, **options) -> DualHeadDiT:
    torch.manual_seed(seed)
    model = build_model("debug", **SMALL, **options)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _npz(url: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(fs.read_bytes(url))) as z:
        return {k: z[k] for k in z.files}


def test_sample_writes_grid_and_images_per_class(root, tmp_path) -> None:
    url = _write_checkpoint(root, "s", 10, _model())
    out = str(tmp_path / "digits")
    request = SampleRequest(classes=(3, 7), per_class=5, seed=1, sampler=SamplerConfig("two_step"))
    result = sample_checkpoint(url, request, out)
    data = _npz(result["npz"])
    assert data["images"].shape == (10, 8, 8, 3) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [3] * 5 + [7] * 5
    from PIL import Image

    grid = Image.open(io.BytesIO(fs.read_bytes(result["png"])))
    assert grid.size[0] > grid.size[1] > 2 * 32  # 5 columns, 2 rows of enlarged 8x8 cells
    # the seed fixes the images, whatever the batch size; another seed changes them
    again = sample_checkpoint(url, SampleRequest((3, 7), 5, 1, SamplerConfig("two_step"), batch_size=3), out + "-b")
    assert np.array_equal(_npz(again["npz"])["images"], data["images"])
    other = sample_checkpoint(url, SampleRequest((3, 7), 5, 2, SamplerConfig("two_step")), out + "-s")
    assert not np.array_equal(_npz(other["npz"])["images"], data["images"])


def test_sample_refuses_clearly(root, tmp_path, capsys) -> None:
    url = _write_checkpoint(root, "r", 10, _model(), "objective.label_dropout=0")
    with pytest.raises(ValueError, match="never trained .*label_dropout=0"):
        sample_checkpoint(url, SampleRequest(sampler=SamplerConfig(cfg_scale=2.0)), str(tmp_path / "g"))
    with pytest.raises(ValueError, match=r"classes \[12\] are outside 0..9"):
        sample_checkpoint(url, SampleRequest(classes=(1, 12)), str(tmp_path / "c"))
    half = Root(root).run("r").checkpoint(20)
    checkpoints.write_weights(half, {}, {}, "")  # written, never committed
    assert cli(["sample", half, "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not committed (no COMMITTED marker)" in err[0]
    assert cli(["export", half, str(tmp_path / "e")]) == 1
    assert "is not committed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no DeepSpeed state"):
        load_checkpoint_model(url, "raw")
    vae = {"name": "sd-vae", "id": str(tmp_path / "no-vae"), "revision": "local", "weights_digest": "sha256:0"}
    attrs = {"autoencoder": vae, "image_channels": 3, "resolution": 256}
    with pytest.raises(AutoencoderUnavailable, match="place a diffusers AutoencoderKL folder there"):
        store_autoencoder(attrs, load_config("demo").data.vae)


def test_export_load_sample_equals_sampling_the_checkpoint(root, tmp_path) -> None:
    url = _write_checkpoint(root, "e", 30, _model(seed=4))
    eval_dir = Root(root).run("e").eval_dir(30, "demo")
    record = {"run": "e", "step": 30, "protocol": "demo", "num_samples": 100, "checkpoint_digest": None}
    record |= {"feature_extractor": {"name": "classifier"}, "real": {"fid": 0.6}, "samplers": {"1-step": {"fid": 1.5}}}
    metrics.write_record(eval_dir, {**record, "checkpoint_digest": checkpoints.digest(url)})
    metrics.write_record(Root(root).run("e").eval_dir(30, "old"), {**record, "protocol": "old"})  # other weights
    export_checkpoint(url, str(tmp_path / "full"))
    export_checkpoint(url, str(tmp_path / "slim"), drop_v_head=True)
    card = (tmp_path / "full" / "README.md").read_text()
    assert "protocol `demo`" in card and "protocol `old`" not in card and "| 1-step |" in card
    assert '"pixels"' in card or "`pixels`" in card  # the store's autoencoder
    ref = load_checkpoint_model(url)
    gen = torch.Generator().manual_seed(0)
    noise, y = torch.randn(12, 1, 8, 8, generator=gen), torch.arange(12) % 10
    for sampler in (SamplerConfig("one_step"), SamplerConfig("two_step"), SamplerConfig("euler", num_steps=3)):
        loaded = DualHeadDiT.from_pretrained(str(tmp_path / "full"))
        assert torch.equal(sample(loaded, noise, y, sampler), sample(ref, noise, y, sampler))
    slim = DualHeadDiT.from_pretrained(str(tmp_path / "slim"))
    assert slim.head_v is None and slim.cfg.heads == "u"
    assert torch.equal(
        sample(slim, noise, y, SamplerConfig("two_step")), sample(ref, noise, y, SamplerConfig("two_step"))
    )
    config_json = json.loads((tmp_path / "slim" / "config.json").read_text())
    assert config_json["dumo"]["v_head_dropped"] and config_json["dumo"]["class_names"][:2] == ["0", "1"]
    wide = DualHeadDiT.from_pretrained(str(tmp_path / "full"), device="cpu", dtype=torch.float64)
    assert wide.pos_embed.dtype == torch.float64 and not wide.pos_embed.requires_grad and not wide.training
    x64 = sample(wide, noise.double(), y, SamplerConfig("one_step", state_dtype="float64"))
    assert torch.allclose(x64.float(), sample(ref, noise, y, SamplerConfig("one_step")), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a directory written by `dumo export`"):
        DualHeadDiT.from_pretrained(str(tmp_path))


def test_a_checkpoint_written_before_the_switch_keeps_its_table(root) -> None:
    old = _model(seed=5, pos_embed_axes="yx")  # the network as the project built it then
    url = _write_checkpoint(root, "legacy", 40, old, legacy=True)
    assert "pos_embed_axes" not in json.loads(fs.read_text(fs.join(url, checkpoints.MODEL_FILE)))
    loaded = load_checkpoint_model(url)
    assert loaded.cfg.pos_embed_axes == "yx"
    assert torch.equal(loaded.pos_embed[0], sincos_pos_embed_2d(32, 4, "yx"))
    gen = torch.Generator().manual_seed(0)
    noise, y = torch.randn(6, 1, 8, 8, generator=gen), torch.arange(6)
    assert torch.equal(sample(loaded, noise, y, SamplerConfig()), sample(old, noise, y, SamplerConfig()))
    # with DiT's table the same weights give other samples: the record must not be made with it
    assert not torch.allclose(sample(_model(seed=5), noise, y, SamplerConfig()), sample(old, noise, y, SamplerConfig()))
    # resuming: the run's config does not set the field, so the run keeps the checkpoint's table
    cfg = config(root, "legacy", *[f"model.{k}={v}" for k, v in SMALL.items()])
    saved = json.loads(fs.read_text(fs.join(url, checkpoints.MODEL_FILE)))
    fresh = build_model("debug", **SMALL, input_size=8, in_channels=1, num_classes=10).cfg
    assert fresh.pos_embed_axes == "xy"
    model_cfg, saved_full = resume_config(cfg.model, fresh, saved)
    assert model_cfg.pos_embed_axes == "yx"
    state = {"zero_stage": 2, "precision": "fp32", "world_size": 1}
    check_resumable(state, cfg.train, asdict(model_cfg), saved_full, url)  # no "another network"
    explicit = config(root, "legacy", *[f"model.{k}={v}" for k, v in SMALL.items()], "model.pos_embed_axes=xy")
    model_cfg, saved_full = resume_config(explicit.model, fresh, saved)
    with pytest.raises(ValueError, match=r"holds another network \(differs in \['pos_embed_axes'\]\)"):
        check_resumable(state, explicit.train, asdict(model_cfg), saved_full, url)


@pytest.mark.slow
def test_a_run_started_from_a_sit_file_trains_samples_and_exports(root, tmp_path, monkeypatch) -> None:
    from tasks.train import train_run

    monkeypatch.setenv("DUMO_STAGING_DIR", str(tmp_path / "staging"))
    monkeypatch.setenv("DUMO_NO_PROGRESS", "1")
    torch.manual_seed(0)
    sit = RefDiT(input_size=8, in_channels=1, patch_size=2, num_classes=10, **SMALL).eval()
    torch.save(sit.state_dict(), tmp_path / "SiT-tiny-8x8.pt")
    sets = [f"model.{k}={v}" for k, v in SMALL.items()]
    sets += [f"model.init_from={tmp_path / 'SiT-tiny-8x8.pt'}", "model.time_scale=1", "train.lr=1e-12"]
    sets += ["train.num_steps=2", "train.checkpoint_every=2", "train.zero_stage=2"]
    result = train_run(config(root, "from-sit", *sets))
    url = result.checkpoint_url
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 1, 8, 8, generator=gen), torch.rand(6, generator=gen)
    y = torch.arange(6)
    with torch.no_grad():
        expected = -sit(x, 1 - t, y)[:, :1]  # SiT's prediction under our conventions
        for weights in ("ema", "raw"):  # lr 1e-12: two steps leave the loaded weights in place
            model = load_checkpoint_model(url, weights)
            out = model(x, t, t * 0.5, y)
            assert (out.v - expected).abs().max() <= 2e-5 * expected.abs().max(), weights
            assert (out.u - expected).abs().max() <= 2e-5 * expected.abs().max(), weights  # u head: a copy
    assert checkpoints.read_marker(url)["step"] == 2
    export_checkpoint(url, str(tmp_path / "raw-export"), weights="raw")
    loaded = DualHeadDiT.from_pretrained(str(tmp_path / "raw-export"))
    noise = torch.randn(4, 1, 8, 8, generator=gen)
    raw = load_checkpoint_model(url, "raw")
    assert torch.equal(sample(loaded, noise, y[:4], SamplerConfig()), sample(raw, noise, y[:4], SamplerConfig()))
    assert cli(["sample", url, "--weights", "raw", "--per-class", "2", "--out", str(tmp_path / "g")]) == 0
    assert _npz(str(tmp_path / "g.npz"))["images"].shape == (20, 8, 8, 3)
