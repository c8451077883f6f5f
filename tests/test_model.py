"""The model library: shapes, init, determinism, exact parameter counts, FLOP accounting, samplers, EMA."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dumo_model import EMA, SamplerConfig, build_model, sample
from dumo_model.info import forward_flops, parameters_by_part

# ALGORITHM.md: plain DiT / + second time embedder (MeanFlow) / + second head (DuMo), in millions.
PARAMS_M = {
    "DuMo-B/2": (130.50, 131.29, 132.48),
    "DuMo-M/2": (306.97, 308.28, 310.40),
    "DuMo-L/2": (458.09, 459.40, 461.51),
    "DuMo-XL/2": (675.11, 676.74, 679.41),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every trainable weight a random value (the init zeroes the heads, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def batch(n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    t = torch.rand(n, generator=gen)
    return x, t, t * torch.rand(n, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("preset", sorted(PARAMS_M))
def test_parameter_counts_match_algorithm_md(preset):
    for heads, expected in zip(("v", "u", "dual"), PARAMS_M[preset]):
        with torch.device("meta"):
            model = build_model(preset, heads=heads)
        assert round(parameters_by_part(model)["total"] / 1e6, 2) == expected, (preset, heads)


def test_parts_add_up_and_zero_r_input_drops_the_interval_embedder():
    with torch.device("meta"):
        model = build_model("DuMo-B/2")
        zero = build_model("DuMo-B/2", r_input="zero")
    parts = parameters_by_part(model)
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"]
    assert parameters_by_part(zero)["time embedder t - r"] == 0
    assert parts["head v"] == parts["head u"] > 0


def test_both_heads_have_the_input_shape_and_absent_heads_are_none():
    x, t, r, y = batch()
    out = randomize(build_model("debug"))(x, t, r, y)
    assert out.v.shape == out.u.shape == x.shape
    assert build_model("debug", heads="v")(x, t, r, y).u is None
    assert build_model("debug", heads="u")(x, t, r, y).v is None
    only_u = build_model("debug")(x, t, r, y, heads=("u",))
    assert only_u.v is None and only_u.u is not None


def test_output_is_exactly_zero_at_init():
    x, t, r, y = batch()
    out = build_model("debug")(x, t, r, y)
    assert torch.count_nonzero(out.v) == 0 and torch.count_nonzero(out.u) == 0


def test_same_seed_same_output_and_other_seed_differs():
    x, t, r, y = batch()
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = build_model("debug")
        torch.nn.init.normal_(model.head_u.linear.weight)  # init zeroes the heads: make the output depend on it
        torch.nn.init.normal_(model.head_u.adaLN_modulation[-1].weight)
        outs.append(model(x, t, r, y).u)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_u_head_depends_on_r_and_zero_r_input_ignores_it():
    x, t, r, y = batch()
    model = randomize(build_model("debug"))
    assert not torch.allclose(model(x, t, r, y).u, model(x, t, t, y).u)
    zero = randomize(build_model("debug", r_input="zero"))
    assert torch.equal(zero(x, t, r, y).u, zero(x, t, t, y).u)


def test_math_attention_matches_sdpa_and_gradient_checkpointing_matches_plain():
    x, t, r, y = batch()
    model = randomize(build_model("debug"))
    ref = model(x, t, r, y).u
    with model.attention_impl("math"):
        assert torch.allclose(model(x, t, r, y).u, ref, atol=1e-5)
    grads = []
    for ckpt in (False, True):
        m = randomize(build_model("debug", grad_checkpointing=ckpt)).train()
        m(x, t, r, y).u.square().sum().backward()
        grads.append(m.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("heads", ["dual", "u", "v"])
def test_analytic_flops_match_torch_flop_counter(heads):
    model = build_model("debug", heads=heads, attention="math", hidden_size=32, depth=2, num_heads=2)
    x, t, r, y = batch(n=3)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, r, y)
    # The counter sees matmuls and convolutions; the analytic count adds nothing else of note.
    assert counter.get_total_flops() == pytest.approx(3 * forward_flops(model.cfg)["total"], rel=0.02)


def test_model_info_cli_prints_the_paper_size(capsys):
    from flows.cli import main

    assert main(["model-info", "DuMo-XL/2"]) == 0
    out = capsys.readouterr().out
    assert "679,410,464" in out and "(679.41M)" in out


def test_unknown_preset_and_option_are_named():
    with pytest.raises(ValueError, match="DuMo-Q/2"):
        build_model("DuMo-Q/2")
    with pytest.raises(ValueError, match="hiden_size"):
        build_model("debug", hiden_size=3)


# ---------------------------------------------------------------------------------------------- samplers


def test_one_and_two_step_samplers_follow_the_flow_map_equations():
    model = randomize(build_model("debug")).eval()
    x, _, _, y = batch()
    e = torch.randn_like(x)
    ones, zeros, half = torch.ones(4), torch.zeros(4), torch.full((4,), 0.5)
    with torch.no_grad():
        expected1 = e - model(e, ones, zeros, y).u
        x_mid = e - 0.5 * model(e, ones, half, y).u
        expected2 = x_mid - 0.5 * model(x_mid, half, zeros, y).u
    assert torch.allclose(sample(model, e, y, SamplerConfig("one_step")), expected1, atol=1e-6)
    assert torch.allclose(sample(model, e, y, SamplerConfig("two_step", t_mid=0.5)), expected2, atol=1e-6)


def test_euler_with_one_step_equals_one_step_of_the_v_head_and_cfg_scale_one_is_no_guidance():
    model = randomize(build_model("debug")).eval()
    x, _, _, y = batch()
    e = torch.randn_like(x)
    with torch.no_grad():
        expected = e - model(e, torch.ones(4), torch.full((4,), 0.5), y).v  # v at t - r = t / 2 (v_interval)
    assert torch.allclose(sample(model, e, y, SamplerConfig("euler", num_steps=1)), expected, atol=1e-6)
    guided = sample(model, e, y, SamplerConfig("one_step", cfg_scale=2.0))
    assert not torch.allclose(guided, sample(model, e, y, SamplerConfig("one_step")))


def test_sampler_state_is_float32_even_for_a_bf16_network():
    model = randomize(build_model("debug")).eval().to(torch.bfloat16)
    x, _, _, y = batch()
    out = sample(model, torch.randn_like(x), y, SamplerConfig("two_step"))
    assert out.dtype == torch.float32
    assert (
        sample(model, torch.randn_like(x), y, SamplerConfig("one_step", state_dtype="float64")).dtype == torch.float64
    )


def test_renoise_sampler_for_zero_r_input_and_wrong_sampler_is_refused():
    model = randomize(build_model("debug", r_input="zero")).eval()
    x, _, _, y = batch()
    out = sample(model, torch.randn_like(x), y, SamplerConfig("renoise", num_steps=3), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="two_step"):
        sample(model, torch.randn_like(x), y, SamplerConfig("two_step"))
    with pytest.raises(ValueError, match="u head"):
        sample(build_model("debug", heads="v"), torch.randn_like(x), y, SamplerConfig("one_step"))


def test_ema_warmup_forgets_the_initial_weights():
    model = build_model("debug", hidden_size=32, depth=1, num_heads=2)
    plain, warm = EMA(model, decay=0.999, warmup=False), EMA(model, decay=0.999)
    with torch.no_grad():
        model.head_u.linear.weight.fill_(1.0)
    for _ in range(600):
        plain.update(model)
        warm.update(model)
    # 0.999^600 = 55% of the zero init stays without warm-up; with it, the product of the decays
    # (1 + n) / (10 + n), n < 600, is 9! / (601 x ... x 609): nothing.
    assert plain.shadow["head_u.linear.weight"].mean().item() == pytest.approx(1 - 0.999**600, rel=1e-3)
    assert warm.shadow["head_u.linear.weight"].mean().item() == pytest.approx(1.0, abs=1e-6)
    restored = EMA(model, decay=0.999)
    restored.load_state_dict(warm.state_dict(), num_updates=600)
    assert restored.current_decay() == warm.current_decay() == pytest.approx(601 / 610)
    assert EMA(model, decay=0.999).current_decay() == pytest.approx(0.1)


def test_ema_update_and_copy():
    model = build_model("debug", hidden_size=32, depth=1, num_heads=2)
    ema = EMA(model, decay=0.9, warmup=False)
    w = model.head_u.linear.weight
    with torch.no_grad():
        w.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["head_u.linear.weight"], torch.full_like(w, 0.1))
    target = build_model("debug", hidden_size=32, depth=1, num_heads=2)
    ema.copy_to(target)
    assert torch.allclose(target.head_u.linear.weight, torch.full_like(w, 0.1))
    assert "pos_embed" not in ema.shadow  # frozen positions are not averaged
