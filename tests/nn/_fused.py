"""A converted UNet run with one kind of fused module, then with those modules' diffusers class back (GPU tests)."""
from __future__ import annotations

import copy

import torch

import tcaq_kernels


def outputs_with_and_without(unet, state, rng, fused_class: type, diffusers_class: type):
    """(fused, plain) outputs of the 8×8 conditional `unet` converted (triton, bf16, GPU) on one random input: as
    converted, then with every `fused_class` module swapped back to `diffusers_class` — everything else the same."""
    model = tcaq_kernels.convert(copy.deepcopy(unet).to("cuda", torch.bfloat16), state, backend="triton")
    x = torch.randn(2, 4, 8, 8, generator=rng).to("cuda", torch.bfloat16)
    text = torch.randn(2, 5, 24, generator=rng).to("cuda", torch.bfloat16)
    t = torch.tensor([900, 100], device="cuda")
    with torch.no_grad():
        fused = model(x, t, encoder_hidden_states=text).sample
        swapped = [m for m in model.modules() if type(m) is fused_class]
        assert swapped, f"no {fused_class.__name__} in the converted model"
        for module in swapped:
            module.__class__ = diffusers_class
        return fused, model(x, t, encoder_hidden_states=text).sample
