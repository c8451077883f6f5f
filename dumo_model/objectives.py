"""Training objectives on one shared backbone: ``dumo``, ``meanflow`` and ``flow_matching``.

Notation of ALGORITHM.md: x data, e noise, x_t = (1 - t) x + t e, v = e - x, flow map u(x_t, t, r) with
x_r = x_t - (t - r) u. MeanFlow identity: u = v - (t - r) d/dt u, the total derivative taken along the
tangent (dx_t/dt, dt/dt, dr/dt) = (v, 1, 0).

DuMo (arXiv 2602.17682; objective as written in arXiv 2604.20796 eq. 8) trains both heads on every sample:
    L = lambda_v ||v_theta(x_t, t) - v_tgt||^2 + lambda_u ||u_theta(x_t, t, r) - sg(u_tgt)||^2,
    u_tgt = v_tgt - (t - r) d/dt u_theta(x_t, t, r).
Every default below is a choice of the lineage (MeanFlow, UCGM), not a value the DuMo paper states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from dumo_model.dit import Heads

# The objectives, and the heads each one trains (dual: v and u; u: MeanFlow's one flow-map head; v: a plain
# DiT). The one list of objective names: the config's Literal and the CLI's choices derive from it.
HEADS_OF_OBJECTIVE: dict[str, Heads] = {"dumo": "dual", "meanflow": "u", "flow_matching": "v"}
ObjectiveName = Literal[tuple(HEADS_OF_OBJECTIVE)]  # type: ignore[valid-type]
Derivative = Literal["finite_difference", "jvp"]
FDScheme = Literal["central", "forward"]
VelocityInTarget = Literal["ground_truth", "head"]
Weighting = Literal["none", "adaptive", "pseudo_huber"]
Reduction = Literal["sum", "mean"]

# A flow map as a function of (x_t, t, r) -> u, with any labels already bound.
FlowMap = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ObjectiveConfig:
    name: ObjectiveName = "dumo"
    # jvp: forward-mode AD, MeanFlow's way. Chosen as the default from bench/numerics.py: it stays right in
    # bf16 and at either time_scale, where a finite difference of bf16 outputs is 32-80% off and one at
    # time_scale 1000 is ~100% off even in fp32. finite_difference is right (3e-5) in fp32 at time_scale 1,
    # and cheaper there on a CPU: the demo uses it. Needs ZeRO 0-2 (docs/model.md).
    derivative: Derivative = "jvp"
    fd_eps: float = 0.005
    # central: [u(t + eps) - u(t - eps)] / 2 eps, two extra no-grad points (ALGORITHM.md's default);
    # forward: [u(t + eps) - u(t)] / eps reusing the trained pass's u(t): one extra point, O(eps) error.
    fd_scheme: FDScheme = "central"
    velocity_in_target: VelocityInTarget = "ground_truth"
    clamp_derivative: bool = False  # clamp (t - r) du/dt to [-1, 1]
    weighting: Weighting = "adaptive"
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-2  # also the c of pseudo_huber
    reduction: Reduction = "sum"  # per-sample squared error summed (lineage) or averaged over elements
    lambda_v: float = 1.0
    lambda_u: float = 1.0
    time_mu: float = -0.4  # t = sigmoid(N(time_mu, time_sigma^2))
    time_sigma: float = 1.0
    meanflow_equal_fraction: float = 0.75  # meanflow only: share of samples with r = t
    label_dropout: float = 0.1
    guidance_omega: float = 1.0  # omega = 1, kappa = 0: training-time guidance off
    guidance_kappa: float = 0.0
    guidance_t_max: float = 0.75

    def __post_init__(self) -> None:
        if self.fd_eps <= 0 or self.fd_eps >= 0.5:
            raise ValueError(f"fd_eps must be in (0, 0.5), got {self.fd_eps}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0 <= self.meanflow_equal_fraction <= 1:
            raise ValueError(f"meanflow_equal_fraction must be in [0, 1], got {self.meanflow_equal_fraction}")
        if self.velocity_in_target == "head" and self.name != "dumo":
            raise ValueError("velocity_in_target='head' needs the v head of the dual model (name='dumo')")
        null_weight = 1 - self.guidance_omega - self.guidance_kappa
        if self.guidance_on and null_weight != 0 and self.label_dropout == 0:
            raise ValueError(
                f"training-time guidance (omega {self.guidance_omega}, kappa {self.guidance_kappa}) weighs the"
                f" null class by {null_weight:g}, which label_dropout 0 never trains; set objective.label_dropout"
                " (0.1 is the lineage's) or turn guidance off (guidance_omega 1, guidance_kappa 0)"
            )

    @property
    def guidance_on(self) -> bool:
        return self.guidance_omega != 1.0 or self.guidance_kappa != 0.0


def forward_equivalents(cfg: ObjectiveConfig, attention_share: float = 0.0) -> float:
    """Forward passes per sample of one training step, counted from the algorithm, not timed. The trained
    pass is 3 (forward + backward). A central finite difference adds 2 no-grad passes, the forward scheme 1
    (meanflow: only on its share of samples with r < t). JVP adds 1 tangent pass: forward-mode through a
    linear layer is one more product of the same size, but through attention's two token-by-token products
    (``attention_share`` of a forward's FLOPs) it is two, so that share counts once more. Training-time
    guidance adds the null-class velocity, and a conditional velocity where the u-target needs it first."""
    if cfg.name == "flow_matching":
        return 3.0 + (1.0 if cfg.guidance_on else 0.0)
    if cfg.derivative == "jvp":
        extra = 1.0 + attention_share
        if cfg.guidance_on or (cfg.name == "dumo" and cfg.velocity_in_target == "head"):
            extra += 1.0  # the conditional velocity, before the tangent (dumo's v head, meanflow's u at r = t)
        if cfg.guidance_on:
            extra += 1.0  # the null class
        return 3.0 + extra
    extra = 2.0 if cfg.fd_scheme == "central" else 1.0
    if cfg.name == "meanflow":
        extra *= 1 - cfg.meanflow_equal_fraction  # only samples with t > r are differentiated
    if cfg.guidance_on:
        extra += 2.0 if cfg.name == "meanflow" else 1.0  # meanflow's conditional velocity is one more pass
    return 3.0 + extra


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def finite_difference_dudt(
    u_fn: FlowMap,
    x_t: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    eps: float,
    u_here: torch.Tensor | None = None,
) -> torch.Tensor:
    """du/dt along (w, 1, 0) by finite difference, divided by the span actually taken: the plus point stops at
    t = 1 and the minus point at r, so u is never queried at a negative interval t - r it was never trained
    on. Without ``u_here``: central, both points in one batched forward. With ``u_here`` = u(x_t, t, r)
    already computed: one-sided, one extra forward (a step backwards, not past r, where t + eps passes 1)."""
    if u_here is not None:
        t_other = torch.where(t + eps <= 1.0, t + eps, torch.maximum(t - eps, r))
        x_other = x_t + _bcast(t_other - t, x_t) * w
        return (u_fn(x_other, t_other, r) - u_here) / _bcast(t_other - t, x_t)
    t_plus, t_minus = (t + eps).clamp(max=1.0), torch.maximum(t - eps, r)
    x_plus = x_t + _bcast(t_plus - t, x_t) * w
    x_minus = x_t + _bcast(t_minus - t, x_t) * w
    u_both = u_fn(torch.cat([x_plus, x_minus]), torch.cat([t_plus, t_minus]), torch.cat([r, r]))
    u_plus, u_minus = u_both.chunk(2)
    return (u_plus - u_minus) / _bcast(t_plus - t_minus, x_t)


def jvp_dudt(
    u_fn: FlowMap, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/dt) by forward-mode AD with tangent (w, 1, 0) (MeanFlow's way)."""
    return torch.func.jvp(u_fn, (x_t, t, r), (w, torch.ones_like(t), torch.zeros_like(r)))


def u_target(
    u_fn: FlowMap,
    x_t: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    derivative: Derivative = "finite_difference",
    eps: float = 0.005,
    clamp: bool = False,
    u_here: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MeanFlow-identity target u_tgt = w - (t - r) d/dt u(x_t, t, r), without gradient.
    Fed the exact flow map and the exact marginal velocity w, it returns the exact flow map.
    ``u_here`` (u at the point itself) switches the finite difference to one-sided."""
    with torch.no_grad():
        if derivative == "jvp":
            _, dudt = jvp_dudt(u_fn, x_t, t, r, w)
        else:
            dudt = finite_difference_dudt(u_fn, x_t, t, r, w, eps, u_here)
        term = _bcast(t - r, x_t) * dudt
        if clamp:
            term = term.clamp(-1.0, 1.0)
        return (w - term).detach()


def flow_map(net, y: torch.Tensor) -> FlowMap:
    """The u head as a function of (x_t, t, r), labels bound; a batch k times larger than y (the two
    points of a central difference) gets y repeated k times."""
    return lambda xx, tt, rr: net(xx, tt, rr, y.repeat(xx.shape[0] // y.shape[0]), heads=("u",)).u


class Objective:
    """Owns noise, time sampling, label dropout, guidance targets and weighting. Call it with the model
    (a DualHeadDiT, or a wrapper whose ``.module`` is one), clean latents x (N, C, H, W) and labels y (N,).
    Returns named terms: ``loss`` (to backpropagate), ``loss_v``, ``loss_u`` (unweighted per-sample
    squared error, batch mean, detached: for logs)."""

    def __init__(self, cfg: ObjectiveConfig, num_classes: int):
        self.cfg, self.null_class = cfg, num_classes
        self._inspect: dict[str, torch.Tensor] | None = None

    # -- sampling of the training problem -------------------------------------------------------
    def sample_times(
        self, n: int, device: torch.device, r_zero: bool, gen: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), each (n,). dumo: t logit-normal, r = t U(0, 1), so r < t on every sample (a lineage guess).
        meanflow, as its official code: two logit-normal draws, t = max, r = min, then r = t on
        ``meanflow_equal_fraction`` of the samples (E[t] 0.54 and P(r < 0.05 | r < t) 0.01 at the defaults,
        against 0.42 and 0.17 under dumo's law). flow_matching: r = t."""
        cfg = self.cfg

        def logit_normal() -> torch.Tensor:
            return torch.sigmoid(cfg.time_mu + cfg.time_sigma * torch.randn(n, device=device, generator=gen))

        t = logit_normal()
        if cfg.name == "flow_matching":
            r = t.clone()
        elif r_zero:
            r = torch.zeros_like(t)
        elif cfg.name == "meanflow":
            other = logit_normal()
            t, r = torch.maximum(t, other), torch.minimum(t, other)
            equal = torch.rand(n, device=device, generator=gen) < cfg.meanflow_equal_fraction
            r = torch.where(equal, t, r)
        else:
            r = t * torch.rand(n, device=device, generator=gen)  # r < t for every sample: no split
        return t, r

    def drop_labels(self, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.cfg.label_dropout == 0:
            return y
        drop = torch.rand(y.shape[0], device=y.device, generator=gen) < self.cfg.label_dropout
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32  # bf16 outputs: the loss in fp32
        sq = (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1)
        return sq.sum(1) if self.cfg.reduction == "sum" else sq.mean(1)  # (N,)

    def weight(self, loss: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.weighting == "adaptive":  # MeanFlow: loss / sg(loss + c)^p
            return loss / (loss.detach() + cfg.adaptive_c).pow(cfg.adaptive_p)
        if cfg.weighting == "pseudo_huber":
            return (loss + cfg.adaptive_c**2).sqrt() - cfg.adaptive_c
        return loss

    # -- the loss -------------------------------------------------------------------------------
    def __call__(
        self,
        model,
        x: torch.Tensor,
        y: torch.Tensor,
        gen: torch.Generator | None = None,
        inspect: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``inspect``, if given, receives the training problem and the u-target of this call (x_t, t, r, y,
        w, u_tgt), so a test or benchmark can check the target the step really used."""
        cfg = self.cfg
        net = getattr(model, "module", model)  # unwrap DeepSpeed/DDP for jvp and the config
        n = x.shape[0]
        # The state in float32 (float64 for a float64 network), whatever precision the network runs in.
        state = torch.float64 if net.pos_embed.dtype == torch.float64 else torch.float32
        x = x.to(state)
        e = torch.randn(x.shape, device=x.device, generator=gen).to(state)
        t, r = self.sample_times(n, x.device, net.cfg.r_input == "zero", gen)
        x_t = (1 - _bcast(t, x)) * x + _bcast(t, x) * e
        v = e - x
        y_in = self.drop_labels(y, gen)
        self._inspect = inspect
        if inspect is not None:
            inspect.update(x_t=x_t, t=t, r=r, y=y_in)

        if cfg.name != "flow_matching" and cfg.derivative == "jvp":
            return self.jvp_loss(net, x_t, t, r, y_in, v)

        out = model(x_t, t, r, y_in)
        if cfg.name == "flow_matching":
            v_tgt = self.velocity_target(net, x_t, t, r, y_in, v, out.v.detach())
            return self.combine(out.v, v_tgt, None, None)
        if cfg.name == "dumo":
            v_tgt = self.velocity_target(net, x_t, t, r, y_in, v, out.v.detach())
            w = out.v.detach() if cfg.velocity_in_target == "head" else v_tgt
            return self.combine(out.v, v_tgt, out.u, self.u_target_subset(net, y_in, x_t, t, r, w, out.u))
        # meanflow: one u head, whose velocity is u(x_t, t, t).
        v_tgt = self.velocity_target(net, x_t, t, t, y_in, v, self.meanflow_velocity(net, x_t, t, y_in))
        return self.combine(None, None, out.u, self.u_target_subset(net, y_in, x_t, t, r, v_tgt, out.u))

    def meanflow_velocity(self, net, x_t, t, y_in) -> torch.Tensor | None:
        if not self.cfg.guidance_on:
            return None
        with torch.no_grad():
            return net(x_t, t, t, y_in, heads=("u",)).u

    def jvp_loss(self, net, x_t, t, r, y_in, v) -> dict[str, torch.Tensor]:
        """One forward-mode call, with gradient, gives the heads and du/dt along (w, 1, 0) (MeanFlow's
        way). Runs on the unwrapped network with math attention (fused SDPA has no forward-mode AD)."""
        cfg = self.cfg
        dumo = cfg.name == "dumo"
        v_tgt = w = v
        if cfg.guidance_on or cfg.velocity_in_target == "head":  # the tangent needs these first
            with torch.no_grad():
                v_head = net(x_t, t, r, y_in, heads=("v",)).v if dumo else None
            v_cond = v_head if dumo else self.meanflow_velocity(net, x_t, t, y_in)
            v_tgt = self.velocity_target(net, x_t, t, r if dumo else t, y_in, v, v_cond)
            w = v_head if cfg.velocity_in_target == "head" else v_tgt
        heads = ("v", "u") if dumo else ("u",)
        fn = lambda xx, tt, rr: tuple(o for o in net(xx, tt, rr, y_in, heads=heads) if o is not None)
        with net.attention_impl("math"):
            outs, tangents = torch.func.jvp(fn, (x_t, t, r), (w, torch.ones_like(t), torch.zeros_like(r)))
        term = _bcast(t - r, x_t) * tangents[-1].detach()
        u_tgt = (w - (term.clamp(-1, 1) if cfg.clamp_derivative else term)).detach()
        self.record(w, u_tgt)
        return self.combine(outs[0] if dumo else None, v_tgt if dumo else None, outs[-1], u_tgt)

    def u_target_subset(self, net, y_in, x_t, t, r, w, u_pred) -> torch.Tensor:
        """Finite-difference u-target. Where t = r the derivative term is multiplied by zero and u_tgt = w
        exactly, so meanflow, whose split puts r = t on most samples, differentiates only the others (75% of
        its extra forward saved, for one host sync to find them). dumo has r < t on every sample: the whole
        batch goes through, with no sync on the hot path."""
        eps, clamp, forward = self.cfg.fd_eps, self.cfg.clamp_derivative, self.cfg.fd_scheme == "forward"
        u_here = u_pred.detach().to(x_t.dtype) if forward else None
        if self.cfg.name != "meanflow":
            return self.record(w, u_target(flow_map(net, y_in), x_t, t, r, w, "finite_difference", eps, clamp, u_here))
        u_tgt = w.detach().clone()
        gap = t > r
        if gap.any():
            idx = gap.nonzero().squeeze(1)
            sub = None if u_here is None else u_here[idx]
            u_tgt[idx] = u_target(
                flow_map(net, y_in[idx]), x_t[idx], t[idx], r[idx], w[idx], "finite_difference", eps, clamp, sub
            ).to(u_tgt.dtype)
        return self.record(w, u_tgt)

    def record(self, w: torch.Tensor, u_tgt: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_inspect", None) is not None:
            self._inspect.update(w=w.detach(), u_tgt=u_tgt)
        return u_tgt

    def velocity_target(self, net, x_t, t, r, y_in, v, v_cond) -> torch.Tensor:
        """v, or with training-time guidance (t <= t_max, label kept):
        omega v + kappa sg(v_theta(.|y)) + (1 - omega - kappa) sg(v_theta(.|null))."""
        cfg = self.cfg
        if not cfg.guidance_on:
            return v
        use = (t <= cfg.guidance_t_max) & (y_in != self.null_class)
        if not use.any():
            return v
        null = torch.full_like(y_in, self.null_class)
        with torch.no_grad():
            out = net(x_t, t, r, null, heads=("v",) if net.head_v is not None else ("u",))
            v_null = out.v if out.v is not None else out.u
        guided = cfg.guidance_omega * v + cfg.guidance_kappa * v_cond
        guided = guided + (1 - cfg.guidance_omega - cfg.guidance_kappa) * v_null
        return torch.where(_bcast(use, v), guided.detach(), v)

    def combine(self, v_pred, v_tgt, u_pred, u_tgt) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        if v_pred is not None:
            loss_v = self.per_sample(v_pred, v_tgt)
            total = total + cfg.lambda_v * self.weight(loss_v).mean()
            terms["loss_v"] = loss_v.mean().detach()
        if u_pred is not None:
            loss_u = self.per_sample(u_pred, u_tgt)
            total = total + cfg.lambda_u * self.weight(loss_u).mean()
            terms["loss_u"] = loss_u.mean().detach()
        terms["loss"] = total
        return terms
