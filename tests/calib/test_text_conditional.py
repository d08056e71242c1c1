"""Min-max calibration of a text-conditional UNet (Stable Diffusion's kind): DDIM trajectories with prompt
embeddings and classifier-free guidance, a state that converts and runs, and clear errors elsewhere."""
import pytest
import torch
from diffusers import DDIMScheduler

import tcaq_kernels
from tcaq_kernels.calib.data import CalibData, collect_trajectories
from tcaq_kernels.quant.state import CalibState
from tcaq_kernels.sampling import TextConditioning, ddim_sample, text_for


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


@pytest.mark.parametrize("method", ["qdiffusion", "tcaq"])
def test_reconstruction_presets_calibrate_a_text_conditional_unet(tiny_cond_unet, scheduler, tiny_budget, rng,
                                                                 tmp_path, method):
    """The block reconstruction (and PAR with its guard, for tcaq) on guided text trajectories: every block's
    inputs captured with the points' text, a state that saves, loads, converts and runs close to the float UNet."""
    tiny_cond_unet.requires_grad_(False)
    prompts = torch.randn(2, 5, 24, generator=rng)
    state = tcaq_kernels.calibrate(tiny_cond_unet, "W8A8", method=method, scheduler=scheduler, timestep_groups=2,
                                   encoder_hidden_states=prompts, negative_encoder_hidden_states=torch.zeros(1, 5, 24),
                                   guidance_scale=5.0, **tiny_budget)
    assert state.settings["calib_data"]["text"] == {"prompts": 2, "tokens": 5, "guidance_scale": 5.0}
    assert any(l.kind == "attention" for l in state.layers.values())
    model = tcaq_kernels.convert(tiny_cond_unet, CalibState.load(state.save(tmp_path / "s.tcaq")), backend="reference")
    x = torch.randn(2, 4, 8, 8, generator=rng)
    with torch.no_grad():
        y, want = (m(x, 400, encoder_hidden_states=prompts).sample for m in (model, tiny_cond_unet))
    assert ((y - want).norm() / want.norm()).item() < 0.2


def test_guided_points_carry_text_and_negative_text(tiny_cond_unet, scheduler, rng, tmp_path):
    """Each point carries its trajectory's prompt, every other one the negative embeddings; the set's text
    survives save/load and enters its digest."""
    prompts, negative = torch.randn(3, 5, 24, generator=rng), torch.randn(1, 5, 24, generator=rng)
    conditioning = TextConditioning(prompts, negative, 4.0)
    data = collect_trajectories(tiny_cond_unet, scheduler, [7, 8, 9, 10], num_steps=3, batch_size=3, progress=False,
                                conditioning=conditioning)
    points = data.points()
    steps, traj = points.steps, torch.arange(4).repeat(3)
    for i in range(len(points)):
        n = int(traj[i])
        want = negative[0] if (int(steps[i]) + n) % 2 else prompts[n % 3]
        assert torch.equal(points.text[i], want)
    (x, t, _, kwargs), *_ = points.batches(5)
    assert kwargs["encoder_hidden_states"].shape == (5, 5, 24) and x.shape[0] == 5
    loaded = CalibData.load(data.save(tmp_path / "d.safetensors"))
    assert loaded.digest() == data.digest() and torch.equal(loaded.conditioning.text, prompts)
    assert loaded.conditioning.guidance_scale == 4.0 and torch.equal(loaded.conditioning.negative, negative)
    unguided = collect_trajectories(tiny_cond_unet, scheduler, [7, 8, 9, 10], num_steps=3, batch_size=3,
                                    progress=False, conditioning=TextConditioning(prompts))
    assert unguided.digest() != data.digest()


def test_what_cannot_be_calibrated_says_so(tiny_cond_unet, ref_unet, scheduler, rng):
    for method in ("minmax", "tcaq"):
        with pytest.raises(ValueError, match="pass encoder_hidden_states="):
            tcaq_kernels.calibrate(tiny_cond_unet, method=method, scheduler=scheduler, num_samples=1, num_steps=2,
                                   progress=False)
        with pytest.raises(ValueError, match="has no cross-attention"):
            tcaq_kernels.calibrate(ref_unet, method=method, scheduler=scheduler, num_samples=1, num_steps=2,
                                   progress=False, encoder_hidden_states=torch.randn(1, 5, 24, generator=rng))
    with pytest.raises(ValueError, match="differ in tokens or width"):
        TextConditioning(torch.randn(2, 5, 24), torch.randn(1, 6, 24), 7.5)


class _Pipe:
    """A Stable-Diffusion-like pipeline: a UNet, a scheduler and `encode_prompt` (a fake text encoder)."""

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler, self.calls = unet, scheduler, []

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None):
        self.calls.append((list(prompt), num_images_per_prompt, do_classifier_free_guidance, negative_prompt))
        text = torch.stack([torch.full((5, 24), float(len(p))) for p in prompt]).to(device)
        return text, (torch.zeros_like(text) if do_classifier_free_guidance else None)


def test_prompts_are_encoded_by_the_pipelines_text_encoder(tiny_cond_unet, scheduler):
    pipe = _Pipe(tiny_cond_unet, scheduler)
    state = tcaq_kernels.calibrate(pipe, num_samples=2, num_steps=2, progress=False, prompts=["a cat", "a dog!"],
                                   negative_prompt="blurry", guidance_scale=3.0)
    assert pipe.calls == [(["a cat", "a dog!"], 1, True, "blurry")]
    assert state.settings["text"] == {"prompts": 2, "tokens": 5, "guidance_scale": 3.0}
    tcaq_kernels.calibrate(pipe, num_samples=1, num_steps=2, progress=False, prompts="a cat")
    assert pipe.calls[-1] == (["a cat"], 1, False, None)
    with pytest.raises(ValueError, match="needs a pipeline with a text encoder"):
        tcaq_kernels.calibrate(tiny_cond_unet, scheduler=scheduler, prompts=["a cat"])
    with pytest.raises(ValueError, match="negative_prompt= goes with prompts="):
        tcaq_kernels.calibrate(pipe, negative_prompt="blurry")
