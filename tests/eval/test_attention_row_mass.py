"""benchmarks/attention_row_mass.py: its processor is the stock attention when P is left alone, and its map
quantizers do what their labels say (rows normalised sum to 1, uniform levels clip at their top)."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("attention_row_mass")


def test_the_processor_is_the_stock_attention_until_p_is_replaced(bench):
    torch.manual_seed(0)
    attn = Attention(32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    x = torch.randn(2, 32, 5, 3)
    attn.set_processor(AttnProcessor())
    stock = attn(x)
    holder = [None]
    attn.set_processor(bench.MapQuantProcessor(holder))
    torch.testing.assert_close(attn(x), stock, rtol=1e-5, atol=1e-6)
    holder[0] = lambda p: torch.zeros_like(p)  # P replaced: only the residual (and the output bias) is left
    assert not torch.allclose(attn(x), stock)


def test_map_quantizers(bench):
    gen = torch.Generator().manual_seed(1)
    p = (1.5 * torch.randn(3, 7, 50, generator=gen)).softmax(-1)
    for fq in (bench.row_normalised(bench.log2_map(6, 1.0)), bench.row_normalised(bench.uniform_map(4, 0.3))):
        torch.testing.assert_close(fq(p).sum(-1), torch.ones(3, 7))
    clipped = bench.uniform_map(6, 0.3)(p)
    assert clipped.max() <= 0.3 + 1e-6 and ((clipped - p).abs() <= 0.3 / 63 / 2 + 1e-6)[p <= 0.3].all()
    assert (bench.log2_map(6, 1.0)(p) > 0).all()  # 6-bit log2 reaches 2^-62: nothing rounds to 0 here
    # row-max maps: each row's top is quantized exactly (code for 1), the rest relative to it; the quantizer
    # unset (identity) gives the softmax back
    rm = bench.row_max(bench.uniform_map(8, 1.0))(p)
    e = p / p.amax(-1, keepdim=True)
    torch.testing.assert_close(rm.amax(-1), 1 / e.sum(-1))
    assert ((rm * e.sum(-1, keepdim=True) - e).abs() <= 0.5 / 255 + 1e-6).all()
    torch.testing.assert_close(bench.row_max(lambda x: x)(p), p)
