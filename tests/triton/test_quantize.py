"""Activation quantize kernel against `quant/primitives.py`: codes bit for bit."""
import pytest
import torch

from tcaq_kernels.ops.triton_ops import quantize_act
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton.quantize import quantize_bsc

from _concat import cat_like, part
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


@pytest.mark.parametrize("bits", [8, 4])
def test_clamp_edges_and_huge_values(gen, device, bits):
    """The kernel clamps to [QMIN − z, QMAX − z] before rounding (`numerics.quantize_uniform`), the reference
    rounds first: the same codes at the range's edges ± ½ (ties included), far past them and at ±inf,
    for zero points at both ends of the range."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    t = Tables(gen, groups=3, batch=3, bits=bits, device=device)
    t.s_inv = torch.tensor([1.0, 1.0, 0.25], device=device)
    t.zero = torch.tensor([qmin, qmax, 1], device=device, dtype=t.zero.dtype)
    t.group = torch.tensor([0, 1, 2], device=device, dtype=t.group.dtype)
    edges = torch.tensor([qmin, qmax], dtype=torch.float32)
    offsets = torch.tensor([-1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5])
    rows = []
    for z, s in ((qmin, 1.0), (qmax, 1.0), (1, 0.25)):
        near = ((edges - z)[:, None] + offsets[None, :]).flatten() / s
        rows.append(torch.cat([near, torch.tensor([1e30, -1e30, float("inf"), float("-inf"), 0.0, -0.0])]))
    x = torch.stack(rows)[:, :, None].expand(-1, -1, 8).contiguous().to(device)  # [B, S, C]
    assert torch.equal(quantize_act(x, t.s_inv, t.zero, t.group, bits), _ref_uniform(x, t, None, -1))


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


def _second_quantizer(gen, t, device):
    """Tables 2 of a split input: another quantizer of the same timestep groups, read with the same per-sample group.
    The samples' groups are made distinct, so a kernel indexing the wrong sample's tables shows."""
    t.group = torch.randperm(t.s_inv.numel(), generator=gen)[:t.group.numel()].to(t.group)
    t2 = Tables(gen, groups=t.s_inv.numel(), batch=t.group.numel(), bits=t.bits, device=device)
    t2.group = t.group
    return t2


def _ref_split(x, t, t2, r_inv, c2):
    """Codes of a split [B, S, C] input: each channel range quantized on its own by the reference, then concatenated."""
    halves = [(t, slice(0, c2)), (t2, slice(c2, None))]
    return torch.cat([_ref_uniform(x[..., cs], tab, None if r_inv is None else r_inv[cs], -1) for tab, cs in halves],
                     dim=-1)


@pytest.mark.parametrize("bits,pack4", [(8, False), (4, False), (4, True)])
@pytest.mark.parametrize("tcr", [False, True])
@pytest.mark.parametrize("c2", [13, 20, 1, 36])
def test_split_input_two_quantizers(gen, device, bits, pack4, tcr, c2):
    """Channels [0, c2) with tables 1, [c2, C) with tables 2, of an NCHW-strided input: c2 inside the first
    or the second 16-wide tile and at both ends; odd c2 puts the boundary inside a packed byte."""
    B, S, C = 3, 45, 37
    x = (torch.randn(B, C, S, generator=gen) * 3).to(device).transpose(1, 2)
    t = Tables(gen, groups=4, batch=B, bits=bits, device=device)
    t2 = _second_quantizer(gen, t, device)
    r_inv = (torch.rand(C, generator=gen) + 0.5).to(device) if tcr else None
    ref = _ref_split(x, t, t2, r_inv, c2)
    if pack4:
        ref = P.pack_int4(ref.contiguous())
    for sentinel in (77, 91):  # an element the kernel skips keeps a sentinel in one of the two runs
        out = torch.full(ref.shape, sentinel, dtype=ref.dtype, device=device)
        quantize_bsc(x, t.s_inv, t.zero, t.group, 1, bits, r_inv, False, pack4, out, c2=c2, s_inv2=t2.s_inv,
                     zero2=t2.zero)
        assert torch.equal(out, ref)


def test_split_input_refusals(gen, device):
    """Arguments the kernel cannot honour are refused before the launch, naming what is wrong."""
    B, S, C = 2, 5, 37
    x = torch.rand(B, S, C, generator=gen).to(device)
    t = Tables(gen, groups=3, batch=B, bits=8, device=device)
    out = torch.empty(B, S, C, dtype=torch.int8, device=device)
    launch = lambda c2=13, s_inv2=t.s_inv, zero2=t.zero, log2=False: quantize_bsc(
        x, t.s_inv, t.zero, t.group, 1, 8, None, log2, False, out.view(torch.uint8) if log2 else out,
        c2=c2, s_inv2=s_inv2, zero2=zero2)
    with pytest.raises(ValueError, match="c2 is for uniform codes, not log2"):
        launch(log2=True)
    for c2 in (0, C, -1, 40):
        with pytest.raises(ValueError, match=f"c2={c2} must satisfy 0 < c2 < C={C}"):
            launch(c2=c2)
    with pytest.raises(ValueError, match="come together, got only c2, s_inv2"):
        launch(zero2=None)
    with pytest.raises(ValueError, match=r"s_inv2 has shape \(2,\)"):
        launch(s_inv2=t.s_inv[:2])


# (C1, C2, layout of x3, of x2, dtype, TCR): odd parts, a boundary inside a 16-wide channel tile (and a packed
# byte) or on a tile edge, the two parts in the same or in different layouts.
CONCAT_CASES = [(24, 13, "nchw", "nchw", torch.float32, True), (16, 16, "nhwc", "nhwc", torch.float32, False),
                (5, 30, "nhwc", "nchw", torch.float32, True), (21, 14, "slice", "nchw", torch.bfloat16, True)]


@pytest.mark.parametrize("case", CONCAT_CASES,
                         ids=lambda c: f"{c[0]}+{c[1]}-{c[2]}-{c[3]}-{str(c[4])[6:]}" + "-tcr" * c[5])
@pytest.mark.parametrize("bits,pack4", [(8, False), (4, True)])
@pytest.mark.parametrize("c2", [None, "C1", 9], ids=["one-quantizer", "c2=C1", "c2=9"])
def test_concatenated_input_read_in_place(gen, device, case, bits, pack4, c2):
    """`x2` (x3 and x2 concatenated along channels, read in place): the codes of the materialised concatenation,
    bit for bit — with one quantizer or a split one (c2 at the parts' boundary or elsewhere), TCR, packed int4
    (an odd C1 puts the boundary inside a byte), into outputs poisoned with different sentinels."""
    C1, C2, l3, l2, dtype, tcr = case
    B, S, C = 3, 45, C1 + C2
    x3, x2 = (part(gen, B, S, c, lay, dtype, device) for c, lay in ((C1, l3), (C2, l2)))
    t = Tables(gen, groups=4, batch=B, bits=bits, device=device)
    t.group = torch.randperm(4, generator=gen)[:B].to(t.group)  # distinct per-sample tables
    split = {}
    if c2 is not None:
        t2 = Tables(gen, groups=4, batch=B, bits=bits, device=device)
        split = dict(c2=C1 if c2 == "C1" else c2, s_inv2=t2.s_inv, zero2=t2.zero)
    r_inv = (torch.rand(C, generator=gen) + 0.5).to(device) if tcr else None
    shape, out_dtype = (B, S, (C + 1) // 2 if pack4 else C), torch.uint8 if pack4 else torch.int8

    def codes(sentinel, *x, **kw):
        out = torch.full(shape, sentinel, dtype=out_dtype, device=device)
        return quantize_bsc(x[0], t.s_inv, t.zero, t.group, 1, bits, r_inv, False, pack4, out, **split, **kw)

    assert torch.equal(codes(77, x3, x2=x2), codes(91, cat_like(x3, x2)))


def test_concatenated_input_refusals(gen, device):
    """A second part that does not fit x3 (batch, pixels, dtype, device, rank), or log2 codes, is refused."""
    B, S = 2, 5
    x3 = torch.rand(B, S, 6, generator=gen).to(device)
    t = Tables(gen, groups=3, batch=B, bits=8, device=device)
    out = torch.empty(B, S, 10, dtype=torch.int8, device=device)
    launch = lambda x2, log2=False: quantize_bsc(x3, t.s_inv, t.zero, t.group, 1, 8, None, log2, False,
                                                 out.view(torch.uint8) if log2 else out, x2=x2)
    for bad in (torch.rand(B + 1, S, 4), torch.rand(B, S + 1, 4), torch.rand(B, S * 4)):
        with pytest.raises(ValueError, match=r"x2: shape .* is not \[B, S, C2\]"):
            launch(bad.to(device))
    with pytest.raises(ValueError, match="x2: dtype torch.float16"):
        launch(torch.rand(B, S, 4).half().to(device))
    with pytest.raises(ValueError, match="x2: on meta"):
        launch(torch.empty(B, S, 4, device="meta"))
    with pytest.raises(ValueError, match="x2: a concatenated input is for uniform codes, not log2"):
        launch(torch.rand(B, S, 4).to(device), log2=True)


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
