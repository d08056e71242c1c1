"""Parsing and defaults shared by every calibration method."""
from __future__ import annotations

import re

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
