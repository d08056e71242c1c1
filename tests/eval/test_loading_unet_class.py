"""`load_fp_unet` loads the UNet class a folder's unet/config.json names, so `--model` may be a Stable Diffusion
folder (e.g. `inspect --validate` of a text-conditional state)."""
import json

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import tcaq_kernels
from tcaq_kernels.__main__ import main
from tcaq_kernels.eval.loading import load_fp_unet


@pytest.fixture
def cond_dir(tmp_path, tiny_cond_unet):
    tiny_cond_unet.save_pretrained(tmp_path / "sd" / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "sd" / "scheduler")
    return tmp_path / "sd"


def test_a_conditional_folder_loads_its_conditional_unet(cond_dir, tmp_path, rng, capsys):
    unet = load_fp_unet(cond_dir)
    assert type(unet) is UNet2DConditionModel and unet.config.cross_attention_dim == 24
    text = torch.randn(1, 5, 24, generator=rng)
    state = tcaq_kernels.calibrate(unet, scheduler=DDIMScheduler(num_train_timesteps=1000), num_samples=1,
                                   num_steps=2, progress=False, encoder_hidden_states=text)
    path = state.save(tmp_path / "cond.tcaq")
    assert main(["inspect", str(path), "--model", str(cond_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["valid_for_model"] is True


def test_an_unknown_unet_class_is_named(cond_dir):
    config = cond_dir / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "UNet3DConditionModel"}))
    with pytest.raises(ValueError, match="names 'UNet3DConditionModel'"):
        load_fp_unet(cond_dir)
