"""Same-seed fidelity: the pure metrics, and the two views on real UNets (3 DDIM steps)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tcaq_kernels.eval.fidelity import PSNR_CAP_DB, fine_scale_energy, mse_psnr, relative_error, same_seed_fidelity
from tcaq_kernels.sampling import ddim_sample, seeded_noise, to_uint8, unet_sample_shape

STEPS = 3


def test_relative_error_per_sample():
    ref = torch.randn(3, 2, 4, 4)
    delta = torch.randn(3, 2, 4, 4)
    got = relative_error(ref + delta, ref)
    expect = delta.flatten(1).double().norm(dim=1) / ref.flatten(1).double().norm(dim=1)
    torch.testing.assert_close(got, expect)
    assert relative_error(ref, ref).eq(0).all()


def test_mse_psnr_by_hand():
    a = np.random.randint(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    b = a.copy()
    b[1, 0, 0, 0] ^= 0x10  # one channel of one pixel off by 16
    mse, psnr = mse_psnr(a, b)
    expect = (16 / 255) ** 2 / (8 * 8 * 3)
    assert mse[0] == 0 and mse[1] == pytest.approx(expect)
    assert psnr[1] == pytest.approx(10 * np.log10(1 / expect))
    assert psnr[0] == PSNR_CAP_DB
    with pytest.raises(ValueError, match="shape"):
        mse_psnr(a, b[:2])


class MappedUNet(torch.nn.Module):
    """A test model whose eps is `fn` of the reference's: its per-step error is known."""

    def __init__(self, unet, fn):
        super().__init__()
        self.unet, self.fn, self.config = unet, fn, unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, x, t):
        return SimpleNamespace(sample=self.fn(self.unet(x, t).sample))


def offset_unet(unet, offset: torch.Tensor) -> MappedUNet:
    """eps + a fixed offset."""
    return MappedUNet(unet, lambda eps: eps + offset)


def gain_unet(unet, k: float) -> MappedUNet:
    """(1 + k)·eps: all of the error lies along the prediction."""
    return MappedUNet(unet, lambda eps: (1 + k) * eps)


def test_per_step_error_uses_reference_trajectory(ref_unet, ref_scheduler):
    """Fed the reference's x_t, the error at each step is exactly ‖offset‖ / ‖eps_ref(x_t)‖."""
    seeds = [int(s) for s in np.random.default_rng().choice(10_000, 2, replace=False)]
    offset = 0.05 * torch.randn(unet_sample_shape(ref_unet))
    eps_norms = []

    def record(i, t, x, eps):
        eps_norms.append(eps.double().flatten(1).norm(dim=1))

    ref_imgs = to_uint8(ddim_sample(ref_unet, ref_scheduler, seeded_noise(seeds, unet_sample_shape(ref_unet)),
                                    STEPS, progress=False, callback=record)).numpy()
    res = same_seed_fidelity(ref_unet, offset_unet(ref_unet, offset), ref_scheduler, seeds, STEPS, progress=False)
    expect = (offset.double().norm() / torch.stack(eps_norms)).numpy()
    np.testing.assert_allclose(res.eps_rel_error, expect, rtol=1e-4)
    np.testing.assert_array_equal(res.ref_images, ref_imgs)
    assert res.eps_rel_error.shape == (STEPS, 2) and len(res.timesteps) == STEPS
    assert 0 < res.summary()["psnr_db"] < PSNR_CAP_DB  # own trajectory drifts: images differ
    # the same offset for every sample: all of the error is shared
    np.testing.assert_allclose(res.eps_error_shared, 1.0, rtol=1e-9)


def test_gain_is_found_and_explains_a_scaled_prediction(ref_unet, ref_scheduler):
    k = float(np.random.default_rng().uniform(0.02, 0.2)) * float(np.random.default_rng().choice([-1, 1]))
    res = same_seed_fidelity(ref_unet, gain_unet(ref_unet, k), ref_scheduler, [11, 12], STEPS, progress=False)
    np.testing.assert_allclose(res.eps_gain_k, k, rtol=1e-4)
    np.testing.assert_allclose(res.eps_gain_explained, 1.0, rtol=1e-4)
    assert res.summary()["eps_gain"]["k_mean"] == pytest.approx(k, rel=1e-4)
    # an offset independent of the prediction: (almost) none of the error is gain
    off = same_seed_fidelity(ref_unet, offset_unet(ref_unet, 0.05 * torch.randn(unet_sample_shape(ref_unet))),
                             ref_scheduler, [11, 12], STEPS, progress=False)
    assert (off.eps_gain_explained < 0.05).all()


def test_own_trajectory_eps_scale(ref_unet, ref_scheduler):
    """A model predicting (1 + k)·ε on its own trajectory: the ratio is |1 + k| only at the first step (the
    same noise); afterwards the trajectories part, so only its direction and finiteness are pinned."""
    k = float(np.random.default_rng().uniform(0.05, 0.2))
    res = same_seed_fidelity(ref_unet, gain_unet(ref_unet, k), ref_scheduler, [21, 22], STEPS, progress=False)
    assert res.eps_rms_ratio_own[0] == pytest.approx(1 + k, rel=1e-4)
    assert np.isfinite(res.eps_rms_ratio_own).all() and res.summary()["eps_rms_ratio_own"]["mean"] > 1


def test_identical_models_give_zero_error(ref_unet, ref_scheduler):
    res = same_seed_fidelity(ref_unet, ref_unet, ref_scheduler, [3, 7], STEPS, progress=False)
    assert not res.eps_rel_error.any() and not res.mse.any()
    s = res.summary()
    assert s["psnr_db"] == PSNR_CAP_DB and s["eps_rel_error"]["max"] == 0.0
    assert s["seeds"] == {"first": 3, "last": 7, "count": 2}
    assert s["fine_energy"]["ref"] == s["fine_energy"]["test"] > 0 and s["fine_energy"]["ratio"] == 1.0
    assert s["eps_error_shared"]["mean"] == 0.0 and s["eps_error_shared"]["independent_level"] == pytest.approx(2 ** -0.5)
    assert s["eps_gain"]["k_mean"] == 0.0 and s["eps_gain"]["explained_mean"] == 0.0
    assert s["eps_rms_ratio_own"]["mean"] == 1.0 and s["eps_rms_ratio_own"]["last_step"] == 1.0


def test_perturbed_copy_is_measurably_worse_and_batch_invariant(ref_unet, ref_scheduler):
    noisy = copy.deepcopy(ref_unet)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * p.std().nan_to_num(0))
    seeds = [0, 1, 2]
    a = same_seed_fidelity(ref_unet, noisy, ref_scheduler, seeds, STEPS, batch_size=3, progress=False)
    b = same_seed_fidelity(ref_unet, noisy, ref_scheduler, seeds, STEPS, batch_size=2, progress=False)
    assert (a.eps_rel_error > 0).all() and np.isfinite(a.eps_rel_error).all()
    assert a.summary()["psnr_db"] < PSNR_CAP_DB
    # weight noise moves each sample's ε its own way: well below an error every sample shares
    assert (a.eps_error_shared > 0).all() and (a.eps_error_shared < 0.99).all()
    # Noise is per seed: splitting the seeds into other batches changes nothing beyond float noise.
    np.testing.assert_allclose(a.eps_rel_error, b.eps_rel_error, rtol=1e-3, atol=1e-6)


def test_fine_scale_energy_by_hand_and_noise_raises_it():
    # a 2×2 grey image with one white pixel: vertical pairs differ once in 2, horizontal once in 2
    img = np.zeros((1, 2, 2, 1), dtype=np.uint8)
    img[0, 0, 0, 0] = 255
    assert fine_scale_energy(img) == pytest.approx(0.5 + 0.5)
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, 32)  # a smooth image: 5 levels a pixel
    smooth = np.broadcast_to((ramp[:, None] + ramp[None, :])[None, :, :, None] / 2, (4, 32, 32, 3)).astype(np.uint8)
    noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    assert fine_scale_energy(noisy) > 10 * fine_scale_energy(smooth) > 0
    with pytest.raises(ValueError, match="at least 2×2"):
        fine_scale_energy(np.zeros((3, 1, 5, 3), dtype=np.uint8))
