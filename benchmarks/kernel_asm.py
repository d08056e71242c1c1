"""What the Triton GEMMs compile to on Hopper, without a GPU: MMA instruction, pipelining, registers, spills.

Why: the Nsight profile (benchmarks/results/profiles/ncu.md) shows the W4A8 kernels at 255 registers
with local-memory spills and the large-shape configs at 12 % theoretical occupancy, and device time is scarce.
Triton cross-compiles for sm_90a on any machine and ptxas reports registers and spills, so a change to a
kernel or a config can be checked here before it costs device minutes. For each variant and each
autotune config the shape keeps (`_prune`), this compiles `_qgemm_kernel` as the JIT would (pointers and
ints ≡ 0 mod 16 marked divisible, ints equal to 1 specialised) and reports:

* the MMA: `wgmma` (Hopper's asynchronous warpgroup MMA) or `mma.sync` (the Ampere instruction);
* the deepest `wgmma.wait_group` count (0: each MMA is waited for before the next is issued — what
  Triton 3.6 does with every int8 `tl.dot`; 1: one MMA in flight — the `…-wgmma` variants, the Gluon
  kernel of `gemm_wgmma.py` on int8 codes or bf16 input, int8 or packed int4 weights);
* whether operands arrive by `cp.async` (software pipeline) or only by plain loads;
* registers per thread, spill stores/loads (bytes) and shared memory per block;
* the machine code's instruction counts (`sass_profile`): each loop's body — the main loop's per-step cost,
  marked * where it issues wgmma — and the straight-line tail after the last loop (the epilogue). Per-step
  instructions × warps / 4 schedulers against the step's MMA cycles tells an issue-bound loop; a loop after
  the MMA loop is an epilogue paid per tap or row (the conv's padding term once was: 235 × 9 per tile).

`--probe` first compiles a bare K loop `acc = tl.dot(a, tl.trans(b), acc)` (operands straight from
memory, nothing else) in int8, fp8 and bf16: the yardstick for what Triton's pipeliner does per dtype.

    python benchmarks/kernel_asm.py --probe --shape 8192x2560x320 --shape 128x1280x5120
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter's single config

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tcaq_kernels.triton import conv, conv_wgmma, gemm, gemm_wgmma, groupnorm  # noqa: E402
from tcaq_kernels.triton.numerics import SILU_EXACT, SILU_FAST  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # Triton's own ptxas, cuobjdump
WGMMA_VARIANTS = ("w8a8-wgmma", "w4a8-wgmma", "w8a8-fused-wgmma", "w4a8-fused-wgmma", "w4a8-fused-split-wgmma")
VARIANTS = {  # name: (A operand, packed int4 weights)
    "w8a8": ("*i8", False), "w4a8": ("*i8", True), "w8a8-fused": ("*bf16", False), "w4a8-fused": ("*bf16", True),
}


@triton.jit
def _probe_kernel(a_ptr, b_ptr, c_ptr, K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK, BLOCK), 0, c_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + r[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + r[:, None] * K + (k0 + rk)[None, :])
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=c_ptr.dtype.element_ty)
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], acc)


def compile_probe(in_type: str, out_type: str):
    src = ASTSource(fn=_probe_kernel, signature={"a_ptr": in_type, "b_ptr": in_type, "c_ptr": out_type, "K": "constexpr",
                                                 "BLOCK": "constexpr", "BLOCK_K": "constexpr"},
                    constexprs={"K": 1024, "BLOCK": 128, "BLOCK_K": 64},
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(3)})
    return triton.compile(src, target=TARGET, options={"num_warps": 4, "num_stages": 3})


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def specialise(arg_names, args: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource as the JIT would build them from `args` (name → (type,
    value); value None for pointers): ints equal to 1 become constants, pointers and ints ≡ 0 mod 16 are
    marked divisible by 16 (torch's allocations are 16-byte aligned)."""
    signature, constexprs, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        typ, value = args[name]
        if value == 1:
            signature[name], constexprs[name] = "constexpr", 1
            continue
        signature[name] = typ
        if value is None or value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def kernel_args(M: int, N: int, K: int, a_type: str, w4: bool) -> dict:
    """The runtime arguments of `qgemm` for a bf16-output GEMM with bias (the benchmark's call): type and
    value, values only where the JIT specialises on them (strides and sizes)."""
    ptr = lambda t: (t, None)
    return {
        "a_ptr": ptr(a_type), "w_ptr": ptr("*u8" if w4 else "*i8"), "w_sum_ptr": ptr("*i32"), "w_scale_ptr": ptr("*fp32"),
        "bias_ptr": ptr("*bf16"), "res_ptr": ptr("*bf16"), "out_ptr": ptr("*bf16"), "part_ptr": ptr("*bf16"),
        "r_inv_ptr": ptr("*fp32"), "s_inv_ptr": ptr("*fp32"), "scale_ptr": ptr("*fp32"), "zero_ptr": ptr("*i32"),
        "group_ptr": ptr("*i32"), "out_s_inv_ptr": ptr("*bf16"), "out_zero_ptr": ptr("*bf16"), "out_r_inv_ptr": ptr("*bf16"),
        "M": ("i32", M), "N": ("i32", N), "K": ("i32", K), "KW": ("i32", (K + 1) // 2 if w4 else K), "k_per_split": ("i32", K), "rows_per_sample": ("i32", M // 2),
        "group_stride": ("i32", 1), "stride_am": ("i32", K), "stride_ak": ("i32", 1),
        "stride_wn": ("i32", (K + 1) // 2 if w4 else K), "stride_rm": ("i32", N), "stride_rn": ("i32", 1),
        "stride_om": ("i32", N),
    }


def compile_variant(M, N, K, variant: str, config: triton.Config):
    a_type, w4 = VARIANTS[variant]
    fn = _jit_function(gemm._qgemm_kernel)
    constexprs = dict(A_FLOAT=a_type != "*i8", HAS_RINV=False, QMIN=-128, QMAX=127, W4=w4, HAS_BIAS=True,
                      HAS_RES=False, SPLIT_K=1, OUT_Q=False, OUT_HAS_RINV=False, OUT_QMIN=-128, OUT_QMAX=127,
                      **config.kwargs, EVEN_K=K % config.kwargs["BLOCK_K"] == 0)
    signature, constexprs, attrs = specialise(fn.arg_names, kernel_args(M, N, K, a_type, w4), constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def compile_wgmma(M, N, K, config: tuple, a_float: bool = False, w4: bool = False, split_k: int = 1):
    """`gemm_wgmma`'s Gluon kernel with one of its CONFIGS, as its launcher calls it (bias, bf16 output;
    `a_float`: bf16 activations quantized in registers; `w4`: packed int4 weights; `split_k` > 1: the
    program writing int32 partial sums)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    bm, bn, bk, stages, warps = config
    fn = gemm_wgmma._w8a8_wgmma_kernel
    args = kernel_args(M, N, K, "*bf16" if a_float else "*i8", w4)  # the two kernels share these names
    constexprs = dict(A_FLOAT=a_float, HAS_RINV=False, QMIN=-128, QMAX=127, W4=w4, SPLIT_K=split_k, HAS_BIAS=True, HAS_RES=False, OUT_Q=False,
                      OUT_HAS_RINV=False, OUT_QMIN=-128, OUT_QMAX=127, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                      STAGES=stages)
    signature, constexprs, attrs = specialise(fn.arg_names, args, constexprs)
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": 1})


def compile_conv_wgmma(shape: tuple, config: tuple, w4: bool = False, split_k: int = 1, c2: int | None = None,
                       up: int = 1):
    """`conv_wgmma`'s Gluon kernel for an NHWC conv (B, C, H, W, N, k, stride; padding k // 2), bf16 output
    with bias, int8 or packed int4 weights (`split_k` > 1: the program writing int32 partial sums; `c2`: a
    split input whose second channel range starts there, two int32 sums; `up` 2: the input read as the
    nearest 2× upsampling of its codes, H × W being the upsampled size)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    B, C, H, W, N, k, stride = shape
    bm, bn, bk, stages, warps = config
    OH, OW = conv.conv_output_size(H, W, k, k, stride, (k // 2,) * 4)
    c1, c_2 = (C, 0) if c2 is None else (c2, C - c2)
    cw = lambda c: (c + 1) // 2 if w4 else c
    w_ty = "*u8" if w4 else "*i8"
    ptrs = dict(x_ptr="*i8", w_ptr=w_ty, w_pad_sum_ptr="*i32", w_scale_ptr="*fp32", bias_ptr="*bf16",
                res_ptr="*bf16", out_ptr="*bf16", part_ptr="*i32" if split_k > 1 else "*bf16", scale_ptr="*fp32", zero_ptr="*i32", group_ptr="*i32",
                out_s_inv_ptr="*bf16", out_zero_ptr="*bf16", out_r_inv_ptr="*bf16",
                w2_ptr=w_ty, w2_pad_sum_ptr="*i32", scale2_ptr="*fp32", zero2_ptr="*i32")
    ints = dict(B=B, H=H, W=W, C=c1, CW=cw(c1), C2=c_2, CW2=cw(c_2 or c1), N=N, OH=OH, OW=OW, pad_h=k // 2,
                pad_w=k // 2, clip_b=k // 2, clip_l=k // 2, clip_r=k // 2, group_stride=1, stride_wn=k * k * cw(c1), stride_w2n=k * k * cw(c_2 or c1),
                stride_rb=N * OH * OW, stride_rc=1, stride_rh=OW * N, stride_rw=N)
    args = {**{n: (t, None) for n, t in ptrs.items()}, **{n: ("i32", v) for n, v in ints.items()}}
    constexprs = dict(KH=k, KW=k, STRIDE=stride, UP=up, PADDED=k > 1, W4=w4, SPLIT_K=split_k, HAS_BIAS=True,
                      HAS_RES=False, TWO_Q=c2 is not None, OUT_Q=False, OUT_HAS_RINV=False, OUT_QMIN=-128, OUT_QMAX=127,
                      EVEN_C=conv.even_channel_blocks(dict(C=c1, C2=c_2, BLOCK_K=bk)), EVEN_N=N % bn == 0,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages)
    fn = conv_wgmma._qconv_wgmma_kernel
    signature, constexprs, attrs = specialise(fn.arg_names, args, constexprs)
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": 1})


def compile_groupnorm(S: int, C: int, num_groups: int, silu: int):
    """`groupnorm`'s one-pass GroupNorm + SiLU + quantize kernel as its launcher calls it for a bf16 NHWC input
    of S pixels × C channels (affine, TCR, 8-bit codes; `silu`: a `numerics.silu` mode)."""
    fn = _jit_function(groupnorm._gn_one_pass_kernel)
    tile = groupnorm.one_pass_tile(S, C, num_groups)
    groups, block_s, block_c = tile
    p = lambda t: (t, None)
    i32 = lambda v: ("i32", v)
    args = dict(x_ptr=p("*bf16"), out_ptr=p("*i8"), gamma_ptr=p("*bf16"), beta_ptr=p("*bf16"), r_inv_ptr=p("*fp32"),
                s_inv_ptr=p("*fp32"), zero_ptr=p("*fp32"), s_inv2_ptr=p("*fp32"), zero2_ptr=p("*fp32"),
                group_ptr=p("*i32"), S=i32(S), C=i32(C), C2=i32(0), CG=i32(C // num_groups), eps=("fp32", 0),
                group_stride=i32(1), stride_xb=i32(S * C), stride_xs=i32(C), stride_xc=i32(1), stride_ob=i32(S * C),
                stride_os=i32(C), x2_ptr=p("*bf16"), C1=i32(C), stride_x2b=i32(S * C), stride_x2s=i32(C),
                stride_x2c=i32(1))
    constexprs = dict(HAS_AFFINE=True, HAS_RINV=True, QMIN=-128, QMAX=127, SILU=silu, CODES=True, TWO_Q=False,
                      TWO_X=False, GROUPS=groups, G_P2=triton.next_power_of_2(groups), BLOCK_S=block_s,
                      BLOCK_C=block_c, FULL=groupnorm.full_tile(S, C // num_groups, tile))
    signature, constexprs, attrs = specialise(fn.arg_names, args, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": groupnorm.one_pass_warps(tile), "num_stages": 1})


def ptxas_usage(ptx: str, arch: str = "sm_90a") -> dict:
    """Registers and spill bytes as ptxas reports them for `ptx` (Triton's own ptxas)."""
    ptxas = NVIDIA_BIN / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else 0, "spill_load_bytes": int(spill.group(2)) if spill else 0}


def sass_profile(cubin: bytes) -> dict:
    """Instruction counts of the machine code (Triton's bundled cuobjdump): each loop — a backward branch's
    body, i.e. one step's instructions, `mma` where it issues wgmma, `mufu` its special-function ops (a
    division's reciprocal shows as MUFU.RCP) — in address order, and `tail`, the
    instructions after the last loop (a kernel's epilogue; NOP padding not counted). A step's count times
    the warps against its MMA cycles says whether a loop is issue-bound; a loop after the MMA loop is an
    epilogue paid per tap or per row (the conv's padding term was one, 235 instructions × 9 taps)."""
    tool = NVIDIA_BIN / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", text)]
    index = {a: i for i, (a, _) in enumerate(code)}
    loops = []
    for i, (addr, op) in enumerate(code):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            body = code[index[int(target.group(1), 16)]:i + 1]
            loops.append({"instructions": len(body), "mma": any("GMMA" in o for _, o in body),
                          "mufu": sum("MUFU." in o for _, o in body), "end": i})
    after = code[loops[-1]["end"] + 1:] if loops else code
    tail = sum(1 for _, op in after if not op.endswith("NOP") and not op.startswith("NOP"))
    return {"loops": [{k: v for k, v in loop.items() if k != "end"} for loop in loops], "tail": tail}


def describe(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    mma = re.findall(r"(wgmma\.mma_async\S*|mma\.sync\S*)", ptx)
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    return {
        "mma": sorted(set(mma)), "mma_count": len(mma), "max_wgmma_wait": max(waits) if waits else None,
        "cp_async": "cp.async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
        "shared_bytes": compiled.metadata.shared, **ptxas_usage(ptx),
        **{f"sass_{k}": v for k, v in sass_profile(compiled.asm["cubin"]).items()},
    }


def configs_for(M: int, K: int) -> list[triton.Config]:
    return gemm._prune(gemm._configs(), {"M": M, "K": K, "k_per_split": K})


def _print(r: dict) -> None:
    mma = ",".join(m.split(".")[0] + "." + m.split(".")[-3] for m in r["mma"]) or "-"
    loops = "/".join(f"{x['instructions']}{'*' if x['mma'] else ''}" for x in r["sass_loops"]) or "-"
    print(f"{r['shape']:>22} {r['variant']:<11} {r['config']:<20} {mma:<18} wait≤{r['max_wgmma_wait']} "
          f"cp.async={r['cp_async']:d} regs={r['registers']} spill={r['spill_store_bytes']}/{r['spill_load_bytes']} B "
          f"smem={r['shared_bytes'] // 1024} KB loops={loops} tail={r['sass_tail']}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", default=[], help="MxNxK (repeatable)")
    p.add_argument("--probe", action="store_true", help="first the bare dot loop in int8, fp8 and bf16")
    p.add_argument("--conv", action="append", default=[], metavar="B,C,H,W,N,k,stride",
                   help="also the Gluon conv (int8 and int4 weights, every config) on this NHWC shape (repeatable)")
    p.add_argument("--variants", default=",".join([*VARIANTS, *WGMMA_VARIANTS]),
                   help="of the tl.dot kernel, and w{8,4}a8[-fused]-wgmma (the Gluon kernel of gemm_wgmma.py)")
    p.add_argument("--groupnorm", action="append", default=[], metavar="S,C,G",
                   help="also the one-pass GroupNorm + SiLU + quantize kernel (S pixels, C channels, G groups), "
                        "with torch's SiLU formula (the interpreter's) and the GPU's fast one (repeatable)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    rows = []
    if a.probe:
        for name, in_type, out_type in (("int8", "*i8", "*i32"), ("fp8", "*fp8e4nv", "*fp32"), ("bf16", "*bf16", "*fp32")):
            info = describe(compile_probe(in_type, out_type))
            rows.append({"shape": "probe 128x128, K 1024", "variant": name, "config": "128x128x64 w4 s3", **info})
            _print(rows[-1])
    for shape in a.shape:
        M, N, K = (int(v) for v in shape.lower().split("x"))
        for variant in a.variants.split(","):
            if variant.endswith("-wgmma"):
                for cfg in gemm_wgmma.CONFIGS:
                    w4 = variant.startswith("w4")
                    info = describe(compile_wgmma(M, N, K, cfg, a_float="-fused" in variant, w4=w4,
                                                  split_k=2 if "-split" in variant else 1))
                    rows.append({"shape": shape, "variant": variant, "config": "{}x{}x{} w{w} s{s}".format(
                        *cfg[:3], w=cfg[4], s=cfg[3]), **info})
                    _print(rows[-1])
                continue
            for cfg in configs_for(M, K):
                tile = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**cfg.kwargs) + f" w{cfg.num_warps} s{cfg.num_stages}"
                info = describe(compile_variant(M, N, K, variant, cfg))
                rows.append({"shape": shape, "variant": variant, "config": tile, **info})
                _print(rows[-1])
    for text in a.conv:
        shape = tuple(int(v) for v in text.split(","))
        for w4, split_k in ((False, 1), (True, 1), (True, 2)):
            for cfg in conv_wgmma.CONFIGS:
                info = describe(compile_conv_wgmma(shape, cfg, w4, split_k))
                variant = ("w4a8" if w4 else "w8a8") + ("-conv-split-wgmma" if split_k > 1 else "-conv-wgmma")
                rows.append({"shape": "conv " + text, "variant": variant,
                             "config": "{}x{}x{} w{w} s{s}".format(*cfg[:3], w=cfg[4], s=cfg[3]), **info})
                _print(rows[-1])
    for text in a.groupnorm:
        S, C, G = (int(v) for v in text.split(","))
        tile = groupnorm.one_pass_tile(S, C, G)
        if tile is None:
            p.error(f"--groupnorm {text}: a group of {S} pixels × {C // G} channels does not fit the one-pass kernel")
        for name, mode in (("exact", SILU_EXACT), ("fast", SILU_FAST)):
            rows.append({"shape": "groupnorm " + text, "variant": f"gn-one-pass-silu-{name}",
                         "config": "{}x{} groups {}".format(*tile[1:], G),
                         **describe(compile_groupnorm(S, C, G, mode))})
            _print(rows[-1])
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
