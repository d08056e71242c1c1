"""latency.py's SD-1.5 rows without a GPU: the architecture is SD-1.5's UNet, and the states it converts come
from ranges observed on a conditional UNet with random latents and text, every timestep group seen."""
import os

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


def test_float_attention_states_leave_attention_to_sdpa(load_benchmark, tiny_cond_unet, rng):
    """`--float-attention`: every attention layer float (diffusers' processor, SDPA), its projections quantized."""
    latency = load_benchmark("latency")
    state = latency.observed_states(tiny_cond_unet, ["W8A8"], text_tokens=5, float_attention=True)["W8A8"]
    attention = [n for n in state.float_layers if n.endswith((".attn1", ".attn2"))]
    assert len(attention) == 8 and set(state.float_layers) == {"conv_in", "conv_out", *attention}
    model = tcaq_kernels.convert(tiny_cond_unet, state, backend="reference")
    attn = model.get_submodule(attention[0])
    assert type(attn.processor).__module__.startswith("diffusers") and type(attn.to_q).__name__ == "QLinear"
    x, text = torch.randn(2, 4, 8, 8, generator=rng), torch.randn(2, 5, 24, generator=rng)
    with torch.no_grad():
        y, want = (m(x, 700, encoder_hidden_states=text).sample for m in (model, tiny_cond_unet))
    assert ((y - want).norm() / want.norm()).item() < 0.2


def test_step_inputs_give_text_to_conditional_unets_only(load_benchmark, tiny_cond_unet, ref_unet):
    """Random (never zero) latents, the same values in fp32 and bf16; text embeddings of 77 tokens only where the
    UNet has cross-attention."""
    latency = load_benchmark("latency")
    cond = latency.step_inputs(tiny_cond_unet, 3, device="cpu")
    for dtype, (x, kwargs) in cond.items():
        text = kwargs["encoder_hidden_states"]
        assert x.dtype == text.dtype == dtype and x.shape == (3, 4, 8, 8) and text.shape == (3, 77, 24)
        assert x.float().std() > 0.5 and text.float().std() > 0.5
    assert torch.equal(cond[torch.float32][0].to(torch.bfloat16), cond[torch.bfloat16][0])
    x, kwargs = latency.step_inputs(ref_unet, 2, device="cpu")[torch.float32]
    assert kwargs == {} and x.shape == (2, ref_unet.config.in_channels, *(2 * [ref_unet.config.sample_size]))


def test_the_recorded_command_names_every_switch_that_was_set(load_benchmark, monkeypatch):
    latency = load_benchmark("latency")
    for key in [k for k in os.environ if k.startswith("TCAQ_")]:
        monkeypatch.delenv(key)
    monkeypatch.setattr("sys.argv", ["benchmarks/latency.py", "--arch", "sd15"])
    assert latency.command_line() == "python benchmarks/latency.py --arch sd15"
    monkeypatch.setenv("TCAQ_TRITON_TUNING", "quick")
    monkeypatch.setenv("TCAQ_CUTLASS_GEMM", "1")
    assert latency.command_line() == ("TCAQ_CUTLASS_GEMM=1 TCAQ_TRITON_TUNING=quick "
                                      "python benchmarks/latency.py --arch sd15")


def test_unfuse_gives_each_fusion_back_to_diffusers(load_benchmark, tiny_cond_unet, tiny_cond_state, rng):
    """--ablate's rows: one fusion undone, the others kept, and the model still runs and agrees with the fused one.
    To 5 %: the fusions move roundings and the norms' statistics order, nothing else, but a code that flips at a
    rounding boundary moves this 8×8 UNet's output (one flip at an exact k + ½ tie of a feed-forward input moved it
    0.65 %, seed 1013 of a local run)."""
    from tcaq_kernels.nn.qfeedforward import FusedFeedForward
    from tcaq_kernels.nn.qtransformer import FusedBasicTransformerBlock, FusedTransformer2DModel

    latency = load_benchmark("latency")
    kinds = (FusedFeedForward, FusedTransformer2DModel, FusedBasicTransformerBlock)
    x, text, t = torch.randn(2, 4, 8, 8, generator=rng), torch.randn(2, 5, 24, generator=rng), torch.tensor([900, 100])
    run = lambda m: m(x, t, encoder_hidden_states=text).sample
    with torch.no_grad():
        fused = run(tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton"))
        for fusion, undone in zip(("feed-forward", "transformer projections", "transformer blocks", None), kinds):
            model = tcaq_kernels.convert(tiny_cond_unet, tiny_cond_state, backend="triton")
            if fusion is None:
                assert latency.unfuse(model, "transformer layer norms") == 4
                assert all(m.tcaq_ln == (False, False) for m in model.modules() if type(m) is kinds[2])
            else:
                assert latency.unfuse(model, fusion) == 4
                left = {k: sum(type(m) is k for m in model.modules()) for k in kinds}
                assert left == {k: 0 if k is undone else 4 for k in kinds}
            out = run(model)
            assert ((out - fused).norm() / fused.norm()) < 5e-2, fusion
