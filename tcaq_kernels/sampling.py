"""Deterministic DDIM sampling shared by calibration, the quickstart and the evaluation harness.

Noise is drawn per sample from its own seed, so a sample depends only on its seed: batching,
resuming and splitting across GPUs give the same images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Initial noise [len(seeds), *shape], sample i drawn from a CPU generator seeded with seeds[i]."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        out[i] = torch.randn(tuple(shape), generator=gen)
    return out.to(device=device, dtype=dtype)


def make_scheduler(config) -> DDIMScheduler:
    """A fresh DDIMScheduler from a scheduler (or its config): schedulers carry per-run state."""
    cfg = config.config if hasattr(config, "config") else config
    return DDIMScheduler.from_config(cfg)


def is_text_conditional(unet) -> bool:
    """Whether `unet` takes text embeddings (`encoder_hidden_states`): a UNet2DConditionModel's cross-attention."""
    return getattr(unet.config, "cross_attention_dim", None) is not None


def text_for(samples: Sequence[int], embeds: torch.Tensor, what: str) -> torch.Tensor:
    """Rows of `embeds` [P, L, D] for sample indices `samples`: sample n takes embeds[n % P] (one row: every
    sample), so a set of P prompts cycles over the trajectories."""
    if embeds.dim() != 3 or embeds.shape[0] == 0:
        raise ValueError(f"{what} must be text embeddings [prompts, tokens, width], got shape {tuple(embeds.shape)}")
    return embeds[torch.tensor([n % embeds.shape[0] for n in samples], device=embeds.device)]


@dataclass(frozen=True)
class TextConditioning:
    """What a text-conditional UNet samples with: the embeddings of P prompts [P, L, D] — trajectory n takes
    prompt n % P — and, for classifier-free guidance, negative embeddings [1 or P, L, D] and a guidance scale."""

    text: torch.Tensor
    negative: Optional[torch.Tensor] = None
    guidance_scale: float = 1.0

    def __post_init__(self):
        text_for([0], self.text, "encoder_hidden_states")
        if self.negative is not None:
            text_for([0], self.negative, "negative_encoder_hidden_states")
            if self.negative.shape[1:] != self.text.shape[1:]:
                raise ValueError(f"negative_encoder_hidden_states {tuple(self.negative.shape)} and "
                                 f"encoder_hidden_states {tuple(self.text.shape)} differ in tokens or width")

    @property
    def guided(self) -> bool:
        return self.negative is not None and self.guidance_scale != 1.0

    def describe(self) -> dict:
        return {"prompts": int(self.text.shape[0]), "tokens": int(self.text.shape[1]),
                "guidance_scale": self.guidance_scale if self.guided else 1.0}


def text_kwargs(conditioning: Optional[TextConditioning], samples: Sequence[int], device, dtype) -> dict:
    """`ddim_sample`'s text keyword arguments for trajectories `samples` (none without `conditioning`)."""
    if conditioning is None:
        return {}
    pick = lambda e, what: text_for(samples, e, what).to(device=device, dtype=dtype)
    guided = conditioning.guided
    return {"text": pick(conditioning.text, "encoder_hidden_states"),
            "negative_text": pick(conditioning.negative, "negative_encoder_hidden_states") if guided else None,
            "guidance_scale": conditioning.guidance_scale}


def text_conditioning(unet, encoder_hidden_states: Optional[torch.Tensor],
                      negative_encoder_hidden_states: Optional[torch.Tensor] = None,
                      guidance_scale: float = 1.0) -> Optional[TextConditioning]:
    """The calibration's `TextConditioning` (None for an unconditional UNet), refusing a text-conditional UNet
    without text and text for a UNet without cross-attention before anything is sampled."""
    if is_text_conditional(unet) != (encoder_hidden_states is not None):
        raise ValueError("a text-conditional UNet calibrates on text: pass encoder_hidden_states= (prompt embeddings "
                         "[prompts, tokens, width])" if encoder_hidden_states is None else
                         "encoder_hidden_states= given, but this UNet has no cross-attention")
    if encoder_hidden_states is None:
        return None
    return TextConditioning(encoder_hidden_states, negative_encoder_hidden_states, float(guidance_scale))


def unet_sample_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, h, w)


@torch.no_grad()
def ddim_sample(
    unet,
    scheduler,
    noise: torch.Tensor,
    num_steps: int = 100,
    eta: float = 0.0,
    progress: bool = True,
    callback: Optional[StepCallback] = None,
    text: Optional[torch.Tensor] = None,
    negative_text: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Run DDIM from `noise` and return the final samples in [-1, 1].

    `callback(step_index, timestep, x_t, eps)` sees every UNet call, which is how calibration
    collects time-major data without patching the model. A text-conditional UNet takes `text` [B, L, D] (its
    `encoder_hidden_states`); with `negative_text` and `guidance_scale` ≠ 1, classifier-free guidance as
    diffusers' pipelines run it: one UNet call a step on [x, x] with [negative_text, text], then
    eps = eps_negative + guidance_scale · (eps_text − eps_negative).
    """
    if is_text_conditional(unet) != (text is not None):
        raise ValueError("a text-conditional UNet needs text embeddings (text=), an unconditional one takes none"
                         if text is None else "text= given, but this UNet has no cross-attention")
    guided = negative_text is not None and guidance_scale != 1.0
    sched = make_scheduler(scheduler)
    sched.set_timesteps(num_steps, device=noise.device)
    x = noise.to(dtype=unet.dtype)
    for i, t in enumerate(tqdm(sched.timesteps, desc="DDIM", disable=not progress, leave=False)):
        if text is None:
            eps = unet(x, t).sample
        elif guided:
            both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative_text, text])).sample
            eps_negative, eps_text = both.chunk(2)
            eps = eps_negative + guidance_scale * (eps_text - eps_negative)
        else:
            eps = unet(x, t, encoder_hidden_states=text).sample
        if callback is not None:
            callback(i, t, x, eps)
        x = sched.step(eps, t, x, eta=eta).prev_sample
    return x.float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW floats → uint8 NHWC on the CPU (the form images are stored and scored in)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def sample_uint8(unet, scheduler, seeds: Sequence[int], num_steps: int, batch_size: int,
                 conditioning: Optional[TextConditioning] = None):
    """uint8 NHWC numpy DDIM samples of `seeds`, `batch_size` at a time on the UNet's device (a seed's
    noise does not depend on the batching, so batch sizes differ only in float summation order); a
    text-conditional UNet's sample i takes `conditioning`'s prompt i % P."""
    seeds = [int(s) for s in seeds]
    device = next(unet.parameters()).device
    shape = unet_sample_shape(unet)
    text = lambda lo: text_kwargs(conditioning, range(lo, min(lo + batch_size, len(seeds))), device, unet.dtype)
    return np.concatenate([
        to_uint8(ddim_sample(unet, scheduler, seeded_noise(seeds[lo : lo + batch_size], shape, device), num_steps,
                             progress=False, **text(lo))).numpy()
        for lo in range(0, len(seeds), batch_size)
    ])
