"""Fused GroupNorm + SiLU + quantize against torch's fp32 group_norm → silu → `quantize_uniform`.

Codes must equal the reference's except one-level flips inside the fp32 band of a rounding boundary
(_gn_band.py); a band of zero width would wrongly fail on summation order, a loose check would
miss a wrong statistic. The input has a mean far from zero, where a Σx² variance would fail.
"""
import pytest
import torch
import torch.nn.functional as F

from tcaq_kernels.ops.triton_ops import groupnorm, groupnorm_silu_quantize, prepare_conv_weight, qconv2d
from tcaq_kernels.triton import groupnorm as gn_module
from tcaq_kernels.triton.groupnorm import groupnorm_bsc, groupnorm_silu_quantize_bsc

from _concat import cat_like, part
from _gn_band import assert_codes_within_band, band, reference
from _tables import Tables, rand_int

# (B, C, H, W, norm groups): channels per group 3, 5, 2 (the embedded model's 64 / 32), 8.
CASES = [(2, 12, 5, 7, 4), (3, 20, 6, 6, 4), (1, 64, 4, 5, 32), (2, 16, 9, 3, 2)]


def _inputs(gen, device, B, C, H, W, dtype=torch.float32, affine=True, tcr=True, bits=8):
    x = (torch.randn(B, C, H, W, generator=gen) * 2 + torch.randn(1, C, 1, 1, generator=gen) * 4).to(dtype)
    gamma = torch.randn(C, generator=gen) * 0.5 + 1 if affine else None
    beta = torch.randn(C, generator=gen) * 0.3 if affine else None
    r_inv = torch.rand(C, generator=gen) + 0.5 if tcr else None
    t = Tables(gen, groups=3, batch=B, bits=bits, device=device)
    move = lambda v: None if v is None else v.to(device)
    return x.to(device), move(gamma), move(beta), move(r_inv), t


def _check(codes, x, G, gamma, beta, eps, r_inv, t, what, silu=True):
    s_inv, zero = t.per_sample(t.s_inv, 4), t.per_sample(t.zero, 4)
    ref, v = reference(x, G, gamma, beta, eps, s_inv, zero, t.bits, r_inv, silu)
    assert codes.dtype == torch.int8 and codes.shape == ref.shape
    return assert_codes_within_band(codes, ref, v, band(x.cpu(), G, _cpu(gamma), _cpu(beta), eps, s_inv.cpu(),
                                                        _cpu(r_inv), silu), what)


def _cpu(v):
    return None if v is None else v.cpu()


def _force(path, monkeypatch):
    """"auto": the launcher's choice (one pass wherever a group fits, as on these small shapes);
    "two-kernel": the statistics kernel, then the codes kernel; "looped": the looped kernel, its row
    tiles cut to 8 so that each of its three sweeps takes several steps even on these small shapes."""
    if path == "two-kernel":
        monkeypatch.setattr(gn_module, "one_pass_tile", lambda *a, **k: None)
    if path == "looped":
        tile = gn_module.looped_tile
        monkeypatch.setattr(gn_module, "LOOPED", True)
        monkeypatch.setattr(gn_module, "looped_tile", lambda *a: (lambda g, s, c: (g, min(s, 8), c))(*tile(*a)))


PATHS = ["auto", "two-kernel", "looped"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bits", [8, 4])
def test_codes_match_reference(gen, device, case, bits, path, monkeypatch):
    _force(path, monkeypatch)
    B, C, H, W, G = case
    x, gamma, beta, r_inv, t = _inputs(gen, device, B, C, H, W, bits=bits)
    codes = groupnorm_silu_quantize(x, gamma, beta, G, 1e-5, t.s_inv, t.zero, t.group, bits, r_inv)
    _check(codes, x, G, gamma, beta, 1e-5, r_inv, t, f"{case} A{bits}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES[:2])
def test_codes_without_silu(gen, device, case, path, monkeypatch):
    """`silu=False`: the codes of group_norm(x) alone (a Transformer2DModel's norm → proj_in), channels-last input."""
    _force(path, monkeypatch)
    B, C, H, W, G = case
    x, gamma, beta, r_inv, t = _inputs(gen, device, B, C, H, W)
    x = x.to(memory_format=torch.channels_last)
    codes = groupnorm_silu_quantize(x, gamma, beta, G, 1e-6, t.s_inv, t.zero, t.group, 8, r_inv, silu=False)
    _check(codes, x, G, gamma, beta, 1e-6, r_inv, t, f"{case} no SiLU", silu=False)
    with_silu = groupnorm_silu_quantize(x, gamma, beta, G, 1e-6, t.s_inv, t.zero, t.group, 8, r_inv)
    assert not torch.equal(codes, with_silu)


# SD-1.5's Transformer2DModel norms (eps 1e-6, bf16, channels-last) at batch 2 and 8 on the GPU.
@pytest.mark.cuda
@pytest.mark.parametrize("case", [(2, 320, 64, 64, 32), (8, 640, 32, 32, 32), (8, 1280, 16, 16, 32),
                                  (8, 1280, 8, 8, 32)])
@pytest.mark.parametrize("path", PATHS)
def test_large_shapes_without_silu(gen, case, path, monkeypatch):
    _force(path, monkeypatch)
    B, C, H, W, G = case
    x, gamma, beta, r_inv, t = _inputs(gen, "cuda", B, C, H, W, dtype=torch.bfloat16)
    x = x.to(memory_format=torch.channels_last)
    codes = groupnorm_silu_quantize(x, gamma, beta, G, 1e-6, t.s_inv, t.zero, t.group, 8, r_inv, silu=False)
    _check(codes, x, G, gamma, beta, 1e-6, r_inv, t, f"{case} no SiLU", silu=False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_channels_last_no_affine(gen, device, dtype, path, monkeypatch):
    _force(path, monkeypatch)
    B, C, H, W, G = 2, 24, 6, 5, 8
    x, _, _, _, t = _inputs(gen, device, B, C, H, W, dtype=dtype, affine=False, tcr=False)
    x = x.to(memory_format=torch.channels_last)
    codes = groupnorm_silu_quantize(x, None, None, G, 1e-6, t.s_inv, t.zero, t.group, 8)
    _check(codes, x, G, None, None, 1e-6, None, t, f"{dtype} channels_last")


@pytest.mark.parametrize("split", [2, 3, 15])
def test_split_statistics_and_poisoned_output(gen, device, split):
    """Statistics summed over several programs per group (the GPU's choice on small batches), an
    empty split included (15 splits of 4·31 elements: 9 each), into an output poisoned with two
    sentinels."""
    _check_poisoned(gen, device, (2, 12, 31, 1, 3), f"split {split}", split=split)


def _check_poisoned(gen, device, case, what, **launch):
    """The launcher on a [B, H·W, C] column of pixels into outputs poisoned with two sentinels."""
    B, C, H, W, G = case
    x, gamma, beta, r_inv, t = _inputs(gen, device, B, C, H, W)
    x3 = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
    for sentinel in (-77, 91):
        out = torch.full((B, H, W, C), sentinel, dtype=torch.int8, device=device)
        groupnorm_silu_quantize_bsc(x3, G, 1e-5, gamma, beta, t.s_inv, t.zero, t.group, 1, 8, r_inv,
                                    out.view(B, H * W, C), **launch)
        _check(out, x, G, gamma, beta, 1e-5, r_inv, t, f"{what}, sentinel {sentinel}")


@pytest.mark.parametrize("max_groups", [None, 2, 1])
def test_one_pass_tiles_and_poisoned_output(gen, device, max_groups, monkeypatch):
    """The one-pass kernel with 3 or 1 groups a program (a divisor of G = 3; 2 is not one) of 5
    channels: 1 or 11 lanes of the 16-wide tile masked, 31 pixels of 32, into a poisoned output."""
    for name in ("ONE_PASS_ELEMENTS", "ONE_PASS_MAX_ELEMENTS"):  # a fixed budget, whatever the environment says
        monkeypatch.setattr(gn_module, name, 16384)
    tile = gn_module.one_pass_tile(31, 15, 3, max_groups)
    assert tile == ((3, 32, 16) if max_groups is None else (1, 32, 16))
    monkeypatch.setattr(gn_module, "one_pass_tile", lambda *a, **k: tile)
    _check_poisoned(gen, device, (2, 15, 31, 1, 3), f"one pass {tile}", one_pass=True)


@pytest.mark.parametrize("S, C, tile, tile_8192", [
    (1024, 128, (4, 1024, 16), (2, 1024, 8)),  # 32×32, C/G = 4: 16-channel rows (whole sectors)
    (1024, 320, (1, 1024, 16), None),          # SD-1.5 32×32, C/G = 10: one pass instead of two kernels
    (256, 1280, (1, 256, 64), None),           # SD-1.5 16×16, C/G = 40
    (256, 128, (8, 256, 32), (8, 256, 32)),    # 16×16, C/G = 4: groups a program still by 8192 elements
    (64, 256, (16, 64, 128), (16, 64, 128)),   # 8×8: unchanged
    (4096, 320, None, None),                   # 64×64: two kernels
])
def test_one_pass_tiles_grow_only_where_8192_elements_could_not_serve(monkeypatch, S, C, tile, tile_8192):
    """The register budget (16384) admits a group 8192 elements cannot hold and 16-channel rows; the groups
    a program takes are still counted against 8192. A budget of 8192 gives the one-size tiles."""
    monkeypatch.setattr(gn_module, "ONE_PASS_ELEMENTS", 8192)
    for budget, want in ((16384, tile), (8192, tile_8192)):
        monkeypatch.setattr(gn_module, "ONE_PASS_MAX_ELEMENTS", budget)
        got = gn_module.one_pass_tile(S, C, 32)
        assert got == want, (S, C, budget, got)
        assert got is None or got[1] * got[2] <= budget


@pytest.mark.parametrize("case", [(2, 64, 4, 4, 32), (3, 32, 8, 8, 4), (1, 128, 16, 16, 32)])
def test_full_tiles_exact(gen, device, case):
    """Shapes whose one-pass tile has no idle lane (the kernel's FULL: masks compile-time true) give the
    reference's codes, as the masked shapes of CASES do."""
    B, C, H, W, G = case
    assert gn_module.full_tile(H * W, C // G, gn_module.one_pass_tile(H * W, C, G))
    x, gamma, beta, r_inv, t = _inputs(gen, device, B, C, H, W)
    codes = groupnorm_silu_quantize(x, gamma, beta, G, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv)
    _check(codes, x, G, gamma, beta, 1e-5, r_inv, t, f"{case}")


def test_one_pass_refuses_groups_too_large(device, monkeypatch):
    """A group of 8192 pixels × 4 channels exceeds the one-pass register budget: asked for, it is refused
    (not silently run two-pass); left to the launcher, the two-kernel path takes it."""
    monkeypatch.setattr(gn_module, "ONE_PASS_MAX_ELEMENTS", 16384)
    assert gn_module.one_pass_tile(8192, 8, 2) is None and gn_module.one_pass_tile(4096, 8, 2) is not None
    x3 = torch.randn(1, 8192, 8, device=device)
    one, z = torch.ones(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.empty(1, 8192, 8, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="exceeds ONE_PASS_MAX_ELEMENTS"):
        groupnorm_silu_quantize_bsc(x3, 2, 1e-5, None, None, one, z, z, 0, 8, None, out, one_pass=True)


def test_one_group_for_the_batch_feeds_the_conv(gen, device):
    """A 0-d group serves every sample; the codes go straight into qconv2d's codes path, whose
    padding reads the zero point: the same result as the conv quantizing the reference activation."""
    B, C, H, W, G, N = 3, 8, 5, 6, 4, 10
    x, gamma, beta, r_inv, t = _inputs(gen, device, B, C, H, W)
    t.group = t.group[:1].reshape(())
    codes = groupnorm_silu_quantize(x, gamma, beta, G, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv)
    g = t.group.long()
    s_inv, zero = t.s_inv[g], t.zero[g]
    ref, v = reference(x, G, gamma, beta, 1e-5, s_inv, zero, 8, r_inv)
    flips = assert_codes_within_band(codes, ref, v, band(x.cpu(), G, _cpu(gamma), _cpu(beta), 1e-5, s_inv.cpu(),
                                                         _cpu(r_inv)), "0-d group")
    w_q, w_sum = prepare_conv_weight(rand_int(gen, (N, C, 3, 3), 8, device), 8)
    w_scale = torch.rand(N, generator=gen).to(device)
    conv = lambda a: qconv2d(a, w_q, w_sum, w_scale, None, t.s_inv, t.scale, t.zero, t.group, 1, [1], 8, r_inv,
                             out_dtype=torch.float32)
    y_float = F.silu(F.group_norm(x, G, gamma, beta, 1e-5))
    if not flips.any():
        assert torch.equal(conv(codes), conv(y_float))


# (B, C, H, W, norm groups, c2): c2 at a norm-group boundary, then inside a group; in the first or the
# second channel tile of the two-kernel path (16 wide in the interpreter).
SPLIT_CASES = [(3, 20, 5, 7, 4, 10), (3, 20, 5, 7, 4, 7), (2, 15, 31, 1, 3, 5), (2, 15, 31, 1, 3, 13),
               (2, 36, 3, 5, 12, 18), (2, 36, 3, 5, 12, 17)]


@pytest.mark.parametrize("path", [dict(one_pass=True), dict(one_pass=False), dict(looped=True)],
                         ids=["one-pass", "two-kernel", "looped"])
@pytest.mark.parametrize("case", SPLIT_CASES)
@pytest.mark.parametrize("bits", [8, 4])
def test_split_input_composes_unsplit_codes(gen, device, case, path, bits):
    """A split input's codes are the unsplit kernel's with tables 1 on channels [0, c2) and with tables 2 on
    [c2, C), bit for bit: the statistics path is the same, only the quantizer differs. Per-sample groups
    (distinct), TCR, a strided [B, H·W, C] view of NCHW x, every output poisoned (a sentinel per call)."""
    B, C, H, W, G, c2 = case
    x, gamma, beta, r_inv, t = _inputs(gen, device, B, C, H, W, bits=bits)
    t.group = torch.randperm(3, generator=gen)[:B].to(t.group)
    t2 = Tables(gen, groups=3, batch=B, bits=bits, device=device)
    t2.group = t.group
    x3 = x.permute(0, 2, 3, 1).reshape(B, H * W, C)

    def codes(tab, sentinel, **split):
        out = torch.full((B, H * W, C), sentinel, dtype=torch.int8, device=device)
        return groupnorm_silu_quantize_bsc(x3, G, 1e-5, gamma, beta, tab.s_inv, tab.zero, tab.group, 1, bits,
                                           r_inv, out, **path, **split)

    for s_split, s_ref in ((-77, 91), (91, -77)):  # an unwritten element keeps a sentinel the other output lacks
        ref = torch.cat([codes(t, s_ref)[..., :c2], codes(t2, s_ref)[..., c2:]], dim=-1)
        assert torch.equal(codes(t, s_split, c2=c2, s_inv2=t2.s_inv, zero2=t2.zero), ref)


# (B, S, C1, C2, norm groups, layout of x3, of x2, dtype): groups of 5 channels, one straddling C1 = 27
# (25..29); the parts' boundary on a group edge; C1 < C/G (group 0 is 0..14, C1 = 12); 40 + 20 channels in
# groups of 12, group 3 (36..47) straddling C1 like SD-1.5's 1280 + 640 in groups of 60 (group 21: 1260..1319).
# Mixed layouts are exact in the interpreter; compiled (sm_90, Triton 3.6) the one-pass and looped tiles take
# the second part's layout for their sums, so x3 channels-last + x2 NCHW matches `cat_like`'s NCHW there too.
CONCAT_CASES = [(2, 35, 27, 13, 8, "nchw", "nchw", torch.float32), (3, 12, 16, 16, 4, "nhwc", "nhwc", torch.float32),
                (2, 20, 12, 33, 3, "nhwc", "nchw", torch.float32), (2, 9, 40, 20, 5, "slice", "nhwc", torch.bfloat16)]
CONCAT_PATHS = [dict(one_pass=True), dict(one_pass=False), dict(split=2), dict(looped=True)]


@pytest.mark.parametrize("case", CONCAT_CASES, ids=lambda c: f"{c[2]}+{c[3]}-G{c[4]}-{c[5]}-{c[6]}-{str(c[7])[6:]}")
@pytest.mark.parametrize("path", CONCAT_PATHS, ids=["one-pass", "two-kernel", "split2", "looped"])
@pytest.mark.parametrize("quant", ["one-quantizer", "c2=C1", "c2=7", "float"])
def test_concatenated_input_read_in_place(gen, device, case, path, quant, monkeypatch):
    """`x2` (x3 and x2 concatenated along channels, read in place, norm groups straddling the boundary): every
    path's output equals the launcher's on the materialised concatenation (`cat_like`: as the model's cat lays
    it out, which fixes the statistics' summation order), bit for bit — codes with one quantizer or a split one
    (c2 at the parts' boundary or elsewhere), TCR and affine, or the float GroupNorm + SiLU — into outputs
    poisoned with different sentinels. The looped kernel's row tiles are cut to 8 (several steps a sweep)."""
    if "looped" in path:
        _force("looped", monkeypatch)
    B, S, C1, C2, G, l3, l2, dtype = case
    C = C1 + C2
    x3 = part(gen, B, S, C1, l3, dtype, device, offset=4.0)  # a mean far from zero, as in `_inputs`
    x2 = part(gen, B, S, C2, l2, dtype, device, offset=4.0)
    _, gamma, beta, r_inv, t = _inputs(gen, device, B, C, 1, 1)
    t.group = torch.randperm(3, generator=gen)[:B].to(t.group)  # distinct per-sample tables
    split = {}
    if quant.startswith("c2"):
        t2 = Tables(gen, groups=3, batch=B, bits=8, device=device)
        split = dict(c2=C1 if quant == "c2=C1" else 7, s_inv2=t2.s_inv, zero2=t2.zero)
    out_dtype = torch.float32 if quant == "float" else torch.int8

    def launch(sentinel, *x, **kw):
        out = torch.full((B, S, C), sentinel, dtype=out_dtype, device=device)
        return groupnorm_silu_quantize_bsc(x[0], G, 1e-5, gamma, beta, t.s_inv, t.zero, t.group, 1, 8, r_inv, out,
                                           **path, **split, **kw)

    assert torch.equal(launch(77, x3, x2=x2), launch(91, cat_like(x3, x2)))


def test_concatenated_input_refusals(device):
    """A second part that does not fit x3 (batch, pixels, dtype, device, rank) is refused, naming x2."""
    B, S = 2, 6
    x3 = torch.randn(B, S, 4, device=device)
    one, z = torch.ones(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.empty(B, S, 8, dtype=torch.int8, device=device)
    launch = lambda x2: groupnorm_silu_quantize_bsc(x3, 2, 1e-5, None, None, one, z, z, 0, 8, None, out, x2=x2)
    for bad in (torch.randn(B + 1, S, 4), torch.randn(B, S - 1, 4), torch.randn(B, S * 4)):
        with pytest.raises(ValueError, match=r"x2: shape .* is not \[B, S, C2\]"):
            launch(bad.to(device))
    with pytest.raises(ValueError, match="x2: dtype torch.bfloat16"):
        launch(torch.randn(B, S, 4, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="x2: on meta"):
        launch(torch.empty(B, S, 4, device="meta"))
    with pytest.raises(ValueError, match="9 channels do not split into 2 groups"):  # C counts both parts
        launch(torch.randn(B, S, 5, device=device))


def test_looped_tiles():
    """Whole groups covering ≥ 32 channels (a divisor of G), or every group when C is smaller; tiles of
    about 4096 elements, never taller than the image."""
    assert gn_module.looped_tile(1024, 64, 32) == (16, 128, 32)  # embedded model, 32×32: 2 channels a group
    assert gn_module.looped_tile(4096, 320, 32) == (4, 64, 64)  # SD-1.5 64×64: 40 of 64 lanes live
    assert gn_module.looped_tile(16, 24, 8) == (8, 16, 32)  # C < 32: one program per sample
    assert gn_module.looped_tile(256, 1280, 32) == (1, 64, 64)


def test_split_input_needs_codes(device):
    """The second quantizer only exists for codes: a float `out` (a plain GroupNorm) with c2 is refused."""
    x3 = torch.randn(1, 6, 8, device=device)
    one, z = torch.ones(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.empty(1, 6, 8, device=device)
    with pytest.raises(ValueError, match="c2 .* not int8 codes"):
        groupnorm_silu_quantize_bsc(x3, 2, 1e-5, None, None, one, z, z, 0, 8, None, out, c2=4, s_inv2=one, zero2=z)


def test_rejects_bad_groups(device):
    x = torch.randn(1, 6, 2, 2, device=device)
    one = torch.ones(1, device=device)
    z = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
        groupnorm_silu_quantize(x, None, None, 4, 1e-5, one, z, z)


def test_fake_impl_matches(device):
    x = torch.randn(2, 4, 3, 5, device=device)
    w = torch.ones(4, device=device)
    tab = torch.ones(2, device=device)
    z = torch.zeros(2, dtype=torch.int32, device=device)
    torch.library.opcheck(groupnorm_silu_quantize, (x, w, w * 0, 2, 1e-5, tab, z, z, 8, w),
                          test_utils=("test_schema", "test_faketensor"))


# SD-1.5 ResBlock norms (batch 2 and 8) and DDPM-CIFAR10's (batch 64) on the GPU.
@pytest.mark.cuda
@pytest.mark.parametrize("case", [(2, 320, 64, 64, 32), (2, 1280, 8, 8, 32), (8, 640, 32, 32, 32),
                                  (2, 2560, 16, 16, 32), (64, 128, 32, 32, 32), (64, 256, 4, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_large_shapes(gen, case, dtype, path, monkeypatch):
    _force(path, monkeypatch)
    B, C, H, W, G = case
    x, gamma, beta, r_inv, t = _inputs(gen, "cuda", B, C, H, W, dtype=dtype)
    x = x.to(memory_format=torch.channels_last) if C % 640 == 0 else x
    codes = groupnorm_silu_quantize(x, gamma, beta, G, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv)
    _check(codes, x, G, gamma, beta, 1e-5, r_inv, t, f"{case} {dtype}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_groupnorm_of_strided_tokens(gen, device, dtype, path, monkeypatch):
    """`groupnorm` (no SiLU, no quantize) of an attention block's tokens [B, L, C] — a transposed view,
    as the block hands them over — against torch's fp32 GroupNorm, in the input's dtype; and through
    the launcher into a poisoned output."""
    _force(path, monkeypatch)
    B, C, L, G = 2, 24, 35, 8
    x = (torch.randn(B, C, L, generator=gen) * 2 + torch.randn(1, C, 1, generator=gen) * 4).to(dtype).to(device)
    gamma, beta = torch.randn(C, generator=gen).to(device), torch.randn(C, generator=gen).to(device)
    tokens = x.transpose(1, 2)
    ref = F.group_norm(x.float(), G, gamma, beta, 1e-5).transpose(1, 2).to(dtype)
    y = groupnorm(tokens, gamma, beta, G, 1e-5)
    assert y.shape == (B, L, C) and y.dtype == dtype and y.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(y, ref, **tol)
    out = torch.full((B, L, C), float("nan"), dtype=dtype, device=device)
    groupnorm_bsc(tokens, G, 1e-5, gamma, beta, out)
    torch.testing.assert_close(out, ref, **tol)


def test_fast_silu_stays_off_in_the_interpreter():
    """The fast SiLU is inline PTX: under the interpreter the kernels keep torch's formula."""
    assert gn_module.silu_mode(False) == gn_module.SILU_OFF
    assert gn_module.silu_mode(True) == (gn_module.SILU_EXACT if gn_module.interpreting() else gn_module.SILU_FAST)


@pytest.mark.cuda
@pytest.mark.parametrize("case", [(2, 320, 64, 64, 32), (8, 640, 32, 32, 32), (64, 128, 32, 32, 32)])
@pytest.mark.parametrize("path", PATHS)
def test_fast_silu_gives_the_same_outputs(gen, case, path, monkeypatch):
    """The GPU's SiLU (two MUFU instructions, `numerics.silu`'s SILU_FAST): the same codes, and the same floats
    for the output norm's GroupNorm + SiLU, as torch's formula (SILU_EXACT) — bit for bit, not within a band."""
    _force(path, monkeypatch)
    B, C, H, W, G = case
    x, gamma, beta, r_inv, t = _inputs(gen, "cuda", B, C, H, W, dtype=torch.bfloat16)
    runs = []
    for mode in (gn_module.SILU_EXACT, gn_module.SILU_FAST):
        monkeypatch.setattr(gn_module, "silu_mode", lambda on, mode=mode: mode if on else gn_module.SILU_OFF)
        codes = groupnorm_silu_quantize(x, gamma, beta, G, 1e-5, t.s_inv, t.zero, t.group, 8, r_inv)
        tokens = x.flatten(2).transpose(1, 2)
        runs.append((codes, groupnorm(tokens, gamma, beta, G, 1e-5, silu=True)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
