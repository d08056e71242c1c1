"""The embedded default model, so a fresh clone runs without any download.

`ddpm-cifar10-small/` is a copy of the project's reference diffusion model (see its README.md).
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "ddpm-cifar10-small"


def default_model_dir() -> Path:
    """Path of the embedded DDPM-CIFAR10 (half-width) model in diffusers DDIMPipeline layout."""
    return DEFAULT_MODEL_DIR
