"""Fixtures for the calibration tests: a tiny random UNet (fast) beside the reference model (real)."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel



@pytest.fixture
def tiny_budget() -> dict:
    """Method options small enough that a whole calibration of `tiny_unet` takes about a second."""
    return dict(
        num_samples=2, num_steps=4, batch_size=8, num_points=8, init_points=8, init_values=2048,
        daq_values=2048, iters=3, recon_batch_size=4, par_guard_samples=4, progress=False,
    )


@pytest.fixture(scope="session")
def tiny_unet() -> UNet2DModel:
    """8×8 UNet with ResBlocks, an attention down and up block, a down- and an up-sampler."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True)
