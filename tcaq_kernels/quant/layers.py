"""Which modules of a diffusers UNet get quantized, and the structural fingerprint of a model."""
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
