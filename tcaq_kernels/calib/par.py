"""PAR — progressively aligned reconstruction (METHOD.md, PAR).

Reconstruction fits blocks on inputs drawn from the full-precision trajectory, but at inference the
quantized model walks its own, drifting trajectory. Each PAR round lets the current quantized model
sample a new calibration set from the same noise (or fresh seeds), then reconstructs every block
again on it: block inputs from the quantized model, targets from the full-precision model on the same
x_t, quantizers warm-started from the previous round, fewer iterations each round.
"""
from __future__ import annotations

import torch

from .blocks import Block
from .config import MethodConfig
from .data import CalibData, collect_trajectories
from .qmodel import QuantSim
from .reconstruct import reconstruct_round


def round_iters(cfg: MethodConfig, k: int) -> int:
    """Optimisation steps per block in PAR round k (round 0 is the base reconstruction)."""
    return max(1, round(cfg.iters * cfg.par_iters_decay**k)) if cfg.iters else 0


def round_seeds(cfg: MethodConfig, k: int) -> list[int]:
    first = cfg.seed + (k * cfg.num_samples if cfg.par_fresh_seeds else 0)
    return list(range(first, first + cfg.num_samples))


def regenerate(sim: QuantSim, float_unet: torch.nn.Module, scheduler, cfg: MethodConfig, k: int) -> CalibData:
    """Calibration data for round k from the quantized model's own DDIM trajectories."""
    return collect_trajectories(
        sim.model, scheduler, round_seeds(cfg, k), cfg.num_steps, cfg.batch_size,
        source=f"quantized (PAR round {k})", fingerprint_of=float_unet, progress=cfg.progress,
    )


def run_par(sim: QuantSim, float_unet: torch.nn.Module, scheduler, blocks: list[Block], cfg: MethodConfig) -> list[dict]:
    """Rounds 1 … par_rounds; returns, per round, the data description and the block records."""
    rounds = []
    for k in range(1, cfg.par_rounds + 1):
        data = regenerate(sim, float_unet, scheduler, cfg, k)
        points = data.points(cfg.num_points, seed=cfg.seed + k)
        iters = round_iters(cfg, k)
        records = reconstruct_round(sim, float_unet, blocks, points, cfg, iters, initialize=False,
                                    num_steps=cfg.num_steps, desc=f"PAR round {k}/{cfg.par_rounds}")
        rounds.append({"round": k, "iters": iters, "data": data.describe(), "blocks": records["blocks"]})
    return rounds
