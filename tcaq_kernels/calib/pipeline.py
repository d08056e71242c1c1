"""The calibration pipeline every preset configures: data → initialise + reconstruct → PAR → state.

1. Full-precision DDIM trajectories (data.py), and a time-major selection of points from them.
2. A fake-quant copy of the UNet (qmodel.py); blocks in execution order (blocks.py).
3. Round 0, block by block: capture, initialise (TCR, DAQ, weight scales, activation qparams), and
   reconstruct (AdaRound + LSQ) unless the configuration says not to.
4. PAR rounds (par.py), if any, each kept only if the PAR guard (guard.py) lets it.
5. Export integers and scales into a CalibState whose settings record the configuration, the data
   each round was fitted on, per-block losses, the DAQ table, the wall time and the device.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Optional

import torch

from ..quant.state import CalibState
from ..sampling import TextConditioning, seeded_noise, text_kwargs, unet_sample_shape
from .blocks import find_blocks
from .config import MethodConfig
from .data import collect_trajectories
from .determinism import deterministic_algorithms
from .par import run_par
from .qmodel import QuantSim
from .reconstruct import reconstruct_round
from .settings import float_layer_names, parse_bits, uniform_group_edges


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """Calibrate on the deterministic model (dropout off), and give the module back as it was."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def calibrate_with_config(unet: torch.nn.Module, scheduler, bits: str, cfg: MethodConfig, method: str,
                          conditioning: Optional[TextConditioning] = None) -> CalibState:
    """Run the pipeline with `cfg` and return the state, labelled `method` (`conditioning`: the prompts a
    text-conditional UNet samples its trajectories with, `sampling.text_conditioning`)."""
    with deterministic_algorithms(cfg.deterministic):
        return _calibrate(unet, scheduler, bits, cfg, method, conditioning)


def _calibrate(unet: torch.nn.Module, scheduler, bits: str, cfg: MethodConfig, method: str,
               conditioning: Optional[TextConditioning]) -> CalibState:
    start = time.perf_counter()
    parse_bits(bits)
    keep_float = float_layer_names(unet, cfg.keep_float)
    device = torch.device(cfg.device) if cfg.device else next(unet.parameters()).device
    fp = unet if next(unet.parameters()).device == device else copy.deepcopy(unet).to(device)
    edges = uniform_group_edges(scheduler.config.num_train_timesteps, cfg.timestep_groups)
    phases = {}
    with _eval_mode(fp), torch.no_grad():
        data = collect_trajectories(fp, scheduler, list(range(cfg.seed, cfg.seed + cfg.num_samples)),
                                    cfg.num_steps, cfg.batch_size, progress=cfg.progress, conditioning=conditioning)
        sim = QuantSim(fp, bits, edges, keep_float, cfg.group_act_params, per_group_p=cfg.daq,
                       act_bits=cfg.act_bits, p_row_norm=cfg.p_row_norm, p_row_max=cfg.p_row_max)
        example = seeded_noise([cfg.seed], unet_sample_shape(fp), device), data.timesteps[:1]
        text = text_kwargs(conditioning, [0], device, fp.dtype)
        blocks = find_blocks(fp, sim.kinds, example, {"encoder_hidden_states": text["text"]} if text else None)
    phases["data"] = time.perf_counter() - start
    with _eval_mode(fp):
        points = data.points(cfg.num_points, seed=cfg.seed)
        base = reconstruct_round(sim, fp, blocks, points, cfg, cfg.iters, initialize=True,
                                 num_steps=cfg.num_steps, desc=f"{method} {bits}: blocks")
        phases["round0"] = time.perf_counter() - start - phases["data"]
        par = run_par(sim, fp, scheduler, blocks, cfg, data)
        phases["par"] = time.perf_counter() - start - phases["data"] - phases["round0"]
    settings = {
        **cfg.as_settings(),
        "method": method,
        "calib_data": data.describe(),
        "num_points_used": len(points),
        "num_blocks": len(blocks),
        "round0_blocks": base["blocks"],
        "par": par["rounds"],
        "par_guard": par["guard"],
        "par_rounds_kept": par["rounds_kept"],
        "daq_table": base["daq"],
        "tcr_strength": base["tcr"],
        "calib_seconds": round(time.perf_counter() - start, 2),
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
        "device": device_name(device),
    }
    return sim.export_state(fp, method, settings)
