"""Activation quantize kernel against `quant/primitives.py`: codes bit for bit."""
import pytest
import torch

from tcaq_kernels.ops.triton_ops import quantize_act
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton.quantize import quantize_bsc

from _tables import Tables


def _ref_uniform(x, t, r_inv, channel_dim):
    q = P.quantize_uniform(x.float(), t.per_sample(t.s_inv, x.dim()), t.per_sample(t.zero, x.dim()), t.bits,
                           r_inv, channel_dim)
    return q.movedim(channel_dim, -1)


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tcr", [False, True])
def test_uniform_nchw_to_nhwc(gen, device, bits, dtype, tcr):
    B, C, H, W = 3, 5, 7, 9
    x = (torch.randn(B, C, H, W, generator=gen) * 4).to(dtype).to(device)
    t = Tables(gen, groups=4, batch=B, bits=bits, device=device)
    r_inv = (torch.rand(C, generator=gen) + 0.5).to(device) if tcr else None
    q = quantize_act(x, t.s_inv, t.zero, t.group, bits, r_inv, channel_dim=1)
    assert q.dtype == torch.int8 and q.shape == (B, H, W, C)
    assert torch.equal(q, _ref_uniform(x, t, r_inv, 1))


def test_uniform_channels_last_and_linear_layouts(gen, device):
    B, C, H, W = 2, 33, 5, 6
    x = torch.randn(B, C, H, W, generator=gen).to(device).to(memory_format=torch.channels_last)
    t = Tables(gen, groups=3, batch=B, bits=8, device=device)
    assert torch.equal(quantize_act(x, t.s_inv, t.zero, t.group, 8, channel_dim=1), _ref_uniform(x, t, None, 1))
    tokens = torch.randn(B, 77, 40, generator=gen).to(device)
    r_inv = (torch.rand(40, generator=gen) + 0.5).to(device)
    assert torch.equal(quantize_act(tokens, t.s_inv, t.zero, t.group, 8, r_inv), _ref_uniform(tokens, t, r_inv, -1))


def test_one_group_for_the_batch(gen, device):
    x = torch.randn(4, 3, 6, 6, generator=gen).to(device)
    t = Tables(gen, groups=5, batch=1, bits=8, device=device)
    q = quantize_act(x, t.s_inv, t.zero, t.group.reshape(()), 8, channel_dim=1)
    g = t.group.long()
    ref = P.quantize_uniform(x, t.s_inv[g], t.zero[g], 8).permute(0, 2, 3, 1)
    assert torch.equal(q, ref)


def test_ties_round_half_to_even(gen, device):
    """Exact .5 products (power-of-two scales) must round to even, as torch.round does."""
    B, C, S = 2, 16, 64
    halves = torch.randint(-300, 300, (B, S, C), generator=gen).float() + 0.5
    t = Tables(gen, groups=2, batch=B, bits=8, device=device)
    t.s_inv = torch.tensor([2.0, 0.5], device=device)
    x = (halves / t.s_inv.cpu()[t.group.long().cpu()].view(B, 1, 1)).to(device)
    assert torch.equal(quantize_act(x, t.s_inv, t.zero, t.group, 8), _ref_uniform(x, t, None, -1))


def test_packed_int4(gen, device):
    B, C, H, W = 2, 7, 5, 5  # odd C: the last byte's high nibble is pack_int4's zero padding
    x = (torch.randn(B, C, H, W, generator=gen) * 2).to(device)
    t = Tables(gen, groups=3, batch=B, bits=4, device=device)
    r_inv = (torch.rand(C, generator=gen) + 0.5).to(device)
    q = quantize_act(x, t.s_inv, t.zero, t.group, 4, r_inv, pack4=True, channel_dim=1)
    assert q.dtype == torch.uint8 and q.shape == (B, H, W, 4)
    assert torch.equal(q, P.pack_int4(_ref_uniform(x, t, r_inv, 1).contiguous()))


@pytest.mark.parametrize("bits", [8, 4])
def test_log2(gen, device, bits):
    B, L = 2, 33
    logits = torch.randn(B, 4, L, L, generator=gen) * 3
    p = torch.softmax(logits, dim=-1)
    p[0, 0, 0, :5] = torch.tensor([0.0, 1e-30, 1.0, 2.0 ** -7, 2.0 ** -7 * 1.4142135])  # zero, tiny, edges
    p = p.to(device)
    t = Tables(gen, groups=3, batch=B, bits=bits, device=device)
    q = quantize_act(p, t.s_inv, None, t.group, bits, mode="log2")
    assert q.dtype == torch.uint8
    assert torch.equal(q, P.quantize_log2(p, t.per_sample(t.s_inv, 4), bits))


def test_poisoned_output_fully_written(gen, device):
    """Two different sentinels: an element the kernel skips would keep one of them and mismatch."""
    B, S, C = 2, 45, 37
    x = torch.randn(B, S, C, generator=gen).to(device)
    t = Tables(gen, groups=3, batch=B, bits=8, device=device)
    ref = _ref_uniform(x, t, None, -1)
    for sentinel in (-77, 91):
        out = torch.full((B, S, C), sentinel, dtype=torch.int8, device=device)
        quantize_bsc(x, t.s_inv, t.zero, t.group, 1, 8, None, False, False, out)
        assert torch.equal(out, ref)


def test_fake_impl_matches(device):
    x = torch.randn(2, 5, 4, 3, device=device)
    tab = torch.ones(2, device=device)
    z = torch.zeros(2, dtype=torch.int32, device=device)
    g = torch.zeros(2, dtype=torch.int32, device=device)
    torch.library.opcheck(quantize_act, (x, tab, z, g, 4, None, "uniform", True, 1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
def test_large_sd_activation(gen):
    x = torch.randn(8, 320, 64, 64, generator=gen).cuda().to(torch.bfloat16)
    t = Tables(gen, groups=10, batch=8, bits=8, device="cuda")
    r_inv = (torch.rand(320, generator=gen) + 0.5).cuda()
    assert torch.equal(quantize_act(x, t.s_inv, t.zero, t.group, 8, r_inv, channel_dim=1), _ref_uniform(x, t, r_inv, 1))
