"""Objectives: the u-target on a flow whose average velocity is known in closed form, finite difference
against JVP, time sampling, training-time guidance, weighting, and a learned 2-D toy."""

from __future__ import annotations

import pytest
import torch

from dumo_model import Objective, ObjectiveConfig, SamplerConfig, build_model, sample
from dumo_model.objectives import flow_map, u_target
from tests.test_model import randomize
from tests.toy2d import CENTERS, energy_distance, toy_data, toy_model, train_toy

# Data x ~ N(m, s^2 I), noise e ~ N(0, I), x_t = (1 - t) x + t e. The probability-flow ODE keeps the
# standardised coordinate (x_t - (1 - t) m) / sigma_t fixed, sigma_t^2 = (1 - t)^2 s^2 + t^2, so
# x_r = (1 - r) m + sigma_r / sigma_t (x_t - (1 - t) m) and u = (x_t - x_r) / (t - r) exactly.
M, S = 0.7, 0.4


def _b(a, like):
    return a.reshape(-1, *([1] * (like.dim() - 1)))


def sigma(t):
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def exact_u(x_t, t, r):
    x_r = (1 - _b(r, x_t)) * M + _b(sigma(r) / sigma(t), x_t) * (x_t - (1 - _b(t, x_t)) * M)
    return (x_t - x_r) / _b(t - r, x_t)


def exact_v(x_t, t):
    dsigma = (t - (1 - t) * S**2) / sigma(t)
    return -M + _b(dsigma / sigma(t), x_t) * (x_t - (1 - _b(t, x_t)) * M)


def gaussian_problem(n=64, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = M + S * torch.randn(n, 1, 4, 4, generator=gen, dtype=dtype)
    e = torch.randn(n, 1, 4, 4, generator=gen, dtype=dtype)
    t = 0.05 + 0.9 * torch.rand(n, generator=gen, dtype=dtype)
    r = t * torch.rand(n, generator=gen, dtype=dtype) * 0.9
    x_t = (1 - _b(t, x)) * x + _b(t, x) * e
    return x_t, t, r


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp", "forward_difference"])
def test_u_target_of_the_exact_flow_map_is_the_exact_flow_map(derivative):
    x_t, t, r = gaussian_problem()
    truth = exact_u(x_t, t, r)
    if derivative == "forward_difference":  # one-sided: first-order accurate in eps
        target = u_target(exact_u, x_t, t, r, exact_v(x_t, t), eps=1e-4, u_here=truth)
    else:
        target = u_target(exact_u, x_t, t, r, exact_v(x_t, t), derivative=derivative)
    assert torch.allclose(target, truth, atol=1e-4, rtol=1e-4)
    derivative = "jvp" if derivative == "jvp" else "finite_difference"
    # ...and a wrong flow map (the velocity used as the average) is not reproduced: the check can fail.
    wrong = u_target(lambda xx, tt, rr: exact_v(xx, tt), x_t, t, r, exact_v(x_t, t), derivative=derivative)
    assert (wrong - truth).abs().max() > 1e-2


def test_exact_flow_map_tends_to_the_velocity_as_r_tends_to_t():
    x_t, t, _ = gaussian_problem()
    assert torch.allclose(exact_u(x_t, t, t - 1e-6), exact_v(x_t, t), atol=1e-4)


def test_finite_difference_and_jvp_agree_on_a_random_network():
    # time_scale=1: with 1000 the top sinusoid of t turns 1000 rad per unit t, which no eps resolves on a
    # random network (a trained one learns to be smooth in t; see docs/model.md).
    model = randomize(build_model("debug", attention="math", time_scale=1.0)).double()
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(8, generator=gen, dtype=torch.float64)
    r = t * torch.rand(8, generator=gen, dtype=torch.float64)
    w = torch.randn_like(x_t)
    u_fn = flow_map(model, torch.randint(0, 10, (8,), generator=gen))
    fd = u_target(u_fn, x_t, t, r, w, "finite_difference", eps=1e-3)
    jvp = u_target(u_fn, x_t, t, r, w, "jvp")
    assert torch.allclose(fd, jvp, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(jvp, w)  # the derivative term is not trivially zero


def test_dumo_losses_agree_between_finite_difference_and_jvp():
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    model = randomize(build_model("debug", time_scale=1.0))
    out = {}
    for d in ("finite_difference", "jvp"):
        obj = Objective(ObjectiveConfig(derivative=d, weighting="none"), num_classes=10)
        out[d] = obj(model, x, y, torch.Generator().manual_seed(5))
    assert torch.allclose(out["jvp"]["loss_v"], out["finite_difference"]["loss_v"])
    assert torch.allclose(out["jvp"]["loss_u"], out["finite_difference"]["loss_u"], rtol=1e-3)


def test_time_sampling_dumo_trains_every_sample_on_r_below_t_meanflow_splits():
    n, gen = 20000, torch.Generator().manual_seed(0)
    t, r = Objective(ObjectiveConfig(), 10).sample_times(n, torch.device("cpu"), False, gen)
    assert (r < t).all() and (r >= 0).all() and (t <= 1).all()
    assert abs(t.logit().mean().item() - (-0.4)) < 0.05 and abs(t.logit().std().item() - 1.0) < 0.05
    t, r = Objective(ObjectiveConfig(name="meanflow"), 10).sample_times(n, torch.device("cpu"), False, gen)
    assert abs((r == t).float().mean().item() - 0.75) < 0.02
    t, r = Objective(ObjectiveConfig(), 10).sample_times(n, torch.device("cpu"), True, gen)
    assert (r == 0).all()


def test_training_time_guidance_target():
    cfg = ObjectiveConfig(guidance_omega=0.2, guidance_kappa=0.5, guidance_t_max=0.75)
    obj = Objective(cfg, num_classes=10)
    model = randomize(build_model("debug"))
    gen = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(6, 1, 8, 8, generator=gen), torch.randn(6, 1, 8, 8, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.7, 0.8, 0.3, 0.9])
    y = torch.tensor([1, 2, 3, 4, 10, 5])  # sample 4 carries the null label: no guidance there
    v_cond = torch.randn_like(v)
    with torch.no_grad():
        v_null = model(x_t, t, t, torch.full_like(y, 10)).v
    got = obj.velocity_target(model, x_t, t, t, y, v, v_cond)
    guided = 0.2 * v + 0.5 * v_cond + 0.3 * v_null
    for i, use in enumerate([True, True, True, False, False, False]):
        assert torch.allclose(got[i], guided[i] if use else v[i], atol=1e-6), i


def test_adaptive_weighting_scales_the_gradient_by_one_over_loss_plus_c():
    obj = Objective(ObjectiveConfig(weighting="adaptive", adaptive_c=0.01), 10)
    loss = torch.tensor([0.5, 3.0], requires_grad=True)
    obj.weight(loss).sum().backward()
    assert torch.allclose(loss.grad, 1 / (loss.detach() + 0.01))


def test_bad_switch_values_are_refused():
    with pytest.raises(ValueError, match="fd_eps"):
        ObjectiveConfig(fd_eps=0.0)
    with pytest.raises(ValueError, match="head"):
        ObjectiveConfig(name="meanflow", velocity_in_target="head")


@pytest.mark.parametrize("name,heads", [("flow_matching", "v"), ("meanflow", "u"), ("dumo", "dual")])
def test_every_objective_backpropagates_into_its_heads(name, heads):
    model = randomize(build_model("debug", heads=heads))
    out = Objective(ObjectiveConfig(name=name), 10)(model, torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for head in (model.head_v, model.head_u):
        if head is not None:
            assert head.linear.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- 2-D toy


def toy_one_step_distance(model, seed=1) -> float:
    """Worst over classes of the energy distance between 1-step samples and fresh data of that class."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for k in range(CENTERS.shape[0]):
        y = torch.full((400,), k)
        x1 = sample(model, torch.randn(400, 2, 1, 1, generator=gen), y, SamplerConfig("one_step")).reshape(-1, 2)
        ref, ys = toy_data(4000, gen)
        worst = max(worst, energy_distance(x1, ref.reshape(-1, 2)[ys == k][:400]))
    return worst


THRESHOLD = 0.5  # untrained: >= 1.0; real data against itself: ~0.01; trained 600 steps: ~0.2-0.3


def test_untrained_model_fails_the_toy_check():
    assert toy_one_step_distance(toy_model().eval()) > THRESHOLD


@pytest.mark.slow
def test_dumo_learns_a_class_conditional_2d_mixture_in_one_step():
    model = train_toy(600, "dumo", seed=0)
    assert toy_one_step_distance(model) < THRESHOLD


# ---------------------------------------------------------------------------------------------- digits


@pytest.mark.slow
def test_demo_recipe_learns_the_digits_and_its_ema_samples_them_in_one_step():
    """The demo's network and optimiser on the scikit-learn digits, in-process (no DeepSpeed): the 1-step
    samples of the EMA weights are recognised as their class (0.933 at 400 steps; the test asks 0.85). Without
    EMA warm-up they score ~0.1."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from dumo_model import EMA

    digits = load_digits()
    x_all = torch.tensor(digits.images / 16.0 * 2 - 1, dtype=torch.float32)[:, None]  # pixels in [-1, 1]
    y_all = torch.tensor(digits.target)
    judge = LogisticRegression(max_iter=3000).fit(x_all.flatten(1).numpy(), y_all.numpy())
    torch.manual_seed(0)
    model = build_model("debug", hidden_size=128, depth=4, num_heads=4, time_scale=1.0)
    obj = Objective(ObjectiveConfig(derivative="finite_difference", label_dropout=0.0), num_classes=10)  # the demo's
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    ema = EMA(model, decay=0.999)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(x_all), (128,), generator=gen)
        loss = obj(model, x_all[idx], y_all[idx], gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
    ema.copy_to(model)
    y = torch.arange(10).repeat(30)
    noise = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    x1 = sample(model.eval(), noise, y, SamplerConfig("one_step")).clamp(-1, 1)
    accuracy = (judge.predict(x1.flatten(1).numpy()) == y.numpy()).mean()
    assert accuracy >= 0.85, accuracy
