"""Split inputs (two activation quantizers over two channel ranges): every backend computes
`y = (acc1·(s_w·s_a1) + acc2·(s_w·s_a2)) + bias`, each conv range padded with its own zero point."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tcaq_kernels.nn import QConv2d, QLinear, TimestepGroups
from tcaq_kernels.quant.primitives import pack_int4, quantize_uniform, quantize_weight, qrange, weight_scale_symmetric
from tcaq_kernels.quant.state import ActQuant, LayerState

EDGES = [500.0]  # two timestep groups
TIMESTEPS = torch.tensor([900, 100, 600])  # groups 1, 0, 1


def _act(bits: int, scale: float, gen) -> ActQuant:
    """Two groups of uniform parameters around `scale`, with zero points inside the code range."""
    qmin, qmax = qrange(bits)
    return ActQuant(bits=bits, kind=["uniform"] * 2, scale=scale * (0.5 + torch.rand(2, generator=gen)),
                    zero=torch.randint(qmin // 2, qmax // 2, (2,), generator=gen, dtype=torch.int32))


def _split_layer(module, kind: str, split: int, w_bits: int, a_bits: int, gen, tcr: bool) -> LayerState:
    c_in = module.weight.shape[1]
    r = 1 + 2 * torch.rand(c_in, generator=gen) if tcr else None
    scale = weight_scale_symmetric(module.weight, w_bits, r)
    w_int = quantize_weight(module.weight, scale, w_bits, r).flatten(1)
    # the two ranges have very different activation ranges (the point of splitting)
    acts = {"input": _act(a_bits, 0.02, gen), "input_skip": _act(a_bits, 0.3, gen)}
    return LayerState(kind=kind, acts=acts, w_bits=w_bits, weight=pack_int4(w_int) if w_bits == 4 else w_int,
                      weight_shape=tuple(module.weight.shape), weight_scale=scale, tcr=r, input_split=split)


def _qlayers(cls, module, layer, backends):
    groups = TimestepGroups(EDGES).to(module.weight.device)
    groups.update(TIMESTEPS, len(TIMESTEPS))
    return {b: cls.from_state("up_blocks.0.resnets.0.conv1", module, layer, groups, b) for b in backends}


def _input(shape, split, channel_dim, gen):
    """Activations whose first range is small and second range large, as at a skip concatenation."""
    x = torch.randn(shape, generator=gen)
    scale = torch.ones(shape[channel_dim])
    scale[split:] = 8.0
    view = [1] * len(shape)
    view[channel_dim] = -1
    return x * scale.view(view)


CONVS = {  # (C_in, split, stride, padding): odd channel counts, a 1×1, a stride-2 conv
    "3x3": (7, 3, 1, 1),
    "3x3_stride2": (9, 5, 2, 1),
    "1x1": (5, 1, 1, 0),
}


@pytest.mark.parametrize("case", sorted(CONVS))
@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (6, 6)])
@pytest.mark.parametrize("tcr", [False, True])
def test_split_conv_reference_and_simulate_are_bit_identical(case, bits, tcr, rng):
    c_in, split, stride, padding = CONVS[case]
    k = 1 if padding == 0 else 3
    conv = torch.nn.Conv2d(c_in, 6, k, stride=stride, padding=padding)
    layer = _split_layer(conv, "conv2d", split, *bits, rng, tcr)
    q = _qlayers(QConv2d, conv, layer, ("reference", "simulate"))
    x = _input((3, c_in, 7, 9), split, 1, rng)
    with torch.no_grad():
        y_ref, y_sim = q["reference"](x), q["simulate"](x)
    assert torch.equal(y_ref, y_sim), (y_ref - y_sim).abs().max().item()
    assert torch.equal(y_ref, _oracle_conv(x, conv, layer, stride, padding))


def _oracle_conv(x, conv, layer, stride, padding):
    """The contract written out sample by sample: each range's codes padded with its own z, then
    convolved unpadded; both products scaled, summed, then the bias."""
    w_int = layer.weight_int().double()
    split = layer.input_split
    r_inv = 1.0 / layer.tcr if layer.tcr is not None else torch.ones(x.shape[1])
    groups = torch.bucketize(TIMESTEPS.float(), torch.tensor(EDGES), right=True)
    out = []
    for b, g in enumerate(groups.tolist()):
        acc = []
        for act, sl in (("input", slice(0, split)), ("input_skip", slice(split, None))):
            a = layer.acts[act]
            codes = quantize_uniform(x[b : b + 1, sl], 1.0 / a.scale[g], a.zero[g], a.bits, r_inv[sl], 1).double()
            padded = F.pad(codes, (padding,) * 4, value=float(a.zero[g]))
            acc.append((F.conv2d(padded - float(a.zero[g]), w_int[:, sl], stride=stride), a.scale[g]))
        w_scale = layer.weight_scale.view(1, -1, 1, 1)
        y = acc[0][0].float() * (w_scale * acc[0][1]) + acc[1][0].float() * (w_scale * acc[1][1])
        out.append(y + conv.bias.view(1, -1, 1, 1))
    return torch.cat(out)


@pytest.mark.parametrize("bits", [(8, 8), (4, 8)])
def test_split_linear_reference_and_simulate_are_bit_identical(bits, rng):
    lin = torch.nn.Linear(9, 11)
    layer = _split_layer(lin, "linear", 4, *bits, rng, tcr=True)
    q = _qlayers(QLinear, lin, layer, ("reference", "simulate"))
    x = _input((3, 5, 9), 4, -1, rng)  # tokens: channels last
    with torch.no_grad():
        y_ref, y_sim = q["reference"](x), q["simulate"](x)
    assert y_ref.shape == (3, 5, 11) and torch.equal(y_ref, y_sim)


def test_split_with_equal_tables_matches_the_unsplit_layer(rng):
    """Same parameters in both ranges: the same codes and integers, only the fp32 combine differs."""
    conv = torch.nn.Conv2d(7, 6, 3, padding=1)
    layer = _split_layer(conv, "conv2d", 3, 8, 8, rng, tcr=True)
    layer.acts["input_skip"] = layer.acts["input"]
    unsplit = LayerState(**{**layer.__dict__, "acts": {"input": layer.acts["input"]}, "input_split": None})
    x = _input((3, 7, 6, 6), 3, 1, rng)
    with torch.no_grad():
        y_split = _qlayers(QConv2d, conv, layer, ("reference",))["reference"](x)
        y_one = _qlayers(QConv2d, conv, unsplit, ("reference",))["reference"](x)
    torch.testing.assert_close(y_split, y_one, rtol=1e-6, atol=1e-6 * y_one.abs().max().item())


def test_split_simulate_is_differentiable(rng):
    conv = torch.nn.Conv2d(7, 6, 3, padding=1)
    q = _qlayers(QConv2d, conv, _split_layer(conv, "conv2d", 3, 8, 8, rng, tcr=False), ("simulate",))["simulate"]
    x = _input((3, 7, 5, 5), 3, 1, rng).requires_grad_(True)
    q(x).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, :3].abs().sum() > 0) and (x.grad[:, 3:].abs().sum() > 0)


@pytest.mark.parametrize("w_bits", [8, 4])
def test_split_triton_layers_match_reference(w_bits, rng):
    """The conv: one kernel with an int32 sum per range; the linear: two unsplit calls (one per range,
    bias-free fp32) added, then the bias. Both combine in the reference's order, so on the same
    accumulators the outputs are the same bits (interpreter on CPU, small shapes; on a GPU where one
    exists)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    conv = torch.nn.Conv2d(7, 6, 3, padding=1)
    lin = torch.nn.Linear(9, 10)
    cases = [
        (QConv2d, conv, _split_layer(conv, "conv2d", 3, w_bits, 8, rng, tcr=True), _input((3, 7, 5, 6), 3, 1, rng)),
        (QLinear, lin, _split_layer(lin, "linear", 5, w_bits, 8, rng, tcr=False), _input((3, 4, 9), 5, -1, rng)),
    ]
    for cls, module, layer, x in cases:
        module, x = module.to(device), x.to(device)
        q = _qlayers(cls, module, layer, ("reference", "triton"))
        with torch.no_grad():
            y_ref, y_tri = q["reference"](x), q["triton"](x)
        assert y_tri.shape == y_ref.shape and y_tri.dtype == y_ref.dtype
        assert torch.equal(y_tri, y_ref), (cls.__name__, (y_tri - y_ref).abs().max().item())
