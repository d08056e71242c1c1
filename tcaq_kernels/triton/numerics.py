"""Device functions shared by the kernels: the activation quantizers of `quant/primitives.py`.

They are written once so that every kernel (standalone quantize, GEMM prologue, conv, attention)
produces the same integers as `quantize_uniform` / `quantize_log2`:

* uniform: `clamp(rint((x·r_inv)·s_inv) + z, qmin, qmax)` in fp32, the two products in that order;
* log2: the level read off the fp32 bit pattern of `y = x·s_inv` (exponent, and mantissa against
  √2), the reserved top code for zero.

Rounding uses the 1.5·2^23 trick instead of `libdevice.rint`: the CPU interpreter (CI) has no
libdevice, and this form rounds half-to-even identically on both. The clamp to ±2^22 before the
add keeps the trick exact and, sitting between the multiply and the add, also stops the compiler
from contracting them into an fma (which would skip the product's rounding and move codes).

The kernels avoid `triton.language.standard` helpers (`tl.cdiv`, `tl.zeros`, reductions): those are
jitted when triton is first imported, and when that happens before TRITON_INTERPRET is set (any
program that imports diffusers first imports triton; tests/conftest.py sets the variable before
that) the CPU interpreter cannot call them. `(n + b - 1) // b` and `tl.full` do the same job.
"""
import os

import torch
import triton
import triton.language as tl
from triton import knobs


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped launch order: GROUP_M row tiles share each weight
    tile while it is still in L2."""
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU CI): kernels then use one small tile config."""
    return bool(knobs.runtime.interpret)


def quick_tuning() -> bool:
    """TCAQ_TRITON_TUNING=quick (set by the GPU tests): two configs a kernel instead of the full
    space, since the tests check integers, not speed, and every config is a compile."""
    return os.environ.get("TCAQ_TRITON_TUNING") == "quick"


def tuning_bench(fn, quantiles):
    """Autotuning timer: replays of a CUDA graph, short.

    The kernels take microseconds, less than their Python launch path, so event timing of eager
    launches ranks configs by host overhead; graph replays time the GPU alone (and the UNet runs in
    a graph anyway). Triton's default of 100 ms per config would make a UNet's first call take minutes.

    `do_bench_cudagraph` runs `fn` on a stream of its own that does not wait for the caller's. Work
    still queued there races with the timed launches: they read inputs not yet written, and they
    write the output, whose memory the caching allocator may have just recycled from a temporary
    that queued kernels of the caller's stream still read (an index tensor, a workspace). So the
    device is drained first (a host sync, once per new autotune key). Seen on an H100: "illegal
    memory access" in the conv's autotuning, only after other tests had filled the allocator's pool
    (the test alone passes, also under compute-sanitizer).
    """
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=3, quantiles=quantiles)


@triton.jit
def exp2_approx(x, FAST: tl.constexpr):
    """2^x: one MUFU.EX2 (`ex2.approx.ftz`) on the GPU (FAST); `tl.math.exp2` otherwise (the interpreter).

    `tl.math.exp2` wraps the same instruction in a subnormal fix-up (four more instructions an
    element); FAST flushes results below 2^-126 to 0 (callers say why that changes nothing of theirs).
    """
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.math.exp2(x)


#: `silu`'s modes: 0 none, 1 torch's formula, 2 its MUFU-only form (GPU)
SILU_OFF, SILU_EXACT, SILU_FAST = 0, 1, 2


@triton.jit
def silu(y, MODE: tl.constexpr):
    """SiLU of fp32 y (MODE 0: y itself). SILU_EXACT: y / (1 + e^−y), as Triton lowers it — ex2.approx with
    its subnormal fix-up, the quotient as div.full (a reciprocal with range scaling): 12 instructions.
    SILU_FAST (GPU only: inline PTX): e^−y as one `ex2.approx.ftz` of y·(−log2 e) and the quotient
    as y·`rcp.approx.ftz`: the same MUFU results wherever they are normal, so the same value for every
    y ≥ −87.3; below, −0 where the exact form gives ~−1e-36 (the same code once quantized)."""
    if MODE == 2:
        e = exp2_approx(y * -1.4426950408889634, True)
        return y * tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32,
                                             is_pure=True, pack=1)
    elif MODE == 1:
        return y / (1.0 + tl.exp(-y))
    else:
        return y


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 `x` rounded to DTYPE (to nearest, ties to even) and widened back: the rounding a torch op applies to
    its output. bf16 through the bit pattern — Triton's interpreter truncates an fp32 → bf16 cast (or rounds
    ties away and drops the carry when asked for "rtne"), where the GPU's cvt.rn gives what this gives; fp16 by
    the cast (numpy's, correct); fp32 unchanged."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def quantize_uniform(u, s_inv, zero, QMIN: tl.constexpr, QMAX: tl.constexpr, CLAMP_FIRST: tl.constexpr = False):
    """Signed uniform codes (int8) of fp32 `u` (already multiplied by r_inv): clamp(rint(u·s_inv) + z).

    rint is round half to even by adding and subtracting 1.5·2^23, exact for |v| ≤ 2^22, so v is first
    saturated at ±2^22 and the code clamped after. CLAMP_FIRST clamps v to [QMIN − z, QMAX − z] instead,
    before rounding: the bounds are integers, so rint(clamp(v)) = clamp(rint(v)) — the same codes (also for
    NaN and ±inf, which get the same bound) with two min/max an element fewer. For callers whose z is one
    value per sample or per channel (GroupNorm, the quantize kernel); where z is one per row (the GEMMs'
    fused quantize, the epilogues' output codes) the per-row bounds cost registers instead — 172 → 225
    and spills in the fused GEMMs on sm_90a (`kernel_asm.py`, 29 Nov) — so they round first."""
    if CLAMP_FIRST:
        z = zero.to(tl.float32)
        v = tl.minimum(tl.maximum(u * s_inv, QMIN - z), QMAX - z)
        return (((v + 12582912.0) - 12582912.0) + z).to(tl.int8)
    else:
        v = tl.minimum(tl.maximum(u * s_inv, -4194304.0), 4194304.0)
        v = ((v + 12582912.0) - 12582912.0) + zero.to(tl.float32)
        return tl.minimum(tl.maximum(v, QMIN), QMAX).to(tl.int8)


@triton.jit
def quantize_output(y, rn, n_mask, g, s_inv_ptr, zero_ptr, r_inv_ptr,
                    HAS_RINV: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """int8 codes of an fp32 epilogue tile y[rows, rn] for the next layer: `quantize_uniform` with
    its tables s_inv[g], zero[g] (g the rows' timestep groups) and, optionally, its per-channel TCR
    reciprocal r_inv[rn], multiplied first as on the host."""
    if HAS_RINV:
        y = y * tl.load(r_inv_ptr + rn, mask=n_mask, other=1.0)[None, :]
    return quantize_uniform(y, tl.load(s_inv_ptr + g)[:, None], tl.load(zero_ptr + g)[:, None], QMIN, QMAX)


@triton.jit
def quantize_log2(x, s_inv, LEVEL_MAX: tl.constexpr, ZERO_CODE: tl.constexpr):
    """log2 codes (int32 values in [0, ZERO_CODE]) of `x` with scale 1/s_inv.

    With y = 1.m·2^e, rint(-log2 y) = -e - [1.m ≥ √2]; x ≤ 0, NaN, subnormals and anything below
    level LEVEL_MAX get ZERO_CODE, exactly like `primitives.quantize_log2`.
    """
    y = x.to(tl.float32) * s_inv
    bits = y.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    above_sqrt2 = ((bits & 0x7FFFFF) > 0x3504F3).to(tl.int32)
    code = tl.maximum(-exponent - above_sqrt2, 0)
    is_zero = (y > 0) == 0
    is_zero = is_zero | (code > LEVEL_MAX)
    return tl.where(is_zero, ZERO_CODE, code)


@triton.jit
def unpack_int4_rows(p, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Widen packed int4 `p` [ROWS, COLS//2] (uint8, low nibble = even column) to int8 [ROWS, COLS].

    Hopper has no 4-bit MMA (DESIGN.md §4): int4 is a storage format, multiplied as int8.
    """
    lo = (p << 4).to(tl.int8, bitcast=True) >> 4
    hi = p.to(tl.int8, bitcast=True) >> 4
    return tl.reshape(tl.join(lo, hi), (ROWS, COLS))
