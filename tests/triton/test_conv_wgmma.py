"""The Gluon wgmma implicit-GEMM conv (sm_90 only, `TCAQ_WGMMA=1`) against `ops/reference.int_conv2d`.

Through `qconv2d` with the routing on and every config forced in turn; a spy asserts each call reached
the wgmma kernel. GPU-only (Gluon does not run in Triton's interpreter); the CPU checks what it compiles to
(tests/triton/test_profile_tools.py)."""
import pytest
import torch

from tcaq_kernels.ops import reference as R
from tcaq_kernels.ops.triton_ops import prepare_conv_weight, qconv2d
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton import conv_wgmma as CW

from _tables import Tables, assert_float_close, assert_upsample_conv_exact, conv_acc_ref, rand_int
from _wgmma import NEEDS_SM90, route_to_wgmma

pytestmark = NEEDS_SM90

# (B, C, H, W, N, k, stride, pads): 3×3 with padding, stride 2 with DDPM's asymmetric pad, 1×1, N not a
# tile multiple, C a multiple of 64 and of 128, pixels not a tile multiple
CASES = [
    (2, 64, 9, 7, 40, 3, 1, (1, 1, 1, 1)),
    (2, 128, 16, 16, 72, 3, 2, (0, 1, 0, 1)),  # 2·8·8 = 128 output pixels: ≥ 64 routes
    (1, 320, 12, 10, 320, 3, 1, (1, 1, 1, 1)),
    (2, 256, 6, 11, 136, 1, 1, (0, 0, 0, 0)),
]


@pytest.fixture(params=range(len(CW.CONFIGS)), ids=lambda i: "x".join(map(str, CW.CONFIGS[i])))
def wgmma(request, monkeypatch):
    """Routing on, one config forced; the list of the calls that reached the kernel."""
    return route_to_wgmma(monkeypatch, CW, "launch", request.param)


def _check_exact(gen, calls, case, w_bits, split_k=None):
    """Unit scales, fp32 output: the conv of fresh random codes equals the reference accumulator exactly
    (padding read as z), and the call reached the Gluon kernel."""
    B, C, H, W, N, k, stride, pads = case
    codes = rand_int(gen, (B, C, H, W), 8, "cuda")
    w = rand_int(gen, (N, C, k, k), w_bits, "cuda")
    t = Tables(gen, groups=4, batch=B, bits=8, device="cuda", unit_scale=True)
    w_q, w_sum = prepare_conv_weight(w, w_bits)
    y = qconv2d(codes.permute(0, 2, 3, 1).contiguous(), w_q, w_sum, torch.ones(N, device="cuda"), None,
                t.s_inv, t.scale, t.zero, t.group, stride, list(pads), out_dtype=torch.float32, split_k=split_k)
    assert calls == [1]
    assert torch.equal(y, conv_acc_ref(codes, w, t, stride, pads).float())


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", CASES)
def test_int8_codes_exact_accumulator(gen, wgmma, w_bits, case):
    _check_exact(gen, wgmma, case, w_bits)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scales_bias_residual_and_next_layer_codes(gen, wgmma, out_dtype):
    B, C, H, W, N = 2, 128, 10, 9, 96
    codes = rand_int(gen, (B, C, H, W), 8, "cuda")
    w = rand_int(gen, (N, C, 3, 3), 8, "cuda")
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).cuda()
    bias = torch.randn(N, generator=gen).cuda()
    residual = torch.randn(B, N, H, W, generator=gen).cuda()
    t, nxt = (Tables(gen, groups=5, batch=B, bits=8, device="cuda") for _ in range(2))
    w_q, w_sum = prepare_conv_weight(w, 8)
    x = codes.permute(0, 2, 3, 1).contiguous()
    args = (x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group, 1, [1], 8, None, residual)
    y = qconv2d(*args, out_dtype)
    ref = R.epilogue(conv_acc_ref(codes, w, t, 1, (1,) * 4), w_scale, t.per_sample(t.scale, 4), bias, 1) + residual
    assert_float_close(y, ref, "wgmma qconv2d")
    y32 = qconv2d(*args, torch.float32)
    q = qconv2d(*args, out_s_inv=nxt.s_inv, out_zero=nxt.zero)
    assert wgmma == [1, 1, 1] and q.dtype == torch.int8
    expect = P.quantize_uniform(y32, t.per_sample(nxt.s_inv, 4), t.per_sample(nxt.zero, 4), 8, None, 1)
    assert torch.equal(q.permute(0, 3, 1, 2), expect)


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case, split_k", [(CASES[0], 2), (CASES[1], 3), (CASES[2], 5)])
def test_split_k_exact_accumulator(gen, wgmma, w_bits, case, split_k):
    """Each split reduces its own (tap, channel block) steps into int32 partial sums; qconv's split-K
    epilogue kernel adds them and turns out-of-image taps into the padding code, as for the tl.dot conv."""
    _check_exact(gen, wgmma, case, w_bits, split_k)


def test_unaligned_channels_and_small_outputs_stay_on_tl_dot(gen, wgmma):
    t = Tables(gen, groups=2, batch=1, bits=8, device="cuda", unit_scale=True)
    for C, H in ((40, 16), (64, 4)):  # C not a multiple of 16; 16 output pixels
        w_q, w_sum = prepare_conv_weight(rand_int(gen, (32, C, 3, 3), 8, "cuda"), 8)
        qconv2d(rand_int(gen, (1, H, H, C), 8, "cuda"), w_q, w_sum, torch.ones(32, device="cuda"), None,
                t.s_inv, t.scale, t.zero, t.group, 1, [1], out_dtype=torch.float32)
    assert wgmma == []


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", [(2, 192, 64, 9, 7, 40, 3, 1), (2, 256, 128, 8, 8, 72, 1, 1)])
def test_split_input_two_accumulators(gen, wgmma, w_bits, case):
    """A split input (two quantizers by channel range, an up block's skip concatenation): the kernel runs
    the ring once per range into its own int32 sum; with unit scales y = acc₁ + acc₂ exactly."""
    B, C, c2, H, W, N, k, stride = case
    pad = k // 2
    codes = rand_int(gen, (B, C, H, W), 8, "cuda")
    w = rand_int(gen, (N, C, k, k), w_bits, "cuda")
    t1, t2 = (Tables(gen, groups=4, batch=B, bits=8, device="cuda", unit_scale=True) for _ in range(2))
    t2.group = t1.group
    (w_q, w_sum), (w_q2, w_sum2) = (prepare_conv_weight(w[:, lo:hi].contiguous(), w_bits)
                                    for lo, hi in ((0, c2), (c2, C)))
    y = qconv2d(codes.permute(0, 2, 3, 1).contiguous(), w_q, w_sum, torch.ones(N, device="cuda"), None,
                t1.s_inv, t1.scale, t1.zero, t1.group, stride, [pad], out_dtype=torch.float32,
                c2=c2, w_q2=w_q2, w_sum2=w_sum2, s_inv2=t2.s_inv, scale2=t2.scale, zero2=t2.zero)
    assert wgmma == [1]
    ref = (conv_acc_ref(codes[:, :c2], w[:, :c2], t1, stride, (pad,) * 4)
           + conv_acc_ref(codes[:, c2:], w[:, c2:], t2, stride, (pad,) * 4))
    assert torch.equal(y, ref.float())


@pytest.mark.parametrize("w_bits", [8, 4])
def test_upsample_reads_codes_in_place(gen, wgmma, w_bits):
    """upsample=2 (a diffusers Upsample2D's interpolate + conv): the gather reads code pixel (ih//2, iw//2);
    with unit scales y equals the reference conv of the upsampled codes exactly, in the Gluon kernel."""
    assert_upsample_conv_exact(gen, "cuda", (2, 64, 5, 4, 40, 3, 1), w_bits)
    assert wgmma == [1]
