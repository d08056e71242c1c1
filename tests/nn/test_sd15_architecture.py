"""Stable Diffusion 1.5's UNet architecture (random weights — none are at hand) through the whole path on the CPU:
min-max calibration on text with classifier-free guidance, conversion to exact integer layers (`reference`
backend) and one step — every module kind SD-1.5 has (cross-attention on 77 tokens, heads of 40/80/160
channels, GEGLU feed-forwards, 1×1 projection convs) converts and runs. About 100 s and 5 GB on 2 cores."""
import os

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import tcaq_kernels


def test_sd15_unet_calibrates_converts_and_runs_on_text(load_benchmark):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**load_benchmark("latency").SD15_UNET).eval().requires_grad_(False)
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs each run; the weights' seed is fixed
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 77, 768, generator=g)
    state = tcaq_kernels.calibrate(unet, scheduler=DDIMScheduler(num_train_timesteps=1000), bits="W8A8",
                                   num_samples=1, num_steps=2, timestep_groups=2, batch_size=1, progress=False,
                                   encoder_hidden_states=text, negative_encoder_hidden_states=torch.zeros(1, 77, 768),
                                   guidance_scale=7.5)
    kinds = [layer.kind for layer in state.layers.values()]
    assert len(kinds) == 312 and kinds.count("attention") == 32 and state.float_layers == ["conv_in", "conv_out"]
    model = tcaq_kernels.convert(unet, state, backend="reference")
    x = torch.randn(1, 4, 64, 64, generator=g)
    with torch.no_grad():
        y, want = (m(x, 700, encoder_hidden_states=text).sample for m in (model, unet))
    err = ((y - want).norm() / want.norm()).item()
    assert err < 0.1, (seed, err)
