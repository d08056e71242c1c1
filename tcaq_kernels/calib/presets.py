"""Named calibration methods: each one is `MethodConfig` defaults plus the overrides listed here.

| preset           | what it is |
| ---------------- | ---------- |
| `minmax`         | no reconstruction: observed ranges, full-range weight scales, nearest rounding, float-model block inputs, every calibration point, no split skip inputs (the same numbers as `calibrate_minmax`, which `METHODS["minmax"]` keeps as the fast path) |
| `qdiffusion`     | the Q-Diffusion baseline: BRECQ block reconstruction (AdaRound + LSQ, MSE-initialised), split skip inputs (shortcut splitting), one activation parameter set for all timesteps, no TCR/DAQ/PAR |
| `tcaq`           | TCAQ-DM: the baseline + TCR (strength searched per layer) + DAQ + 2 PAR rounds (each kept only if the PAR guard lets it), with activation parameters per timestep group |
| `qdiffusion+tcr` | ablation: the baseline + TCR only |
| `qdiffusion+daq` | ablation: the baseline + DAQ only (timestep groups for the post-softmax quantizer only; every other quantizer keeps one shared set) |
| `qdiffusion+par` | ablation: the baseline + PAR only (guarded, as in `tcaq`) |
| `qdiffusion+groups` | ablation: the baseline + per-timestep-group activation parameters only |

Any option of `MethodConfig` can be overridden per call, e.g.
`calibrate(pipe, "W4A8", method="tcaq", iters=500, par_rounds=1)`.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..quant.state import CalibState
from ..sampling import text_conditioning
from .config import MethodConfig
from .pipeline import calibrate_with_config

TCAQ_GROUPS = 10  # [ours] 10 equal timestep ranges = 10 DDIM-100 steps each

# split_skip off: min-max is the plain-PTQ baseline row (one quantizer per layer input, as
# `calibrate_minmax` defaults to); shortcut splitting is one of Q-Diffusion's contributions, so it
# starts with `qdiffusion` and everything built on it. `split_skip=True` works here too, and helps
# (measured in calib/README.md, "Measured").
_MINMAX = dict(reconstruct=False, weight_scale="minmax", act_init="minmax", block_inputs="float", num_points=None,
               init_points=None, split_skip=False)
_QDIFFUSION = dict(timestep_groups=1, split_skip=True)
# [ours] per-layer strength search: full equalisation (the paper's TCR, strength 1) helped at W6A6 but
# hurt 4-bit weights in our measurements (calib/config.py, tcr_strengths)
_TCR = dict(tcr=True, tcr_strengths=(0.0, 0.25, 0.5, 0.75, 1.0))
_DAQ = dict(daq=True, timestep_groups=TCAQ_GROUPS)
# [ours] each PAR round is kept only if 64 held-out samples did not move away from full precision
# (guard.py): PAR faded W4A4 (tcaq 32.1 FID-ResNet56 with it, 13.7 without) and helped W4A8
_PAR = dict(par_rounds=2, par_guard_samples=64)
_GROUPS = dict(timestep_groups=TCAQ_GROUPS, group_act_params=True)

PRESETS: dict[str, dict] = {
    "minmax": _MINMAX,
    "qdiffusion": _QDIFFUSION,
    "tcaq": {**_QDIFFUSION, **_TCR, **_DAQ, **_PAR, **_GROUPS},
    "qdiffusion+tcr": {**_QDIFFUSION, **_TCR},
    "qdiffusion+daq": {**_QDIFFUSION, **_DAQ, "group_act_params": False},
    "qdiffusion+par": {**_QDIFFUSION, **_PAR},
    "qdiffusion+groups": {**_QDIFFUSION, **_GROUPS},
}


def preset_config(name: str, **options) -> MethodConfig:
    """The configuration of preset `name` with `options` applied on top."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: available presets are {sorted(PRESETS)}")
    return MethodConfig().updated(**PRESETS[name]).updated(**options)


def make_method(name: str) -> Callable[..., CalibState]:
    """A `METHODS` entry: `(unet, scheduler, bits="W8A8", **options) -> CalibState` for preset `name`."""
    overrides = PRESETS[name]

    def method(unet: torch.nn.Module, scheduler, bits: str = "W8A8", encoder_hidden_states=None,
               negative_encoder_hidden_states=None, guidance_scale: float = 1.0, **options) -> CalibState:
        conditioning = text_conditioning(unet, encoder_hidden_states, negative_encoder_hidden_states, guidance_scale)
        return calibrate_with_config(unet, scheduler, bits, preset_config(name, **options), name, conditioning)

    method.__name__ = f"calibrate_{name.replace('+', '_')}"
    method.__doc__ = (f"Preset '{name}': MethodConfig with {overrides} (see calib/presets.py and calib/config.py); "
                      "a text-conditional UNet takes its prompts' embeddings as calibrate_minmax does.")
    return method
