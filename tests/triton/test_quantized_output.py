"""Quantized epilogue output of the GEMM and conv: the next layer's int8 codes instead of y.

The codes must be `primitives.quantize_uniform` of the op's own fp32 output (out_dtype=float32) with
the next layer's tables, bit for bit, on the unsplit kernel and the split-K reduction alike; fed to
that layer they must give what quantizing its float input there gives. Codes are checked through
the launchers (`qgemm` / `qconv`) into outputs that start one off the expected code everywhere, so
an element the kernel does not write fails; the ops' own plumbing is checked by the chain tests.
"""
import pytest
import torch

from tcaq_kernels.ops.triton_ops import prepare_conv_weight, prepare_linear_weight, qconv2d, qlinear, quantize_act
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton.conv import qconv
from tcaq_kernels.triton.gemm import qgemm

from _tables import Tables, rand_int

GROUPS = 4


class Linear:
    """A qlinear layer on [B, L, K] input with random weights, scales, bias, input tables and
    (optionally) a bf16 residual. `code_bits` narrows the int8 input codes, `unit` makes
    y = the integer accumulator (unit scales, no bias): see `test_half_way_values_round_to_even`."""

    channel_dim = -1

    def __init__(self, gen, device, shape, w_bits, a_float, residual, code_bits=8, unit=False):
        B, L, K, N = shape
        self.t = Tables(gen, GROUPS, B, code_bits, device, unit_scale=unit)
        self.r_inv = (torch.rand(K, generator=gen) + 0.5).to(device)
        x = (torch.randn(B, L, K, generator=gen) * 2).to(device)
        self.x = x if a_float else rand_int(gen, (B, L, K), code_bits, device)
        self.w_q, self.w_sum = prepare_linear_weight(rand_int(gen, (N, K), w_bits, device), w_bits)
        self._epilogue(gen, device, N, (B, L, N) if residual else None, unit)

    def _epilogue(self, gen, device, N, residual_shape, unit):
        self.N = N
        self.w_scale = torch.ones(N, device=device) if unit else (torch.rand(N, generator=gen) * 1e-3 + 1e-4).to(device)
        self.bias = None if unit else torch.randn(N, generator=gen).to(device)
        self.residual = None
        if residual_shape is not None:
            self.residual = (torch.randn(residual_shape, generator=gen) * 2).to(torch.bfloat16).to(device)

    def op(self, x, split_k, **out):
        t = self.t
        return qlinear(x, self.w_q, self.w_sum, self.w_scale, self.bias, t.s_inv, t.scale, t.zero, t.group,
                       8, self.r_inv, self.residual, split_k=split_k, **out)

    def codes_layout(self, y_codes):
        return y_codes

    def launch(self, out, split_k, q):
        """The GEMM into `out` [B, L, N] int8 with the next layer's quantizer q."""
        B, L, K = self.x.shape
        t = self.t
        res = self.residual.reshape(B * L, self.N) if self.residual is not None else None
        qgemm(self.x.reshape(B * L, K), self.w_q, self.w_sum, self.w_scale, self.bias, t.s_inv, t.scale, t.zero,
              t.group, 1, L, 8, self.r_inv, res, out.view(B * L, self.N), split_k, *q)


class Conv(Linear):
    """A qconv2d layer on [B, C, H, W] input (float NCHW, or NHWC int8 codes), NCHW residual."""

    channel_dim = 1

    def __init__(self, gen, device, shape, w_bits, a_float, residual, code_bits=8, unit=False):
        B, C, H, W, N, k, self.stride, self.pad = shape
        self.t = Tables(gen, GROUPS, B, code_bits, device, unit_scale=unit)
        self.r_inv = (torch.rand(C, generator=gen) + 0.5).to(device)
        x = (torch.randn(B, C, H, W, generator=gen) * 2).to(device)
        self.x = x if a_float else rand_int(gen, (B, H, W, C), code_bits, device)
        self.w_q, self.w_sum = prepare_conv_weight(rand_int(gen, (N, C, k, k), w_bits, device), w_bits)
        OH, OW = (H + 2 * self.pad - k) // self.stride + 1, (W + 2 * self.pad - k) // self.stride + 1
        self._epilogue(gen, device, N, (B, N, OH, OW) if residual else None, unit)

    def op(self, x, split_k, **out):
        t = self.t
        return qconv2d(x, self.w_q, self.w_sum, self.w_scale, self.bias, t.s_inv, t.scale, t.zero, t.group,
                       self.stride, [self.pad], 8, self.r_inv, self.residual, split_k=split_k, **out)

    def codes_layout(self, y_codes):
        return y_codes.permute(0, 2, 3, 1).contiguous()  # NCHW-shaped → NHWC, the int8 output's layout

    def launch(self, out, split_k, q):
        """The conv into `out` [B, OH, OW, N] int8 (seen as NCHW, as qconv2d does)."""
        t = self.t
        codes = self.x
        if codes.is_floating_point():
            codes = quantize_act(codes, t.s_inv, t.zero, t.group, 8, self.r_inv, channel_dim=1)
        qconv(codes, self.w_q, self.w_sum, self.w_scale, self.bias, t.scale, t.zero, t.group, 1, self.stride,
              (self.pad,) * 4, self.residual, out.permute(0, 3, 1, 2), split_k, *q)


LAYERS = {"linear": (Linear, (2, 19, 300, 45)), "conv": (Conv, (2, 37, 7, 9, 21, 3, 1, 1))}


def next_quantizer(gen, layer, y, bits, with_r_inv):
    """(s_inv[G], zero[G], r_inv[N] or None, bits) of the layer after `layer`, scaled so that the
    codes of its output y fill the range and the tails clip."""
    qmin, qmax = P.qrange(bits)
    s_inv = ((torch.rand(GROUPS, generator=gen) + 0.5) * qmax / (2 * y.float().std().item())).to(y.device)
    zero = torch.randint(qmin // 4, qmax // 4 + 1, (GROUPS,), generator=gen, dtype=torch.int32).to(y.device)
    r_inv = (torch.rand(layer.N, generator=gen) + 0.5).to(y.device) if with_r_inv else None
    return s_inv, zero, r_inv, bits


def host_codes(layer, y, q):
    """`primitives.quantize_uniform` of the fp32 output y, per sample's group, in the int8 output's layout."""
    s_inv, zero, r_inv, bits = q
    t = layer.t
    codes = P.quantize_uniform(y, t.per_sample(s_inv, y.dim()), t.per_sample(zero, y.dim()), bits, r_inv,
                               layer.channel_dim)
    return layer.codes_layout(codes)


def check_codes(layer, y, q, split_k):
    """The kernel's codes against the host's on y, the op's fp32 output; every element written."""
    expect = host_codes(layer, y, q)
    out = expect ^ 1  # every element starts off its expected code
    layer.launch(out, split_k, q)
    bad = out != expect
    assert not bad.any(), f"{int(bad.sum())} of {out.numel()} codes off, e.g. {out[bad][:4]} vs {expect[bad][:4]}"


def check_chain(gen, layer, q, split_k):
    """Codes from the op fed to the next layer = that layer quantizing the fp32 output itself."""
    s_inv, zero, r_inv, bits = q
    y = layer.op(layer.x, split_k, out_dtype=torch.float32)
    codes = layer.op(layer.x, split_k, out_s_inv=s_inv, out_zero=zero, out_r_inv=r_inv, out_bits=bits)
    assert codes.dtype == torch.int8 and torch.equal(codes, host_codes(layer, y, q))
    N, N2, t = layer.N, 13, layer.t
    w2 = rand_int(gen, (N2, N) if layer.channel_dim == -1 else (N2, N, 3, 3), 8, y.device)
    scale2 = (torch.rand(GROUPS, generator=gen) * 0.1).to(y.device)
    w_scale2 = (torch.rand(N2, generator=gen) * 0.01).to(y.device)
    if layer.channel_dim == -1:
        w_q, w_sum = prepare_linear_weight(w2, 8)
        nxt = lambda a: qlinear(a, w_q, w_sum, w_scale2, None, s_inv, scale2, zero, t.group, bits, r_inv,
                                out_dtype=torch.float32)
    else:
        w_q, w_sum = prepare_conv_weight(w2, 8)
        nxt = lambda a: qconv2d(a, w_q, w_sum, w_scale2, None, s_inv, scale2, zero, t.group, 1, [1], bits, r_inv,
                                out_dtype=torch.float32)
    assert torch.equal(nxt(codes), nxt(y))


# (residual, out_r_inv, out_bits): each of residual and the TCR reciprocal with and without the
# other, both code widths.
VARIANTS = [(False, False, 8), (True, True, 8), (True, False, 4), (False, True, 4)]


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("w_bits", [8, 4], ids=["W8", "W4"])
@pytest.mark.parametrize("a_float", [False, True], ids=["int8-in", "float-in"])
@pytest.mark.parametrize("split_k", [1, 3], ids=["split1", "split3"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"res{int(v[0])}-rinv{int(v[1])}-A{v[2]}")
def test_codes_equal_host_quantize(gen, device, kind, w_bits, a_float, split_k, variant):
    residual, with_r_inv, bits = variant
    cls, shape = LAYERS[kind]
    layer = cls(gen, device, shape, w_bits, a_float, residual)
    y = layer.op(layer.x, split_k, out_dtype=torch.float32)
    check_codes(layer, y, next_quantizer(gen, layer, y, bits, with_r_inv), split_k)


@pytest.mark.parametrize("kind", LAYERS)
def test_half_way_values_round_to_even(gen, device, kind):
    """y = the integer accumulator and s_inv = 1/2: half the outputs sit exactly between two codes."""
    cls, shape = LAYERS[kind]
    layer = cls(gen, device, shape, 4, False, False, code_bits=2, unit=True)
    zero = torch.randint(-8, 9, (GROUPS,), generator=gen, dtype=torch.int32).to(device)
    q = (torch.full((GROUPS,), 0.5, device=device), zero, None, 8)
    for split_k in (1, 3):
        y = layer.op(layer.x, split_k, out_dtype=torch.float32)
        assert ((y * 0.5).frac().abs() == 0.5).float().mean() > 0.3
        check_codes(layer, y, q, split_k)


@pytest.mark.parametrize("kind", LAYERS)
def test_product_order_is_the_hosts(gen, device, kind):
    """(y·r_inv)·s_inv and y·(r_inv·s_inv) round apart now and then: r_inv[n] is picked, per
    channel, among draws that make the two orders give different codes on some row of y, so that
    only the host's order (y·r_inv first) passes."""
    cls, shape = LAYERS[kind]
    layer = cls(gen, device, shape, 4, False, False, code_bits=2, unit=True)
    y = layer.op(layer.x, 1, out_dtype=torch.float32)
    cols = layer.codes_layout(y).reshape(-1, layer.N).cpu()  # [M, N], y integer, |y| ≲ 300
    s_inv = torch.rand((), generator=gen) * 0.1 + 0.3
    draws = torch.rand(100000, 1, generator=gen) + 0.5
    r_inv = torch.empty(layer.N)
    for n in range(layer.N):
        apart = (torch.round((cols[:, n] * draws) * s_inv) != torch.round(cols[:, n] * (draws * s_inv))).any(1)
        r_inv[n] = draws[apart.nonzero()[0, 0] if apart.any() else 0, 0]
    apart = torch.round((cols * r_inv) * s_inv) != torch.round(cols * (r_inv * s_inv))
    assert apart.any(0).sum() >= layer.N // 4, "too few channels where the orders differ"
    q = (s_inv.repeat(GROUPS).to(device), torch.zeros(GROUPS, dtype=torch.int32, device=device), r_inv.to(device), 8)
    check_codes(layer, y, q, 1)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bits_split", [(8, 1), (4, 3)], ids=["A8-split1", "A4-split3"])
def test_codes_feed_the_next_layer(gen, device, kind, bits_split):
    bits, split_k = bits_split
    cls, shape = LAYERS[kind]
    layer = cls(gen, device, shape, 8, True, True)
    y = layer.op(layer.x, 1, out_dtype=torch.float32)
    check_chain(gen, layer, next_quantizer(gen, layer, y, bits, True), split_k)


@pytest.mark.parametrize("kind", LAYERS)
def test_fake_impl_matches(gen, device, kind):
    """torch.compile traces int8 codes of the right shape ([..., N], or NHWC for the conv)."""
    cls, shape = LAYERS[kind]
    layer = cls(gen, device, (1, 3, 64, 8) if kind == "linear" else (1, 5, 4, 3, 8, 3, 2, 1), 8, True, False)
    t = layer.t
    out = dict(out_s_inv=t.s_inv, out_zero=t.zero, out_r_inv=torch.ones(8, device=device), out_bits=4)
    op = qlinear if kind == "linear" else qconv2d
    args = (layer.x, layer.w_q, layer.w_sum, layer.w_scale, None, t.s_inv, t.scale, t.zero, t.group)
    args += () if kind == "linear" else (layer.stride, [layer.pad])
    torch.library.opcheck(op, args, out, test_utils=("test_schema", "test_faketensor"))
    codes = op(*args, **out)
    assert codes.dtype == torch.int8
    assert codes.shape == ((1, 3, 8) if kind == "linear" else (1, 2, 2, 8)) and codes.is_contiguous()


@pytest.mark.parametrize("kind", LAYERS)
def test_bad_arguments_are_named(gen, device, kind):
    cls, shape = LAYERS[kind]
    layer = cls(gen, device, shape, 8, False, False)
    s_inv, zero = layer.t.s_inv, layer.t.zero
    cases = [
        (dict(out_s_inv=s_inv), "out_zero missing"),
        (dict(out_zero=zero), "needs out_s_inv"),
        (dict(out_bits=4), "needs out_s_inv"),
        (dict(out_s_inv=s_inv, out_zero=zero, out_bits=9), "out_bits"),
        (dict(out_s_inv=s_inv, out_zero=zero, out_bits=1), "out_bits"),
        (dict(out_s_inv=s_inv, out_zero=zero, out_r_inv=torch.ones(layer.N + 1, device=device)), "out_r_inv"),
        (dict(out_s_inv=s_inv, out_zero=zero[:2]), "out_zero"),
        (dict(out_s_inv=s_inv, out_zero=zero, out_dtype=torch.bfloat16), "out_dtype"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            layer.op(layer.x, 1, **kwargs)


# SD-1.5 / DDPM shapes on the GPU: linear (B, L, K, N), conv (B, C, H, W, N, k, stride, pad).
@pytest.mark.cuda
@pytest.mark.parametrize("kind_shape", [
    ("linear", (2, 4096, 320, 320)), ("linear", (2, 77, 768, 1280)), ("linear", (2, 64, 1280, 5120)),
    ("conv", (2, 320, 64, 64, 320, 3, 1, 1)), ("conv", (2, 640, 32, 32, 640, 3, 2, 1)),
    ("conv", (2, 1280, 8, 8, 1280, 3, 1, 1)),
], ids=lambda v: f"{v[0]}-{'x'.join(map(str, v[1]))}")
@pytest.mark.parametrize("w_bits", [8, 4], ids=["W8", "W4"])
@pytest.mark.parametrize("a_float", [False, True], ids=["int8-in", "float-in"])
def test_large_shapes(gen, kind_shape, w_bits, a_float):
    kind, shape = kind_shape
    cls = LAYERS[kind][0]
    for residual, with_r_inv, bits in VARIANTS:
        layer = cls(gen, "cuda", shape, w_bits, a_float, residual)
        for split_k in (1, 4):
            y = layer.op(layer.x, split_k, out_dtype=torch.float32)
            q = next_quantizer(gen, layer, y, bits, with_r_inv)
            check_codes(layer, y, q, split_k)
    check_chain(gen, layer, q, 4)
