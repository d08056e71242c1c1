"""PAR — progressively aligned reconstruction (METHOD.md, PAR).

Reconstruction fits blocks on inputs drawn from the full-precision trajectory, but at inference the
quantized model walks its own, drifting trajectory. Each PAR round lets the current quantized model
sample a new calibration set from the same noise (or fresh seeds), then reconstructs every block
again on it: block inputs from the quantized model, targets from the full-precision model on the same
x_t, quantizers warm-started from the previous round, fewer iterations each round.
`par_float_share` keeps that share of each round's points from the full-precision trajectories
(round 0's data), to separate what the regenerated data does from what the extra rounds do (at W4A4
both fade the samples, the rounds more: calib/README.md, "Which part of PAR fades").
`par_guard_samples` keeps a round only if the samples of held-out seeds did not move away from the
full-precision ones (guard.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from ..sampling import TextConditioning
from .blocks import Block
from .config import MethodConfig
from .data import CalibData, CalibPoints, collect_trajectories
from .guard import ParGuard, snapshot, verdict_line
from .qmodel import QuantSim
from .reconstruct import reconstruct_round


def round_iters(cfg: MethodConfig, k: int) -> int:
    """Optimisation steps per block in PAR round k (round 0 is the base reconstruction)."""
    return max(1, round(cfg.iters * cfg.par_iters_decay**k)) if cfg.iters else 0


def round_seeds(cfg: MethodConfig, k: int) -> list[int]:
    first = cfg.seed + (k * cfg.num_samples if cfg.par_fresh_seeds else 0)
    return list(range(first, first + cfg.num_samples))


def regenerate(sim: QuantSim, float_unet: torch.nn.Module, scheduler, cfg: MethodConfig, k: int,
               conditioning: Optional[TextConditioning] = None) -> CalibData:
    """Calibration data for round k from the quantized model's own DDIM trajectories (on the float data's text,
    for a text-conditional UNet)."""
    return collect_trajectories(
        sim.model, scheduler, round_seeds(cfg, k), cfg.num_steps, cfg.batch_size,
        source=f"quantized (PAR round {k})", fingerprint_of=float_unet, progress=cfg.progress,
        conditioning=conditioning,
    )


def round_points(regenerated: CalibData, float_data: CalibData, num_points: Optional[int], float_share: float,
                 seed: int) -> CalibPoints:
    """The points of one PAR round: `float_share` of them from the full-precision trajectories, the rest
    from the regenerated ones, each part spread evenly over the steps, merged time-major."""
    total = num_points or regenerated.x.shape[0] * regenerated.x.shape[1]
    n_float = round(float_share * total)
    parts = [d.points(n, seed=seed) for d, n in ((float_data, n_float), (regenerated, total - n_float)) if n > 0]
    return parts[0] if len(parts) == 1 else CalibPoints.merged(parts)


def run_par(sim: QuantSim, float_unet: torch.nn.Module, scheduler, blocks: list[Block], cfg: MethodConfig,
            float_data: CalibData) -> dict:
    """Rounds 1 … par_rounds on regenerated data (`float_data`: round 0's, for `par_float_share`).

    Returns {"rounds": per round the data description, the block records and, with the guard, its
    verdict; "guard": the guard's seeds and round 0's check, or None}. A round the guard rejects is
    undone (the model is left as before it) and ends PAR.
    """
    rounds: list[dict] = []
    conditioning = float_data.conditioning
    guard = ParGuard(float_unet, scheduler, cfg, conditioning) if cfg.par_guard_samples and cfg.par_rounds else None
    guard_record = guard.start(sim.model) if guard else None
    for k in range(1, cfg.par_rounds + 1):
        before = snapshot(sim.model) if guard else None
        data = regenerate(sim, float_unet, scheduler, cfg, k, conditioning)
        points = round_points(data, float_data, cfg.num_points, cfg.par_float_share, seed=cfg.seed + k)
        iters = round_iters(cfg, k)
        records = reconstruct_round(sim, float_unet, blocks, points, cfg, iters, initialize=False,
                                    num_steps=cfg.num_steps, desc=f"PAR round {k}/{cfg.par_rounds}",
                                    learn_rounding=cfg.par_learn_rounding)
        entry = {"round": k, "iters": iters, "data": data.describe(), "blocks": records["blocks"]}
        rounds.append(entry)
        if guard:
            kept, entry["guard"] = guard.judge(sim.model)
            if cfg.progress:
                tqdm.write(verdict_line(k, entry["guard"], len(guard.seeds)))
            if not kept:
                sim.model.load_state_dict(before)
                break
    return {"rounds": rounds, "guard": guard_record,
            "rounds_kept": sum(1 for r in rounds if r.get("guard", {}).get("kept", True))}
