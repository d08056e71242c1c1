"""Which modules of a diffusers UNet get quantized, where their inputs split, and the structural
fingerprint of a model."""
from __future__ import annotations

import hashlib
import json

import torch
from diffusers.models.attention_processor import Attention

# Kept in float by default: the 3-channel input conv and the output conv carry the image itself,
# are a tiny share of the FLOPs, and every peer keeps them in high precision.
DEFAULT_FLOAT_LAYERS = ("conv_in", "conv_out")


def layer_kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, torch.nn.Conv2d):
        return "conv2d"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return None


def quantizable_layers(model: torch.nn.Module) -> dict[str, str]:
    """`{module name: kind}` for every Conv2d, Linear and Attention block, in module order."""
    out = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is not None and name:
            out[name] = kind
    return out


def skip_splits(unet: torch.nn.Module, layers) -> dict[str, int]:
    """`{layer: input_split}` for the layers among `layers` that read an up block's skip concatenation.

    In a diffusers UNet, up-block ResBlock j reads `cat([h, skip], dim=1)` in its `conv1` (after
    GroupNorm and SiLU, which keep the channel order) and its `conv_shortcut`. The skips are the
    down path's residuals: the first down block's input (conv_in's output), then every down-block
    ResBlock's output and every downsampler's output, in order; each up block takes
    `len(resnets)` of them from the end, its ResBlock j the (j+1)-th last. So the skip's channel
    count, and with it `split = ResBlock in_channels − skip channels`, follows from the module
    structure alone, without a forward pass (tests/calib/test_split_skip.py checks the result
    against the tensors a forward actually concatenates). A model without down/up blocks has no
    splits; a structure that does not add up is refused, naming the ResBlock.
    """
    down, up = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
    if down is None or up is None or not len(down):
        return {}
    residuals = [down[0].resnets[0].in_channels]
    for block in down:
        residuals += [resnet.out_channels for resnet in block.resnets]
        if getattr(block, "downsamplers", None) is not None:
            residuals += [sampler.out_channels for sampler in block.downsamplers]
    splits = {}
    for b, block in enumerate(up):
        for j, resnet in enumerate(block.resnets):
            where = f"up_blocks.{b}.resnets.{j}"
            if not residuals:
                raise ValueError(f"{where}: more skip concatenations than down-path residuals; "
                                 "this UNet's skips cannot be split (calibrate with split_skip=False)")
            split = resnet.in_channels - residuals.pop()
            if not 0 < split < resnet.in_channels:
                raise ValueError(f"{where}: {resnet.in_channels} input channels do not hold a skip of "
                                 f"{resnet.in_channels - split} channels (calibrate with split_skip=False)")
            splits.update({f"{where}.{conv}": split for conv in ("conv1", "conv_shortcut") if f"{where}.{conv}" in layers})
    if residuals:
        raise ValueError(f"{len(residuals)} down-path residuals are never concatenated in an up block; "
                         "this UNet's skips cannot be split (calibrate with split_skip=False)")
    return splits


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex) of the class, config and parameter names/shapes — structure, not values.

    Values are left out on purpose: casting a model to bf16, or moving it, must not invalidate a
    state, while a different architecture or channel count must.
    """
    config = getattr(model, "config", None)
    cfg = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}
    params = [(n, list(p.shape)) for n, p in model.named_parameters()]
    blob = json.dumps({"class": type(model).__name__, "config": cfg, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
