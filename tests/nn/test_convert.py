"""convert(): reference and simulate backends agree, and the result is a drop-in UNet."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMPipeline

import tcaq_kernels
from tcaq_kernels.calib.minmax import state_from_ranges
from tcaq_kernels.calib.observe import RangeObserver
from tcaq_kernels.nn import QAttnProcessor, QConv2d, QLinear
from tcaq_kernels.quant.layers import quantizable_layers
from tcaq_kernels.sampling import ddim_sample, seeded_noise


@pytest.fixture(scope="module")
def converted(ref_unet, ref_state_w8a8):
    return {b: tcaq_kernels.convert(ref_unet, ref_state_w8a8, backend=b) for b in ("reference", "simulate")}


def test_every_layer_swapped_and_float_layers_kept(converted, ref_state_w8a8):
    model = converted["reference"]
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["conv_in"] is torch.nn.Conv2d and kinds["conv_out"] is torch.nn.Conv2d
    for name, layer in ref_state_w8a8.layers.items():
        if layer.kind == "attention":
            assert isinstance(model.get_submodule(name).processor, QAttnProcessor)
        else:
            assert kinds[name] is {"conv2d": QConv2d, "linear": QLinear}[layer.kind]
    plain = [n for n, m in model.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert sorted(plain) == ["conv_in", "conv_out"]


def _layer_inputs(unet, names, x, t):
    """Inputs of each named layer during one float forward."""
    seen, handles = {}, []
    for name in names:
        mod = unet.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, a, _n=name: seen.setdefault(_n, a[0].detach())))
    with torch.no_grad():
        unet(x, t)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("timestep", [999, 420, 15])
def test_backends_agree_layer_by_layer(converted, ref_unet, ref_state_w8a8, rng, timestep):
    x = torch.randn(2, 3, 32, 32, generator=rng)
    names = [n for n, l in ref_state_w8a8.layers.items() if l.kind != "attention"]
    inputs = _layer_inputs(ref_unet, names, x, timestep)
    for model in converted.values():
        model.tcaq_groups.update(timestep, 2)
    expected_group = int(timestep * 4 // 1000)
    assert converted["reference"].tcaq_groups.group.tolist() == [expected_group] * 2
    for name in names:
        ref_mod, sim_mod = converted["reference"].get_submodule(name), converted["simulate"].get_submodule(name)
        inp = inputs[name]
        with torch.no_grad():
            y_ref, y_sim = ref_mod(inp), sim_mod(inp)
        # same integers, same epilogue: identical bits (fp32 partial sums of integer codes are exact)
        assert torch.equal(y_ref, y_sim), (name, (y_ref - y_sim).abs().max().item())


def test_backends_agree_on_attention_blocks(converted, ref_unet, ref_state_w8a8, rng):
    x = torch.randn(2, 3, 32, 32, generator=rng)
    names = [n for n, l in ref_state_w8a8.layers.items() if l.kind == "attention"]
    assert names, "the reference model has attention blocks"
    inputs = _layer_inputs(ref_unet, names, x, 500)
    for model in converted.values():
        model.tcaq_groups.update(500, 2)
    for name in names:
        with torch.no_grad():
            y_ref = converted["reference"].get_submodule(name)(inputs[name])
            y_sim = converted["simulate"].get_submodule(name)(inputs[name])
            y_fp = ref_unet.get_submodule(name)(inputs[name])
        assert torch.equal(y_ref, y_sim), name
        # and the quantized block is close to, but not identical with, the float block
        q_err = (y_ref - y_fp).norm() / y_fp.norm()
        assert 0 < q_err < 0.05, (name, q_err.item())


def test_row_normalised_attention_backends_agree(ref_unet, ref_state_w8a8, rng):
    """With `p_row_norm` the reference (int64 mass) and simulate (fp32 sum of integer codes: exact) paths
    give the same bits, and the flag changes the output: with 4-bit maps, which drop mass the division
    restores, the blocks end up closer to the float ones."""
    x = torch.randn(2, 3, 32, 32, generator=rng)
    names = [n for n, l in ref_state_w8a8.layers.items() if l.kind == "attention"]
    inputs = _layer_inputs(ref_unet, names, x, 500)
    state = copy.deepcopy(ref_state_w8a8)
    for name in names:  # 4-bit uniform maps on the same ranges
        p = state.layers[name].acts["p"]
        p.bits, p.scale, p.zero = 4, p.scale * 255 / 15, torch.full_like(p.zero, -8)
    normed = copy.deepcopy(state)
    for name in names:
        normed.layers[name].p_row_norm = True
    models = {(b, rn): tcaq_kernels.convert(ref_unet, s, backend=b)
              for b in ("reference", "simulate") for rn, s in ((False, state), (True, normed))}
    for model in models.values():
        model.tcaq_groups.update(500, 2)
    errors = {False: [], True: []}
    for name in names:
        with torch.no_grad():
            y = {key: m.get_submodule(name)(inputs[name]) for key, m in models.items()}
            y_fp = ref_unet.get_submodule(name)(inputs[name])
        assert torch.equal(y["reference", True], y["simulate", True]), name
        assert not torch.equal(y["reference", True], y["reference", False]), name
        for rn in (False, True):
            errors[rn].append(((y["reference", rn] - y_fp).norm() / y_fp.norm()).item())
    # not every block gains on one noise input (measured: 4 of 6 closer to float, two 1–9 % further), the
    # six together do (summed relative error 0.24 → 0.19)
    assert sum(errors[True]) < sum(errors[False]), errors


def test_row_max_attention_backends_agree(ref_unet, ref_state_w8a8, rng):
    """With `p_row_max` (CalibState v4) the reference and simulate paths give the same bits (the same fp32
    map exp(S − max) and Σ_j y_j on both), and 8-bit uniform codes of that map over (0, 1] (step 1/255:
    every row's largest entry is code 255 exactly) keep each attention block close to the float one."""
    x = torch.randn(2, 3, 32, 32, generator=rng)
    names = [n for n, l in ref_state_w8a8.layers.items() if l.kind == "attention"]
    inputs = _layer_inputs(ref_unet, names, x, 500)
    state = copy.deepcopy(ref_state_w8a8)
    for name in names:
        p = state.layers[name].acts["p"]
        p.kind = ["uniform"] * len(p.kind)
        p.scale, p.zero = torch.full_like(p.scale, 1 / 255), torch.full_like(p.zero, -128)
        state.layers[name].p_row_max = True
    models = {b: tcaq_kernels.convert(ref_unet, state, backend=b) for b in ("reference", "simulate")}
    plain = tcaq_kernels.convert(ref_unet, ref_state_w8a8, backend="reference")
    for model in (*models.values(), plain):
        model.tcaq_groups.update(500, 2)
    for name in names:
        with torch.no_grad():
            y = {b: m.get_submodule(name)(inputs[name]) for b, m in models.items()}
            y_plain = plain.get_submodule(name)(inputs[name])
            y_fp = ref_unet.get_submodule(name)(inputs[name])
        assert torch.equal(y["reference"], y["simulate"]), name
        assert not torch.equal(y["reference"], y_plain), name
        err = ((y["reference"] - y_fp).norm() / y_fp.norm()).item()
        assert err < 0.01, (name, err)


def _psnr(a, b):
    return (10 * torch.log10(4.0 / (a - b).pow(2).mean())).item()  # images in [-1, 1]


def test_backends_agree_end_to_end(converted, ref_unet, ref_scheduler):
    """Same seeds through both backends give the same images, bit for bit, on the CPU.

    The simulate path multiplies integer-valued fp32 codes, which is exact while partial sums stay
    below 2^24 — always the case for these activations; the reference sums in float64.
    """
    noise = seeded_noise(range(100, 104), (3, 32, 32))
    ref = ddim_sample(converted["reference"], ref_scheduler, noise, 8, progress=False)
    sim = ddim_sample(converted["simulate"], ref_scheduler, noise, 8, progress=False)
    fp = ddim_sample(ref_unet, ref_scheduler, noise, 8, progress=False)
    assert torch.equal(ref, sim)
    assert 25 < _psnr(ref, fp) < 60, _psnr(ref, fp)  # quantized: close to, but not, full precision


def test_backends_agree_end_to_end_with_split_skip_inputs(ref_unet, ref_scheduler):
    """The 24 up-block layers that read cat([h, skip]) quantize the two ranges separately; the two
    backends still give the same DDIM samples, bit for bit (2 calibration samples × DDIM-4, 2 groups)."""
    state = tcaq_kernels.calibrate(ref_unet, scheduler=ref_scheduler, bits="W8A8", num_samples=2, num_steps=4,
                                   timestep_groups=2, batch_size=2, split_skip=True, progress=False)
    assert sum(l.input_split is not None for l in state.layers.values()) == 24
    noise = seeded_noise(range(100, 102), (3, 32, 32))
    images = {b: ddim_sample(tcaq_kernels.convert(ref_unet, state, backend=b), ref_scheduler, noise, 4, progress=False)
              for b in ("reference", "simulate")}
    assert torch.equal(images["reference"], images["simulate"])
    fp = ddim_sample(ref_unet, ref_scheduler, noise, 4, progress=False)
    assert 25 < _psnr(images["reference"], fp) < 60, _psnr(images["reference"], fp)


def test_quantized_close_to_full_precision(converted, ref_unet, rng):
    x = torch.randn(4, 3, 32, 32, generator=rng)
    with torch.no_grad():
        e_fp = ref_unet(x, 300).sample
        e_q = converted["reference"](x, 300).sample
    rel = ((e_q - e_fp).norm() / e_fp.norm()).item()
    assert 0 < rel < 0.1, rel


def test_per_sample_timesteps_match_per_sample_calls(converted, rng):
    model = converted["reference"]
    x = torch.randn(3, 3, 32, 32, generator=rng)
    t = torch.tensor([990, 510, 20])
    with torch.no_grad():
        batched = model(x, t).sample
        assert model.tcaq_groups.group.tolist() == [3, 2, 0]
        single = torch.cat([model(x[i : i + 1], int(t[i])).sample for i in range(3)])
        wrong = model(x, torch.tensor([990, 990, 990])).sample
    # batch size changes float rounding upstream (and so a few codes); wrong groups change far more
    err = ((batched - single).norm() / single.norm()).item()
    assert err < 0.02 and err * 10 < ((wrong - single).norm() / single.norm()).item()


def test_drop_in_for_ddim_pipeline(converted, ref_unet, ref_scheduler):
    model = converted["reference"]
    assert type(model) is type(ref_unet)
    assert model.config == ref_unet.config and model.dtype == ref_unet.dtype and model.device == ref_unet.device
    pipe = DDIMPipeline(unet=model, scheduler=ref_scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    images = out.images
    assert images.shape == (2, 32, 32, 3) and (images >= 0).all() and (images <= 1).all()
    assert images.std() > 0.05  # not a blank image


def test_convert_does_not_touch_the_input_model(ref_unet, ref_state_w8a8):
    before = {n: type(m) for n, m in ref_unet.named_modules()}
    tcaq_kernels.convert(ref_unet, ref_state_w8a8)
    assert {n: type(m) for n, m in ref_unet.named_modules()} == before
    assert not hasattr(ref_unet, "tcaq_groups")


def test_convert_accepts_a_path_and_rejects_bad_backend(ref_unet, ref_state_w8a8, tmp_path):
    path = ref_state_w8a8.save(tmp_path / "s.tcaq")
    model = tcaq_kernels.convert(ref_unet, path, backend="simulate")
    assert model.tcaq_info["backend"] == "simulate"
    with pytest.raises(ValueError, match="unknown backend 'cuda-nope'"):
        tcaq_kernels.convert(ref_unet, ref_state_w8a8, backend="cuda-nope")


def test_conditional_unet_converts_and_backends_agree(tiny_cond_unet, rng):
    unet = tiny_cond_unet
    layers = quantizable_layers(unet)
    layers = {n: k for n, k in layers.items() if n not in ("conv_in", "conv_out")}
    assert any(n.endswith("attn2") for n in layers), "cross-attention present"
    observer = RangeObserver(unet, layers, [500.0])
    text = torch.randn(2, 7, 24, generator=rng)
    with observer, torch.no_grad():
        for t in (900, 100):
            unet(torch.randn(2, 4, 8, 8, generator=rng), t, encoder_hidden_states=text)
    state = state_from_ranges(unet, observer, "W8A8", ["conv_in", "conv_out"], {})
    state.validate(unet)
    x = torch.randn(2, 4, 8, 8, generator=rng)
    with torch.no_grad():
        fp = unet(x, 700, encoder_hidden_states=text).sample
        outs = {b: tcaq_kernels.convert(unet, state, backend=b)(x, 700, encoder_hidden_states=text).sample
                for b in ("reference", "simulate")}
    assert outs["reference"].shape == fp.shape
    assert torch.equal(outs["reference"], outs["simulate"])
    assert ((outs["reference"] - fp).norm() / fp.norm()) < 0.1


def test_w4a8_state_runs_with_packed_weights(ref_unet, ref_scheduler, rng):
    state = tcaq_kernels.calibrate(ref_unet, scheduler=ref_scheduler, bits="W4A8", num_samples=2, num_steps=4,
                                   batch_size=2, progress=False)
    conv = next(l for l in state.layers.values() if l.kind == "conv2d")
    assert conv.weight.dtype == torch.uint8
    model = tcaq_kernels.convert(ref_unet, state)
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        out = model(x, 100).sample
        fp = ref_unet(x, 100).sample
    assert torch.isfinite(out).all() and ((out - fp).norm() / fp.norm()) < 0.5


def test_simulate_backend_is_differentiable(converted, rng):
    x = torch.randn(2, 3, 32, 32, generator=rng, requires_grad=True)
    out = converted["simulate"](x, 250).sample
    out.pow(2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.cuda
def test_group_index_is_device_side_and_graph_capturable(ref_unet, ref_state_w8a8):
    model = tcaq_kernels.convert(copy.deepcopy(ref_unet).cuda(), ref_state_w8a8)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    t = torch.tensor(900, device="cuda")
    with torch.no_grad():
        eager = model(x, t).sample
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t).sample
        t.fill_(100)
        graph.replay()
        assert model.tcaq_groups.group.tolist() == [0, 0]
        t.fill_(900)
        graph.replay()
    torch.testing.assert_close(out, eager)


def test_a_deep_copied_part_refuses_a_stale_timestep_group(converted, ref_unet, ref_state_w8a8, rng):
    """A deep copy of one block is not updated by any UNet forward: its layers refuse to run (naming the
    layer) until its group is set; then it computes what the block inside the UNet computes. A copy of the
    whole model stays attached to its own copy."""
    model = converted["reference"]
    name = next(n for n, l in ref_state_w8a8.layers.items() if l.kind == "conv2d" and n.startswith("up_blocks.0"))
    x = torch.randn(2, 3, 32, 32, generator=rng)
    inp = _layer_inputs(ref_unet, [name], x, 37)[name]
    model.tcaq_groups.update(37, 2)
    part = copy.deepcopy(model.up_blocks[0])
    layer = part.get_submodule(name.removeprefix("up_blocks.0."))
    with pytest.raises(RuntimeError, match=f"layer '{name}': deep-copied apart from the converted UNet"):
        layer(inp)
    layer.groups.update(37, 2)
    with torch.no_grad():
        assert torch.equal(layer(inp), model.get_submodule(name)(inp))

    whole = copy.deepcopy(model)
    assert whole.tcaq_groups is not model.tcaq_groups
    assert whole.get_submodule(name).groups is whole.tcaq_groups  # the copy's layers share the copy's index
    with torch.no_grad():
        assert torch.equal(whole(x, 999).sample, model(x, 999).sample)
        assert whole.tcaq_groups.group.tolist() == [3, 3]


def test_a_pickled_model_runs_and_reattaches(converted, rng):
    """torch.save / torch.load of a whole converted model: the index's weak owner reference does not travel,
    the loaded model's forward sets it again, and a part copied from the loaded model is refused as above."""
    import io

    model = converted["reference"]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        assert torch.equal(loaded(x, 420).sample, model(x, 420).sample)
    part = copy.deepcopy(loaded.down_blocks[0])
    with pytest.raises(RuntimeError, match="deep-copied apart"):
        part.resnets[0].conv1(torch.randn(2, part.resnets[0].conv1.weight_shape[1], 8, 8, generator=rng))
