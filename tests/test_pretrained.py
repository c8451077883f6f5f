"""Starting from released DiT and SiT checkpoints, and the position table.

The "released" state dicts come from a small reference network written here after DiT's and SiT's
``models.py`` (timm's key names, ``learn_sigma`` output of 2C channels in (p, q, c) order, a label table of
num_classes + 1 rows, the position table built with numpy's meshgrid as they build it), at random weights:
nothing is downloaded. The converted DuMo model must give that network's prediction under ALGORITHM.md's
conventions (v = e - x, t = 1 noise).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dumo_model.dit import build_model, sincos_pos_embed_2d
from dumo_model.pretrained import PretrainedError, fold_reversed_time, init_from_released, released_shapes
from storage.pretrained import read_state_file
from tasks.config import load_config

TINY = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def reference_table(dim: int, grid: int) -> np.ndarray:
    """DiT/MAE's table: meshgrid(w, h) puts the column coordinate first; each half is [sin, cos]."""
    grid_w, grid_h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def one(pos: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(grid_w, dim // 2), one(grid_h, dim // 2)], axis=1)


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        def ln(z):
            return F.layer_norm(z, z.shape[-1:], eps=1e-6)

        def mod(z, shift, scale):
            return z * (1 + scale[:, None]) + shift[:, None]

        s1, c1, g1, s2, c2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        b, n, d = x.shape
        h = mod(ln(x), s1, c1)
        q, k, v = self.attn.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1[:, None] * self.attn.proj(a)
        h = self.mlp.fc2(F.gelu(self.mlp.fc1(mod(ln(x), s2, c2)), approximate="tanh"))
        return x + g2[:, None] * h


class RefDiT(nn.Module):
    """DiT/SiT at ``learn_sigma=True``: forward returns all 2C channels, timesteps embedded raw."""

    def __init__(self, input_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes):
        super().__init__()
        d, p, c = hidden_size, patch_size, in_channels
        self.p, self.c_out = p, 2 * c
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(c, d, p, p)
        grid = input_size // p
        self.pos_embed = nn.Parameter(torch.from_numpy(reference_table(d, grid)).float()[None], requires_grad=False)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, d)
        self.blocks = nn.ModuleList([RefBlock(d, num_heads) for _ in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(d, p * p * 2 * c)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        with torch.no_grad():  # random everywhere (adaLN-Zero would make every output 0)
            for name, prm in self.named_parameters():
                if name != "pos_embed":
                    prm.normal_(0, 0.2 if prm.ndim > 1 else 0.05)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        c = self.t_embedder.mlp(feats.to(self.t_embedder.mlp[0].weight.dtype))
        c = c + self.y_embedder.embedding_table(y)
        h = self.x_embedder.proj(x.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h = self.final_layer.linear(F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
        g, p = int(h.shape[1] ** 0.5), self.p
        h = h.reshape(len(h), g, g, p, p, self.c_out)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(len(h), self.c_out, g * p, g * p)


def _inputs(n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=gen)
    t = torch.rand(n, generator=gen)
    r = t * torch.rand(n, generator=gen)
    y = torch.randint(0, 11, (n,), generator=gen)  # 10 = the null class
    return x, t, r, y


@pytest.fixture(scope="module")
def reference() -> RefDiT:
    torch.manual_seed(0)
    return RefDiT(**TINY).eval()


def test_position_table_is_dits_axis_order() -> None:
    ours = sincos_pos_embed_2d(64, 4, "xy").double().numpy()
    assert np.abs(ours - reference_table(64, 4)).max() < 1e-6
    legacy = sincos_pos_embed_2d(64, 4, "yx").double().numpy()
    assert np.abs(legacy - reference_table(64, 4)).max() > 0.5  # the project's table before the fix
    assert np.allclose(legacy[:, :32], ours[:, 32:]) and np.allclose(legacy[:, 32:], ours[:, :32])


@torch.no_grad()
def test_sit_checkpoint_gives_sits_velocity_under_our_conventions(reference) -> None:
    model = build_model("debug", **TINY, time_scale=1.0).eval()
    report = init_from_released(model, reference.state_dict(), "sit")
    x, t, r, y = _inputs()
    out = model(x, t, r, y)
    # SiT: x_s = s x + (1 - s) e, predicts x - e, raw s; ours: t = 1 - s, v = e - x
    expected = -reference(x, 1 - t, y)[:, :4]
    # float32 tolerance: measured 1.5e-4 on outputs up to 14.7 (1.8e-5 in float64, where the float32
    # sinusoidal features remain); the fold itself is exact (test_time_reversal_fold_is_exact)
    assert (out.v - expected).abs().max() <= 2e-5 * expected.abs().max()
    assert (out.v - reference(x, t, y)[:, :4].neg()).abs().max() > 0.1  # without the fold it would not match
    assert torch.equal(out.u, out.v)  # u head: a copy of the v head
    again = model(x, t, torch.zeros_like(r), y)  # emb_h's output layer starts at zero: r changes nothing
    assert torch.equal(again.v, out.v)
    assert report.tensors_mapped == len(released_shapes(model)) - 1  # all but pos_embed (checked, rebuilt)
    assert report.time_fold and report.head_negated and report.output_channels_kept == "4 of 8 (learn_sigma)"


@torch.no_grad()
def test_dit_checkpoint_gives_dits_output_at_time_scale_1000(reference) -> None:
    model = build_model("debug", **TINY, time_scale=1000.0).eval()
    init_from_released(model, reference.state_dict(), "dit", u_head="zero")
    x, _, r, y = _inputs()
    steps = torch.tensor([0.0, 125.0, 250.0, 500.0, 875.0, 999.0])  # DiT's integer timesteps; step/1000 exact-ish
    out = model(x, steps / 1000, r * 0, y)
    expected = reference(x, steps, y)[:, :4]  # DiT's noise prediction
    assert torch.equal(out.v, expected)  # bit-identical (measured: max difference 0.0 in float32 and float64)
    assert torch.count_nonzero(out.u) == 0  # u head zero


@torch.no_grad()
def test_time_reversal_fold_is_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=gen, dtype=torch.float64)
    t = torch.rand(50, generator=gen, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128).double()

    def feats(s: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.cos(s[:, None] * freqs), torch.sin(s[:, None] * freqs)], dim=1)

    assert torch.allclose(feats(t) @ fold_reversed_time(w).T, feats(1 - t) @ w.T, atol=1e-12, rtol=0)


def test_zero_v_head_and_one_head_models(reference) -> None:
    model = build_model("debug", **TINY, time_scale=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_from_released(model, reference.state_dict(), "sit", v_head="zero", u_head="zero")
    for name in ("head_v.linear.weight", "head_u.linear.weight"):
        assert torch.equal(model.state_dict()[name], before[name]) and torch.count_nonzero(before[name]) == 0
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    # MeanFlow (one u head on (t, r)): the checkpoint's velocity head becomes u, which at r = t is a velocity
    meanflow = build_model("debug", **TINY, time_scale=1.0, heads="u").eval()
    init_from_released(meanflow, reference.state_dict(), "sit")
    x, t, _, y = _inputs()
    with torch.no_grad():
        expected = -reference(x, 1 - t, y)[:, :4]
        assert (meanflow(x, t, t, y).u - expected).abs().max() <= 2e-5 * expected.abs().max()


def _refused(model, state, fmt, match) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError, match=match):
        init_from_released(model, state, fmt)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded, not even partly


def test_wrong_checkpoints_are_refused_whole(reference) -> None:
    model = build_model("debug", **TINY, time_scale=1.0)
    good = reference.state_dict()
    _refused(model, {k: v for k, v in good.items() if k != "blocks.1.mlp.fc2.bias"}, "sit", r"missing \['blocks.1")
    _refused(model, {**good, "blocks.2.attn.qkv.weight": good["blocks.1.attn.qkv.weight"]}, "sit", "unexpected")
    wide = dict(good, **{"y_embedder.embedding_table.weight": torch.zeros(1001, 64)})
    _refused(
        model, wide, "sit", r"y_embedder.embedding_table.weight has shape \(1001, 64\), this model needs \(11, 64\)"
    )
    swapped = dict(good, pos_embed=sincos_pos_embed_2d(64, 4, "yx")[None])
    _refused(model, swapped, "sit", "pos_embed differs")
    _refused(model, good, "dit", r"needs model.time_scale=1000")
    _refused(model, {"step": torch.tensor(1)}, "sit", "missing")
    with pytest.raises(PretrainedError, match="no state dict"):
        init_from_released(model, {"args": object()}, "sit")


def test_training_checkpoint_and_file_formats(reference, tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(3)  # the same random h_embedder input layer (not in the checkpoint) in both
    model = build_model("debug", **TINY, time_scale=1.0).eval()
    torch.save({"model": {}, "ema": reference.state_dict(), "opt": {}}, tmp_path / "SiT-train.pt")
    init_from_released(model, read_state_file(str(tmp_path / "SiT-train.pt")), "sit")
    torch.manual_seed(3)
    other = build_model("debug", **TINY, time_scale=1.0).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "sit.safetensors")
    init_from_released(other, read_state_file(str(tmp_path / "sit.safetensors")), "sit")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a PyTorch state-dict file"):
        read_state_file(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        read_state_file(str(tmp_path / "absent.pt"))


def test_xl2_checkpoint_maps_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = build_model("DuMo-XL/2", time_scale=1.0)
        plain_dit = build_model("DuMo-XL/2", heads="v")
        state = {k: torch.empty(s) for k, s in released_shapes(model).items()}
    report = init_from_released(model, state, "sit")
    # everything but pos_embed, with the final layer cut to 4 of 8 channels: a plain DiT-XL/2 without positions
    expected = sum(p.numel() for n, p in plain_dit.named_parameters() if n != "pos_embed")
    assert report.parameters_mapped == expected
    released = sum(math.prod(s) for s in released_shapes(model).values())
    assert released == 675_129_632  # DiT-XL/2 (learn_sigma), as DiT's train.py prints it
    assert expected + 256 * 1152 + 16 * 1152 + 16 == released  # + positions + the dropped sigma channels
    assert model.blocks[27].attn.qkv.weight.is_meta


def test_config_tells_the_format_and_its_time_scale() -> None:
    cfg = load_config("imagenet256-xl2-from-sit")
    assert cfg.model.source_format == "sit" and cfg.model.init_u_head == "copy"
    # DiT embeds t at 1000, where only the JVP derivative is accurate (bench/numerics.py)
    sets = ["model.init_from=/m/DiT-XL-2-256x256.pt", "model.time_scale=1000", "objective.derivative=jvp"]
    assert load_config("demo", sets).model.source_format == "dit"
    with pytest.raises(ValueError, match="set model.time_scale=1"):
        load_config(
            "demo", ["model.init_from=/m/SiT-XL-2-256x256.pt", "model.time_scale=1000", "objective.derivative=jvp"]
        )
    with pytest.raises(ValueError, match="set model.init_format to dit or sit"):
        load_config("demo", ["model.init_from=/m/weights.pt"])
