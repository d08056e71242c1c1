"""W8A8 / W4A8 GEMM against `ops/reference.py`: int32 accumulators bit for bit, floats to fp32 rounding."""
import pytest
import torch

from tcaq_kernels.ops import reference as R
from tcaq_kernels.ops.triton_ops import prepare_linear_weight, qlinear
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton import gemm as G
from tcaq_kernels.triton.gemm import choose_split_k, k_range_per_split, qgemm

from _tables import Tables, assert_float_close, linear_acc_ref, rand_int

# (B, rows per sample, K, N): M not a tile multiple, odd K, a single row per sample, K < one tile.
SHAPES = [(2, 37, 70, 45), (3, 1, 64, 96), (2, 20, 33, 17), (1, 64, 128, 64)]


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_codes_exact_accumulator(gen, device, w_bits, shape):
    """Unit scales, fp32 output: the kernel's output is float(int32 accumulator), compared exactly."""
    B, L, K, N = shape
    a = rand_int(gen, (B, L, K), 8, device)
    w = rand_int(gen, (N, K), w_bits, device)
    t = Tables(gen, groups=4, batch=B, bits=8, device=device, unit_scale=True)
    w_q, w_sum = prepare_linear_weight(w, w_bits)
    y = qlinear(a, w_q, w_sum, torch.ones(N, device=device), None, t.s_inv, t.scale, t.zero, t.group,
                out_dtype=torch.float32)
    assert torch.equal(y, linear_acc_ref(a, w, t).float())


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("a_bits", [8, 6])
@pytest.mark.parametrize("tcr", [False, True])
@pytest.mark.parametrize("route", ["prologue", "quantize-first"])
def test_fused_quantize_prologue_exact(gen, device, monkeypatch, w_bits, a_bits, tcr, route):
    """Float input: codes made in the GEMM prologue, or by the quantize kernel ahead of it (`PREQUANTIZE`, here
    forced for M = 58 rows), must equal quantize_uniform's."""
    monkeypatch.setattr(G, "PREQUANTIZE", route == "quantize-first")
    monkeypatch.setattr(G, "PREQUANTIZE_MIN_M", 1)
    B, L, K, N = 2, 29, 72, 40
    x = (torch.randn(B, L, K, generator=gen) * 3).to(torch.bfloat16).to(device)
    w = rand_int(gen, (N, K), w_bits, device)
    t = Tables(gen, groups=3, batch=B, bits=a_bits, device=device, unit_scale=True)
    r_inv = (torch.rand(K, generator=gen) + 0.5).to(device) if tcr else None
    w_q, w_sum = prepare_linear_weight(w, w_bits)
    y = qlinear(x, w_q, w_sum, torch.ones(N, device=device), None, t.s_inv, t.scale, t.zero, t.group,
                a_bits, r_inv, out_dtype=torch.float32)
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), a_bits, r_inv, -1)
    assert torch.equal(y, linear_acc_ref(codes, w, t).float())


@pytest.mark.parametrize("w_bits", [8, 4])
def test_the_quantize_first_route_is_the_default_from_64_rows_and_changes_no_bit(gen, device, monkeypatch, w_bits):
    """M = 70 float rows, one group for all of them, TCR reciprocals, a bias and a bf16 residual: the default
    route (quantize kernel, then the int8 GEMM) gives the prologue route's outputs bit for bit."""
    M, K, N = 70, 96, 48
    x = (torch.randn(M, K, generator=gen) * 2).to(torch.bfloat16).to(device)
    w_q, w_sum = prepare_linear_weight(rand_int(gen, (N, K), w_bits, device), w_bits)
    t = Tables(gen, groups=3, batch=1, bits=8, device=device)
    r_inv = (torch.rand(K, generator=gen) + 0.5).to(device)
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).to(device)
    bias, residual = torch.randn(N, generator=gen).to(device), torch.randn(M, N, generator=gen).to(torch.bfloat16)
    call = lambda: qlinear(x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group, 8, r_inv,
                           residual=residual.to(device))
    assert G.PREQUANTIZE and M >= G.PREQUANTIZE_MIN_M
    first = call()
    monkeypatch.setattr(G, "PREQUANTIZE", False)
    assert torch.equal(first, call())


def test_cutlass_takes_only_what_its_kernels_write():
    """The CUTLASS route (TCAQ_CUTLASS_GEMM=1) takes int8 × int8 → bf16 calls with no residual, no output
    quantizer, one K split, aligned K and N and enough work; each other call stays on the Triton kernels."""
    i8, bf16 = torch.int8, torch.bfloat16
    ok = dict(M=2048, N=1280, K=1280, a_dtype=i8, w_dtype=i8, out_dtype=bf16, residual=False, out_quantized=False,
              split_k=1)
    assert G.cutlass_takes(**ok)
    for change in (dict(a_dtype=bf16), dict(w_dtype=torch.uint8), dict(out_dtype=torch.float32),
                   dict(residual=True), dict(out_quantized=True), dict(split_k=2), dict(K=1288), dict(N=1284),
                   dict(M=64, N=320, K=320)):
        assert not G.cutlass_takes(**{**ok, **change}), change


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_epilogue_scale_bias_residual(gen, device, out_dtype):
    B, L, K, N = 2, 45, 96, 72
    x = torch.randn(B, L, K, generator=gen).to(device)
    w = rand_int(gen, (N, K), 8, device)
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).to(device)
    bias = torch.randn(N, generator=gen).to(device)
    residual = torch.randn(B, L, N, generator=gen).to(out_dtype).to(device)
    t = Tables(gen, groups=5, batch=B, bits=8, device=device)
    w_q, w_sum = prepare_linear_weight(w, 8)
    y = qlinear(x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group, residual=residual,
                out_dtype=out_dtype)
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), 8, None, -1)
    ref = R.epilogue(linear_acc_ref(codes, w, t), w_scale, t.per_sample(t.scale, 3), bias, -1) + residual.float()
    assert y.dtype == out_dtype
    assert_float_close(y, ref, "qlinear")


def test_poisoned_output_and_one_group(gen, device):
    """NaN-poisoned output must be fully overwritten; a one-element `group` serves every row."""
    M, K, N = 50, 64, 33
    a = rand_int(gen, (M, K), 8, device)
    w = rand_int(gen, (N, K), 4, device)
    t = Tables(gen, groups=3, batch=1, bits=8, device=device)
    w_scale = torch.rand(N, generator=gen).to(device)
    w_q, w_sum = prepare_linear_weight(w, 4)
    out = torch.full((M, N), float("nan"), device=device)
    qgemm(a, w_q, w_sum, w_scale, None, t.s_inv, t.scale, t.zero, t.group, 0, M, 8, None, None, out)
    g = t.group.long()
    ref = R.epilogue(R.int_linear(a, w, t.zero[g]), w_scale, t.scale[g], None, -1)
    assert_float_close(out, ref, "qgemm")


def test_fake_impl_matches(device):
    x = torch.randn(2, 3, 32, device=device)
    w_q, w_sum = prepare_linear_weight(torch.ones(16, 32, dtype=torch.int8, device=device), 4)
    one = torch.ones(2, device=device)
    z = torch.zeros(2, dtype=torch.int32, device=device)
    torch.library.opcheck(qlinear, (x, w_q, w_sum, torch.ones(16, device=device), None, one, one, z, z),
                          test_utils=("test_schema", "test_faketensor"))


# SD-1.5 (batch 2) and DDPM shapes on the GPU: M×N×K.
@pytest.mark.parametrize("policy, codes, floats", [("codes", True, False), ("all", True, True), ("off", False, False)])
def test_wgmma_routing_policy(monkeypatch, policy, codes, floats):
    """By default only int8-code activations go to the Gluon kernels (the measured split: see gemm.WGMMA)."""
    monkeypatch.setattr(G, "WGMMA", policy)
    assert G.use_wgmma(torch.empty(4, 8, dtype=torch.int8)) == codes
    assert [G.use_wgmma(torch.empty(4, 8, dtype=d)) for d in (torch.bfloat16, torch.float16, torch.float32)] == [floats] * 3


@pytest.mark.cuda
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("mnk", [(8192, 320, 320), (2048, 5120, 640), (154, 1280, 768), (2, 1280, 320),
                                 (65536, 256, 256)])
def test_large_shapes(gen, w_bits, mnk):
    M, N, K = mnk
    B = 2 if M % 2 == 0 else 1
    x = torch.randn(B, M // B, K, generator=gen).to(torch.bfloat16).cuda()
    w = rand_int(gen, (N, K), w_bits, "cuda")
    t = Tables(gen, groups=10, batch=B, bits=8, device="cuda")
    w_scale = (torch.rand(N, generator=gen) * 0.01).cuda()
    bias = torch.randn(N, generator=gen).cuda()
    w_q, w_sum = prepare_linear_weight(w, w_bits)
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), 8, None, -1)
    acc = linear_acc_ref(codes, w, t)
    y = qlinear(codes, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, torch.ones_like(t.scale),
                t.zero, t.group, out_dtype=torch.float32)
    assert torch.equal(y, acc.float())
    y = qlinear(x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group)
    assert_float_close(y, R.epilogue(acc, w_scale, t.per_sample(t.scale, 3), bias, -1), "qlinear")


# split-K: odd small shapes, K not a multiple of the split's 128-aligned range, every weight width,
# both input kinds; the int32 result must not depend on the split.
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("a_float", [False, True])
def test_split_k_exact(gen, device, w_bits, split_k, a_float):
    B, L, K, N = 3, 1, 333, 37
    w = rand_int(gen, (N, K), w_bits, device)
    t = Tables(gen, groups=4, batch=B, bits=8, device=device, unit_scale=True)
    r_inv = (torch.rand(K, generator=gen) + 0.5).to(device)
    x = (torch.randn(B, L, K, generator=gen) * 3).to(device)
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), 8, r_inv, -1)
    w_q, w_sum = prepare_linear_weight(w, w_bits)
    y = qlinear(x if a_float else codes, w_q, w_sum, torch.ones(N, device=device), None, t.s_inv, t.scale, t.zero,
                t.group, 8, r_inv, out_dtype=torch.float32, split_k=split_k)
    assert torch.equal(y, linear_acc_ref(codes, w, t).float())


def test_split_k_epilogue_bias_residual(gen, device):
    """The split's epilogue kernel applies zero point, scales, bias and residual like the fused one."""
    B, L, K, N = 2, 5, 300, 45
    x = torch.randn(B, L, K, generator=gen).to(device)
    w = rand_int(gen, (N, K), 8, device)
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).to(device)
    bias = torch.randn(N, generator=gen).to(device)
    residual = torch.randn(B, L, N, generator=gen).to(device)
    t = Tables(gen, groups=5, batch=B, bits=8, device=device)
    w_q, w_sum = prepare_linear_weight(w, 8)
    args = (x, w_q, w_sum, w_scale, bias, t.s_inv, t.scale, t.zero, t.group)
    y_split = qlinear(*args, residual=residual, split_k=3)
    assert torch.equal(y_split, qlinear(*args, residual=residual, split_k=1))
    codes = P.quantize_uniform(x, t.per_sample(t.s_inv, 3), t.per_sample(t.zero, 3), 8, None, -1)
    ref = R.epilogue(linear_acc_ref(codes, w, t), w_scale, t.per_sample(t.scale, 3), bias, -1) + residual
    assert_float_close(y_split, ref, "qlinear split-K")


def test_choose_split_k():
    """Split only where the output tiles leave SMs idle, never below 256 of K a split."""
    assert choose_split_k(8192, 320, 320, 132) == 1
    assert choose_split_k(2, 1280, 1280, 132) == 5  # 20 tiles of 16×64; K 1280 allows 5 splits
    assert choose_split_k(2, 320, 1280, 132) == 5
    assert choose_split_k(128, 1280, 5120, 132) == 13
    assert choose_split_k(2, 1280, 200, 132) == 1
    assert k_range_per_split(1280, 5) == (256, 5) and k_range_per_split(5120, 13) == (512, 10)
    assert k_range_per_split(333, 3) == (128, 3) and k_range_per_split(100, 4) == (128, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("mnk", [(2, 1280, 1280), (2, 320, 1280), (128, 1280, 5120), (154, 320, 768),
                                 (8, 640, 1280)])
def test_split_k_large_shapes(gen, w_bits, mnk):
    """The SD-1.5 small-M shapes with the heuristic's split and forced splits, bit for bit."""
    M, N, K = mnk
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16).cuda()
    w = rand_int(gen, (N, K), w_bits, "cuda")
    t = Tables(gen, groups=10, batch=1, bits=8, device="cuda", unit_scale=True)
    w_q, w_sum = prepare_linear_weight(w, w_bits)
    codes = P.quantize_uniform(x, t.s_inv[t.group.long()], t.zero[t.group.long()], 8)
    acc = R.int_linear(codes, w, t.zero[t.group.long()]).float()
    chosen = choose_split_k(M, N, K, torch.cuda.get_device_properties(0).multi_processor_count)
    for split_k in (None, 1, chosen, 4, 16):  # None splits only with TCAQ_AUTO_SPLIT_K=1
        for a in (codes, x):
            y = qlinear(a, w_q, w_sum, torch.ones(N, device="cuda"), None, t.s_inv, t.scale, t.zero, t.group,
                        out_dtype=torch.float32, split_k=split_k)
            assert torch.equal(y, acc), (split_k, a.dtype)


def test_strided_tables_are_refused_by_name(gen):
    """A stride-0 table (`expand`) would be read past its storage by the kernel's raw indexing."""
    x = torch.randn(4, 40, generator=gen)
    w = rand_int(gen, (24, 40), 8, "cpu")
    t = Tables(gen, groups=3, batch=1, bits=8, device="cpu")
    w_q, w_sum = prepare_linear_weight(w, 8)
    one_scale = t.scale[:1].expand(3)
    with pytest.raises(ValueError, match="scale must be contiguous"):
        qlinear(x, w_q, w_sum, torch.ones(24), None, t.s_inv, one_scale, t.zero, t.group)


def test_an_unknown_routing_switch_is_an_error_not_the_default():
    """`TCAQ_WGMMA=persistent` named a kernel that was removed (27 Nov): importing must say so (one
    subprocess: the import-time check; the values themselves in process)."""
    import os
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-c", "import tcaq_kernels.triton.gemm"],
                         env={**os.environ, "TCAQ_WGMMA": "persistent"}, capture_output=True, text=True)
    assert bad.returncode != 0 and "TCAQ_WGMMA='persistent'" in bad.stderr
    assert [G.wgmma_policy(v) for v in ("", "0", "1")] == ["codes", "off", "all"]
    with pytest.raises(ValueError, match="TCAQ_WGMMA='2'"):
        G.wgmma_policy("2")
