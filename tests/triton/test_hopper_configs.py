"""Every Hopper autotune config of the GEMM and conv kernels, each forced in turn, bit for bit.

The interpreter (CI) otherwise runs one small config only, so a tile shape that breaks the
index or mask arithmetic (a 16-row tile, a 256-wide N tile, BLOCK_K 32 with int4 weights, a
split whose K range is not a BLOCK_K multiple) would first show on a GPU. Each run writes into an
output with NaN-poisoned guard elements before and after it: an out-of-bounds store changes
them. On the GPU the autotuner picks among the same configs, so the test is CPU-only.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from tcaq_kernels.ops import reference as R
from tcaq_kernels.ops.triton_ops import quantize_act
from tcaq_kernels.quant import primitives as P
from tcaq_kernels.triton import conv as C
from tcaq_kernels.triton import gemm as G

from _tables import Tables, rand_int

GUARD = 64
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter sweep; the GPU autotunes over these")


def hopper_configs(module) -> list:
    """The config list `module._configs()` builds for a GPU (the full one, not the quick one)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(module, "interpreting", lambda: False)
    mp.setattr(module, "quick_tuning", lambda: False)
    try:
        return module._configs()
    finally:
        mp.undo()


def config_id(cfg) -> str:
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}"


@pytest.fixture
def force(monkeypatch):
    """Make `kernel` autotune over `cfg` alone (configs and cache restored afterwards)."""
    def apply(kernel, cfg):
        monkeypatch.setattr(kernel, "configs", [cfg])
        monkeypatch.setattr(kernel, "cache", {})
    return apply


def guarded_output(shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(backing buffer, contiguous view of `shape` inside it), everything NaN."""
    n = math.prod(shape)
    backing = torch.full((n + 2 * GUARD,), float("nan"))
    return backing, backing[GUARD:GUARD + n].view(shape)


def assert_guards_intact(backing: torch.Tensor, what: str) -> None:
    assert torch.isnan(backing[:GUARD]).all() and torch.isnan(backing[-GUARD:]).all(), \
        f"{what}: a store landed outside the output"


@pytest.mark.parametrize("cfg", hopper_configs(G), ids=config_id)
def test_gemm_every_config(gen, force, cfg):
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    M, N = (9 if bm <= 32 else 70), 72  # the M class the pruning keeps this config for
    for w_bits, a_float, split in itertools.product((8, 4), (False, True), (1, 3)):
        K = 2 * bk * 3 + 6 if split == 1 else 3 * 256  # ragged K unsplit; split ranges of whole tiles
        force(G._qgemm_kernel, cfg)
        x = torch.randn(M, K, generator=gen)
        w = rand_int(gen, (N, K), w_bits, "cpu")
        t = Tables(gen, groups=4, batch=1, bits=8, device="cpu", unit_scale=True)
        w_q, w_sum = G.prepare_linear_weight(w, w_bits)
        codes = P.quantize_uniform(x, t.s_inv[t.group.long()], t.zero[t.group.long()], 8)
        expect = R.int_linear(codes, w, t.zero[t.group.long()]).float()
        backing, out = guarded_output((M, N))
        G.qgemm(x if a_float else codes, w_q, w_sum, torch.ones(N), None, t.s_inv, t.scale, t.zero, t.group,
                0, M, 8, None, None, out, split)
        what = f"{config_id(cfg)} W{w_bits} {'float' if a_float else 'int8'} input, split {split}"
        assert torch.equal(out, expect), what
        assert_guards_intact(backing, what)


# (B, C, H, W, N, k, stride): a 3×3 conv whose C is not a tile multiple, a strided 1×1
CONV_SHAPES = [lambda bk: (1, 2 * bk + 8, 5, 6, 40, 3, 1), lambda bk: (2, bk, 4, 4, 24, 1, 2)]


@pytest.mark.parametrize("cfg", hopper_configs(C), ids=config_id)
def test_conv_every_config(gen, force, cfg):
    bk = cfg.kwargs["BLOCK_K"]
    for w_bits, split, shape in itertools.product((8, 4), (1, 3), CONV_SHAPES):
        B, Cin, H, W, N, k, s = shape(bk)
        force(C._qconv_kernel, cfg)
        x = torch.randn(B, Cin, H, W, generator=gen)
        w = rand_int(gen, (N, Cin, k, k), w_bits, "cpu")
        t = Tables(gen, groups=4, batch=B, bits=8, device="cpu", unit_scale=True)
        w_q, w_sum = C.prepare_conv_weight(w, w_bits)
        codes = quantize_act(x, t.s_inv, t.zero, t.group, 8, channel_dim=1)
        pad = k // 2
        expect = R.int_conv2d(codes.permute(0, 3, 1, 2), w, t.per_sample(t.zero, 4), (s, s), (pad, pad)).float()
        OH, OW = expect.shape[2], expect.shape[3]
        backing, out_nhwc = guarded_output((B, OH, OW, N))
        out = out_nhwc.permute(0, 3, 1, 2)  # NCHW-shaped, channels-last, as the op allocates it
        C.qconv(codes, w_q, w_sum, torch.ones(N), None, t.scale, t.zero, t.group, 1, s, (pad,) * 4, None, out, split)
        what = f"{config_id(cfg)} W{w_bits} {B}x{Cin}x{H}x{W}→{N} k{k} s{s}, split {split}"
        assert torch.equal(out, expect), what
        assert_guards_intact(backing, what)
