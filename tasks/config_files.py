"""The YAML presets in configs/: where they are and which exist.

Apart from tasks/config.py (which validates them) so that `dumo --help` can name the presets without
importing pydantic, torch or the model library.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def config_presets() -> list[str]:
    """The preset names a command accepts for a config (``demo`` -> configs/demo.yaml), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
