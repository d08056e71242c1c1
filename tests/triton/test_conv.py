"""Implicit-GEMM conv against `ops/reference.int_conv2d`: int32 accumulators bit for bit."""
import itertools

import pytest
import torch

from tcaq_kernels.ops import reference as R
from tcaq_kernels.ops.triton_ops import prepare_conv_weight, qconv2d, quantize_act
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton import conv as conv_module
from tcaq_kernels.triton.conv import conv_split_k, padding_sums, qconv

from _tables import Tables, assert_float_close, assert_upsample_conv_exact, conv_acc_ref, rand_int

# (B, C, H, W, N, k, stride, padding): C_in = 3 and 4 (image / latent input), odd C, stride 2,
# 1×1, non-square images, a spatial size that is not a multiple of the stride.
CASES = [
    (2, 3, 8, 8, 16, 3, 1, 1),
    (2, 4, 7, 9, 24, 3, 1, 1),
    (2, 37, 9, 6, 20, 3, 2, 1),
    (1, 40, 6, 6, 33, 1, 1, 0),
    (2, 33, 7, 7, 16, 1, 2, 0),
    (3, 64, 5, 5, 40, 3, 1, 1),
]


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", CASES)
def test_int8_codes_exact_accumulator(gen, device, w_bits, case):
    B, C, H, W, N, k, stride, pad = case
    codes = rand_int(gen, (B, C, H, W), 8, device)
    w = rand_int(gen, (N, C, k, k), w_bits, device)
    t = Tables(gen, groups=4, batch=B, bits=8, device=device, unit_scale=True)
    w_q, w_sum = prepare_conv_weight(w, w_bits, pad)
    y = qconv2d(codes.permute(0, 2, 3, 1).contiguous(), w_q, w_sum, torch.ones(N, device=device), None,
                t.s_inv, t.scale, t.zero, t.group, stride, [pad], out_dtype=torch.float32)
    ref = conv_acc_ref(codes, w, t, stride, (pad,) * 4)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, ref.float())


@pytest.mark.parametrize("w_bits", [8, 4])
def test_asymmetric_padding_stride2(gen, device, w_bits):
    """DDPM's Downsample2D pads (0, 1, 0, 1) then convolves 3×3 / 2 without padding: with the padding table
    of exactly that padding and with the default one (1 on every side), which covers it."""
    B, C, H, W, N = 2, 19, 8, 8, 12
    codes = rand_int(gen, (B, C, H, W), 8, device)
    w = rand_int(gen, (N, C, 3, 3), w_bits, device)
    t = Tables(gen, groups=3, batch=B, bits=8, device=device, unit_scale=True)
    ref = conv_acc_ref(codes, w, t, 2, (0, 1, 0, 1)).float()
    for padding in ([0, 1, 0, 1], None):
        w_q, w_sum = prepare_conv_weight(w, w_bits, padding)
        y = qconv2d(codes.permute(0, 2, 3, 1).contiguous(), w_q, w_sum, torch.ones(N, device=device), None,
                    t.s_inv, t.scale, t.zero, t.group, 2, [0, 1, 0, 1], out_dtype=torch.float32)
        assert torch.equal(y, ref), padding


# (B, C, H, W, N, k, stride, padding): image and latent inputs, an odd C, stride 2, padding 2 (K = 63 of 64)
PACK_CASES = [
    (2, 3, 8, 8, 16, 3, 1, 1),
    (2, 4, 7, 9, 24, 3, 1, 1),
    (2, 5, 9, 6, 20, 3, 2, 1),
    (1, 7, 6, 5, 9, 3, 1, 2),
]


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", PACK_CASES)
def test_packed_taps_exact_accumulator(gen, device, w_bits, case):
    """PACK_TAPS_K: (tap, channel) flattened into the K tile, the same int32 sums (int4 weights run
    widened: int8 by the time they reach the kernel); plain 2× upsampling reads the same way."""
    B, C, H, W, N, k, stride, pad = case
    codes = rand_int(gen, (B, C, H, W), 8, device)
    w = rand_int(gen, (N, C, k, k), w_bits, device)
    t = Tables(gen, groups=3, batch=B, bits=8, device=device, unit_scale=True)
    w_q, w_sum = prepare_conv_weight(w, w_bits, pad)
    assert w_bits == 4 or conv_module.packs_taps(w_q, C, False, 1)
    y = qconv2d(codes.permute(0, 2, 3, 1).contiguous(), w_q, w_sum, torch.ones(N, device=device), None,
                t.s_inv, t.scale, t.zero, t.group, stride, [pad], out_dtype=torch.float32, split_k=1)
    assert torch.equal(y, conv_acc_ref(codes, w, t, stride, (pad,) * 4).float())
    if stride == 1 and pad == k // 2:  # the helper's 'same' upsampling conv
        assert_upsample_conv_exact(gen, device, (B, C, H, W, N, k, pad), w_bits)


def test_packed_taps_only_where_they_fit():
    assert conv_module.PACK_TAPS_K == 64  # the cases below straddle it
    w8 = lambda C, k=3: torch.zeros(4, k, k, C, dtype=torch.int8)
    assert conv_module.packs_taps(w8(7), 7, False, 1) and not conv_module.packs_taps(w8(8), 8, False, 1)
    assert not conv_module.packs_taps(w8(3, 1), 3, False, 1)  # one tap: nothing to pack
    assert not conv_module.packs_taps(w8(3), 3, True, 1) and not conv_module.packs_taps(w8(3), 3, False, 2)
    assert not conv_module.packs_taps(torch.zeros(4, 3, 3, 2, dtype=torch.uint8), 3, False, 1)


def test_padding_sums_are_the_kept_taps(gen):
    """Entry (a, b, c, d) sums the weights of filter rows [a, KH − b) and columns [c, KW − d) — by a mask over
    the taps here —, zero where that is empty (pads past the kernel)."""
    w = rand_int(gen, (5, 7, 3, 4), 8, "cpu")
    pads = (3, 1, 0, 2)
    table = padding_sums(w, pads)
    assert table.shape == (4, 2, 1, 3, 5) and table.dtype == torch.int32
    for a, b, c, d in itertools.product(*(range(p + 1) for p in pads)):
        keep = torch.zeros(3, 4, dtype=torch.int64)
        keep[a:3 - b, c:4 - d] = 1
        assert torch.equal(table[a, b, c, d].long(), (w.long() * keep).sum(dim=(1, 2, 3))), (a, b, c, d)


def test_padding_table_checks(gen, device):
    """A table prepared for a wider padding serves a narrower one (the same result); a narrower one, or an
    output size that is not the conv's, is refused with the fix named."""
    B, C, H, W, N = 2, 9, 6, 5, 10
    codes = rand_int(gen, (B, H, W, C), 8, device)
    w = rand_int(gen, (N, C, 3, 3), 8, device)
    t = Tables(gen, groups=2, batch=B, bits=8, device=device, unit_scale=True)
    ones = torch.ones(N, device=device)
    call = lambda w_sum: qconv2d(codes, w_q, w_sum, ones, None, t.s_inv, t.scale, t.zero, t.group, 1, [1],
                                 out_dtype=torch.float32)
    w_q, exact = prepare_conv_weight(w, 8, [1])
    y = call(exact)
    assert torch.equal(y, conv_acc_ref(codes.permute(0, 3, 1, 2), w, t, 1, (1,) * 4).float())
    assert torch.equal(call(prepare_conv_weight(w, 8, [2, 1])[1]), y)
    with pytest.raises(ValueError, match=r"prepare_conv_weight\(w, bits, padding=\[1, 1, 1, 1\]\)"):
        call(prepare_conv_weight(w, 8, 0)[1])
    out = torch.empty(B, N, H + 1, W, device=device).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"out is \(7, 5\) pixels.* gives \(6, 5\)"):
        qconv(codes, w_q, exact, ones, None, t.scale, t.zero, t.group, 1, 1, (1, 1, 1, 1), None, out)
    with pytest.raises(ValueError, match="padding must be"):
        prepare_conv_weight(w, 8, [1, 2, 3])


def _float_conv_inputs(gen, device, B, C, H, W, N, tcr):
    """Fresh float input, int8 3×3 weights, scales, bias, residual and (with `tcr`) TCR reciprocals."""
    x = (torch.randn(B, C, H, W, generator=gen) * 2).to(device)
    w = rand_int(gen, (N, C, 3, 3), 8, device)
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).to(device)
    bias = torch.randn(N, generator=gen).to(device)
    residual = torch.randn(B, N, H, W, generator=gen).to(device)
    r_inv = (torch.rand(C, generator=gen) + 0.5).to(device) if tcr else None
    return x, w, w_scale, bias, residual, r_inv


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tcr", [False, True])
@pytest.mark.parametrize("split_k", [1, 4])
def test_float_input_epilogue_residual(gen, device, out_dtype, tcr, split_k):
    """Float NCHW in (quantize → NHWC codes → conv), scales, bias and an NCHW residual; split-K's
    reduction kernel runs the same epilogue as the unsplit kernel, so their outputs are equal."""
    B, C, H, W, N = 2, 12, 6, 7, 20
    x, w, w_scale, bias, residual, r_inv = _float_conv_inputs(gen, device, B, C, H, W, N, tcr)
    t = Tables(gen, groups=5, batch=B, bits=8, device=device)
    w_q, w_sum = prepare_conv_weight(w, 8)
    args = (x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group, 1, [1], 8, r_inv, residual, out_dtype)
    y = qconv2d(*args, split_k=split_k)
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 4), t.per_sample(t.zero, 4), 8, r_inv, 1)
    ref = R.epilogue(conv_acc_ref(codes, w, t, 1, (1,) * 4), w_scale, t.per_sample(t.scale, 4), bias, 1) + residual
    assert_float_close(y, ref, f"qconv2d split_k={split_k}")
    if split_k > 1:
        assert torch.equal(y, qconv2d(*args, split_k=1))


def test_poisoned_output(gen, device):
    B, C, H, W, N = 2, 5, 5, 6, 9
    codes = rand_int(gen, (B, H, W, C), 8, device)
    w = rand_int(gen, (N, C, 3, 3), 4, device)
    t = Tables(gen, groups=2, batch=B, bits=8, device=device)
    w_scale = torch.rand(N, generator=gen).to(device)
    w_q, w_sum = prepare_conv_weight(w, 4)
    out = torch.full((B, N, H, W), float("nan"), device=device).to(memory_format=torch.channels_last)
    qconv(codes, w_q, w_sum, w_scale, None, t.scale, t.zero, t.group, 1, 1, (1, 1, 1, 1), None, out)
    acc = conv_acc_ref(codes.permute(0, 3, 1, 2), w, t, 1, (1,) * 4)
    assert_float_close(out, R.epilogue(acc, w_scale, t.per_sample(t.scale, 4), None, 1), "qconv")


def test_fake_impl_matches(device):
    x = torch.randn(2, 3, 5, 5, device=device)
    w_q, w_sum = prepare_conv_weight(torch.ones(8, 3, 3, 3, dtype=torch.int8, device=device), 8)
    one = torch.ones(2, device=device)
    z = torch.zeros(2, dtype=torch.int32, device=device)
    args = (x, w_q, w_sum, torch.ones(8, device=device), None, one, one, z, z, 2, [1])
    for kwargs in ({}, {"split_k": 2}):
        torch.library.opcheck(qconv2d, args, kwargs, test_utils=("test_schema", "test_faketensor"))


# SD-1.5 and DDPM layers on the GPU: (B, C, H, W, N, k, stride, pad).
@pytest.mark.cuda
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", [
    (2, 320, 64, 64, 320, 3, 1, 1), (2, 4, 64, 64, 320, 3, 1, 1), (2, 640, 32, 32, 640, 3, 2, 1),
    (2, 960, 32, 32, 640, 1, 1, 0), (2, 2560, 8, 8, 1280, 3, 1, 1), (256, 3, 32, 32, 128, 3, 1, 1),
    (256, 256, 4, 4, 256, 3, 1, 1),
])
def test_large_shapes(gen, w_bits, case):
    B, C, H, W, N, k, stride, pad = case
    x = torch.randn(B, C, H, W, generator=gen).to(torch.bfloat16).cuda()
    w = rand_int(gen, (N, C, k, k), w_bits, "cuda")
    t = Tables(gen, groups=10, batch=B, bits=8, device="cuda")
    w_scale = (torch.rand(N, generator=gen) * 0.01).cuda()
    bias = torch.randn(N, generator=gen).cuda()
    w_q, w_sum = prepare_conv_weight(w, w_bits)
    codes = quantize_act(x, t.s_inv, t.zero, t.group, 8, channel_dim=1)
    acc = conv_acc_ref(codes.permute(0, 3, 1, 2), w, t, stride, (pad,) * 4)
    y = qconv2d(codes, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, torch.ones_like(t.scale),
                t.zero, t.group, stride, [pad], out_dtype=torch.float32)
    assert torch.equal(y, acc.float())
    y = qconv2d(x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group, stride, [pad])
    assert_float_close(y, R.epilogue(acc, w_scale, t.per_sample(t.scale, 4), bias, 1), "qconv2d")


def test_codes_in_the_wrong_layout_are_refused(device):
    """int8 input is taken as NHWC codes: an NCHW code tensor must not be read as pixels × channels."""
    w_q, w_sum = prepare_conv_weight(torch.ones(8, 5, 3, 3, dtype=torch.int8, device=device), 8)
    one = torch.ones(1, device=device)
    z = torch.zeros(1, dtype=torch.int32, device=device)
    nchw = torch.zeros(2, 5, 6, 7, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="NHWC"):
        qconv2d(nchw, w_q, w_sum, torch.ones(8, device=device), None, one, one, z, z, 1, [1])


# split-K: odd C, 3×3 and 1×1, stride 1 and 2, asymmetric padding; split counts that do not divide
# the reduction steps (KH·KW·⌈C/64⌉ under the interpreter) and one past the cap. The int32 result
# must not depend on the split, and every output must be written (NaN-poisoned).
# (B, C, H, W, N, k, stride, (top, bottom, left, right), split counts)
SPLIT_CASES = [
    (2, 37, 7, 9, 20, 3, 1, (1, 1, 1, 1), (2, 4, 16)),
    (1, 45, 9, 6, 17, 3, 2, (1, 1, 1, 1), (3, 5)),
    (2, 19, 8, 8, 12, 3, 2, (0, 1, 0, 1), (2, 7)),
    (2, 261, 5, 5, 33, 1, 1, (0, 0, 0, 0), (2, 3)),
    (1, 200, 7, 7, 24, 1, 2, (0, 0, 0, 0), (2,)),
]


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_k_exact_accumulator(gen, device, w_bits, case):
    B, C, H, W, N, k, stride, pads, splits = case
    codes = rand_int(gen, (B, H, W, C), 8, device)
    w = rand_int(gen, (N, C, k, k), w_bits, device)
    t = Tables(gen, groups=4, batch=B, bits=8, device=device, unit_scale=True)
    w_q, w_sum = prepare_conv_weight(w, w_bits)
    ref = conv_acc_ref(codes.permute(0, 3, 1, 2), w, t, stride, pads).float()
    for split_k in splits:
        out = torch.full(ref.shape, float("nan"), device=device).to(memory_format=torch.channels_last)
        qconv(codes, w_q, w_sum, torch.ones(N, device=device), None, t.scale, t.zero, t.group, 0 if B == 1 else 1,
              stride, pads, None, out, split_k)
        assert torch.equal(out, ref), split_k


def test_conv_split_k_choice():
    """The heuristic splits SD's deep layers at batch 2 on 132 SMs, never without a GPU, and caps a
    count at the reduction steps of the widest (128-channel) K tile."""
    assert conv_split_k(None, 128, 1280, 1280, 9, 132) == 13  # 8×8, 3×3: 10 output tiles of 128×128
    assert conv_split_k(None, 128, 1280, 2560, 1, 132) == 10  # 8×8, 1×1 over 2560 channels
    assert conv_split_k(None, 512, 1280, 2560, 9, 132) == 3  # 16×16
    assert conv_split_k(None, 8192, 320, 320, 9, 132) == 1  # 64×64: enough tiles
    assert conv_split_k(None, 128, 1280, 1280, 9, None) == 1  # CPU
    assert conv_split_k(16, 50, 20, 37, 9, None) == 9 and conv_split_k(5, 50, 20, 261, 1, None) == 3
    with pytest.raises(ValueError, match="split_k"):
        conv_split_k(0, 128, 1280, 1280, 9, 132)


# SD-1.5 layers that the heuristic splits (B, C, H, W, N, k, stride, pad), on the GPU (132 SMs: batch 2;
# the 16×16 1920→1280 conv at batch 8 has 160 output tiles and is not split — the first H200 run caught
# that case in this list).
@pytest.mark.cuda
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", [
    (2, 1280, 8, 8, 1280, 3, 1, 1), (2, 2560, 8, 8, 1280, 1, 1, 0), (2, 2560, 16, 16, 1280, 3, 1, 1),
    (2, 1280, 16, 16, 1280, 3, 2, 1), (2, 640, 32, 32, 640, 3, 2, 1), (2, 1920, 16, 16, 1280, 3, 1, 1),
])
def test_split_k_large_shapes(gen, w_bits, case):
    """The heuristic's split and forced ones, int8 codes and float input, bit for bit."""
    B, C, H, W, N, k, stride, pad = case
    x = torch.randn(B, C, H, W, generator=gen).to(torch.bfloat16).cuda()
    w = rand_int(gen, (N, C, k, k), w_bits, "cuda")
    t = Tables(gen, groups=10, batch=B, bits=8, device="cuda", unit_scale=True)
    w_q, w_sum = prepare_conv_weight(w, w_bits)
    codes = quantize_act(x, t.s_inv, t.zero, t.group, 8, channel_dim=1)
    acc = conv_acc_ref(codes.permute(0, 3, 1, 2), w, t, stride, (pad,) * 4).float()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = conv_split_k(None, B * acc.shape[2] * acc.shape[3], N, C, k * k, sms)
    assert chosen > 1
    for split_k in (None, 1, chosen, 3, 16):  # None splits only with TCAQ_AUTO_SPLIT_K=1
        for a in (codes, x):
            y = qconv2d(a, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group,
                        stride, [pad], out_dtype=torch.float32, split_k=split_k)
            assert torch.equal(y, acc), (split_k, a.dtype)


@pytest.mark.cuda
def test_split_k_in_cuda_graph(gen):
    """A split conv captured in a CUDA graph (no host sync) follows the device-side group on replay."""
    B, C, H, W, N = 2, 1280, 8, 8, 1280
    codes = rand_int(gen, (B, H, W, C), 8, "cuda")
    w = rand_int(gen, (N, C, 3, 3), 8, "cuda")
    t = Tables(gen, groups=10, batch=B, bits=8, device="cuda", unit_scale=True)
    w_q, w_sum = prepare_conv_weight(w, 8)
    conv = lambda: qconv2d(codes, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group,
                           1, [1], out_dtype=torch.float32)
    conv()  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = conv()
    for _ in range(2):
        t.group.copy_(torch.randint(0, 10, (B,), generator=gen, dtype=torch.int32))
        graph.replay()
        assert torch.equal(y, conv_acc_ref(codes.permute(0, 3, 1, 2), w, t, 1, (1,) * 4).float())


# ------------------------------------------------------------------ split input (two quantizers by channel range)

def _split_tables(gen, groups, batch, device, unit_scale=False):
    """Two activation quantizers' tables that share one per-sample group tensor."""
    t1 = Tables(gen, groups=groups, batch=batch, bits=8, device=device, unit_scale=unit_scale)
    t2 = Tables(gen, groups=groups, batch=batch, bits=8, device=device, unit_scale=unit_scale)
    t2.group = t1.group
    return t1, t2


def _split_weights(w, c2, w_bits):
    """qconv2d's split keyword arguments' weights: each range prepared on its own channel slice."""
    (w_q, w_sum), (w_q2, w_sum2) = (prepare_conv_weight(w[:, lo:hi].contiguous(), w_bits)
                                    for lo, hi in ((0, c2), (c2, w.shape[1])))
    return w_q, w_sum, dict(w_q2=w_q2, w_sum2=w_sum2)


# (B, C, c2, H, W, N, k, stride, padding): c2 off every tile size, odd C, stride 2, 1×1
SPLIT_CASES = [
    (2, 37, 13, 7, 6, 20, 3, 1, 1),
    (3, 48, 32, 5, 5, 24, 3, 2, 1),
    (2, 33, 16, 6, 7, 17, 1, 1, 0),
]


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_input_exact_accumulators(gen, device, w_bits, case):
    """Unit scales and fp32 output: the one-kernel split conv is the sum of each range's reference
    accumulator (its own zero point for the codes and the padding), exactly."""
    B, C, c2, H, W, N, k, stride, pad = case
    codes = rand_int(gen, (B, C, H, W), 8, device)
    w = rand_int(gen, (N, C, k, k), w_bits, device)
    t1, t2 = _split_tables(gen, 4, B, device, unit_scale=True)
    w_q, w_sum, second = _split_weights(w, c2, w_bits)
    y = qconv2d(codes.permute(0, 2, 3, 1).contiguous(), w_q, w_sum, torch.ones(N, device=device), None,
                t1.s_inv, t1.scale, t1.zero, t1.group, stride, [pad], out_dtype=torch.float32,
                c2=c2, s_inv2=t2.s_inv, scale2=t2.scale, zero2=t2.zero, **second)
    ref = (conv_acc_ref(codes[:, :c2], w[:, :c2], t1, stride, (pad,) * 4)
           + conv_acc_ref(codes[:, c2:], w[:, c2:], t2, stride, (pad,) * 4))
    assert torch.equal(y, ref.float())


@pytest.mark.parametrize("tcr", [False, True])
def test_split_input_float_epilogue(gen, device, tcr):
    """Float NCHW in: each range quantized with its own tables (TCR's 1/r over all C), then scales in
    ops/reference.py's order (acc₁·s₁ + acc₂·s₂, then bias), bias and residual."""
    B, C, c2, H, W, N = 2, 40, 24, 6, 5, 12
    x, w, w_scale, bias, residual, r_inv = _float_conv_inputs(gen, device, B, C, H, W, N, tcr)
    t1, t2 = _split_tables(gen, 5, B, device)
    w_q, w_sum, second = _split_weights(w, c2, 8)
    y = qconv2d(x, w_q, w_sum, w_scale, bias, t1.s_inv, t1.scale, t1.zero, t1.group, 1, [1], 8, r_inv, residual,
                c2=c2, s_inv2=t2.s_inv, scale2=t2.scale, zero2=t2.zero, **second)
    accs = []
    for t, lo, hi in ((t1, 0, c2), (t2, c2, C)):
        r = None if r_inv is None else r_inv[lo:hi]
        codes = P.quantize_uniform(x[:, lo:hi], t.per_sample(t.s_inv, 4), t.per_sample(t.zero, 4), 8, r, 1)
        accs.append(conv_acc_ref(codes, w[:, lo:hi], t, 1, (1,) * 4))
    ref = R.epilogue(accs[0], w_scale, t1.per_sample(t1.scale, 4), bias, 1,
                     (accs[1], t2.per_sample(t2.scale, 4))) + residual
    assert_float_close(y, ref, "split qconv2d")


def test_split_input_refusals(gen, device):
    B, C, N = 2, 16, 8
    x = torch.randn(B, C, 4, 4, generator=gen).to(device)
    w = rand_int(gen, (N, C, 3, 3), 8, device)
    t1, t2 = _split_tables(gen, 2, B, device)
    w_q, w_sum, second = _split_weights(w, 8, 8)
    base = (x, w_q, w_sum, torch.ones(N, device=device), None, t1.s_inv, t1.scale, t1.zero, t1.group, 1, [1])
    tables2 = dict(s_inv2=t2.s_inv, scale2=t2.scale, zero2=t2.zero)
    with pytest.raises(ValueError, match="needs w_sum2"):
        qconv2d(*base, c2=8, w_q2=second["w_q2"], **tables2)
    with pytest.raises(ValueError, match="which needs c2"):
        qconv2d(*base, **second, **tables2)
    with pytest.raises(ValueError, match="c2=16 must lie inside"):
        qconv2d(*base, c2=16, **second, **tables2)
    with pytest.raises(ValueError, match="is not the weights of channels"):
        qconv2d(*base, c2=4, **second, **tables2)
    with pytest.raises(ValueError, match="split input"):
        qconv2d(*base, c2=8, split_k=2, **second, **tables2)
    with pytest.raises(ValueError, match="two ranges' padding tables differ"):
        qconv2d(*base, c2=8, **dict(second, w_sum2=prepare_conv_weight(w[:, 8:].contiguous(), 8, 2)[1]), **tables2)


def test_split_input_fake_impl(device):
    x = torch.randn(2, 6, 5, 5, device=device)
    w_q, w_sum = prepare_conv_weight(torch.ones(8, 4, 3, 3, dtype=torch.int8, device=device), 8)
    w_q2, w_sum2 = prepare_conv_weight(torch.ones(8, 2, 3, 3, dtype=torch.int8, device=device), 8)
    one = torch.ones(2, device=device)
    z = torch.zeros(2, dtype=torch.int32, device=device)
    args = (x, w_q, w_sum, torch.ones(8, device=device), None, one, one, z, z, 1, [1])
    kwargs = dict(c2=4, w_q2=w_q2, w_sum2=w_sum2, s_inv2=one, scale2=one, zero2=z)
    torch.library.opcheck(qconv2d, args, kwargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", [(256, 256, 128, 8, 8, 128, 3, 1, 1), (256, 384, 256, 16, 16, 128, 1, 1, 0),
                                  (2, 1920, 1280, 16, 16, 640, 3, 1, 1), (2, 960, 640, 32, 32, 320, 1, 1, 0)])
def test_split_input_large_shapes(gen, w_bits, case):
    """The embedded model's and SD-1.5's up-block skip concatenations (wgmma kernel where it routes)."""
    B, C, c2, H, W, N, k, stride, pad = case
    codes = rand_int(gen, (B, C, H, W), 8, "cuda")
    w = rand_int(gen, (N, C, k, k), w_bits, "cuda")
    t1, t2 = _split_tables(gen, 10, B, "cuda", unit_scale=True)
    w_q, w_sum, second = _split_weights(w, c2, w_bits)
    y = qconv2d(codes.permute(0, 2, 3, 1).contiguous(), w_q, w_sum, torch.ones(N, device="cuda"), None,
                t1.s_inv, t1.scale, t1.zero, t1.group, stride, [pad], out_dtype=torch.float32,
                c2=c2, s_inv2=t2.s_inv, scale2=t2.scale, zero2=t2.zero, **second)
    ref = (conv_acc_ref(codes[:, :c2], w[:, :c2], t1, stride, (pad,) * 4)
           + conv_acc_ref(codes[:, c2:], w[:, c2:], t2, stride, (pad,) * 4))
    assert torch.equal(y, ref.float())


# ------------------------------------------------------------- upsample=2 (a diffusers Upsample2D's interpolate + conv)

@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", [(2, 37, 5, 3, 20, 3, 1), (3, 16, 4, 4, 24, 3, 1), (2, 33, 3, 5, 17, 1, 0)])
def test_upsample_codes_exact_accumulator(gen, device, w_bits, case):
    """The conv over the 2× nearest upsampling of the codes, read in place (pixel (ih, iw) ← (ih//2, iw//2)),
    equals the reference conv of the upsampled codes exactly; the upsampled tensor is never made."""
    assert_upsample_conv_exact(gen, device, case, w_bits)


def test_upsample_float_input_matches_interpolate_then_conv(gen, device):
    """Float input: quantizing at low resolution and reading the codes upsampled gives what diffusers'
    path gives — `F.interpolate(nearest)`, then quantize and conv — bit for bit (the quantize is
    elementwise, so it commutes with repeating pixels); with TCR, bias and a residual."""
    B, C, H, W, N = 2, 12, 3, 4, 10
    x, w, w_scale, bias, _, r_inv = _float_conv_inputs(gen, device, B, C, H, W, N, tcr=True)
    residual = torch.randn(B, N, 2 * H, 2 * W, generator=gen).to(device)
    t = Tables(gen, groups=4, batch=B, bits=8, device=device)
    w_q, w_sum = prepare_conv_weight(w, 8)
    args = (w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group, 1, [1], 8, r_inv, residual)
    fused = qconv2d(x, *args, upsample=2)
    plain = qconv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), *args)
    assert torch.equal(fused, plain)


def test_upsample_refusal(gen, device):
    w_q, w_sum = prepare_conv_weight(rand_int(gen, (4, 8, 3, 3), 8, device), 8)
    t = Tables(gen, groups=2, batch=1, bits=8, device=device)
    with pytest.raises(ValueError, match="upsample must be 1 or 2"):
        qconv2d(rand_int(gen, (1, 3, 3, 8), 8, device), w_q, w_sum, torch.ones(4, device=device), None,
                t.s_inv, t.scale, t.zero, t.group, 1, [1], upsample=3)


@pytest.mark.cuda
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", [(256, 128, 8, 8, 128), (256, 128, 16, 16, 128), (2, 1280, 32, 32, 1280)])
def test_upsample_large_shapes(gen, w_bits, case):
    """The embedded model's and SD-1.5's Upsample2D convs (3×3, pad 1) on the GPU (wgmma where it routes)."""
    assert_upsample_conv_exact(gen, "cuda", (*case, 3, 1), w_bits)
