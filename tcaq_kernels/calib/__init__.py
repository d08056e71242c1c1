"""Calibration methods producing a `CalibState`.

`METHODS["minmax"]` is the fast observe-while-sampling min-max calibration; every other method is a
preset of the reconstruction pipeline (see `presets.py` for the list and `config.py` for options).
"""
from __future__ import annotations

from .config import MethodConfig
from .minmax import calibrate_minmax
from .presets import PRESETS, make_method, preset_config

METHODS = {"minmax": calibrate_minmax, **{name: make_method(name) for name in PRESETS if name != "minmax"}}


def calibrate(pipe_or_unet, bits: str = "W8A8", method: str = "minmax", scheduler=None, **options):
    """Calibrate a diffusers pipeline (or a UNet plus `scheduler=`) and return a `CalibState`.

    `options` are the chosen method's keyword arguments (see each method's docstring). A text-conditional UNet
    (Stable Diffusion's) calibrates on its prompts' embeddings: `encoder_hidden_states=` [P, L, D], and for
    classifier-free guidance `negative_encoder_hidden_states=` and `guidance_scale=` (`calibrate_minmax`).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: available methods are {sorted(METHODS)}")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    scheduler = scheduler if scheduler is not None else getattr(pipe_or_unet, "scheduler", None)
    if scheduler is None:
        raise ValueError("calibrate needs a scheduler: pass a pipeline, or scheduler=")
    return METHODS[method](unet, scheduler, bits=bits, **options)


__all__ = ["METHODS", "PRESETS", "MethodConfig", "calibrate", "calibrate_minmax", "preset_config"]
