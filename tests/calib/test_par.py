"""PAR: each round's calibration data comes from the quantized model's own trajectories."""
from __future__ import annotations

import pytest
import torch

import tcaq_kernels
from tcaq_kernels.calib.blocks import find_blocks
from tcaq_kernels.calib.config import MethodConfig
from tcaq_kernels.calib.data import CalibData, collect_trajectories
from tcaq_kernels.calib.par import regenerate, round_iters, round_points, round_seeds
from tcaq_kernels.calib.qmodel import QuantSim
from tcaq_kernels.calib.reconstruct import reconstruct_round
from tcaq_kernels.calib.settings import uniform_group_edges


@pytest.fixture
def calibrated(tiny_unet, tiny_scheduler, tiny_budget):
    cfg = MethodConfig(**{**tiny_budget, "timestep_groups": 2, "num_points": None, "init_points": None})
    data = collect_trajectories(tiny_unet, tiny_scheduler, round_seeds(cfg, 0), cfg.num_steps, progress=False)
    sim = QuantSim(tiny_unet, "W4A4", uniform_group_edges(1000, 2), cfg.keep_float)
    blocks = find_blocks(tiny_unet, sim.kinds, (data.x[0], data.timesteps[0]))
    reconstruct_round(sim, tiny_unet, blocks, data.points(None), cfg, cfg.iters, True, cfg.num_steps, "round 0")
    return sim, cfg, data


def test_regenerated_data_is_the_quantized_models_trajectory(calibrated, tiny_unet, tiny_scheduler):
    sim, cfg, data0 = calibrated
    data1 = regenerate(sim, tiny_unet, tiny_scheduler, cfg, 1)
    assert data1.source == "quantized (PAR round 1)"
    assert data1.model_fingerprint == data0.model_fingerprint  # it belongs to the float model's structure
    assert data1.seeds == data0.seeds and torch.equal(data1.timesteps, data0.timesteps)
    assert torch.equal(data1.x[0], data0.x[0])  # the same starting noise …
    drift = (data1.x[1:] - data0.x[1:]).norm() / data0.x[1:].norm()
    assert drift > 0.05  # … then the quantized model walks its own trajectory (W4A4: measured ~0.5)
    assert data1.digest() != data0.digest()
    # and that trajectory is the one the exported state gives after convert()
    converted = tcaq_kernels.convert(tiny_unet, sim.export_state(tiny_unet, "test", {}), backend="simulate")
    data_conv = collect_trajectories(converted, tiny_scheduler, data0.seeds, cfg.num_steps, progress=False)
    assert (data_conv.x - data1.x).norm() / data1.x.norm() < 1e-5  # float summation order only (~3e-7)


def test_rounds_shrink_iterations_and_can_use_fresh_seeds():
    cfg = MethodConfig(iters=800, par_iters_decay=0.5, num_samples=4, seed=10)
    assert [round_iters(cfg, k) for k in range(4)] == [800, 400, 200, 100]
    assert round_seeds(cfg, 2) == [10, 11, 12, 13]
    assert round_seeds(cfg.updated(par_fresh_seeds=True), 2) == [18, 19, 20, 21]
    assert round_iters(cfg.updated(iters=0, reconstruct=True), 1) == 0


def test_pipeline_records_every_round(tiny_unet, tiny_scheduler, tiny_budget):
    state = tcaq_kernels.calibrate(tiny_unet, "W8A8", method="qdiffusion+par", scheduler=tiny_scheduler,
                                   **{**tiny_budget, "iters": 4, "par_guard_samples": 0})
    par = state.settings["par"]
    assert [r["round"] for r in par] == [1, 2] and [r["iters"] for r in par] == [2, 1]
    digests = {state.settings["calib_data"]["digest"], *(r["data"]["digest"] for r in par)}
    assert len(digests) == 3 and all(r["data"]["source"].startswith("quantized") for r in par)
    assert set(par[0]["blocks"]) == set(state.settings["round0_blocks"])
    assert state.settings["par_guard"] is None and state.settings["par_rounds_kept"] == 2
    state.validate(tiny_unet)


def _data(steps: int, n: int, offset: float) -> CalibData:
    """Trajectories whose values say where they come from: offset + step + trajectory/100."""
    x = offset + torch.arange(steps).view(steps, 1, 1, 1, 1) + torch.arange(n).view(1, n, 1, 1, 1) / 100
    return CalibData(x=x.expand(steps, n, 1, 2, 2).clone(), timesteps=torch.arange(steps - 1, -1, -1) * 10,
                     seeds=list(range(n)), sampler="ddim", num_steps=steps, eta=0.0, model_fingerprint="f", source="test")


@pytest.mark.parametrize("share,expected_float", [(0.0, 0), (0.25, 10), (1.0, 40)])
def test_round_points_mix_float_trajectories_in_and_stay_time_major(share, expected_float):
    regenerated, float_data = _data(10, 6, 0.0), _data(10, 6, 1000.0)
    points = round_points(regenerated, float_data, 40, share, seed=3)
    assert len(points) == 40
    from_float = points.x[:, 0, 0, 0] >= 1000
    assert int(from_float.sum()) == expected_float
    assert torch.equal(points.steps, points.steps.sort().values)  # time-major, as every round's points
    # every point's step index and timestep belong to the trajectory value it carries
    assert torch.equal(points.steps, (points.x[:, 0, 0, 0] % 1000).floor().long())
    assert torch.equal(points.timesteps, regenerated.timesteps[points.steps])
    if 0 < share < 1:  # each part is spread over the steps, not bunched at the start
        assert points.steps[from_float].unique().numel() == 10


def test_float_share_is_checked():
    with pytest.raises(ValueError, match="par_float_share=1.5"):
        MethodConfig(par_float_share=1.5)


@pytest.mark.parametrize("learn_rounding", [True, False])
def test_par_can_keep_round0_rounding(calibrated, tiny_unet, tiny_scheduler, learn_rounding):
    """par_learn_rounding=False: the PAR rounds move only activation step sizes; the integer weights
    stay those of round 0 (the test of whether re-learned rounding is what fades W4A4)."""
    from tcaq_kernels.calib.fakequant import FakeQuantLayer
    from tcaq_kernels.calib.par import run_par

    sim, cfg, data = calibrated
    cfg = cfg.updated(par_rounds=1, iters=8, par_learn_rounding=learn_rounding, par_guard_samples=0)
    layers = {n: l for n, l in sim.layers.items() if isinstance(l, FakeQuantLayer)}
    ints0 = {n: l.weight_q.integers().clone() for n, l in layers.items()}
    steps0 = {n: qz.log_scale.detach().clone() for n, l in sim.layers.items() for qz in l.quantizers().values()}
    blocks = find_blocks(tiny_unet, sim.kinds, (data.x[0], data.timesteps[0]))
    run_par(sim, tiny_unet, tiny_scheduler, blocks, cfg, data)
    same_ints = all(torch.equal(l.weight_q.integers(), ints0[n]) for n, l in layers.items())
    assert same_ints is not learn_rounding
    steps = {n: qz.log_scale for n, l in sim.layers.items() for qz in l.quantizers().values()}
    assert any(not torch.equal(steps[n], steps0[n]) for n in steps0)  # step sizes learned either way


def test_a_round_with_nothing_to_learn_leaves_the_model(calibrated, tiny_unet, tiny_scheduler):
    """Rounding kept and step sizes fixed: every block is skipped, not a backward pass without gradients."""
    from tcaq_kernels.calib.par import run_par

    sim, cfg, data = calibrated
    cfg = cfg.updated(par_rounds=1, iters=4, par_learn_rounding=False, learn_act_scale=False, par_guard_samples=0)
    before = {k: v.clone() for k, v in sim.model.state_dict().items()}
    blocks = find_blocks(tiny_unet, sim.kinds, (data.x[0], data.timesteps[0]))
    par = run_par(sim, tiny_unet, tiny_scheduler, blocks, cfg, data)
    assert all(r["final_rec_loss"] is None for r in par["rounds"][0]["blocks"].values())
    assert all(torch.equal(v, before[k]) for k, v in sim.model.state_dict().items())
