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
from ..sampling import TextConditioning, ddim_sample, seeded_noise, text_for, text_kwargs, unet_sample_shape

_META_KEY = "tcaq_calib_data"


@dataclass
class CalibPoints:
    """A flat selection of (step, trajectory) points: UNet inputs, their timesteps and step indices (and, for a
    text-conditional UNet, each point's text embeddings)."""

    x: torch.Tensor  # [P, C, H, W]
    timesteps: torch.Tensor  # [P] int64
    steps: torch.Tensor  # [P] int64, index of the sampler step each point comes from
    text: Optional[torch.Tensor] = None  # [P, L, D]: encoder_hidden_states of a text-conditional UNet

    def __len__(self) -> int:
        return self.x.shape[0]

    def take(self, idx: torch.Tensor) -> "CalibPoints":
        """The points at `idx`, in that order."""
        return CalibPoints(self.x[idx], self.timesteps[idx], self.steps[idx],
                           None if self.text is None else self.text[idx])

    def batches(self, batch_size: int):
        """(x, t, step, UNet keyword arguments) slices in order; points are time-major, so a batch spans few
        timesteps."""
        for lo in range(0, len(self), batch_size):
            hi = lo + batch_size
            kwargs = {} if self.text is None else {"encoder_hidden_states": self.text[lo:hi]}
            yield self.x[lo:hi], self.timesteps[lo:hi], self.steps[lo:hi], kwargs

    @staticmethod
    def merged(parts: list["CalibPoints"]) -> "CalibPoints":
        """The points of `parts` in one set, time-major (stable within a step)."""
        steps = torch.cat([p.steps for p in parts])
        order = torch.sort(steps, stable=True).indices
        texts = [p.text for p in parts]
        text = None if any(t is None for t in texts) else torch.cat(texts)
        return CalibPoints(torch.cat([p.x for p in parts]), torch.cat([p.timesteps for p in parts]), steps,
                           text).take(order)


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
    conditioning: Optional[TextConditioning] = None  # the prompts a text-conditional UNet sampled with

    @property
    def num_samples(self) -> int:
        return self.x.shape[1]

    def _text_tensors(self) -> dict[str, torch.Tensor]:
        c = self.conditioning
        if c is None:
            return {}
        out = {"text": c.text.detach().float().cpu().contiguous()}
        if c.negative is not None:
            out["negative_text"] = c.negative.detach().float().cpu().contiguous()
        return out

    def digest(self) -> str:
        """SHA-256 (16 hex) of the inputs, timesteps (and text): two sets with one digest hold the same data."""
        h = hashlib.sha256()
        for t in (self.x.detach().float().cpu().contiguous(), self.timesteps.cpu().contiguous(),
                  *self._text_tensors().values()):
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
            **({} if self.conditioning is None else {"text": self.conditioning.describe()}),
        }

    def points(self, num_points: Optional[int] = None, seed: int = 0) -> CalibPoints:
        """`num_points` points spread evenly over the steps (every point when None), time-major.

        Each step gets ⌊P/S⌋ trajectories (chosen at random without replacement, seeded), and the
        remainder goes to evenly spaced steps; a step never gives more trajectories than it has. A point of a
        text-conditional set carries its trajectory's prompt embeddings; with classifier-free guidance every
        other point (by step + trajectory) carries the negative ones instead, since the UNet sees both.
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
            text=self._point_text(idx_s, idx_n),
        )

    def _point_text(self, idx_s: torch.Tensor, idx_n: torch.Tensor) -> Optional[torch.Tensor]:
        c = self.conditioning
        if c is None:
            return None
        n = idx_n.tolist()
        text = text_for(n, c.text, "encoder_hidden_states").to(self.x.device)
        if c.guided:
            negative = text_for(n, c.negative, "negative_encoder_hidden_states").to(self.x.device)
            odd = ((idx_s + idx_n) % 2 == 1).to(self.x.device)
            text = torch.where(odd[:, None, None], negative, text)
        return text

    # ------------------------------------------------------------------------------------ IO

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        meta = {
            "seeds": self.seeds, "sampler": self.sampler, "num_steps": self.num_steps, "eta": self.eta,
            "model_fingerprint": self.model_fingerprint, "source": self.source, "digest": self.digest(),
            "guidance_scale": None if self.conditioning is None else self.conditioning.guidance_scale,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"x": self.x.detach().float().cpu().contiguous(), "timesteps": self.timesteps.cpu().contiguous(),
                   **self._text_tensors()}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibData":
        path = Path(path)
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(_META_KEY, "null") or "null")
            if meta is None:
                raise ValueError(f"{path}: not a calibration-data file (no '{_META_KEY}' metadata)")
            names = set(fh.keys())
            conditioning = None
            if "text" in names:
                negative = fh.get_tensor("negative_text") if "negative_text" in names else None
                conditioning = TextConditioning(fh.get_tensor("text"), negative, float(meta["guidance_scale"]))
            data = cls(
                x=fh.get_tensor("x"), timesteps=fh.get_tensor("timesteps"), seeds=list(meta["seeds"]),
                sampler=meta["sampler"], num_steps=int(meta["num_steps"]), eta=float(meta["eta"]),
                model_fingerprint=meta["model_fingerprint"], source=meta["source"], conditioning=conditioning,
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
    conditioning: Optional[TextConditioning] = None,
) -> CalibData:
    """Run DDIM (eta 0) from each seed's noise with `unet` and record every step's input x_t.

    `unet` may be the float model or a quantized copy (PAR); `fingerprint_of` names the float model
    whose structure the data belongs to (default: `unet` itself). A text-conditional UNet samples with
    `conditioning` (trajectory n: prompt n % P, with its classifier-free guidance).
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

        text = text_kwargs(conditioning, range(lo, min(lo + batch_size, len(seeds))), device, unet.dtype)
        ddim_sample(unet, scheduler, seeded_noise(seeds[lo : lo + batch_size], shape, device), num_steps,
                    progress=False, callback=record, **text)
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
        conditioning=conditioning,
    )
