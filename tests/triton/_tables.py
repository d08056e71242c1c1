"""Random timestep-group tables and references for the kernel tests (fresh draws every run)."""
import torch
import torch.nn.functional as F

from tcaq_kernels.ops import reference as R
from tcaq_kernels.ops.triton_ops import prepare_conv_weight, qconv2d
from tcaq_kernels.quant import primitives as P


class Tables:
    """Parameter tables of one quantized activation with G timestep groups, and a per-sample group."""

    def __init__(self, gen: torch.Generator, groups: int, batch: int, bits: int, device, unit_scale=False):
        qmin, qmax = P.qrange(bits)
        self.bits = bits
        self.scale = torch.rand(groups, generator=gen) * 0.2 + 0.05
        if unit_scale:
            self.scale = torch.ones(groups)
        self.s_inv = 1.0 / (torch.rand(groups, generator=gen) * 0.2 + 0.05)
        self.zero = torch.randint(qmin // 4, qmax // 4 + 1, (groups,), generator=gen, dtype=torch.int32)
        self.group = torch.randint(0, groups, (batch,), generator=gen, dtype=torch.int32)
        for name in ("scale", "s_inv", "zero", "group"):
            setattr(self, name, getattr(self, name).to(device))

    def per_sample(self, table: torch.Tensor, ndim: int) -> torch.Tensor:
        """table[group[b]] shaped [B, 1, …, 1] to broadcast against an ndim-dim tensor."""
        return table[self.group.long()].view(-1, *([1] * (ndim - 1)))


def rand_int(gen, shape, bits, device):
    qmin, qmax = P.qrange(bits)
    return torch.randint(qmin, qmax + 1, shape, generator=gen, dtype=torch.int8).to(device)


def assert_float_close(out: torch.Tensor, ref: torch.Tensor, what: str):
    """Floats up to fp32 rounding (an fma in the epilogue), then the output dtype's own rounding."""
    assert not out.isnan().any(), f"{what}: unwritten (NaN) outputs"
    eps = torch.finfo(out.dtype).eps
    ref_o = ref.to(out.dtype).float()
    tol = 2 * eps * ref.abs() + 4 * torch.finfo(torch.float32).eps * ref.abs().max().clamp(min=1)
    bad = (out.float() - ref_o).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} outputs off, e.g. {out.float()[bad][:4]} vs {ref_o[bad][:4]}"


def linear_acc_ref(codes: torch.Tensor, w_int: torch.Tensor, t: Tables) -> torch.Tensor:
    """Reference GEMM accumulator Σ (a − z[g])·w of codes [B, …, K] with the tables' per-sample zero points."""
    return R.int_linear(codes, w_int, t.per_sample(t.zero, codes.dim()))


def conv_acc_ref(codes_nchw: torch.Tensor, w_int: torch.Tensor, t: Tables, stride: int, pads) -> torch.Tensor:
    """Reference conv accumulator, the padding read as the code z (asymmetric padding done in the quantized
    domain with z first; pads = (top, bottom, left, right))."""
    top, bottom, left, right = pads
    z = t.per_sample(t.zero, 4)
    if (top, left) == (bottom, right):
        return R.int_conv2d(codes_nchw, w_int, z, (stride, stride), (top, left))
    padded = F.pad(codes_nchw.double() - z.double(), (left, right, top, bottom)) + z.double()
    return R.int_conv2d(padded, w_int, z, (stride, stride), (0, 0))


def assert_upsample_conv_exact(gen, device, case, w_bits):
    """`qconv2d(..., upsample=2)` on fresh codes (B, C, H, W) with N outputs, a k×k kernel and padding `pad`
    (case = (B, C, H, W, N, k, pad)), unit scales and fp32 output: exactly the reference conv of the
    nearest-upsampled codes."""
    B, C, H, W, N, k, pad = case
    codes = rand_int(gen, (B, C, H, W), 8, device)
    w = rand_int(gen, (N, C, k, k), w_bits, device)
    t = Tables(gen, groups=3, batch=B, bits=8, device=device, unit_scale=True)
    w_q, w_sum = prepare_conv_weight(w, w_bits, pad)
    y = qconv2d(codes.permute(0, 2, 3, 1).contiguous(), w_q, w_sum, torch.ones(N, device=device), None,
                t.s_inv, t.scale, t.zero, t.group, 1, [pad], out_dtype=torch.float32, upsample=2)
    up = codes.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert y.shape == (B, N, 2 * H, 2 * W)
    assert torch.equal(y, conv_acc_ref(up, w, t, 1, (pad,) * 4).float())
