"""`cuda_graphed`: CUDA-graph replay of a converted UNet behind the UNet's own interface (graphs.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMPipeline
from diffusers.models.unets.unet_2d import UNet2DOutput

import tcaq_kernels
from tcaq_kernels.graphs import GraphedUNet, _map_tensors, _signature
from tcaq_kernels.nn import TimestepGroups


def test_cpu_model_runs_eagerly_and_delegates(tiny_cond_unet, rng):
    wrapped = tcaq_kernels.cuda_graphed(tiny_cond_unet)
    x = torch.randn(2, tiny_cond_unet.config.in_channels, 8, 8, generator=rng)
    text = torch.randn(2, 5, tiny_cond_unet.config.cross_attention_dim, generator=rng)
    with torch.no_grad():
        got = wrapped(x, 321, encoder_hidden_states=text).sample
        want = tiny_cond_unet(x, 321, encoder_hidden_states=text).sample
    assert torch.equal(got, want) and wrapped.num_graphs == 0
    assert wrapped.config is tiny_cond_unet.config and wrapped.dtype == tiny_cond_unet.dtype
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute


def test_drop_in_for_a_diffusers_pipeline(ref_unet, ref_scheduler):
    """A stock pipeline takes the wrapper as its `unet` (config, dtype and device read through it)."""
    images = {}
    for name, unet in (("plain", ref_unet), ("wrapped", tcaq_kernels.cuda_graphed(ref_unet))):
        pipe = DDIMPipeline(unet=unet, scheduler=copy.deepcopy(ref_scheduler))
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                            output_type="np").images
    assert images["plain"].std() > 0 and (images["plain"] == images["wrapped"]).all()


def test_signature_tells_calls_apart():
    x = torch.ones(2, 3)
    assert _signature(((x, 5), {"a": None})) == _signature(((torch.zeros(2, 3), 5), {"a": None}))
    assert _signature(((x, 5), {})) != _signature(((torch.ones(3, 3), 5), {}))
    assert _signature(((x, 5), {})) != _signature(((x.double(), 5), {}))
    assert _signature(((x,), {"cond": {"text_embeds": x, "time_ids": x}})) is not None
    assert _signature(((x,), {"callback": object()})) is None  # not capturable: eager


def test_outputs_are_copied_with_their_types():
    out = UNet2DOutput(sample=torch.randn(2, 3))
    copied = _map_tensors(out, lambda t: t.clone())
    assert type(copied) is UNet2DOutput and torch.equal(copied.sample, out.sample)
    assert copied.sample.data_ptr() != out.sample.data_ptr()
    pair = _map_tensors((out.sample, [out.sample]), lambda t: t + 1)
    assert isinstance(pair, tuple) and isinstance(pair[1], list) and torch.equal(pair[1][0], out.sample + 1)


def test_group_buffer_of_a_batch_size_keeps_its_address():
    """A graph captured at one batch size reads the same group buffer after calls at another."""
    groups = TimestepGroups([250.0, 500.0, 750.0])
    groups.update(torch.tensor(100), 1)
    initial = groups.group  # the registered buffer, batch 1
    groups.update(torch.tensor(100), 2)
    first = groups.group
    groups.update(torch.tensor([900, 600, 300, 10]), 4)
    assert groups.group.tolist() == [3, 2, 1, 0]
    groups.update(torch.tensor(800), 2)
    assert groups.group is first and first.tolist() == [3, 3]
    groups.update(torch.tensor(600), 1)
    assert groups.group is initial and initial.tolist() == [2]


def test_counts_must_be_positive(tiny_cond_unet):
    with pytest.raises(ValueError, match="warmup"):
        tcaq_kernels.cuda_graphed(tiny_cond_unet, warmup=0)
    with pytest.raises(ValueError, match="max_graphs"):
        tcaq_kernels.cuda_graphed(tiny_cond_unet, max_graphs=0)


@pytest.mark.cuda
def test_replay_matches_eager_on_gpu(ref_unet, ref_state_w8a8, rng):
    """Bit-identical to the eager model (the same kernels and tuned configs) at two batch sizes and
    timesteps of every group, given as a CPU tensor, a Python int and a device tensor; an earlier
    output is not overwritten by later replays."""
    model = tcaq_kernels.convert(copy.deepcopy(ref_unet).cuda(), ref_state_w8a8, backend="triton")
    wrapped = tcaq_kernels.cuda_graphed(model)
    outs = []
    with torch.no_grad():
        for batch, t in ((4, torch.tensor(999)), (7, 500), (4, torch.tensor(10, device="cuda")), (4, 260)):
            x = torch.randn(batch, 3, 32, 32, generator=rng).cuda()
            got = wrapped(x, t).sample
            want = model(x, t).sample
            assert torch.equal(got, want), f"batch {batch}, t {t}: {(got - want).abs().max().item()}"
            outs.append((got, want.clone()))
    assert wrapped.num_graphs == 2
    assert all(torch.equal(got, want) for got, want in outs)


@pytest.mark.cuda
def test_evaluation_samples_triton_models_from_graphs(ref_unet, ref_scheduler, ref_state_w8a8):
    """`evaluate`/`generate` convert through eval.loading.convert_unet: a triton model on the GPU comes
    wrapped, and its uint8 samples are the eager model's (two batches, the second smaller)."""
    from tcaq_kernels.eval.loading import convert_unet
    from tcaq_kernels.sampling import sample_uint8

    unet = copy.deepcopy(ref_unet).cuda()
    wrapped = convert_unet(unet, ref_state_w8a8, "triton")
    assert isinstance(wrapped, GraphedUNet)
    seeds = list(range(6))
    got = sample_uint8(wrapped, ref_scheduler, seeds, num_steps=4, batch_size=4)
    want = sample_uint8(wrapped.unet, ref_scheduler, seeds, num_steps=4, batch_size=4)
    assert wrapped.num_graphs == 2 and (got == want).all()
