"""A 2-D class-conditional toy: each class is a mixture of two Gaussians. Points are fed to the DiT as
(N, 2, 1, 1) "images" (one token, patch 1), so the toy exercises the real model, objective and sampler."""

from __future__ import annotations

import torch

from dumo_model import Objective, ObjectiveConfig, build_model
from dumo_model.ema import EMA

CENTERS = torch.tensor([[[-2.0, -2.0], [-2.0, 2.0]], [[2.0, 2.0], [2.0, -2.0]], [[0.0, 0.0], [0.0, 3.0]]])
SPREAD = 0.3


def toy_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, CENTERS.shape[0], (n,), generator=gen)
    mode = torch.randint(0, 2, (n,), generator=gen)
    x = CENTERS[y, mode] + SPREAD * torch.randn(n, 2, generator=gen)
    return x.reshape(n, 2, 1, 1), y


def toy_model(**overrides):
    kw = dict(
        input_size=1,
        patch_size=1,
        in_channels=2,
        num_classes=CENTERS.shape[0],
        hidden_size=64,
        depth=2,
        num_heads=4,
        time_scale=1000.0,
    )
    kw.update(overrides)
    return build_model("debug", **kw)


def train_toy(
    num_steps: int, objective: str = "dumo", seed: int = 0, batch: int = 256, lr: float = 2e-3, **objective_kw
):
    torch.manual_seed(seed)
    heads = {"dumo": "dual", "meanflow": "u", "flow_matching": "v"}[objective]
    model = toy_model(heads=heads)
    # The finite difference this toy was calibrated with (its threshold predates the JVP default).
    kw = {"derivative": "finite_difference", **objective_kw}
    obj = Objective(ObjectiveConfig(name=objective, label_dropout=0.0, **kw), CENTERS.shape[0])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    ema = EMA(model, decay=0.99)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        x, y = toy_data(batch, gen)
        loss = obj(model, x, y, gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
    ema.copy_to(model)
    return model.eval()


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance between two point sets (N, 2): 0 for equal distributions."""
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
