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
    classifier-free guidance `negative_encoder_hidden_states=` and `guidance_scale=` (`calibrate_minmax`) — or,
    given a pipeline with `encode_prompt` (diffusers' Stable Diffusion pipelines), `prompts=[...]` (and
    `negative_prompt=`), which it encodes with the pipeline's text encoder.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: available methods are {sorted(METHODS)}")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if "prompts" in options:
        prompts, negative_prompt = options.pop("prompts"), options.pop("negative_prompt", None)
        guidance_scale = options.get("guidance_scale", 1.0)
        options.update(_encoded_prompts(pipe_or_unet, unet, prompts, negative_prompt, guidance_scale))
    elif "negative_prompt" in options:
        raise ValueError("negative_prompt= goes with prompts=")
    scheduler = scheduler if scheduler is not None else getattr(pipe_or_unet, "scheduler", None)
    if scheduler is None:
        raise ValueError("calibrate needs a scheduler: pass a pipeline, or scheduler=")
    return METHODS[method](unet, scheduler, bits=bits, **options)


def _encoded_prompts(pipe, unet, prompts, negative_prompt, guidance_scale: float) -> dict:
    """`encoder_hidden_states` (and, for guidance ≠ 1, `negative_encoder_hidden_states`) of `prompts` from the
    pipeline's `encode_prompt`."""
    if not hasattr(pipe, "encode_prompt"):
        raise ValueError("prompts= needs a pipeline with a text encoder (encode_prompt), e.g. diffusers' "
                         "StableDiffusionPipeline; with a bare UNet pass encoder_hidden_states= instead")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts= is empty")
    guided = guidance_scale != 1.0
    text, negative = pipe.encode_prompt(prompts, next(unet.parameters()).device, 1, guided,
                                        negative_prompt=negative_prompt)
    return {"encoder_hidden_states": text, **({"negative_encoder_hidden_states": negative} if guided else {})}


__all__ = ["METHODS", "PRESETS", "MethodConfig", "calibrate", "calibrate_minmax", "preset_config"]
