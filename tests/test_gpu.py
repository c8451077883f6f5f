"""The code paths that only run with a CUDA device: bf16 autocast and fused attention kernels against fp32,
the u-target's JVP derivative term in bf16 against a float64 reference, DeepSpeed's bf16 ZeRO-2 engine on
NCCL, sampling on the GPU, the trainer process with ``train.device: cuda``, the SD-VAE's bf16 autocast.

Every test is marked ``gpu`` and skipped where no CUDA device is visible (tests/conftest.py), as in CI.
Run on a GPU machine: ``pytest -m gpu tests/test_gpu.py`` (bench/gpu_check.sh does, among its parts).
Tolerances: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per operation); the outputs of a
network of a dozen blocks, compared as ||a - b|| / ||b|| over a batch, stay within a few percent. The
derivative-term limit is the one bench/numerics.py and tasks.config use (5%).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dumo_model import Objective, ObjectiveConfig, SamplerConfig, build_model, sample
from dumo_model.dit import DualHeadDiT

REPO = Path(__file__).resolve().parent.parent
LIMIT = 0.05  # bench/numerics.py LIMIT = tasks.config.MAX_DERIVATIVE_ERROR
pytestmark = pytest.mark.gpu
# Where the tests run and how deep the B/2 networks are. Only a dry run of this file's code on a machine
# without a GPU changes them (tests/test_gpu.py's functions called directly with DEV = "cpu"); pytest
# skips every test here without CUDA.
DEV = "cuda"
DEPTH: dict = {}


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 references in true fp32 (no TF32 tensor cores), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_net(preset: str = "DuMo-B/2", seed: int = 0, **overrides) -> DualHeadDiT:
    """The model's own init with its zero-initialised layers (adaLN modulations, heads) drawn N(0, 0.02),
    so that t, r, y and both heads reach the output (an all-zero head would make every comparison pass)."""
    torch.manual_seed(seed)
    model = build_model(preset, input_size=32, in_channels=4, **overrides)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def inputs(n: int, seed: int = 0, num_classes: int = 1000):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 32, 32, generator=gen)
    t = torch.rand(n, generator=gen).clamp(0.05, 0.95)
    r = t * torch.rand(n, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return [v.to(DEV) for v in (x, t, r, y)]


def test_bf16_autocast_forward_and_backward_agree_with_fp32_on_cuda():
    """DuMo-B/2 (full depth), both heads: bf16 autocast (fused SDPA in bf16) against the fp32 network."""
    model = random_net(**DEPTH).to(DEV)
    x, t, r, y = inputs(8)
    target = torch.randn_like(x)

    def run(bf16: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, r, y)
        loss = ((out.v.float() - target) ** 2).mean() + ((out.u.float() - target) ** 2).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.v.float().detach(), out.u.float().detach(), grads

    v32, u32, g32 = run(False)
    v16, u16, g16 = run(True)
    assert v16.dtype == torch.float32 and torch.isfinite(g16).all()
    errs = {"v": rel(v16, v32), "u": rel(u16, u32), "grad": rel(g16, g32)}
    print(f"bf16 autocast vs fp32, DuMo-B/2: {errs}")
    assert errs["v"] < 0.03 and errs["u"] < 0.03, errs
    assert errs["grad"] < 0.1, errs
    assert errs["v"] > 0  # autocast really ran in bf16 (identical outputs would mean it did not)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_kernels_agree_with_math_attention_on_cuda(dtype):
    """The sdpa path picks CUDA's flash / memory-efficient kernels; the math path is what JVP uses."""
    model = random_net(**{"depth": 4, **DEPTH}).to(device=DEV, dtype=dtype).eval()
    x, t, r, y = inputs(8)
    with torch.no_grad():
        fused = model(x, t, r, y)
        with model.attention_impl("math"):
            math = model(x, t, r, y)
    tol = 1e-4 if dtype == torch.float32 else 0.03
    for a, b in ((fused.v, math.v), (fused.u, math.u)):
        assert a.dtype == dtype and rel(a, b) < tol, rel(a, b)


@pytest.mark.parametrize("precision", ["bf16-engine", "bf16-autocast"])
def test_jvp_derivative_term_in_bf16_on_cuda_matches_a_float64_reference(precision):
    """The u-target's (t - r) du/dt by JVP as the objective computes it, the network held in bf16 on the GPU
    (DeepSpeed's bf16 engine) or under bf16 autocast, against a float64 JVP on a float64 copy of the very
    weights held, on the same problem: within bench/numerics.py's limit. DuMo-B/2, full depth."""
    from bench.numerics import held, problem, reference, rel_error, term

    model = random_net(**DEPTH)
    p = problem(model, 8, seed=0, device=DEV)
    net = held(model, precision, DEV)
    err = rel_error(term(net, precision, "jvp", 0.0, p), reference(net, p))
    print(f"JVP derivative term, {precision}, DuMo-B/2 on cuda: {100 * err:.3f}%")
    assert 0 < err < LIMIT


def test_fp32_central_difference_on_cuda_matches_the_float64_reference():
    """The default of the demo (finite difference, time scale 1) in fp32 on the GPU stays as right as on the
    CPU (3e-5 there): the GPU's kernels add no error a central difference at eps 0.005 would amplify."""
    from bench.numerics import held, problem, reference, rel_error, term

    model = random_net(**{"depth": 4, **DEPTH}, time_scale=1.0)
    p = problem(model, 8, seed=1, device=DEV)
    net = held(model, "fp32", DEV)
    err = rel_error(term(net, "fp32", "central", 0.005, p), reference(net, p))
    assert err < 1e-3, err


def test_objective_runs_on_cuda_with_a_cuda_generator():
    """The objective draws noise, times and label dropout on the batch's device from a CUDA generator."""
    model = random_net(**{"depth": 2, **DEPTH}).to(DEV)
    x, _, _, y = inputs(8)
    gen = torch.Generator(device=DEV).manual_seed(0)
    for derivative in ("jvp", "finite_difference"):
        obj = Objective(ObjectiveConfig(derivative=derivative, label_dropout=0.1), model.cfg.num_classes)
        seen: dict[str, torch.Tensor] = {}
        with torch.autocast(DEV, dtype=torch.bfloat16):
            out = obj(model, x, y, gen, inspect=seen)
        out["loss"].backward()
        assert out["loss"].device.type == DEV and torch.isfinite(out["loss"]), derivative
        assert seen["u_tgt"].device.type == DEV and seen["u_tgt"].dtype == torch.float32
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)


def test_one_step_sample_on_cuda_agrees_with_the_cpu():
    """x_0 = e - u(e, 1, 0) on the GPU: fp32 equals the CPU's result; bf16 autocast stays close, and the
    state stays float32 either way."""
    model = random_net(**{"depth": 4, **DEPTH}).eval()
    gen = torch.Generator().manual_seed(0)
    noise, y = torch.randn(8, 4, 32, 32, generator=gen), torch.randint(0, 1000, (8,), generator=gen)
    cfg = SamplerConfig(name="one_step")
    cpu = sample(model, noise, y, cfg)
    model.to(DEV)
    noise, y = noise.to(DEV), y.to(DEV)
    gpu = sample(model, noise, y, cfg)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        gpu16 = sample(model, noise, y, cfg)
        two = sample(model, noise, y, SamplerConfig(name="two_step"))
    assert gpu.device.type == DEV and gpu.dtype == torch.float32 and gpu16.dtype == torch.float32
    assert rel(gpu.cpu(), cpu) < 1e-4
    assert rel(gpu16.cpu(), cpu) < 0.03
    assert two.shape == noise.shape and torch.isfinite(two).all()


def _run_python(code: str, timeout: int = 240, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh process (DeepSpeed's process group must not outlive it); its last stdout
    line is a JSON record."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def ds_env(port: int) -> dict[str, str]:
    """One rank without a launcher (what tasks.train's inline launcher sets)."""
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DS_ACCELERATOR": DEV,
    }


@pytest.mark.parametrize("derivative", ["jvp", "finite_difference"])
def test_deepspeed_zero2_bf16_engine_step_on_cuda(derivative):
    """One rank, NCCL, the engine configured as the trainer configures it (tasks.ranks.distributed's JSON from
    a TrainConfig with device cuda, bf16, ZeRO-2; client torch AdamW): two steps, finite losses, bf16
    weights that moved, and the EMA (float32) following them."""
    rec = _run_python(
        f"""
        import json, torch, deepspeed
        from dumo_model import EMA, Objective, ObjectiveConfig, build_model
        from tasks.config import TrainConfig
        from tasks.ranks.distributed import deepspeed_config
        from tasks.ranks.trainer import step_generator
        dev = {DEV!r}
        deepspeed.init_distributed(dist_backend="nccl" if dev == "cuda" else "gloo")
        if dev == "cuda":
            torch.cuda.set_device(0)
        torch.manual_seed(0)
        model = build_model("DuMo-B/2", depth=2, input_size=32, in_channels=4)
        with torch.no_grad():  # the zero-initialised layers drawn too, so that every weight gets a gradient
            for p in model.parameters():
                if p.requires_grad and not p.any():
                    p.normal_(0.0, 0.02)
        model = model.to(dev)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ema = EMA(model, 0.99)  # before the engine casts the module, as the trainer makes it
        train = TrainConfig(batch_size_global=16, zero_stage=2, precision="bf16", device=dev)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(train))
        trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
        before = {{n: p.detach().float().clone() for n, p in engine.module.named_parameters() if p.requires_grad}}
        ema_before = {{n: s.clone() for n, s in ema.shadow.items()}}
        obj = Objective(ObjectiveConfig(derivative="{derivative}"), 1000)
        x = torch.randn(16, 4, 32, 32, device=dev)
        y = torch.randint(0, 1000, (16,), device=dev)
        losses = []
        for step in range(2):
            out = obj(engine, x, y, gen=step_generator(0, step, 0, 0, torch.device(dev)))
            engine.backward(out["loss"])
            engine.step()
            ema.update(engine.module)
            losses.append(out["loss"].item())
        params = dict(engine.module.named_parameters())
        moved = sum(int(not torch.equal(before[n], params[n].detach().float())) for n in trainable)
        ema_moved = sum(int(not torch.equal(ema_before[n], s)) for n, s in ema.shadow.items())
        dtypes = sorted({{str(p.dtype) for p in engine.module.parameters()}})
        print(json.dumps(dict(losses=losses, moved=moved, total=len(before), ema_moved=ema_moved, dtypes=dtypes,
                              grad_norm=float(engine.get_global_grad_norm() or 0.0))))
        """,
        env=ds_env(29531),
    )
    print(rec)
    assert all(torch.isfinite(torch.tensor(rec["losses"]))), rec
    assert rec["dtypes"] == ["torch.bfloat16"], rec
    assert rec["moved"] >= 0.9 * rec["total"] and rec["ema_moved"] >= 0.9 * rec["total"], rec
    assert rec["grad_norm"] > 0 and torch.isfinite(torch.tensor(rec["grad_norm"])), rec


def test_trainer_process_trains_on_cuda_and_writes_a_checkpoint(tmp_path):
    """The real worker (python -m tasks.ranks) with train.device cuda, bf16, ZeRO-2 on a synthetic
    latent store: it finishes its steps, logs finite losses and commits a checkpoint whose EMA weights
    load back into the network."""
    from storage import checkpoints as ckpts
    from storage import fs, latents
    from storage.layout import Root
    from storage.train_log import read_train_log
    from tasks.config import load_config

    root = str(tmp_path / "root")
    latents.write_synthetic(Root(root).latent_store("synthetic"), 64, (4, 8, 8), shard_size=32)
    cfg = load_config(
        None,
        [
            f"root={root}",
            "name=gpu",
            "data.store_name=synthetic",
            "model.preset=debug",
            "model.hidden_size=64",
            "model.depth=2",
            "model.num_heads=2",
            "train.batch_size_global=16",
            "train.num_steps=4",
            "train.log_every=1",
            f"train.device={DEV}",
            "train.precision=bf16",
            "train.zero_stage=2",
        ],
    )
    run = Root(root).run("gpu")
    fs.write_text(run.config, cfg.to_yaml())
    env = {
        **os.environ,
        **ds_env(29533),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "DUMO_NO_PROGRESS": "1",
    }
    env["DUMO_STAGING_DIR"] = str(tmp_path / "staging")
    done = subprocess.run(
        [sys.executable, "-m", "tasks.ranks", root, "gpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    log = read_train_log(run)
    assert [r["step"] for r in log][-1] == 4, log
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_v"], r["loss_u"]])).all() for r in log), log
    step = ckpts.latest(run)
    assert step == 4, done.stdout[-2000:]
    from tasks.sample import load_checkpoint_model  # how dumo sample and evaluation load it

    model = load_checkpoint_model(run.checkpoint(step), "ema", torch.device(DEV))
    assert next(model.parameters()).device.type == DEV


def test_sd_vae_encodes_and_decodes_under_bf16_autocast_on_cuda(tiny_vae_dir):
    """storage.autoencoders.SDVAE on cuda runs under bf16 autocast and hands back float32 on the CPU, close
    to its fp32 results (a tiny random AutoencoderKL: no weights to fetch)."""
    from storage.autoencoders import SDVAE

    torch.manual_seed(0)
    gpu, cpu = SDVAE(tiny_vae_dir, torch.device(DEV)), SDVAE(tiny_vae_dir, torch.device("cpu"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = gpu.encode(x)
    mean32, std32 = cpu.encode(x)
    assert mean.dtype == torch.float32 and not mean.is_cuda and mean.shape == (2, 4, 8, 8)
    assert rel(mean, mean32) < 0.05 and rel(std, std32) < 0.05
    out = gpu.decode(mean)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32 and out.abs().max() <= 1
