"""TCAQ_W4_WIDEN: packed int4 weights widened per call, then the int8 kernels — the same integers, so the
outputs must equal the in-loop widening's bit for bit (and the widening must actually have run)."""
import pytest
import torch

from tcaq_kernels.ops.triton_ops import prepare_conv_weight, prepare_linear_weight, qconv2d, qlinear
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton import widen

from _tables import Tables, rand_int


@pytest.mark.parametrize("shape", [(5, 7), (3, 64), (37, 129), (2, 3, 3, 33), (1, 1)])
def test_widen_matches_unpack(gen, device, shape):
    """Odd and even lengths, several row tiles (37 rows of 65 bytes), conv weights' [N, KH, KW, ⌈C/2⌉]."""
    q = rand_int(gen, shape, 4, device)
    packed = P.pack_int4(q).contiguous()
    out = widen.widen_int4(packed, shape[-1])
    assert out.dtype == torch.int8 and torch.equal(out, q)
    assert torch.equal(out, P.unpack_int4(packed, shape[-1]))


def test_widen_refuses_wrong_inputs(device):
    packed = torch.zeros(4, 5, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="5 packed bytes a row do not hold 12 codes"):
        widen.widen_int4(packed, 12)
    with pytest.raises(ValueError, match="contiguous uint8"):
        widen.widen_int4(packed.t(), 8)
    with pytest.raises(ValueError, match="contiguous uint8"):
        widen.widen_int4(packed.to(torch.int8), 10)


@pytest.fixture
def widened(monkeypatch):
    """Runs a call without, then with the per-call widening; returns both results and the widening count."""
    calls = []
    real = widen.widen_int4

    def spy(packed, length):
        calls.append((tuple(packed.shape), length))
        return real(packed, length)

    monkeypatch.setattr(widen, "widen_int4", spy)

    def run(fn):
        calls.clear()
        monkeypatch.setattr(widen, "WIDEN", False)
        base = fn()
        assert not calls
        monkeypatch.setattr(widen, "WIDEN", True)
        return base, fn(), calls
    return run


@pytest.mark.parametrize("float_input", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemm_widened_equals_in_loop(gen, device, widened, float_input, split_k):
    B, L, K, N = 2, 23, 301, 45  # odd K: a padding nibble per row; K spans several split-K ranges
    x = rand_int(gen, (B, L, K), 8, device) if not float_input else (torch.randn(B, L, K, generator=gen) * 3).to(device)
    w_q, w_sum = prepare_linear_weight(rand_int(gen, (N, K), 4, device), 4)
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).to(device)
    bias = torch.randn(N, generator=gen).to(device)
    t = Tables(gen, groups=3, batch=B, bits=8, device=device)
    base, wide, calls = widened(lambda: qlinear(x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group,
                                                split_k=split_k, out_dtype=torch.float32))
    assert calls == [((N, (K + 1) // 2), K)]
    assert torch.equal(base, wide)


def test_conv_widened_equals_in_loop(gen, device, widened):
    B, C, H, W, N = 2, 13, 6, 5, 19  # odd C: every tap's row of the packed weight has a padding nibble
    x = (torch.randn(B, C, H, W, generator=gen) * 2).to(device)
    w_q, w_sum = prepare_conv_weight(rand_int(gen, (N, C, 3, 3), 4, device), 4)
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).to(device)
    t = Tables(gen, groups=3, batch=B, bits=8, device=device)
    base, wide, calls = widened(lambda: qconv2d(x, w_q, w_sum, w_scale, None, t.s_inv, t.scale, t.zero, t.group,
                                                2, [1, 1], out_dtype=torch.float32))
    assert calls == [((N, 3, 3, (C + 1) // 2), C)]
    assert torch.equal(base, wide)


def test_split_input_conv_widens_both_ranges(gen, device, widened):
    """A split input (channels [c2, C) with their own quantizer and weights): both ranges widen."""
    B, C, c2, H, W, N = 2, 21, 9, 5, 6, 14
    x = (torch.randn(B, C, H, W, generator=gen) * 2).to(device)
    w = rand_int(gen, (N, C, 3, 3), 4, device)
    (w_q, w_sum), (w_q2, w_sum2) = (prepare_conv_weight(w[:, lo:hi].contiguous(), 4) for lo, hi in ((0, c2), (c2, C)))
    t, t2 = (Tables(gen, groups=3, batch=B, bits=8, device=device) for _ in range(2))
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).to(device)
    base, wide, calls = widened(lambda: qconv2d(
        x, w_q, w_sum, w_scale, None, t.s_inv, t.scale, t.zero, t.group, 1, [1, 1], out_dtype=torch.float32,
        c2=c2, w_q2=w_q2, w_sum2=w_sum2, s_inv2=t2.s_inv, scale2=t2.scale, zero2=t2.zero))
    assert calls == [((N, 3, 3, (c2 + 1) // 2), c2), ((N, 3, 3, (C - c2 + 1) // 2), C - c2)]
    assert torch.equal(base, wide)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 4096, 320, 320), (2, 77, 768, 1280), (8, 64, 1280, 5120)])
def test_gemm_widened_large(gen, widened, shape):
    """SD-1.5 shapes on the GPU: the Gluon-routed int8 codes and the float prologue, widened or not."""
    B, L, K, N = shape
    w_q, w_sum = prepare_linear_weight(rand_int(gen, (N, K), 4, "cuda"), 4)
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).cuda()
    t = Tables(gen, groups=3, batch=B, bits=8, device="cuda")
    for x in (rand_int(gen, (B, L, K), 8, "cuda"), torch.randn(B, L, K, generator=gen).cuda()):
        base, wide, _ = widened(lambda: qlinear(x, w_q, w_sum, w_scale, None, t.s_inv, t.scale, t.zero, t.group,
                                                out_dtype=torch.float32))
        assert torch.equal(base, wide)


@pytest.mark.cuda
@pytest.mark.parametrize("case", [(8, 320, 64, 64, 320), (2, 1280, 16, 16, 1280), (64, 256, 16, 16, 256)])
def test_conv_widened_large(gen, widened, case):
    B, C, H, W, N = case
    x = torch.randn(B, C, H, W, generator=gen).cuda()
    w_q, w_sum = prepare_conv_weight(rand_int(gen, (N, C, 3, 3), 4, "cuda"), 4)
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).cuda()
    t = Tables(gen, groups=3, batch=B, bits=8, device="cuda")
    base, wide, _ = widened(lambda: qconv2d(x, w_q, w_sum, w_scale, None, t.s_inv, t.scale, t.zero, t.group,
                                            1, [1, 1], out_dtype=torch.float32))
    assert torch.equal(base, wide)
