"""Per-item costs that docs/scaling.md multiplies out: what one image costs to encode, and what one
parameter costs in a checkpoint.

    python bench/unit_costs.py                                   # ~1 minute on a CPU; no network, no GPU
    python bench/unit_costs.py --checkpoint demo-root/runs/demo/checkpoints/step-0000800

- SD-VAE encoder FLOPs per 256 px image: the architecture of stabilityai/sd-vae-ft-mse (block_out_channels
  128/256/512/512, 2 layers per block) at random init, counted by torch.utils.flop_counter (2 FLOPs per
  multiply-add). The store encodes each image and its mirror image: twice this per row.
- JPEG decode + ADM center crop to 256 px of an ImageNet-sized JPEG (scikit-learn's china.jpg resized to
  500x375, quality 90), one core, through storage.images.adm_center_crop, as an encode task does it.
- Checkpoint bytes per parameter: the files of a committed checkpoint over the parameters in its EMA.

Prints a table and writes JSON (bench/results/unit_costs.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.images import adm_center_crop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "unit_costs.json"


def encoder_gflop(resolution: int = 256) -> float:
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=resolution,
    ).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(torch.randn(1, 3, resolution, resolution))
    return counter.get_total_flops() / 1e9


def jpeg_ms(resolution: int = 256, repeats: int = 50) -> tuple[float, int]:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    buf = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).resize((500, 375)).save(buf, format="JPEG", quality=90)
    blob = buf.getvalue()
    t0 = time.perf_counter()
    for _ in range(repeats):
        np.asarray(adm_center_crop(Image.open(io.BytesIO(blob)).convert("RGB"), resolution))
    return (time.perf_counter() - t0) / repeats * 1e3, len(blob)


def checkpoint_bytes_per_param(path: str) -> dict:
    from safetensors.numpy import load_file

    params = sum(v.size for v in load_file(os.path.join(path, "ema.safetensors")).values())
    sizes = {
        os.path.relpath(os.path.join(r, f), path): os.path.getsize(os.path.join(r, f))
        for r, _, fs in os.walk(path)
        for f in fs
    }
    trainer = sum(v for k, v in sizes.items() if k.startswith("trainer"))
    return {
        "params": params,
        "bytes": sum(sizes.values()),
        "bytes_per_param": sum(sizes.values()) / params,
        "trainer_bytes_per_param": trainer / params,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a committed checkpoint directory (local)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gflop = encoder_gflop()
    ms, nbytes = jpeg_ms()
    rows = [
        ("SD-VAE encoder, one 256 px image", f"{gflop:.1f} GFLOP"),
        ("  per store row (image + mirror)", f"{2 * gflop:.1f} GFLOP"),
        (f"JPEG decode + ADM crop, 500x375, {nbytes:,} B, 1 core", f"{ms:.1f} ms"),
    ]
    result = {"encoder_gflop_per_image": gflop, "jpeg_decode_crop_ms": ms, "jpeg_bytes": nbytes}
    if args.checkpoint:
        ck = checkpoint_bytes_per_param(args.checkpoint)
        rows.append((f"checkpoint, {ck['params']:,} parameters", f"{ck['bytes_per_param']:.2f} B/param"))
        rows.append(("  of which DeepSpeed state (trainer/)", f"{ck['trainer_bytes_per_param']:.2f} B/param"))
        result["checkpoint"] = ck
    load = os.getloadavg()[0]
    result.update(
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}", load_average=load
    )
    print(f"machine: {result['machine']}; load average {load:.1f}")
    print("| unit | cost |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
