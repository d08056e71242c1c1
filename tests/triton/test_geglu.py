"""GEGLU + quantize kernel (triton/geglu.py) against diffusers' GEGLU product quantized by `quant/primitives.py`.

On the GPU the reference is torch's own `a * F.gelu(gate)` (its CUDA gelu calls the erff the kernel's libdevice
provides): codes bit for bit. Under the CPU interpreter the kernel's erf is Python's math.erf while torch's CPU
gelu uses its own polynomial (fp16 results an ulp apart near x ≈ −2.5), so there the reference forms torch's
CUDA formula with math.erf — the same arithmetic the GPU check pins to torch — and the test checks everything
else: the halves, the masks, strides, timestep groups, TCR and the quantize.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tcaq_kernels.ops.triton_ops import geglu_quantize
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton.geglu import geglu_quantize_bsc
from tcaq_kernels.triton.numerics import round_to

from _tables import Tables


def _gelu(g: torch.Tensor) -> torch.Tensor:
    """gelu(g) in g's dtype as the unfused path computes it on g's device (see module doc)."""
    if g.is_cuda:
        return F.gelu(g)
    x = g.float().numpy()
    erf = np.vectorize(math.erf, otypes=[np.float32])(x * np.float32(math.sqrt(0.5)))
    return torch.from_numpy((x * np.float32(0.5)) * (np.float32(1.0) + erf)).to(g.dtype)


def _reference(h: torch.Tensor, t: Tables, r_inv) -> torch.Tensor:
    a, gate = h.chunk(2, dim=-1)
    product = a * _gelu(gate)
    return P.quantize_uniform(product.float(), t.per_sample(t.s_inv, h.dim()), t.per_sample(t.zero, h.dim()), t.bits,
                              r_inv, -1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tcr", [False, True])
def test_codes_are_the_quantized_geglu_product(gen, device, bits, dtype, tcr):
    B, S, Fh = 3, 7, 37  # odd tokens and channels: partial tiles in both directions
    h = (torch.randn(B, S, 2 * Fh, generator=gen) * 2).to(dtype).to(device)
    t = Tables(gen, groups=4, batch=B, bits=bits, device=device)
    t.s_inv = t.s_inv / 4  # products of a few units land across the code range
    r_inv = (torch.rand(Fh, generator=gen) + 0.5).to(device) if tcr else None
    q = geglu_quantize(h, t.s_inv, t.zero, t.group, bits, r_inv)
    assert q.dtype == torch.int8 and q.shape == (B, S, Fh)
    ref = _reference(h, t, r_inv)
    assert torch.equal(q, ref)
    assert len(ref.unique()) > 4  # the draw exercises the range, not one clamped code


def test_every_code_is_written_and_strided_input_is_read_in_place(gen, device):
    B, S, Fh = 2, 9, 21
    base = torch.randn(B, 2 * Fh, S, generator=gen).to(torch.bfloat16).to(device)
    h = base.transpose(1, 2)  # [B, S, 2F] with channel stride S
    t = Tables(gen, groups=2, batch=B, bits=8, device=device)
    ref = _reference(h, t, None)
    for poison in (-128, 127):
        out = torch.full((B, S, Fh), poison, dtype=torch.int8, device=device)
        geglu_quantize_bsc(h, t.s_inv, t.zero, t.group, 1, 8, None, out)
        assert torch.equal(out, ref)


def test_one_group_for_the_batch_and_flattened_rows(gen, device):
    h = torch.randn(4, 5, 2 * 12, generator=gen).to(device)
    t = Tables(gen, groups=3, batch=1, bits=8, device=device)
    q = geglu_quantize(h, t.s_inv, t.zero, t.group.reshape(()), 8)
    t.group = t.group.expand(4).contiguous()
    assert torch.equal(q, _reference(h, t, None))
    # a 2-D [B·S, 2F] input with one group entry per sample: rows split evenly between the samples
    t2 = Tables(gen, groups=3, batch=4, bits=8, device=device)
    flat = geglu_quantize(h.reshape(20, 24), t2.s_inv, t2.zero, t2.group, 8)
    assert torch.equal(flat.view(4, 5, 12), _reference(h, t2, None))


def test_bad_arguments_are_named(gen, device):
    t = Tables(gen, groups=2, batch=2, bits=8, device=device)
    h = torch.randn(2, 3, 10, generator=gen).to(device)
    with pytest.raises(ValueError, match=r"float h \[\.\.\., 2F\]"):
        geglu_quantize(h[..., :9], t.s_inv, t.zero, t.group, 8)
    with pytest.raises(ValueError, match="r_inv must have one entry per output channel"):
        geglu_quantize(h, t.s_inv, t.zero, t.group, 8, torch.ones(10, device=device))
    with pytest.raises(ValueError, match="bits must be in"):
        geglu_quantize(h, t.s_inv, t.zero, t.group, 9)
    with pytest.raises(ValueError, match="do not split into 2 samples"):
        geglu_quantize(h.reshape(6, 10)[:5], t.s_inv, t.zero, t.group, 8)
    with pytest.raises(ValueError, match="out must be int8"):
        geglu_quantize_bsc(h, t.s_inv, t.zero, t.group, 1, 8, None, torch.empty(2, 3, 5, device=device))


def test_fake_impl_matches(gen, device):
    """The op's schema and fake implementation (what torch.compile traces) agree with the real one."""
    h = torch.randn(2, 3, 10, generator=gen).to(device)
    t = Tables(gen, groups=2, batch=2, bits=8, device=device)
    torch.library.opcheck(geglu_quantize, (h, t.s_inv, t.zero, t.group, 8, torch.ones(5, device=device)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 4096, 1280), (8, 1024, 2560), (2, 64, 5120)])  # SD-1.5's three levels
def test_sd15_shapes_match_torch_bit_for_bit(gen, shape):
    B, S, Fh = shape
    h = (torch.randn(B, S, 2 * Fh, generator=gen) * 2).to(torch.bfloat16).cuda()
    t = Tables(gen, groups=4, batch=B, bits=8, device="cuda")
    r_inv = (torch.rand(Fh, generator=gen) + 0.5).cuda()
    assert torch.equal(geglu_quantize(h, t.s_inv, t.zero, t.group, 8, r_inv), _reference(h, t, r_inv))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_gate_value_matches_torch_gelu(device, dtype):
    """Every finite bf16 / fp16 gate value, with a = 1 and a unit scale fine enough to see gelu's last bits
    (codes of 64·gelu, clamped): torch's CUDA gelu and the kernel's agree on each."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    gate = bits[torch.isfinite(bits)].cuda()
    h = torch.cat([torch.ones_like(gate), gate]).view(1, 1, -1)
    s_inv, zero = torch.tensor([64.0], device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
    group = torch.zeros(1, dtype=torch.int32, device="cuda")
    ref = P.quantize_uniform(F.gelu(gate).float(), s_inv, zero, 8).view(1, 1, -1)
    assert torch.equal(geglu_quantize(h, s_inv, zero, group, 8), ref)


@triton.jit
def _round_kernel(x_ptr, out_ptr, N, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, round_to(tl.load(x_ptr + offs, mask=offs < N), DTYPE), mask=offs < N)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_is_torchs_cast(gen, device, dtype):
    """`numerics.round_to` against torch's fp32 → dtype cast: random values, exact ties (both parities),
    carries into the exponent, subnormals, the overflow edge and infinities."""
    mant = torch.finfo(dtype).bits - {torch.bfloat16: 9, torch.float16: 6}[dtype]  # explicit mantissa bits
    step = 2.0 ** -mant
    ties = torch.tensor([1 + step / 2, 1 + 1.5 * step, 2 - step / 2, -(1 + step / 2), 3 * (1 + 1.5 * step)])
    edges = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).max * (1 + step / 2), 1e-40, -3e-39, 6e-8,
                          float("inf"), float("-inf"), 0.0, -0.0])
    x = torch.cat([torch.randn(4000, generator=gen) * 100, torch.randn(1000, generator=gen) * 1e-5, ties, edges])
    x = x.to(device)
    out = torch.empty_like(x)
    tl_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), DTYPE=tl_dtype, BLOCK=1024)
    assert torch.equal(out, x.to(dtype).float())
