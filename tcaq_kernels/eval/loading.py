"""Loading the models an evaluation compares: the full-precision UNet and, optionally, its converted copy.

The quantization API (`tcaq_kernels.load_state` / `CalibState.load`, `tcaq_kernels.convert`) is imported
only when a CalibState is asked for, so the evaluation harness runs for full precision without it.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """`model_dir`, or the embedded reference model; checked to hold a diffusers UNet + scheduler."""
    if model_dir is None:
        from ..models import default_model_dir

        model_dir = default_model_dir()
    path = Path(model_dir)
    for sub in ("unet/config.json", "scheduler/scheduler_config.json"):
        if not (path / sub).is_file():
            raise FileNotFoundError(f"--model {path}: missing {sub} (expected a diffusers DDIMPipeline folder)")
    return path


def load_fp_unet(model_dir: str | os.PathLike | None = None, device=None, dtype=torch.float32):
    """The full-precision UNet in eval mode (float32 unless told otherwise): the UNet2DModel or
    UNet2DConditionModel (Stable Diffusion's) its unet/config.json names."""
    import json

    from diffusers import UNet2DConditionModel, UNet2DModel

    path = resolve_model_dir(model_dir)
    classes = {cls.__name__: cls for cls in (UNet2DModel, UNet2DConditionModel)}
    name = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8")).get("_class_name", "UNet2DModel")
    if name not in classes:
        raise ValueError(f"--model {path}: unet/config.json names {name!r}; expected one of {sorted(classes)}")
    unet = classes[name].from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    return unet.eval().to(device)


def load_scheduler_config(model_dir: str | os.PathLike | None = None) -> dict:
    """The model's scheduler config, for `sampling.make_scheduler`."""
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler.load_config(resolve_model_dir(model_dir), subfolder="scheduler"))


def load_calib_state(path: str | os.PathLike):
    """A CalibState through the package's public loader (`load_state`, else `CalibState.load`)."""
    import tcaq_kernels

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--state {path}: no such file")
    loader = getattr(tcaq_kernels, "load_state", None)
    if loader is None and hasattr(tcaq_kernels, "CalibState"):
        loader = tcaq_kernels.CalibState.load
    if loader is None:
        raise RuntimeError("--state given, but tcaq_kernels has neither load_state nor CalibState.load yet")
    return loader(path)


def convert_unet(fp_unet, state, backend: str = "reference"):
    """A converted deep copy of `fp_unet` (the original stays full precision for comparison). A
    `triton` model on a GPU comes wrapped in `cuda_graphed`: run eagerly, each sampling step would pay
    the host's launch cost once per layer (latency.md), and the replays are the eager model's results."""
    import tcaq_kernels

    if not hasattr(tcaq_kernels, "convert"):
        raise RuntimeError("--state given, but tcaq_kernels.convert does not exist yet")
    unet = tcaq_kernels.convert(copy.deepcopy(fp_unet), state, backend=backend).eval()
    if backend == "triton" and next(unet.parameters()).is_cuda:
        return tcaq_kernels.cuda_graphed(unet)
    return unet
