"""Calibration methods producing a `CalibState`."""
from __future__ import annotations

from .minmax import calibrate_minmax

METHODS = {"minmax": calibrate_minmax}


def calibrate(pipe_or_unet, bits: str = "W8A8", method: str = "minmax", scheduler=None, **options):
    """Calibrate a diffusers pipeline (or a UNet plus `scheduler=`) and return a `CalibState`.

    `options` are the chosen method's keyword arguments (see each method's docstring).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: available methods are {sorted(METHODS)}")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    scheduler = scheduler if scheduler is not None else getattr(pipe_or_unet, "scheduler", None)
    if scheduler is None:
        raise ValueError("calibrate needs a scheduler: pass a pipeline, or scheduler=")
    return METHODS[method](unet, scheduler, bits=bits, **options)


__all__ = ["METHODS", "calibrate", "calibrate_minmax"]
