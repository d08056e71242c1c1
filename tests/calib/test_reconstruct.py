"""Block reconstruction on a real ResBlock of the reference model: AdaRound beats nearest rounding."""
from __future__ import annotations

import pytest
from tcaq_kernels.calib.blocks import block_io, capture_targets, find_blocks
from tcaq_kernels.calib.config import MethodConfig
from tcaq_kernels.calib.data import collect_trajectories
from tcaq_kernels.calib.initialize import initialize_block
from tcaq_kernels.calib.qmodel import QuantSim
from tcaq_kernels.calib.reconstruct import beta_schedule, block_error, optimize_block

BLOCK = "down_blocks.2.resnets.0"  # 128 channels at 8×8: conv1, time_emb_proj, conv2


def _points(unet, scheduler, seeds):
    data = collect_trajectories(unet, scheduler, seeds, num_steps=4, batch_size=len(seeds), progress=False)
    return data.points(None)


@pytest.fixture(scope="module")
def setup(ref_unet, ref_scheduler):
    cfg = MethodConfig(iters=150, recon_batch_size=8, batch_size=16, init_points=None, init_values=8192, seed=0,
                       act_init="mse", weight_scale="mse", progress=False)
    sim = QuantSim(ref_unet, "W4A8", [], keep_float=cfg.keep_float)
    train, held_out = _points(ref_unet, ref_scheduler, [0, 1, 2, 3]), _points(ref_unet, ref_scheduler, [10, 11])
    blocks = {b.name: b for b in find_blocks(ref_unet, sim.kinds, (train.x[:1], train.timesteps[:1]))}
    block = blocks[BLOCK]
    io = {name: block_io(block, ref_unet, pts, sim.index.groups_of(pts.timesteps),
                         capture_targets(ref_unet, [block], pts, 16)[BLOCK], 16)
          for name, pts in (("train", train), ("held_out", held_out))}
    initialize_block(sim, block, io["train"], cfg, num_steps=4)
    return sim, block, io, cfg


def test_adaround_lowers_the_block_error_versus_nearest_rounding(setup):
    sim, block, io, cfg = setup
    assert block.layers == [f"{BLOCK}.conv1", f"{BLOCK}.time_emb_proj", f"{BLOCK}.conv2"]
    sim.set_mode(block.layers, weight="quant", act=True)
    nearest = {k: block_error(sim, block, v, 16) for k, v in io.items()}
    nearest_ints = {n: sim.layers[n].weight_q.integers().clone() for n in block.layers}
    record = optimize_block(sim, block, io["train"], cfg, cfg.iters, progress=False)
    learned = {k: block_error(sim, block, v, 16) for k, v in io.items()}
    assert learned["train"] < 0.9 * nearest["train"], (nearest, learned, record)
    assert learned["held_out"] < nearest["held_out"], (nearest, learned)
    for name in block.layers:
        wq = sim.layers[name].weight_q
        assert wq.learned and wq.mode == "quant"
        ints = wq.integers()
        changed = (ints != nearest_ints[name]).float().mean().item()
        assert 0 < changed < 0.5, (name, changed)
        # AdaRound only chooses between floor and ceil of w/s (weights the MSE scale clips stay clipped)
        ratio = wq.weight / wq._scale_view()
        inside = ratio.abs() < 7
        assert ((ints - ratio)[inside].abs() < 1 + 1e-4).all()


def test_beta_schedule_warms_up_then_anneals():
    assert beta_schedule(0, 100, 0.2, 20, 2) is None and beta_schedule(19, 100, 0.2, 20, 2) is None
    assert beta_schedule(20, 100, 0.2, 20, 2) == 20
    assert beta_schedule(99, 100, 0.2, 20, 2) == pytest.approx(2 + 18 / 80)
    values = [beta_schedule(i, 100, 0.2, 20, 2) for i in range(20, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
