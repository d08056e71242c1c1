"""Min-max calibration of a text-conditional UNet (Stable Diffusion's kind): DDIM trajectories with prompt
embeddings and classifier-free guidance, a state that converts and runs, and clear errors elsewhere."""
import pytest
import torch
from diffusers import DDIMScheduler

import tcaq_kernels
from tcaq_kernels.quant.state import CalibState
from tcaq_kernels.sampling import ddim_sample, text_for


@pytest.fixture(scope="module")
def scheduler():
    return DDIMScheduler(num_train_timesteps=1000)


def test_guided_ddim_is_diffusers_classifier_free_guidance(tiny_cond_unet, scheduler, rng):
    """One step: eps = eps(negative) + g·(eps(text) − eps(negative)) from one UNet call on the doubled batch."""
    x, text = torch.randn(2, 4, 8, 8, generator=rng), torch.randn(2, 5, 24, generator=rng)
    negative = torch.zeros(2, 5, 24)
    got = ddim_sample(tiny_cond_unet, scheduler, x, num_steps=1, progress=False, text=text, negative_text=negative,
                      guidance_scale=6.0)
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    with torch.no_grad():
        eps_n, eps_t = (tiny_cond_unet(x, t, encoder_hidden_states=e).sample for e in (negative, text))
    want = sched.step(eps_n + 6.0 * (eps_t - eps_n), t, x).prev_sample.clamp(-1, 1)
    assert torch.allclose(got, want, atol=1e-5)
    plain = ddim_sample(tiny_cond_unet, scheduler, x, num_steps=1, progress=False, text=text)
    assert not torch.allclose(got, plain, atol=1e-3)  # the guidance did something


def test_minmax_calibrates_a_text_conditional_unet(tiny_cond_unet, scheduler, rng, tmp_path):
    prompts = torch.randn(2, 5, 24, generator=rng)
    state = tcaq_kernels.calibrate(tiny_cond_unet, bits="W8A8", scheduler=scheduler, num_samples=3, num_steps=4,
                                   timestep_groups=2, batch_size=2, progress=False, encoder_hidden_states=prompts,
                                   negative_encoder_hidden_states=torch.zeros(1, 5, 24), guidance_scale=7.5)
    assert state.settings["text"] == {"prompts": 2, "tokens": 5, "guidance_scale": 7.5}
    state = CalibState.load(state.save(tmp_path / "cond.tcaq"))
    model = tcaq_kernels.convert(tiny_cond_unet, state, backend="reference")
    x = torch.randn(2, 4, 8, 8, generator=rng)
    with torch.no_grad():
        y, want = (m(x, 600, encoder_hidden_states=prompts).sample for m in (model, tiny_cond_unet))
    assert ((y - want).norm() / want.norm()).item() < 0.2


def test_text_rows_cycle_over_the_samples(rng):
    embeds = torch.randn(3, 2, 4, generator=rng)
    assert torch.equal(text_for(range(2, 7), embeds, "e"), embeds[[2, 0, 1, 2, 0]])
    with pytest.raises(ValueError, match=r"e must be text embeddings \[prompts, tokens, width\]"):
        text_for(range(2), embeds[0], "e")


def test_what_cannot_be_calibrated_says_so(tiny_cond_unet, ref_unet, scheduler, rng):
    with pytest.raises(ValueError, match="pass encoder_hidden_states="):
        tcaq_kernels.calibrate(tiny_cond_unet, scheduler=scheduler, num_samples=1, num_steps=2, progress=False)
    with pytest.raises(ValueError, match="method='minmax' for now"):
        tcaq_kernels.calibrate(tiny_cond_unet, method="tcaq", scheduler=scheduler,
                               encoder_hidden_states=torch.randn(1, 5, 24, generator=rng))
    with pytest.raises(ValueError, match="has no cross-attention"):
        tcaq_kernels.calibrate(ref_unet, scheduler=scheduler, num_samples=1, num_steps=2, progress=False,
                               encoder_hidden_states=torch.randn(1, 5, 24, generator=rng))
