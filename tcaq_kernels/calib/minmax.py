"""Min-max calibration: observed ranges per timestep group, nearest-rounded per-channel weights.

No reconstruction. It is the baseline row of the quality tables, and it makes the whole
calibrate → convert → sample path run before the heavier methods are involved.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..quant.layers import DEFAULT_FLOAT_LAYERS, model_fingerprint, quantizable_layers, skip_splits
from ..quant.primitives import pack_int4, qparams_from_range, qparams_symmetric, quantize_weight, weight_scale_symmetric
from ..quant.state import SYMMETRIC_ACTS, ActQuant, CalibState, CalibStateError, LayerState, layer_acts
from ..sampling import ddim_sample, seeded_noise, text_conditioning, text_kwargs, unet_sample_shape
from .observe import RangeObserver
from .settings import float_layer_names, parse_bits, uniform_group_edges


def calibrate_minmax(
    unet: torch.nn.Module,
    scheduler,
    bits: str = "W8A8",
    num_samples: int = 64,
    num_steps: int = 100,
    timestep_groups: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    keep_float: Sequence[str] = DEFAULT_FLOAT_LAYERS,
    progress: bool = True,
    split_skip: bool = False,
    p_row_norm: bool = False,
    p_row_max: bool = False,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    negative_encoder_hidden_states: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
) -> CalibState:
    """Sample `num_samples` DDIM trajectories with the float `unet` and quantize from their ranges.

    A text-conditional UNet (Stable Diffusion's) samples with text: `encoder_hidden_states` [P, L, D], the
    embeddings of P prompts (e.g. the first result of a diffusers pipeline's `encode_prompt`), trajectory n
    taking prompt n % P; with `negative_encoder_hidden_states` ([1 or P, L, D]) and `guidance_scale` ≠ 1 each
    step runs the UNet on both, as classifier-free guidance does, so the ranges cover both halves of its batch.

    `split_skip`: give the skip half of every up-block concatenation its own input quantizer
    (shortcut splitting; off for this baseline, see calib/presets.py). `p_row_norm`: attention layers
    divide P·V by each row's quantized P mass (calib/config.py, `p_row_norm`). `p_row_max`: attention
    layers quantize exp(S − row max), whose ranges are observed instead of the softmax's
    (calib/config.py, `p_row_max`).
    """
    parse_bits(bits)  # fail before sampling
    conditioning = text_conditioning(unet, encoder_hidden_states, negative_encoder_hidden_states, guidance_scale)
    keep = set(float_layer_names(unet, keep_float))
    layers = {n: k for n, k in quantizable_layers(unet).items() if n not in keep}
    edges = uniform_group_edges(scheduler.config.num_train_timesteps, timestep_groups)
    device = next(unet.parameters()).device
    seeds = list(range(seed, seed + num_samples))
    splits = skip_splits(unet, layers) if split_skip else {}
    with RangeObserver(unet, layers, edges, splits, p_row_max) as observer:
        for start in tqdm(range(0, num_samples, batch_size), desc="min-max calibration", disable=not progress):
            batch = range(start, min(start + batch_size, num_samples))
            noise = seeded_noise([seeds[n] for n in batch], unet_sample_shape(unet), device, unet.dtype)
            ddim_sample(unet, scheduler, noise, num_steps, progress=False,
                        **text_kwargs(conditioning, batch, device, unet.dtype))
    settings = {
        "num_samples": num_samples,
        "num_steps": num_steps,
        "timestep_groups": timestep_groups,
        "seed": seed,
        "sampler": "ddim",
        "act_qparams": "minmax",
        "split_skip": split_skip,
        "p_row_norm": p_row_norm,
        "p_row_max": p_row_max,
    }
    if conditioning is not None:
        settings["text"] = conditioning.describe()
    return state_from_ranges(unet, observer, bits, sorted(keep), settings, p_row_norm)


def state_from_ranges(unet: torch.nn.Module, observer: RangeObserver, bits: str, float_layers, settings: dict,
                      p_row_norm: bool = False) -> CalibState:
    """Min-max CalibState from an observer that watched `unet` (any way of driving it will do).

    `p_row_max` comes from the observer, not from an argument: its "p" ranges are those of the map it
    recorded, and a state flagged otherwise would clip (softmax ranges for e ≤ 1) or waste its levels."""
    w_bits, a_bits = parse_bits(bits)
    modules = dict(unet.named_modules())
    state_layers = {}
    for name, kind in observer.layers.items():
        split = observer.splits.get(name)
        acts = {act: _act_quant(name, act, observer.stats[(name, act)].cpu(), a_bits) for act in layer_acts(kind, split)}
        if kind == "attention":
            state_layers[name] = LayerState(kind=kind, acts=acts, p_row_norm=p_row_norm, p_row_max=observer.p_row_max)
        else:
            state_layers[name] = weight_layer_state(kind, modules[name].weight, w_bits, acts, input_split=split)
    return CalibState(
        method="minmax",
        bits=bits,
        group_edges=observer.edges.tolist(),
        model_fingerprint=model_fingerprint(unet),
        model_class=type(unet).__name__,
        layers=state_layers,
        float_layers=list(float_layers),
        settings=settings,
    )


def weight_layer_state(kind: str, weight: torch.Tensor, w_bits: int, acts: dict, tcr=None, input_split=None) -> LayerState:
    """Per-output-channel symmetric nearest-rounded weights (packed when 4-bit)."""
    w = weight.detach().float().cpu()
    scale = weight_scale_symmetric(w, w_bits, tcr)
    w_int = quantize_weight(w, scale, w_bits, tcr).flatten(1)
    stored = pack_int4(w_int) if w_bits == 4 else w_int
    return LayerState(
        kind=kind, acts=acts, w_bits=w_bits, weight=stored, weight_shape=tuple(w.shape), weight_scale=scale, tcr=tcr,
        input_split=input_split,
    )


def _act_quant(layer: str, act: str, ranges: torch.Tensor, bits: int) -> ActQuant:
    lo, hi = ranges[:, 0], ranges[:, 1]
    if not torch.isfinite(ranges).all():
        empty = [g for g in range(ranges.shape[0]) if not math.isfinite(lo[g].item())]
        raise CalibStateError(
            f"layer '{layer}': activation '{act}' was never observed in timestep groups {empty}; "
            "use more sampling steps or fewer timestep groups"
        )
    if act in SYMMETRIC_ACTS:
        scale, zero = qparams_symmetric(torch.maximum(lo.abs(), hi.abs()), bits)
    else:
        scale, zero = qparams_from_range(lo, hi, bits)
    return ActQuant(bits=bits, kind=["uniform"] * ranges.shape[0], scale=scale.float(), zero=zero)
