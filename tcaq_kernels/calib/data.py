"""Calibration data: the inputs x_t a UNet sees along DDIM trajectories, stored time-major.

The same collector serves the full-precision model (the first calibration set) and a quantized
one (PAR: the quantized model's own trajectory from the same noise), so the two sets differ only in
which model drew the trajectory — what `source` records. A set carries what made it (sampler,
steps, seeds, model fingerprint) and a digest of its values, so a calibration can say exactly what it
was fitted on.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..quant.layers import model_fingerprint
from ..sampling import ddim_sample, seeded_noise, unet_sample_shape

_META_KEY = "tcaq_calib_data"


@dataclass
class CalibPoints:
    """A flat selection of (step, trajectory) points: UNet inputs, their timesteps and step indices."""

    x: torch.Tensor  # [P, C, H, W]
    timesteps: torch.Tensor  # [P] int64
    steps: torch.Tensor  # [P] int64, index of the sampler step each point comes from

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, batch_size: int):
        """(x, t, step) slices in order; points are time-major, so a batch spans few timesteps."""
        for lo in range(0, len(self), batch_size):
            yield self.x[lo : lo + batch_size], self.timesteps[lo : lo + batch_size], self.steps[lo : lo + batch_size]


@dataclass
class CalibData:
    """`x[s, n]` is the UNet input at sampler step s of trajectory n (seed `seeds[n]`)."""

    x: torch.Tensor  # [S, N, C, H, W]
    timesteps: torch.Tensor  # [S] int64: the timestep of each step
    seeds: list[int]
    sampler: str
    num_steps: int
    eta: float
    model_fingerprint: str
    source: str  # "float", or which quantized model drew the trajectories

    @property
    def num_samples(self) -> int:
        return self.x.shape[1]

    def digest(self) -> str:
        """SHA-256 (16 hex) of the inputs and timesteps: two sets with one digest hold the same data."""
        h = hashlib.sha256()
        for t in (self.x.detach().float().cpu().contiguous(), self.timesteps.cpu().contiguous()):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """What made this set, for a CalibState's settings."""
        return {
            "sampler": self.sampler,
            "num_steps": self.num_steps,
            "eta": self.eta,
            "num_samples": self.num_samples,
            "seeds": {"first": self.seeds[0], "count": len(self.seeds)},
            "model_fingerprint": self.model_fingerprint,
            "source": self.source,
            "digest": self.digest(),
        }

    def points(self, num_points: Optional[int] = None, seed: int = 0) -> CalibPoints:
        """`num_points` points spread evenly over the steps (every point when None), time-major.

        Each step gets ⌊P/S⌋ trajectories (chosen at random without replacement, seeded), and the
        remainder goes to evenly spaced steps; a step never gives more trajectories than it has.
        """
        steps, n = self.x.shape[0], self.x.shape[1]
        if num_points is None or num_points >= steps * n:
            idx_s = torch.arange(steps).repeat_interleave(n)
            idx_n = torch.arange(n).repeat(steps)
        else:
            counts = torch.full((steps,), num_points // steps, dtype=torch.long)
            extra = num_points % steps
            if extra:
                counts[torch.linspace(0, steps - 1, extra).round().long()] += 1
            gen = torch.Generator().manual_seed(seed)
            idx_s, idx_n = [], []
            for s in range(steps):
                k = min(int(counts[s]), n)
                idx_s.append(torch.full((k,), s, dtype=torch.long))
                idx_n.append(torch.randperm(n, generator=gen)[:k].sort().values)
            idx_s, idx_n = torch.cat(idx_s), torch.cat(idx_n)
        dev = self.x.device
        return CalibPoints(
            x=self.x[idx_s.to(dev), idx_n.to(dev)],
            timesteps=self.timesteps.to(dev)[idx_s.to(dev)],
            steps=idx_s.to(dev),
        )

    # ------------------------------------------------------------------------------------ IO

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        meta = {
            "seeds": self.seeds, "sampler": self.sampler, "num_steps": self.num_steps, "eta": self.eta,
            "model_fingerprint": self.model_fingerprint, "source": self.source, "digest": self.digest(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"x": self.x.detach().float().cpu().contiguous(), "timesteps": self.timesteps.cpu().contiguous()}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibData":
        path = Path(path)
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(_META_KEY, "null") or "null")
            if meta is None:
                raise ValueError(f"{path}: not a calibration-data file (no '{_META_KEY}' metadata)")
            data = cls(
                x=fh.get_tensor("x"), timesteps=fh.get_tensor("timesteps"), seeds=list(meta["seeds"]),
                sampler=meta["sampler"], num_steps=int(meta["num_steps"]), eta=float(meta["eta"]),
                model_fingerprint=meta["model_fingerprint"], source=meta["source"],
            )
        if data.digest() != meta["digest"]:
            raise ValueError(f"{path}: calibration data does not match its recorded digest (corrupted)")
        return data


@torch.no_grad()
def collect_trajectories(
    unet: torch.nn.Module,
    scheduler,
    seeds: Sequence[int],
    num_steps: int = 100,
    batch_size: int = 64,
    source: str = "float",
    fingerprint_of: Optional[torch.nn.Module] = None,
    progress: bool = True,
) -> CalibData:
    """Run DDIM (eta 0) from each seed's noise with `unet` and record every step's input x_t.

    `unet` may be the float model or a quantized copy (PAR); `fingerprint_of` names the float model
    whose structure the data belongs to (default: `unet` itself).
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("collect_trajectories: seeds is empty")
    device = next(unet.parameters()).device
    shape = unet_sample_shape(unet)
    chunks, timesteps = [], None
    for lo in tqdm(range(0, len(seeds), batch_size), desc=f"calibration data ({source})", disable=not progress, leave=False):
        xs, ts = [], []

        def record(i, t, x, eps):
            xs.append(x.detach().float())
            ts.append(int(t))

        ddim_sample(unet, scheduler, seeded_noise(seeds[lo : lo + batch_size], shape, device), num_steps,
                    progress=False, callback=record)
        chunks.append(torch.stack(xs))
        timesteps = ts
    return CalibData(
        x=torch.cat(chunks, dim=1),
        timesteps=torch.tensor(timesteps, dtype=torch.long, device=device),
        seeds=seeds,
        sampler="ddim",
        num_steps=num_steps,
        eta=0.0,
        model_fingerprint=model_fingerprint(fingerprint_of if fingerprint_of is not None else unet),
        source=source,
    )
