"""Shared fixtures: the embedded reference model and a small min-max state calibrated on it."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. `triton.jit` reads the variable when
# it decorates, and diffusers imports triton, so this must come before any other import below.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests check integers, not speed: one config per kernel (triton/numerics.py `quick_tuning`). It also
# makes a kernel's debug launch (its own autotune key) run the config of the launch it is compared with;
# under full tuning they may differ, and with them the fp32 softmax sums and a few P codes (the attention
# tests' op-vs-debug check failed so on an H200, 27 Nov, with every stage check passing).
# `TCAQ_TRITON_TUNING=` (empty) restores the full search.
os.environ.setdefault("TCAQ_TRITON_TUNING", "quick")

from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

import tcaq_kernels  # noqa: E402
from tcaq_kernels.models import default_model_dir  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests are reported as skipped (never as passed) where no GPU is."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ref_unet() -> UNet2DModel:
    unet = UNet2DModel.from_pretrained(default_model_dir(), subfolder="unet").float().eval()
    unet.requires_grad_(False)
    return unet


@pytest.fixture(scope="session")
def ref_scheduler() -> DDIMScheduler:
    return DDIMScheduler.from_pretrained(default_model_dir(), subfolder="scheduler")


@pytest.fixture(scope="session")
def ref_state_w8a8(ref_unet, ref_scheduler):
    """Min-max W8A8 with 4 timestep groups: 8 samples × 12 DDIM steps (3 steps a group)."""
    return tcaq_kernels.calibrate(
        ref_unet, scheduler=ref_scheduler, bits="W8A8", num_samples=8, num_steps=12,
        timestep_groups=4, batch_size=8, progress=False,
    )


@pytest.fixture(scope="session")
def tiny_cond_unet() -> UNet2DConditionModel:
    """8×8 conditional UNet with cross-attention down and up blocks (random weights)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="session")
def tiny_cond_state(tiny_cond_unet):
    """Min-max W8A8 state of `tiny_cond_unet` (conv_in / conv_out float), ranges observed over one forward with
    text in each of its two timestep groups."""
    from tcaq_kernels.calib.minmax import state_from_ranges
    from tcaq_kernels.calib.observe import RangeObserver
    from tcaq_kernels.quant.layers import quantizable_layers

    unet = tiny_cond_unet
    layers = {n: k for n, k in quantizable_layers(unet).items() if n not in ("conv_in", "conv_out")}
    observer = RangeObserver(unet, layers, [500.0])
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(2, 5, 24, generator=gen)
    with observer, torch.no_grad():
        for t in (900, 100):
            unet(torch.randn(2, 4, 8, 8, generator=gen), t, encoder_hidden_states=text)
    return state_from_ranges(unet, observer, "W8A8", ["conv_in", "conv_out"], {})


@pytest.fixture
def rng() -> torch.Generator:
    """Fresh random inputs every run (seed printed by pytest on failure via the repr)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def load_benchmark():
    """`load(name)`: the script benchmarks/<name>.py as a module (benchmarks/ is not a package), for
    testing its pure parts."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
