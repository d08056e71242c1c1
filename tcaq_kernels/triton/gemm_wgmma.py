"""W8A8 and W4A8 GEMM for Hopper in Gluon: int8 wgmma kept in flight while the next tiles load.

Why a second GEMM: Triton 3.6 compiles `tl.dot` on int8 to `wgmma … s32.s8.s8` but waits for each one
before issuing the next (`wgmma.wait_group 0`; bf16 and fp8 loops keep one in flight — see
`benchmarks/kernel_asm.py --probe`), so the int8 kernel cannot reach the tensor cores' int8 rate. Gluon
exposes the instruction directly: here each K step issues its MMA asynchronously and waits only for the
previous one (`warpgroup_mma_wait(1)`), and a ring of STAGES shared-memory buffers is filled by cp.async
STAGES-1 steps ahead.

Activations come as int8 codes or as floats: then each step loads the float tile from its buffer into
registers, quantizes it with `numerics.quantize_uniform` (per-row timestep-group tables, optional TCR 1/r
per column) and stores the codes to one of two shared buffers the MMA reads. (A from registers would skip
that store, but Triton 3.6 cannot lower a wait that keeps int8 register operands alive: "Unexpected
bitwidth in WGMMAWaitGroupOp: 8".)
The epilogue is `gemm.linear_epilogue` itself (bias, residual, float or next-layer int8 output), so the
numbers are the `tl.dot` kernel's. Packed int4 weights arrive as half the bytes and are widened to int8
in registers (`numerics.unpack_int4_rows`), then stored to a double buffer the MMA reads, like the float
path's codes. Split-K as in `gemm.py`: each program of a split reduces its K range into int32 partial
sums, and `qgemm` finishes with the same split-K epilogue kernel.
"""
from __future__ import annotations

import torch
import triton
from triton.runtime.jit import constexpr_function
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .gemm import linear_epilogue
from .numerics import quantize_uniform, tuning_bench, unpack_int4_rows

#: (BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps). 128×256 is left out: its accumulator alone fills half of
#: the 255 registers and ptxas spills (benchmarks/kernel_asm.py). BLOCK_K 64 for short K (K = 320 is 2.5
#: steps of 128).
CONFIGS = [(128, 128, 128, 4, 8), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4),
           (128, 128, 64, 6, 8), (128, 64, 64, 6, 4)]


@constexpr_function
def _instr_n(BLOCK_M, BLOCK_N, num_warps):
    """The widest wgmma N for int8 (a multiple of 16 up to 224, dividing the warps' share of BLOCK_N)."""
    m_reps = triton.cdiv(BLOCK_M, 16)
    n_reps = triton.cdiv(num_warps, m_reps)
    max_n = max(BLOCK_N // n_reps, 16)
    n = 224
    while n > max_n or BLOCK_N % n != 0:
        n -= 16
    return n


@constexpr_function
def _warps(BLOCK_M, num_warps):
    """Warps along M first (each warpgroup takes 64 rows), the rest along N."""
    along_m = min(num_warps, max(4, BLOCK_M // 16))
    return [along_m, num_warps // along_m]


@constexpr_function
def _copy_layout(rows, cols, elem_bits, num_warps):
    """Registers of a [rows, cols] tile for cp.async: 16 bytes per thread along the contiguous dim."""
    vec = 128 // elem_bits
    along_k = min(32, cols // vec)
    return gl.BlockedLayout([1, vec], [32 // along_k, along_k], [num_warps, 1], [1, 0])


@constexpr_function
def _epilogue_layout(BLOCK_N, num_warps):
    """Registers of the output tile for the epilogue: 8 consecutive columns per thread, a warp's threads
    along N first, so each row's stores are whole 16-byte pieces of contiguous memory (the wgmma layout
    gives a thread 2 columns of 8 rows apart, a quarter of each 32-byte sector per store)."""
    along_n = min(32, BLOCK_N // 8)
    return gl.BlockedLayout([1, 8], [32 // along_n, along_n], [num_warps, 1], [1, 0])


def smem_bytes(config: triton.Config, a_bytes: int, w4: bool, a_float: bool) -> int:
    """Shared memory the kernel allocates with this config: the STAGES ring of both operands, plus the two
    code buffers of a float input and the two widened-weight buffers of int4 weights."""
    bm, bn, bk, st = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "STAGES"))
    return st * (bm * bk * a_bytes + bn * (bk // 2 if w4 else bk)) + 2 * bm * bk * a_float + 2 * bn * bk * w4


def _prune(configs, named_args, **kwargs):
    """The configs whose buffers fit the card's shared memory (an fp32 input quadruples the A ring)."""
    a = named_args["a_ptr"]
    limit = torch.cuda.get_device_properties(a.device).shared_memory_per_block_optin
    fits = [c for c in configs if smem_bytes(c, a.element_size(), kwargs["W4"], kwargs["A_FLOAT"]) <= limit]
    if not fits:
        raise ValueError(f"gemm_wgmma: no config fits {limit} bytes of shared memory for {a.dtype} input")
    return fits


@gluon.jit
def _ready_w_operand(w_smem, w8_smem, s, i, w_copy: gl.constexpr, W4: gl.constexpr, SYNC_W4: gl.constexpr,
                     STAGES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """The head of ring step i (slot s), shared by the Gluon kernels: wait for the step's cp.async copies
    (this thread's, then everyone's), fence them for the MMA's async proxy, and return the weight operand
    — the slot itself, or for packed int4 its int8 widening in registers (Hopper has no 4-bit MMA) stored
    to buffer i % 2, which MMA i-2 last read and the previous step's wait retired. `SYNC_W4` false leaves
    the widened buffer's fence and barrier to the caller (the float-input GEMM does both after its codes)."""
    async_copy.wait_group(STAGES - 2)
    gl.thread_barrier()
    fence_async_shared()
    if W4:
        w8 = w8_smem.index(i % 2)
        w8.store(unpack_int4_rows(w_smem.index(s).load(w_copy), BLOCK_N, BLOCK_K))
        if SYNC_W4:
            fence_async_shared()
            gl.thread_barrier()
        w_op = w8.permute((1, 0))
    else:
        w_op = w_smem.index(s).permute((1, 0))
    return w_op


@gluon.jit
def _epilogue_tile(acc, off_m, off_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The accumulator in `_epilogue_layout` with its global rows and columns. (Working in the wgmma layout
    instead — 20–35 % fewer epilogue instructions, but 142–200 registers at BLOCK_N = 128 and half-sector
    stores — timed 0.92× (GEMM) and 0.96× (conv) median on an H200: benchmarks/results/wgmma-variants-h200/.)"""
    epi: gl.constexpr = _epilogue_layout(BLOCK_N, gl.num_warps())
    acc = gl.convert_layout(acc, epi)
    em = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, epi))
    en = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, epi))
    return acc, em, en


@gluon.jit
def _store_partials(part_ptr, acc, em, en, M, N):
    """A split program's int32 partial sums into its [M, N] slice of the workspace; `gemm.py`'s and `conv.py`'s
    split-K epilogue kernels add the slices in split order and finish."""
    part = part_ptr + gl.program_id(1).to(gl.int64) * M * N + em.to(gl.int64)[:, None] * N + en[None, :]
    gl.store(part, acc, mask=(em < M)[:, None] & (en < N)[None, :])


@gluon.jit
def _load_stage(a_smem, w_smem, a_ptrs, w_ptrs, m_ok, n_ok, ka, kw, k_left, w_left, live):
    """cp.async of one K step of both operands (zeros past M, N and K, and for steps past this program's
    range: `live` false), as one commit group. `w_left` counts the weight row's remaining bytes (half of
    `k_left`, rounded up, for packed int4)."""
    async_copy.async_copy_global_to_shared(a_smem, a_ptrs, mask=(m_ok & live)[:, None] & (ka < k_left)[None, :])
    async_copy.async_copy_global_to_shared(w_smem, w_ptrs, mask=(n_ok & live)[:, None] & (kw < w_left)[None, :])
    async_copy.commit_group()


@gluon.jit
def _w8a8_wgmma_kernel(
    a_ptr, w_ptr, w_sum_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, part_ptr,
    r_inv_ptr, s_inv_ptr, scale_ptr, zero_ptr, group_ptr, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr,
    M, N, K, KW, k_per_split, rows_per_sample, group_stride, stride_am, stride_wn, stride_rm, stride_rn, stride_om,
    A_FLOAT: gl.constexpr, HAS_RINV: gl.constexpr, QMIN: gl.constexpr, QMAX: gl.constexpr, W4: gl.constexpr,
    SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr,
    OUT_Q: gl.constexpr, OUT_HAS_RINV: gl.constexpr, OUT_QMIN: gl.constexpr, OUT_QMAX: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
):
    num_warps: gl.constexpr = gl.num_warps()
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid = gl.program_id(0)
    off_m = (pid % num_m) * BLOCK_M  # neighbouring programs share a weight tile while it is in L2
    off_n = (pid // num_m) * BLOCK_N

    a_ty: gl.constexpr = a_ptr.dtype.element_ty
    WK: gl.constexpr = BLOCK_K // 2 if W4 else BLOCK_K  # weight bytes per row and step (KW: per whole row;
    # an argument, not (K + 1) // 2, so the JIT knows when it is a multiple of 16 and cp.async can move 16 bytes)
    a_copy: gl.constexpr = _copy_layout(BLOCK_M, BLOCK_K, a_ty.primitive_bitwidth, num_warps)
    w_copy: gl.constexpr = _copy_layout(BLOCK_N, WK, 8, num_warps)
    rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_copy))
    ka = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_copy))
    rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_copy))
    kw = gl.arange(0, WK, layout=gl.SliceLayout(0, w_copy))
    if SPLIT_K > 1:  # this program reduces k in [k_lo, k_hi); k_per_split is a multiple of BLOCK_K
        k_lo = gl.program_id(1) * k_per_split
        k_hi = gl.minimum(k_lo + k_per_split, K)
    else:
        k_lo = 0
        k_hi = K
    num_k = (k_hi - k_lo + BLOCK_K - 1) // BLOCK_K
    K_rest = K - k_lo  # masks count from the split's first column
    KW_rest = KW - k_lo * WK // BLOCK_K
    a_ptrs = a_ptr + rm.to(gl.int64)[:, None] * stride_am + (k_lo + ka)[None, :]
    w_ptrs = w_ptr + rn.to(gl.int64)[:, None] * stride_wn + (k_lo * WK // BLOCK_K + kw)[None, :]
    m_ok = rm < M
    n_ok = rn < N

    a_smem = gl.allocate_shared_memory(a_ty, [STAGES, BLOCK_M, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], a_ty))
    w_ty: gl.constexpr = w_ptr.dtype.element_ty
    w_smem = gl.allocate_shared_memory(w_ty, [STAGES, BLOCK_N, WK], gl.NVMMASharedLayout.get_default_for([BLOCK_N, WK], w_ty))
    for p in gl.static_range(STAGES - 1):  # prologue: steps 0 … STAGES-2 in flight (empty masks past K)
        _load_stage(a_smem.index(p), w_smem.index(p), a_ptrs + p * BLOCK_K, w_ptrs + p * WK,
                    m_ok, n_ok, ka, kw, K_rest - p * BLOCK_K, KW_rest - p * WK, p < num_k)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=_warps(BLOCK_M, num_warps), instr_shape=[16, _instr_n(BLOCK_M, BLOCK_N, num_warps), 32])
    if A_FLOAT:  # the quantizer's per-row tables, once, and two buffers for the codes
        qg = gl.load(group_ptr + ((rm % M) // rows_per_sample) * group_stride)
        q_s_inv = gl.load(s_inv_ptr + qg)[:, None]
        q_zero = gl.load(zero_ptr + qg)[:, None]
        q_smem = gl.allocate_shared_memory(gl.int8, [2, BLOCK_M, BLOCK_K],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8))
    if W4:  # two buffers for the widened weights
        w8_smem = gl.allocate_shared_memory(gl.int8, [2, BLOCK_N, BLOCK_K],
                                            gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8))
    else:
        w8_smem = w_smem  # not read: the int8 slots are the operand

    acc = gl.zeros((BLOCK_M, BLOCK_N), gl.int32, mma_layout)
    for i in range(num_k):
        s = i % STAGES
        w_op = _ready_w_operand(w_smem, w8_smem, s, i, w_copy, W4, not A_FLOAT, STAGES, BLOCK_N, BLOCK_K)
        if A_FLOAT:
            u = a_smem.index(s).load(a_copy).to(gl.float32)
            if HAS_RINV:
                u = u * gl.load(r_inv_ptr + k_lo + i * BLOCK_K + ka, mask=ka < K_rest - i * BLOCK_K, other=1.0)[None, :]
            # lanes past K become the code z here, but meet zero weights. Buffer i % 2 was last read by
            # MMA i-2, which the previous step's wait retired.
            codes = q_smem.index(i % 2)
            codes.store(quantize_uniform(u, q_s_inv, q_zero, QMIN, QMAX))
            fence_async_shared()
            gl.thread_barrier()
            a_op = codes
        else:
            a_op = a_smem.index(s)
        acc = warpgroup_mma(a_op, w_op, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        # step i-1's MMA is done: its buffers take step i+STAGES-1 (every warpgroup past the wait first)
        gl.thread_barrier()
        j = i + STAGES - 1
        _load_stage(a_smem.index(j % STAGES), w_smem.index(j % STAGES), a_ptrs + j * BLOCK_K, w_ptrs + j * WK,
                    m_ok, n_ok, ka, kw, K_rest - j * BLOCK_K, KW_rest - j * WK, j < num_k)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)

    acc, em, en = _epilogue_tile(acc, off_m, off_n, BLOCK_M, BLOCK_N)
    if SPLIT_K > 1:
        _store_partials(part_ptr, acc, em, en, M, N)
        return
    g = gl.load(group_ptr + ((em % M) // rows_per_sample) * group_stride)
    linear_epilogue(acc, em, en, M, N, gl.load(zero_ptr + g), g, w_sum_ptr, w_scale_ptr, scale_ptr, bias_ptr, res_ptr,
                    out_ptr, out_s_inv_ptr, out_zero_ptr, out_r_inv_ptr, stride_rm, stride_rn, stride_om,
                    HAS_BIAS, HAS_RES, OUT_Q, OUT_HAS_RINV, OUT_QMIN, OUT_QMAX)


_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st}, num_warps=w)
             for bm, bn, bk, st, w in CONFIGS],
    key=["M", "N", "K", "A_FLOAT", "W4", "SPLIT_K", "HAS_RES", "OUT_Q"],
    prune_configs_by={"early_config_prune": _prune}, do_bench=tuning_bench,
)(_w8a8_wgmma_kernel)


def supported(a2: torch.Tensor, w_op: torch.Tensor) -> bool:
    """Whether `qgemm` may hand this call to the wgmma kernel: sm_90, at least one 64-row tile, and operand
    rows whose byte strides are 16-byte multiples (cp.async moves 16 bytes per thread; packed int4 rows
    are ⌈K/2⌉ bytes)."""
    return (a2.is_cuda and torch.cuda.get_device_capability(a2.device) == (9, 0)
            and w_op.dtype in (torch.int8, torch.uint8) and a2.shape[0] >= 64 and a2.stride(1) == 1
            and w_op.stride(1) == 1 and (a2.stride(0) * a2.element_size()) % 16 == 0 and w_op.stride(0) % 16 == 0)


def launch(a2, w_op, w_sum, w_scale, bias_arg, res, out, part, r_inv, s_inv, scale, zero, group,
           out_tables: tuple, k_per_split: int, split_k: int, rows_per_sample: int, group_stride: int, a_bits: int,
           tail: dict) -> None:
    """The wgmma kernel in `qgemm`'s place, same arguments (`tail`: qgemm's HAS_BIAS, HAS_RES, SPLIT_K and
    output-quantizer constexprs); with split_k > 1 it writes int32 partial sums to `part` and `qgemm` runs
    the split-K epilogue kernel after it, as for its own kernel."""
    M, K = a2.shape
    N = w_op.shape[0]
    a_float = a2.dtype != torch.int8
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)
    _tuned[grid](
        a2, w_op, w_sum, w_scale, bias_arg, res, out, part,
        r_inv if r_inv is not None else s_inv, s_inv, scale, zero, group, *out_tables,
        M, N, K, w_op.shape[1], k_per_split, rows_per_sample, group_stride, a2.stride(0), w_op.stride(0),
        res.stride(0), res.stride(1), out.stride(0),
        A_FLOAT=a_float, HAS_RINV=a_float and r_inv is not None, QMIN=-(1 << (a_bits - 1)), QMAX=(1 << (a_bits - 1)) - 1,
        W4=w_op.dtype == torch.uint8, **tail,
    )
