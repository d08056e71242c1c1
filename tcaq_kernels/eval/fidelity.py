"""Same-seed fidelity of one UNet against another (full precision vs quantized, simulated vs real).

Two views, over a fixed seed set:

- per step, the noise-prediction relative error ‖ε_test − ε_ref‖ / ‖ε_ref‖ with both models fed the
  SAME x_t, taken from the reference model's own trajectory. This isolates each step's error from the
  drift that earlier steps cause, so it shows which timesteps a quantizer hurts. Beside it, the
  shared part of that error: ‖mean over seeds of (ε_test − ε_ref)‖ / mean ‖ε_test − ε_ref‖, about
  1/√n for errors that differ from seed to seed and 1 for an error every sample gets (a bias, say from
  a zero point or a channel scale): the part that moves every image the same way. And the gain
  1 + k of ε_test ≈ (1 + k)·ε_ref + r (least squares over seeds, k = Σ⟨d, ε_ref⟩ / Σ‖ε_ref‖²): the
  error's component along the prediction itself (k > 0: the noise estimate is scaled up, k < 0: down;
  CPU W4A4 states: qdiffusion k = +0.08 at t ≥ 700, 45 % of its error there). PTQD (He et al.,
  NeurIPS 2023) calls it the correlated part of the quantization noise; `explained` is the share of
  ‖d‖² it accounts for;
- at the end, each model runs its own trajectory from the same noise and the final images are
  compared (MSE and PSNR on the stored uint8 images scaled to [0, 1]). This is the error a user sees,
  accumulated over the whole sampling loop. Along the way, the RMS of each model's ε on its OWN
  trajectory, step by step (test over reference): a quantized model that keeps predicting unit-size
  noise where full precision's prediction shrinks (late steps) removes image with it, and its x_t
  fades toward grey — a CPU tcaq W4A4 state ended at ε RMS 1.04 against full precision's 0.71 and at
  a fifth of its image contrast, an error that the same-x_t view only shows at the last steps. Beside
  it, the fine-scale energy of each image set (mean
  squared difference of neighbouring pixels): a quantized sampler that leaves noise in its images
  scores above 1× full precision, a blurring one below — PSNR cannot tell the two apart, FID can
  (the 26 Nov tcaq W4A8 row had better PSNR and worse FID than qdiffusion, and +14 % fine energy).

DDIM runs with eta = 0 only: the stochastic path of `ddim_sample` draws from the global RNG, so the two
models would not see the same noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..sampling import ddim_sample, seeded_noise, to_uint8, unet_sample_shape

#: PSNR of identical images is infinite; report this cap instead so the JSON stays numeric.
PSNR_CAP_DB = 100.0


def relative_error(test: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖test − ref‖₂ / ‖ref‖₂ over all non-batch dims, in float64."""
    t, r = test.double().flatten(1), ref.double().flatten(1)
    return (t - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)


def mse_psnr(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample MSE and PSNR (dB, peak 1, capped at PSNR_CAP_DB) of uint8 images scaled to [0, 1]."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"image sets differ in shape or are empty: {a.shape} vs {b.shape}")
    d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    mse = (d**2).reshape(len(d), -1).mean(axis=1)
    return mse, psnr_from_mse(mse)


def fine_scale_energy(images: np.ndarray) -> float:
    """Mean squared difference of vertically and horizontally adjacent pixels of uint8 images
    [n, H, W, C], scaled to [0, 1]: how much fine-scale structure (or leftover noise) they carry."""
    return float(fine_scale_energy_per_image(images).mean())


def fine_scale_energy_per_image(images: np.ndarray) -> np.ndarray:
    """`fine_scale_energy` of each image, [n]: its mean is the set's (the images share one size), and
    resampling it gives the set's statistic a standard error (the PAR guard's bootstrap)."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    if x.ndim != 4 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"expected uint8 images [n, H, W, C] of at least 2×2 pixels, got shape {x.shape}")
    n = len(x)
    return (((x[:, 1:] - x[:, :-1]) ** 2).reshape(n, -1).mean(axis=1)
            + ((x[:, :, 1:] - x[:, :, :-1]) ** 2).reshape(n, -1).mean(axis=1))


def psnr_from_mse(mse) -> np.ndarray:
    mse = np.asarray(mse, dtype=np.float64)
    floor = 10.0 ** (-PSNR_CAP_DB / 10.0)
    return 10.0 * np.log10(1.0 / np.maximum(mse, floor))


@dataclass
class FidelityResult:
    seeds: list[int]
    timesteps: list[int]
    eps_rel_error: np.ndarray  # [steps, n]: reference trajectory, same x_t for both models
    ref_images: np.ndarray  # uint8 [n, H, W, C]
    test_images: np.ndarray  # uint8 [n, H, W, C], the test model's own trajectory
    mse: np.ndarray  # [n]
    psnr: np.ndarray  # [n]
    eps_error_shared: np.ndarray  # [steps]: ‖mean_n d‖ / mean_n ‖d‖ of d = ε_test − ε_ref (see module doc)
    eps_gain_k: np.ndarray  # [steps]: k of ε_test ≈ (1 + k)·ε_ref + r, pooled over seeds
    eps_gain_explained: np.ndarray  # [steps]: share of Σ‖d‖² that k·ε_ref accounts for
    eps_rms_ratio_own: np.ndarray  # [steps]: RMS of ε_test on its own trajectory / ε_ref's on the reference's

    def summary(self) -> dict:
        per_step = self.eps_rel_error.mean(axis=1)
        pooled_mse = float(self.mse.mean())
        fine_ref, fine_test = fine_scale_energy(self.ref_images), fine_scale_energy(self.test_images)
        return {
            "n_seeds": len(self.seeds),
            "seeds": {"first": int(self.seeds[0]), "last": int(self.seeds[-1]), "count": len(self.seeds)},
            "psnr_db": float(psnr_from_mse(pooled_mse)),
            "psnr_db_mean_per_sample": float(self.psnr.mean()),
            "mse": pooled_mse,
            "fine_energy": {"ref": fine_ref, "test": fine_test, "ratio": fine_test / fine_ref if fine_ref > 0 else None},
            "eps_error_shared": {
                "mean": float(self.eps_error_shared.mean()),
                "independent_level": 1.0 / np.sqrt(len(self.seeds)),  # what errors unrelated across seeds give
                "per_step": [float(v) for v in self.eps_error_shared],
            },
            "eps_gain": {
                "k_mean": float(self.eps_gain_k.mean()),
                "explained_mean": float(self.eps_gain_explained.mean()),
                "k_per_step": [float(v) for v in self.eps_gain_k],
                "explained_per_step": [float(v) for v in self.eps_gain_explained],
            },
            "eps_rms_ratio_own": {
                "mean": float(self.eps_rms_ratio_own.mean()),
                "last_step": float(self.eps_rms_ratio_own[-1]),
                "per_step": [float(v) for v in self.eps_rms_ratio_own],
            },
            "eps_rel_error": {
                "mean": float(per_step.mean()),
                "max": float(per_step.max()),
                "argmax_timestep": int(self.timesteps[int(per_step.argmax())]),
                "first_step": float(per_step[0]),
                "last_step": float(per_step[-1]),
                "timesteps": [int(t) for t in self.timesteps],
                "per_step": [float(v) for v in per_step],
            },
        }


def _device_of(unet) -> torch.device:
    return next(unet.parameters()).device


@torch.no_grad()
def same_seed_fidelity(
    ref_unet,
    test_unet,
    scheduler,
    seeds: Sequence[int],
    num_steps: int = 100,
    batch_size: int = 64,
    progress: bool = True,
) -> FidelityResult:
    """Compare `test_unet` with `ref_unet` on `seeds` (see the module docstring for the two views).

    Each model runs on its own device and dtype; noise comes from `seeded_noise`, so a seed gives the
    same start whatever the batch.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    shape = unet_sample_shape(ref_unet)
    ref_dev, test_dev = _device_of(ref_unet), _device_of(test_unet)
    test_dtype = next(test_unet.parameters()).dtype
    errs, ref_imgs, test_imgs, timesteps = [], [], [], []
    diff_sum = torch.zeros((num_steps, *shape), dtype=torch.float64)  # Σ_n (ε_test − ε_ref) per step
    diff_norm_sum = torch.zeros(num_steps, dtype=torch.float64)  # Σ_n ‖ε_test − ε_ref‖ per step
    # Σ_n ⟨d, ε_ref⟩, Σ_n ‖ε_ref‖², Σ_n ‖d‖² per step: the gain regression's sufficient statistics (ε_ref is
    # the reference on its own trajectory, so Σ‖ε_ref‖² is also the denominator of the own-trajectory RMS ratio)
    cross, ref_sq, diff_sq = (torch.zeros(num_steps, dtype=torch.float64) for _ in range(3))
    test_own_sq = torch.zeros(num_steps, dtype=torch.float64)  # Σ_n ‖ε_test‖² on the test model's own trajectory
    batches = range(0, len(seeds), batch_size)
    for lo in tqdm(batches, desc="fidelity", disable=not progress, leave=False):
        chunk = seeds[lo : lo + batch_size]
        step_errs: list[torch.Tensor] = []
        step_ts: list[int] = []

        def on_step(i, t, x, eps_ref):
            eps_test = test_unet(x.to(device=test_dev, dtype=test_dtype), t.to(test_dev)).sample.to(ref_dev)
            step_errs.append(relative_error(eps_test, eps_ref).cpu())
            step_ts.append(int(t))
            e = eps_ref.double()
            d = eps_test.double() - e  # reduced where it lives; only the sums leave the device
            diff_sum[i] += d.sum(0).cpu()
            diff_norm_sum[i] += d.flatten(1).norm(dim=1).sum().cpu()
            cross[i] += (d * e).sum().cpu()
            ref_sq[i] += e.pow(2).sum().cpu()
            diff_sq[i] += d.pow(2).sum().cpu()

        def on_own_step(i, t, x, eps):
            test_own_sq[i] += eps.double().pow(2).sum().cpu()

        ref = ddim_sample(ref_unet, scheduler, seeded_noise(chunk, shape, ref_dev), num_steps, progress=False, callback=on_step)
        test = ddim_sample(test_unet, scheduler, seeded_noise(chunk, shape, test_dev), num_steps, progress=False,
                           callback=on_own_step)
        errs.append(torch.stack(step_errs).numpy())
        ref_imgs.append(to_uint8(ref).numpy())
        test_imgs.append(to_uint8(test).numpy())
        timesteps = step_ts
    ref_images, test_images = np.concatenate(ref_imgs), np.concatenate(test_imgs)
    mse, psnr = mse_psnr(test_images, ref_images)
    n = len(seeds)
    shared = ((diff_sum / n).flatten(1).norm(dim=1) / (diff_norm_sum / n).clamp_min(1e-30)).numpy()
    k, explained = eps_gain(cross, ref_sq, diff_sq)
    return FidelityResult(seeds, timesteps, np.concatenate(errs, axis=1), ref_images, test_images, mse, psnr, shared,
                          k.numpy(), explained.numpy(), (test_own_sq / ref_sq.clamp_min(1e-300)).sqrt().numpy())


def eps_gain(cross: torch.Tensor, ref_sq: torch.Tensor, diff_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, explained) per step from Σ⟨d, ε_ref⟩, Σ‖ε_ref‖², Σ‖d‖²: the least-squares k of d ≈ k·ε_ref and
    the share k²·Σ‖ε_ref‖² / Σ‖d‖² of the error it accounts for (0 where there is no error)."""
    k = cross / ref_sq.clamp_min(1e-300)
    explained = torch.where(diff_sq > 0, k.pow(2) * ref_sq / diff_sq.clamp_min(1e-300), torch.zeros_like(k))
    return k, explained
