"""Where the bundled demo model lives, and how a model argument is resolved."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_NAME = "demo"


def demo_model_dir() -> Path:
    """Directory of the bundled demo model (config.json + model.safetensors)."""
    return Path(str(resources.files("allocsearch") / "assets" / "demo"))


def resolve_model_path(model: str) -> Path:
    """``"demo"`` -> the bundled model directory; anything else is taken as a path."""
    return demo_model_dir() if model == DEMO_NAME else Path(model).expanduser()
