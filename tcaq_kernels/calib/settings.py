"""Parsing and defaults shared by every calibration method."""
from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Iterable, Mapping

import torch

from ..quant.layers import quantizable_layers
from ..quant.primitives import ACT_BITS, WEIGHT_BITS

SUPPORTED_BITS = ("W8A8", "W6A6", "W4A8", "W4A4")


def parse_bits(bits: str) -> tuple[int, int]:
    """'W4A8' → (4, 8); rejects widths the kernels do not implement."""
    m = re.fullmatch(r"W(\d+)A(\d+)", bits.upper())
    if not m or int(m.group(1)) not in WEIGHT_BITS or int(m.group(2)) not in ACT_BITS:
        raise ValueError(f"bits={bits!r}: expected W<w>A<a> with w in {WEIGHT_BITS} and a in {ACT_BITS}, e.g. {SUPPORTED_BITS}")
    return int(m.group(1)), int(m.group(2))


def uniform_group_edges(num_train_timesteps: int, groups: int) -> list[float]:
    """Edges splitting [0, T) into `groups` equal timestep ranges (group g holds edges[g-1] ≤ t < edges[g])."""
    if groups < 1 or groups > num_train_timesteps:
        raise ValueError(f"timestep_groups={groups}: must be between 1 and {num_train_timesteps}")
    return [num_train_timesteps * g / groups for g in range(1, groups)]


def layer_act_bits(layers: Iterable[str], default: int, overrides: Mapping[str, int]) -> dict[str, int]:
    """Activation bits per layer: `default`, or the first `overrides` pattern (fnmatch) the name matches.

    Mixed precision where a uniform width loses most (e.g. `{"*.conv_shortcut": 8}` at W4A4, see
    calib/README.md "Where W4A4 loses"); a pattern that matches no layer is an error, not a no-op.
    """
    layers = list(layers)
    for pattern, bits in overrides.items():
        if bits not in ACT_BITS:
            raise ValueError(f"act_bits[{pattern!r}]={bits}: activation bits must be one of {ACT_BITS}")
        if not any(fnmatchcase(name, pattern) for name in layers):
            raise ValueError(f"act_bits pattern {pattern!r} matches no quantized layer (e.g. {layers[:3]})")
    return {name: next((b for pat, b in overrides.items() if fnmatchcase(name, pat)), default) for name in layers}


def float_layer_names(model: torch.nn.Module, entries: Iterable[str]) -> list[str]:
    """The layers `keep_float` keeps in float: each entry a module name of `model`, or an fnmatch pattern over
    its quantizable layers (`"*.conv_shortcut"`, the 13 1×1 shortcut convs whose inputs carry most of W8A8's
    error on the CPU, calib/README.md). An entry that names nothing is an error, not a no-op."""
    layers, modules = list(quantizable_layers(model)), set(dict(model.named_modules()))
    out: list[str] = []
    for entry in entries:
        hits = [entry] if entry in modules else [n for n in layers if fnmatchcase(n, entry)]
        if not hits:
            raise ValueError(f"keep_float entry {entry!r} names no layer (neither a module name nor a pattern "
                             f"matching a quantizable layer, e.g. {layers[:3]})")
        out += hits
    return sorted(dict.fromkeys(out))

