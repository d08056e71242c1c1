"""latency.py's SD-1.5 rows without a GPU: the architecture is SD-1.5's UNet, and the states it converts come
from ranges observed on a conditional UNet with random latents and text, every timestep group seen."""
import torch
from diffusers import UNet2DConditionModel

import tcaq_kernels


def test_the_sd15_config_builds_sd15s_unet(load_benchmark):
    latency = load_benchmark("latency")
    with torch.device("meta"):  # the architecture only: no memory for 860 M parameters
        unet = UNet2DConditionModel(**latency.SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # Stable Diffusion 1.5's UNet
    assert unet.config.sample_size * 8 == 512 and unet.config.cross_attention_dim == 768


def test_observed_states_convert_and_run(load_benchmark, tiny_cond_unet, rng):
    latency = load_benchmark("latency")
    states = latency.observed_states(tiny_cond_unet, ["W8A8", "W4A8"], text_tokens=5)
    x, text = torch.randn(2, 4, 8, 8, generator=rng), torch.randn(2, 5, 24, generator=rng)
    with torch.no_grad():
        want = tiny_cond_unet(x, 300, encoder_hidden_states=text).sample
    for bits, state in states.items():
        assert state.bits == bits and state.float_layers == ["conv_in", "conv_out"] and len(state.group_edges) == 3
        model = tcaq_kernels.convert(tiny_cond_unet, state, backend="reference")
        with torch.no_grad():
            y = model(x, 300, encoder_hidden_states=text).sample
        err = ((y - want).norm() / want.norm()).item()
        assert y.shape == want.shape and err < (0.2 if bits == "W8A8" else 0.6), (bits, err)
