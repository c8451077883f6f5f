"""``dumo export``: a committed checkpoint as a directory another team loads with
``DualHeadDiT.from_pretrained(DIR)``: ``model.safetensors``, ``config.json`` and a README model card with the
run's metrics records and the latent store's autoencoder. One process, no Prefect."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from dumo_model.exported import config_json, export_state
from storage import checkpoints, fs
from storage.metrics import format_table
from storage.outputs import step_records
from storage.pretrained import write_export
from tasks.sample import Weights, load_checkpoint_model, run_context, store_attrs

log = logging.getLogger("dumo.export")


def export_checkpoint(url: str, out_dir: str, weights: Weights = "ema", drop_v_head: bool = False) -> dict[str, Any]:
    """Write the export of the committed checkpoint ``url`` into ``out_dir``; returns its provenance."""
    url = fs.normalize(url)
    marker = checkpoints.read_marker(url)  # refuses an uncommitted checkpoint
    root, run, step, cfg = run_context(url)
    model = load_checkpoint_model(url, weights)
    state, model_cfg = export_state(model, drop_v_head)
    try:
        attrs = store_attrs(root, cfg.data.store_name)
    except FileNotFoundError:
        attrs = {}
        log.warning(f"the run's latent store is not on {root.url}: the export names no autoencoder")
    records = step_records(root.run(run), step, marker["ema_sha256"])
    provenance = {
        "run": run,
        "step": step,
        "checkpoint_url": url,
        "checkpoint_ema_sha256": marker["ema_sha256"],
        "weights": weights,
        "objective": cfg.objective.name,
        "v_head_dropped": drop_v_head,
        "autoencoder": attrs.get("autoencoder"),
        "latent_scale": attrs.get("latent_scale"),
        "latent_shift": attrs.get("latent_shift"),
        "resolution": attrs.get("resolution"),
        "class_names": list(attrs.get("class_names") or []),
    }
    card = model_card(provenance, asdict(model_cfg), records)
    files = write_export(out_dir, state, config_json(model_cfg, provenance), card)
    n = sum(v.numel() for v in state.values())
    log.info(f"{run} step {step}: {weights} weights, {len(state)} tensors ({n:,d} values) exported to {out_dir}")
    return {**provenance, "files": files, "num_parameters": n}


def model_card(prov: dict[str, Any], model_cfg: dict[str, Any], records: list[dict]) -> str:
    """README.md of an export: how to load and sample it, its network, the metrics of its weights, provenance."""
    ae = prov["autoencoder"] or {}
    lines = [
        f"# {prov['run']}, step {prov['step']}",
        "",
        f"A {prov['objective']} model (DuMo pipeline, arXiv 2602.17682), {prov['weights']} weights"
        + (", v head dropped (1- and 2-step sampling only)." if prov["v_head_dropped"] else "."),
        "",
        "```python",
        "import torch",
        "from dumo_model import DualHeadDiT, SamplerConfig, sample",
        "",
        'model = DualHeadDiT.from_pretrained("THIS_DIR", device="cuda", dtype=torch.bfloat16)',
        "x0 = sample(model, noise, labels, SamplerConfig('one_step'))  # noise (N, C, H, W) at t = 1",
        "```",
        "",
        "Conventions: x_t = (1 - t) x + t e, t = 1 is noise; v = e - x; u(x_t, t, r) the average velocity over [r, t].",
        f"Latents become images with `{ae.get('id', 'an unrecorded autoencoder')}`"
        f" (revision {ae.get('revision')}, weights {ae.get('weights_digest')}): divide by latent scale"
        f" {prov['latent_scale']} and add shift {prov['latent_shift']}, decode, pixels in [-1, 1]."
        f" Resolution {prov['resolution']}, {model_cfg['num_classes']} classes (label {model_cfg['num_classes']}"
        " is the null class).",
        "",
        "## Network",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in model_cfg.items()],
        "",
        "## Metrics",
        "",
    ]
    if not records:
        lines.append("No evaluation of these weights was recorded in the run.")
    for record in records:
        lines += [format_table(record), ""]
    if prov["weights"] != "ema" and records:
        lines.append("The metrics were measured on the EMA weights; this export holds the raw weights.")
    lines += ["", "## Provenance", "", "```json", json.dumps({**prov, "class_names": "..."}, indent=1), "```", ""]
    return "\n".join(lines)
