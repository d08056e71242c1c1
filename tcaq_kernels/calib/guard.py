"""PAR guard [ours]: keep a PAR round only if the quantized model's samples did not move away from the
full-precision ones on held-out seeds.

Why: at W4A4 PAR fades the samples towards flat grey (tcaq W4A4 FID-ResNet56 32.1 with two PAR rounds,
13.7 and 17.7 without, on two calibrations), while at W4A8 the same rounds help (3.7 vs 4.3–4.9). The
block losses cannot tell: in a CPU run whose PAR rounds faded the samples (fine-energy ratio 1.10 →
0.15), all 35 blocks' reconstruction losses fell in both rounds. What tells
is the end of the sampler: before and after each round, the quantized model samples `par_guard_samples`
held-out seeds and is compared with the full-precision samples of the same seeds by

* PSNR (how far the images moved), and
* the fade, max(0, −log(fine-scale energy ratio)) (fidelity.fine_scale_energy): how much fine structure
  the samples lost. One-sided on purpose: fading is PAR's failure mode, while a ratio above 1 is the
  leftover quantization noise of a short or low-bit sampler, which the PSNR already sees (on DDIM-6 a
  W4A8 round that lowered the ε error raised the ratio from 2.32 to 2.43).

A round is kept unless the fade grew by more than `par_guard_fade_tol` (and, only when
`par_guard_psnr_tol_db` is set, unless the PSNR fell by more than that); a rejected round is undone and
PAR stops there (later rounds would start from it). PSNR is recorded but not decisive by default: on
the measured 10k rows the fade sides with FID-ResNet56 in every pair of with/without PAR we have —
W4A4 (fine-energy ratio 0.04 with PAR vs 0.39 without: reject), W4A4 with 8-bit shortcut inputs on two
calibration seeds (1.14 vs 1.18, FID a tie; 0.68 vs 0.99: reject), W4A8 (1.09 vs 0.84: keep) — while
PSNR does not at W4A8 (27.03 dB with PAR, 27.86 without, FID 3.71 vs 4.30). calib/README.md, "PAR guard".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..eval.fidelity import fine_scale_energy_per_image, mse_psnr, psnr_from_mse
from ..sampling import TextConditioning, sample_uint8
from .config import MethodConfig

#: held-out seeds start this far above the calibration seed, clear of every PAR round's fresh seeds
GUARD_SEED_OFFSET = 500_000


@dataclass(frozen=True)
class SampleCheck:
    """How close the quantized model's samples are to the full-precision ones on the guard seeds."""

    psnr_db: float
    fine_ratio: float
    # per held-out seed, [n]: the test and the reference images' fine-scale energy (None for a check built
    # by hand); the bootstrap of `fade_change_se` resamples them
    fine_test: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    fine_ref: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def fade(self) -> float:
        """−log fine-energy ratio, floored at 0: 0 when the samples carry at least as much fine structure
        as full precision, ∞ for flat images."""
        return max(0.0, -math.log(self.fine_ratio)) if self.fine_ratio > 0 else math.inf

    def as_dict(self) -> dict:
        return {"psnr_db": round(self.psnr_db, 4), "fine_ratio": round(self.fine_ratio, 5), "fade": round(self.fade, 5)}


def compare(ref_images: np.ndarray, test_images: np.ndarray) -> SampleCheck:
    """PSNR of the pooled MSE and fine-energy ratio of uint8 [n, H, W, C] image sets of the same seeds."""
    mse, _ = mse_psnr(ref_images, test_images)
    ref_fine, test_fine = fine_scale_energy_per_image(ref_images), fine_scale_energy_per_image(test_images)
    ratio = test_fine.mean() / ref_fine.mean() if ref_fine.mean() > 0 else 1.0
    return SampleCheck(float(psnr_from_mse(mse.mean())), float(ratio), test_fine, ref_fine)


def fade_change_se(before: SampleCheck, after: SampleCheck, draws: int = 2000, seed: int = 0) -> Optional[float]:
    """Bootstrap standard error of `after.fade − before.fade` over the held-out seeds.

    Why: the guard's tolerance (0.1) has to be compared with how well 64 samples measure the fade. On the
    GPU (27 Nov) W6A6's round 1 was undone for a change of 0.102 — noise or a real fade could not be
    told. The seeds are resampled together for the two checks and the reference (same seeds, so the
    change is measured paired). None when a check has no per-seed energies or every draw is degenerate."""
    if before.fine_test is None or after.fine_test is None or before.fine_ref is None:
        return None
    n = len(before.fine_ref)
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    ref = before.fine_ref[idx].mean(axis=1)

    def fade(test: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.maximum(0.0, -np.log(test[idx].mean(axis=1) / ref))

    change = fade(after.fine_test) - fade(before.fine_test)
    change = change[np.isfinite(change)]
    return float(change.std(ddof=1)) if len(change) > 1 else None


def keeps(before: SampleCheck, after: SampleCheck, fade_tol: float, psnr_tol_db: Optional[float] = None) -> bool:
    """A round is kept unless the fade grew by more than `fade_tol` or, with `psnr_tol_db` set, the
    PSNR fell by more than that."""
    psnr_ok = psnr_tol_db is None or after.psnr_db >= before.psnr_db - psnr_tol_db
    return after.fade <= before.fade + fade_tol and psnr_ok


def guard_seeds(cfg: MethodConfig) -> list[int]:
    first = cfg.seed + GUARD_SEED_OFFSET
    return list(range(first, first + cfg.par_guard_samples))


class ParGuard:
    """The full-precision samples of the guard seeds and the check of the state PAR would keep."""

    def __init__(self, float_unet: torch.nn.Module, scheduler, cfg: MethodConfig,
                 conditioning: Optional[TextConditioning] = None):
        self.scheduler, self.cfg, self.conditioning = scheduler, cfg, conditioning
        self.seeds = guard_seeds(cfg)
        self.reference = sample_uint8(float_unet, scheduler, self.seeds, cfg.num_steps, cfg.batch_size, conditioning)
        self.current: Optional[SampleCheck] = None

    def check(self, quant_unet: torch.nn.Module) -> SampleCheck:
        return compare(self.reference, sample_uint8(quant_unet, self.scheduler, self.seeds, self.cfg.num_steps,
                                                    self.cfg.batch_size, self.conditioning))

    def start(self, quant_unet: torch.nn.Module) -> dict:
        """Check the model PAR starts from (round 0's); returns the record."""
        self.current = self.check(quant_unet)
        return {"seeds": {"first": self.seeds[0], "count": len(self.seeds)}, "round0": self.current.as_dict()}

    def judge(self, quant_unet: torch.nn.Module) -> tuple[bool, dict]:
        """Check the model after a round against the last kept one; (kept, record)."""
        after = self.check(quant_unet)
        kept = keeps(self.current, after, self.cfg.par_guard_fade_tol, self.cfg.par_guard_psnr_tol_db)
        record = {"before": self.current.as_dict(), "after": after.as_dict(), "kept": kept}
        se = fade_change_se(self.current, after)
        if se is not None:
            record["fade_change_se"] = round(se, 5)
        if kept:
            self.current = after
        return kept, record


def verdict_line(k: int, record: dict, n: int) -> str:
    """The guard's decision on round k as one log line."""
    b, a = record["before"], record["after"]
    se = f" ± {record['fade_change_se']:.3f}" if "fade_change_se" in record else ""
    return (f"PAR round {k}: {'kept' if record['kept'] else 'undone, PAR stops'} — on {n} held-out samples "
            f"fine-energy ratio {b['fine_ratio']:.3f} → {a['fine_ratio']:.3f} (fade change "
            f"{a['fade'] - b['fade']:+.3f}{se}), PSNR {b['psnr_db']:.2f} → {a['psnr_db']:.2f} dB")


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (rounding variables, step sizes) to undo a round with."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
