"""PAR guard: a round is kept only if held-out samples did not move away from full precision."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tcaq_kernels.calib import guard as guard_mod
from tcaq_kernels.calib.blocks import find_blocks
from tcaq_kernels.calib.config import MethodConfig
from tcaq_kernels.calib.data import collect_trajectories
from tcaq_kernels.calib.guard import ParGuard, SampleCheck, compare, fade_change_se, guard_seeds, keeps
from tcaq_kernels.calib.par import round_seeds, run_par
from tcaq_kernels.calib.qmodel import QuantSim
from tcaq_kernels.calib.reconstruct import reconstruct_round
from tcaq_kernels.calib.settings import uniform_group_edges


def test_compare_sees_fading_and_noise():
    rng = np.random.default_rng(7)
    ref = rng.integers(0, 256, size=(5, 9, 7, 3), dtype=np.uint8)
    same = compare(ref, ref)
    assert same.fine_ratio == 1.0 and same.fade == 0.0 and same.psnr_db >= 60
    flat = np.full_like(ref, 128)  # what a faded model draws
    faded = compare(ref, flat)
    assert faded.fine_ratio == 0.0 and faded.fade == math.inf
    blurred = ((ref.astype(np.int32) + np.roll(ref, 1, axis=1) + np.roll(ref, 1, axis=2)) // 3).astype(np.uint8)
    soft = compare(ref, blurred)
    assert 0 < soft.fine_ratio < 1 and math.isclose(soft.fade, -math.log(soft.fine_ratio))
    rougher = compare(blurred, ref)  # more fine energy than the reference: not a fade
    assert rougher.fine_ratio > 1 and rougher.fade == 0.0
    mse = ((ref / 255.0 - blurred / 255.0) ** 2).mean()
    assert math.isclose(soft.psnr_db, -10 * math.log10(mse), rel_tol=1e-12)


def _blur(images: np.ndarray, amount: float) -> np.ndarray:
    """Mix each image with its 1-pixel shifts: less fine-scale energy, more for a larger `amount`."""
    x = images.astype(np.float64)
    mixed = (1 - amount) * x + amount * (np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2)) / 2
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def test_fade_change_se_is_a_paired_bootstrap_that_shrinks_with_more_seeds():
    rng = np.random.default_rng(11)
    ref = rng.integers(0, 256, size=(1024, 6, 6, 3), dtype=np.uint8)
    ses = {}
    for n in (64, 1024):
        before, after = compare(ref[:n], _blur(ref[:n], 0.2)), compare(ref[:n], _blur(ref[:n], 0.4))
        assert after.fade > before.fade > 0
        ses[n] = fade_change_se(before, after)
        assert 0 < ses[n] < after.fade - before.fade  # a real fade, measured to better than its size
        assert fade_change_se(before, before) == 0.0  # the same check twice: every draw's change is 0
    assert ses[64] / ses[1024] == pytest.approx(4.0, rel=0.35)  # ∝ 1/√n
    assert fade_change_se(SampleCheck(20.0, 0.9), SampleCheck(20.0, 0.8)) is None  # no per-seed energies


@pytest.mark.parametrize("after,kept", [
    (SampleCheck(20.0, 0.9), True),    # unchanged
    (SampleCheck(21.0, 1.05), True),   # closer
    (SampleCheck(19.0, 0.9), True),    # PSNR fell: recorded, not decisive by default
    (SampleCheck(22.0, 0.85), True),   # fade grew by 0.057, within the default tolerance (0.1)
    (SampleCheck(22.0, 0.8), False),   # fade grew by 0.118 (−log 0.8 + log 0.9)
    (SampleCheck(22.0, 1.3), True),    # more fine energy than full precision is not a fade
])
def test_keeps_unless_the_samples_fade(after, kept):
    assert keeps(SampleCheck(20.0, 0.9), after, MethodConfig().par_guard_fade_tol) is kept


def test_psnr_decides_only_when_given_a_tolerance():
    before = SampleCheck(20.0, 0.9)
    assert keeps(before, SampleCheck(19.9, 0.9), fade_tol=0.1, psnr_tol_db=0.2)
    assert not keeps(before, SampleCheck(19.7, 0.9), fade_tol=0.1, psnr_tol_db=0.2)
    assert not keeps(before, SampleCheck(21.0, 0.89), fade_tol=0.0)  # the strict guard of 439da3c


def test_guard_seeds_are_held_out():
    cfg = MethodConfig(seed=1_000_000, num_samples=64, par_rounds=2, par_fresh_seeds=True, par_guard_samples=16)
    used = {s for k in range(cfg.par_rounds + 1) for s in round_seeds(cfg, k)}
    assert len(guard_seeds(cfg)) == 16 and used.isdisjoint(guard_seeds(cfg))


def test_guard_options_are_checked():
    with pytest.raises(ValueError, match="par_guard_samples=-1"):
        MethodConfig(par_guard_samples=-1)
    with pytest.raises(ValueError, match="par_guard_fade_tol=-0.1"):
        MethodConfig(par_guard_fade_tol=-0.1)


@pytest.fixture
def round0(tiny_unet, tiny_scheduler, tiny_budget):
    cfg = MethodConfig(**{**tiny_budget, "timestep_groups": 2, "num_points": None, "init_points": None,
                          "par_rounds": 2, "iters": 6})
    data = collect_trajectories(tiny_unet, tiny_scheduler, round_seeds(cfg, 0), cfg.num_steps, progress=False)
    sim = QuantSim(tiny_unet, "W4A4", uniform_group_edges(1000, 2), cfg.keep_float)
    blocks = find_blocks(tiny_unet, sim.kinds, (data.x[0], data.timesteps[0]))
    reconstruct_round(sim, tiny_unet, blocks, data.points(None), cfg, cfg.iters, True, cfg.num_steps, "round 0")
    return sim, blocks, cfg, data


def _state(sim) -> dict:
    return {k: v.clone() for k, v in sim.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rejected_round_is_undone_and_ends_par(round0, tiny_unet, tiny_scheduler, monkeypatch):
    sim, blocks, cfg, data = round0
    before = _state(sim)
    checks = iter([SampleCheck(18.0, 0.95), SampleCheck(18.5, 0.5)])  # round 0, then a faded round 1
    monkeypatch.setattr(ParGuard, "check", lambda self, unet: next(checks))
    par = run_par(sim, tiny_unet, tiny_scheduler, blocks, cfg, data)
    assert [r["round"] for r in par["rounds"]] == [1] and par["rounds_kept"] == 0  # round 2 never ran
    verdict = par["rounds"][0]["guard"]
    assert verdict["kept"] is False and verdict["after"]["fine_ratio"] == 0.5 and verdict["before"]["fine_ratio"] == 0.95
    assert par["rounds"][0]["blocks"]  # the round did run and change the model …
    assert _same(_state(sim), before)  # … and was undone


def test_kept_rounds_stay(round0, tiny_unet, tiny_scheduler, monkeypatch):
    sim, blocks, cfg, data = round0
    before = _state(sim)
    checks = iter([SampleCheck(18.0, 0.9), SampleCheck(18.5, 0.95), SampleCheck(19.0, 1.0)])
    monkeypatch.setattr(ParGuard, "check", lambda self, unet: next(checks))
    par = run_par(sim, tiny_unet, tiny_scheduler, blocks, cfg, data)
    assert par["rounds_kept"] == 2 and [r["guard"]["kept"] for r in par["rounds"]] == [True, True]
    assert par["rounds"][1]["guard"]["before"] == par["rounds"][0]["guard"]["after"]
    assert not _same(_state(sim), before)


def test_guard_on_real_samples_leaves_the_model_it_last_kept(round0, tiny_unet, tiny_scheduler):
    """No mocks: after PAR, the model's guard samples are exactly those of the last kept check —
    whether a round was undone or not (sampling is deterministic for a seed)."""
    sim, blocks, cfg, data = round0
    par = run_par(sim, tiny_unet, tiny_scheduler, blocks, cfg, data)
    assert par["guard"]["seeds"] == {"first": cfg.seed + guard_mod.GUARD_SEED_OFFSET, "count": cfg.par_guard_samples}
    kept = [par["guard"]["round0"]] + [r["guard"]["after"] for r in par["rounds"] if r["guard"]["kept"]]
    for r in par["rounds"]:
        assert all(math.isfinite(r["guard"]["after"][k]) for k in ("psnr_db", "fine_ratio"))
        assert r["guard"]["fade_change_se"] >= 0 and math.isfinite(r["guard"]["fade_change_se"])
    final = ParGuard(tiny_unet, tiny_scheduler, cfg).check(sim.model).as_dict()
    assert final == kept[-1]
