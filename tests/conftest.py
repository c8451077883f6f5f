"""Shared test setup: offline, isolated Prefect home, one torch thread for the tiny in-process models
(faster than two for them, and immune to OpenMP spinning when the other core is busy)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import pytest
import torch

# The session's one Prefect test server and one moto S3 server, for every test module (a module that
# imported these fixtures itself would get a server of its own: a fixture is registered per module).
from tests.prefect_fixtures import prefect_harness  # noqa: F401
from tests.s3_fixtures import moto_endpoint, s3_bucket  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# One Prefect home per test process. Under pytest-xdist the workers inherit the controller's environment,
# and a shared home would share the local result storage, where a cached task result of one worker's test
# could be read by another's; so a home this file made for the controller is replaced in each worker.
if os.environ.get("PREFECT_HOME") in (None, os.environ.get("DUMO_TESTS_PREFECT_HOME")):
    os.environ["PREFECT_HOME"] = os.environ["DUMO_TESTS_PREFECT_HOME"] = tempfile.mkdtemp(prefix="dumo-prefect-home-")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _longest_files_first(items)


def _longest_files_first(items: list[pytest.Item]) -> None:
    """Under pytest-xdist with ``--dist loadfile --no-loadscope-reorder`` (make test), whole files go to the
    workers in collection order. Files with more tests marked slow go first, so that the long ones (a
    Prefect server end to end, DeepSpeed ranks) do not start last while the other worker idles; a file's
    own order is kept (some files run in order on shared module fixtures). Every worker sorts alike."""
    slow = Counter(item.path for item in items if "slow" in item.keywords)
    first_seen = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (-slow[item.path], first_seen[item.path]))


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random diffusers AutoencoderKL saved to a directory: the sd-vae path without weights to fetch."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
    )
    path = str(tmp_path_factory.mktemp("vae") / "tiny-vae")
    vae.save_pretrained(path)
    return path
