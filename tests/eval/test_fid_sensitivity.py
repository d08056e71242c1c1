"""The perturbations of benchmarks/fid_sensitivity.py do what its table says: noise adds fine-scale energy,
blur removes it, both by amounts that grow with the parameter, and neither leaves uint8."""
from __future__ import annotations

import numpy as np
import pytest

from tcaq_kernels.eval.fidelity import fine_scale_energy, mse_psnr


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("fid_sensitivity")


def test_noise_raises_and_blur_lowers_fine_energy(bench):
    rng = np.random.default_rng(3)
    i, j = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, size=(16, 1, 1, 3))  # a texture of a few pixels' period per image
    texture = np.rint(120 + 60 * np.sin(2 * np.pi * i[None, :, :, None] / 5 + phase)
                     * np.cos(2 * np.pi * j[None, :, :, None] / 7)).astype(np.uint8)
    base = fine_scale_energy(texture)
    noisy = [bench.add_noise(texture, s) for s in bench.NOISE_SIGMAS]
    blurred = [bench.blur(texture, b) for b in bench.BLUR_AMOUNTS]
    assert all(x.dtype == np.uint8 and x.shape == texture.shape for x in noisy + blurred)
    ups = [fine_scale_energy(x) / base for x in noisy]
    downs = [fine_scale_energy(x) / base for x in blurred]
    assert 1 < ups[0] < ups[1] < ups[2] and 1 > downs[0] > downs[1] > downs[2]
    errors = [mse_psnr(texture, x)[0].mean() for x in noisy]
    assert errors[0] < errors[1] < errors[2]
    assert np.array_equal(bench.add_noise(texture, 2.0), bench.add_noise(texture, 2.0))  # seeded
