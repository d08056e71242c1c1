"""Per-layer activation bits (`MethodConfig.act_bits`): resolution, errors, and a mixed state end to end."""
from __future__ import annotations

import pytest
import torch

import tcaq_kernels
from tcaq_kernels.calib.settings import layer_act_bits

LAYERS = ["down.conv1", "up.0.conv_shortcut", "up.1.conv_shortcut", "up.1.attn"]


def test_first_matching_pattern_wins_and_the_rest_keep_the_default():
    bits = layer_act_bits(LAYERS, 4, {"*.conv_shortcut": 8, "up.*": 6})
    assert bits == {"down.conv1": 4, "up.0.conv_shortcut": 8, "up.1.conv_shortcut": 8, "up.1.attn": 6}
    assert layer_act_bits(LAYERS, 4, {}) == dict.fromkeys(LAYERS, 4)


def test_unknown_patterns_and_widths_are_refused_by_name():
    with pytest.raises(ValueError, match=r"pattern '\*\.conv3' matches no quantized layer"):
        layer_act_bits(LAYERS, 4, {"*.conv3": 8})
    with pytest.raises(ValueError, match=r"act_bits\['\*\.conv_shortcut'\]=5"):
        layer_act_bits(LAYERS, 4, {"*.conv_shortcut": 5})


def test_mixed_width_state_calibrates_exports_and_converts(tiny_unet, ref_scheduler, rng):
    state = tcaq_kernels.calibrate(tiny_unet, scheduler=ref_scheduler, bits="W4A4", method="qdiffusion",
                                   num_samples=2, num_steps=3, num_points=6, iters=2, batch_size=2,
                                   recon_batch_size=2, act_bits={"*.conv_shortcut": 8}, progress=False)
    shortcuts = [n for n in state.layers if n.endswith("conv_shortcut")]
    assert shortcuts
    for name, layer in state.layers.items():
        expected = 8 if name in shortcuts else 4
        assert {a.bits for a in layer.acts.values()} == {expected}, name
    assert state.settings["act_bits"] == {"*.conv_shortcut": 8}
    ref = tcaq_kernels.convert(tiny_unet, state, backend="reference")
    sim = tcaq_kernels.convert(tiny_unet, state, backend="simulate")
    x, t = torch.randn(2, 3, 8, 8, generator=rng), torch.tensor([700, 30])
    with torch.no_grad():
        assert torch.equal(ref(x, t).sample, sim(x, t).sample)
