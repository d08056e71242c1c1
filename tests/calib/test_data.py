"""Calibration data: time-major trajectories with provenance, point selection, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tcaq_kernels.calib.data import CalibData, collect_trajectories
from tcaq_kernels.quant.layers import model_fingerprint
from tcaq_kernels.sampling import ddim_sample, sample_uint8, seeded_noise, to_uint8, unet_sample_shape


@pytest.fixture(scope="module")
def data(tiny_unet, tiny_scheduler):
    return collect_trajectories(tiny_unet, tiny_scheduler, seeds=[5, 6, 7], num_steps=4, batch_size=2, progress=False)


def test_time_major_layout_and_provenance(data, tiny_unet, tiny_scheduler):
    assert data.x.shape == (4, 3, 3, 8, 8)  # [steps, samples, C, H, W]
    assert data.timesteps.tolist() == [750, 500, 250, 0]
    assert data.seeds == [5, 6, 7] and data.sampler == "ddim" and data.num_steps == 4 and data.eta == 0.0
    assert data.source == "float" and data.model_fingerprint == model_fingerprint(tiny_unet)
    # step 0 is the initial noise of each seed, batching notwithstanding (two batches: [5, 6], [7])
    assert torch.equal(data.x[0], seeded_noise([5, 6, 7], (3, 8, 8)))
    # and the last recorded input is what DDIM fed the UNet at t = 0
    seen = []
    ddim_sample(tiny_unet, tiny_scheduler, seeded_noise([7], (3, 8, 8)), 4, progress=False,
                callback=lambda i, t, x, eps: seen.append(x.clone()))
    assert torch.allclose(seen[-1][0], data.x[-1, 2], atol=1e-6)
    described = data.describe()
    assert described["digest"] == data.digest() and described["seeds"] == {"first": 5, "count": 3}


def test_points_are_spread_evenly_over_steps(data):
    all_points = data.points(None)
    assert len(all_points) == 12 and all_points.steps.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    some = data.points(6, seed=1)
    assert len(some) == 6
    # ⌊6/4⌋ = 1 per step; the remainder 2 goes to evenly spaced steps 0 and 3
    assert torch.bincount(some.steps, minlength=4).tolist() == [2, 1, 1, 2]
    assert (some.steps[1:] >= some.steps[:-1]).all()  # time-major
    for x, t, s in zip(some.x, some.timesteps, some.steps):
        assert t == data.timesteps[s]
        assert any(torch.equal(x, data.x[s, n]) for n in range(3))
    assert torch.equal(data.points(6, seed=1).x, some.x)  # seeded


def test_save_load_round_trip_and_corruption(data, tmp_path):
    path = data.save(tmp_path / "calib.safetensors")
    back = CalibData.load(path)
    assert torch.equal(back.x, data.x) and back.seeds == data.seeds and back.digest() == data.digest()
    assert back.source == data.source and back.model_fingerprint == data.model_fingerprint
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    tensors["x"][0, 0, 0, 0, 0] += 1.0
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="digest"):
        CalibData.load(path)


def test_empty_seed_list_is_refused(tiny_unet, tiny_scheduler):
    with pytest.raises(ValueError, match="seeds is empty"):
        collect_trajectories(tiny_unet, tiny_scheduler, seeds=[], num_steps=2, progress=False)


def test_sample_uint8_is_the_samplers_images_whatever_the_batching(tiny_unet, tiny_scheduler):
    seeds = [3, 11, 12, 40, 41]
    one = sample_uint8(tiny_unet, tiny_scheduler, seeds, 3, batch_size=1)
    two = sample_uint8(tiny_unet, tiny_scheduler, seeds, 3, batch_size=2)
    direct = to_uint8(ddim_sample(tiny_unet, tiny_scheduler, seeded_noise(seeds, unet_sample_shape(tiny_unet)), 3,
                                  progress=False)).numpy()
    assert one.dtype == np.uint8 and one.shape == (5, 8, 8, 3)
    for other in (two, direct):  # the same noise per seed; batching changes float summation order only
        assert np.abs(one.astype(np.int16) - other).max() <= 1
