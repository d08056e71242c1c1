"""Kernel micro-benchmarks: the Triton W8A8 / W4A8 GEMM and conv against the vendor libraries.

Every GEMM and conv shape of the SD-1.5 UNet (512 px, 64×64 latent) at batch 2 and 8 and of the
DDPM-CIFAR10 layout (channels 128/256/256/256, 32×32 … 4×4) at batch 256 (and with `--models embedded-b64,
embedded-b256` the embedded model's, whose step benchmarks/latency.py times), side by side in one run:
bf16 cuBLAS (`F.linear`), `torch._int_mm` (int32 out, no epilogue), fp8 `torch._scaled_mm`
(bf16 out), cuDNN bf16 conv (channels_last), and the Triton kernels. Time is the median of
`triton.testing.do_bench` over replays of a CUDA graph holding one call (L2 cleared before every
replay, no host launch overhead: the GPU time), on random data, never zeros. The eager per-call
time (Python launch path included) is recorded beside it as `eager_ms`, and `floor_ms` is the
roofline floor (HBM bytes at 3.0 TB/s vs dense tensor-core peak) of the impls whose bytes we know.

Rows (`--out`/kernels.json): {"op", "model", "shape", "count", "impl", "ms", "tops",
"speedup_vs_bf16", "card", "command", "config", "eager_ms", "floor_ms", "torch", "triton"}; `count` is how
often the shape occurs in one UNet call, `config` the Triton tile the autotuner chose. The markdown table beside
it has the medians.

Ops: "gemm", "conv" (below), "groupnorm" — a ResBlock's GroupNorm + SiLU before its conv:
"torch-bf16" (F.group_norm + F.silu, bf16, channels_last as the quantized convs write it),
"torch-bf16+quant" (the same, then the quantize kernel: what the unfused triton UNet runs) and
"triton-fused" (`groupnorm_silu_quantize`: one kernel reading x once where a sample's norm group fits
in registers, else statistics kernel + a pass writing the conv's codes), "triton-fused-two-kernel"
(always the latter, for comparison) and "triton-fused-looped" (`_gn_looped_kernel`: three sweeps over
32+-channel slices, the second and third meant to hit L2; opt-in in the UNet, TCAQ_GN_LOOPED=1);
the shapes and counts are the 44 norms of the 22 ResnetBlock2D of each UNet (derived from the
diffusers configs), 32 groups — and "gemm-splitk", the GEMM shapes whose output tiles leave SMs
idle (`choose_split_k` > 1 on this card), each Triton impl without split-K (`split_k=1`) and with
the heuristic's split ("-splitk"; the split count is appended to `config`) — and "conv-splitk",
the same for the conv shapes the heuristic splits (`conv_split_k`: SD's deep layers at small
batch), cuDNN bf16 beside them.

`--shapes` runs only the named shapes, `--impls` only the named columns (and each table's baseline);
`--profile` times nothing and writes nothing: it calls each impl once between cudaProfilerStart/Stop,
for Nsight Compute (`ncu --profile-from-start off …`), to explain a ratio.

Impls: "triton-w8a8" / "triton-w4a8" take int8 codes (GEMM only, like int_mm), as does "cutlass-w8a8" (the
CUTLASS Hopper GEMM of csrc/sm90, TMA and warp-specialized wgmma, sm_90 only, with its own tile choice, and
"cutlass-w8a8-<tile>" with each tile forced, "cutlass-w4a8" with packed int4 weights widened in registers, and
"cutlass-w8a8+quant" from the bf16 input through the quantize kernel first, to set against "triton-w8a8-fused";
the per-row z / s_a tables are made once per shape, outside the timing, as a UNet call would share them); the
"-fused" GEMM
rows take the bf16 activation as the UNet's linears do (`qlinear`): from `gemm.PREQUANTIZE_MIN_M` rows the
quantize kernel first, then the int8 kernel; below, or with TCAQ_PREQUANTIZE=0, quantized in the GEMM prologue
(the "triton-*" GEMM rows go through `qlinear`, so its routing switches — TCAQ_WGMMA, TCAQ_PREQUANTIZE,
TCAQ_CUTLASS_GEMM — apply to them: `ab_env.py` compares the routes);
"triton-w4a8-widen" (GEMM, conv; "-widen-fused" GEMM) is the W4A8 layer as the UNet runs it by default:
`widen.widen_int4` of the packed weight, then the int8 kernels (both launches timed); the other W4 rows
("triton-w4a8", "-fused", "gluon-w4a8", the split-K tables) time the kernels' in-loop widening;
"triton-w8a8+quant" conv rows take the bf16 NCHW (channels_last) activation: quantize kernel + conv.
The conv baseline "cudnn-bf16" is `F.conv2d` with the bias (torch's defaults); "cudnn-bf16-tuned" turns
`cudnn.benchmark` on and "cudnn-bf16-tuned-nobias" also drops the bias — the conv alone, as compiled bf16 runs it,
20–64 % faster than the biased call on an H200 (benchmarks/results/cudnn-baseline-h200/): compare against it too.

Command (repo root, GPU machine; the shapes were traced once from diffusers' UNet2DConditionModel /
UNet2DModel on the meta device, so diffusers is not needed here):

    PYTHONUNBUFFERED=1 python benchmarks/kernels.py --out benchmarks/results

(`--ops conv-splitk,gemm-splitk` runs only those rows and keeps the others from the earlier run;
`--render` rewrites kernels.md from kernels.json without a GPU, e.g. after merging the attention rows
of `tests/triton/test_attention.py --bench`.)

Where `import tcaq_kernels` would pull in diffusers and it is absent, put a stub package first on
the path: `mkdir -p /tmp/pk/tcaq_kernels && touch /tmp/pk/tcaq_kernels/__init__.py && for d in quant
ops triton; do ln -sfn $PWD/tcaq_kernels/$d /tmp/pk/tcaq_kernels/$d; done` and run with
`PYTHONPATH=/tmp/pk`.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton

from tcaq_kernels.ops import cuda_ext
from tcaq_kernels.ops.triton_ops import (groupnorm_silu_quantize, prepare_conv_weight, prepare_linear_weight,
                                         qconv2d, qlinear, quantize_act)
from tcaq_kernels.triton.conv import _qconv_kernel, conv_output_size, conv_split_k
from tcaq_kernels.triton import conv_wgmma, gemm_wgmma, widen
from tcaq_kernels.triton.gemm import _qgemm_kernel, choose_split_k, k_range_per_split, output_quantizer
from tcaq_kernels.triton import groupnorm
from tcaq_kernels.triton.groupnorm import _gn_silu_quantize_kernel

# (M, N, K, count per UNet call)
GEMM = {
    "sd15-b2": [
        (2, 320, 1280, 5), (2, 640, 1280, 5), (2, 1280, 320, 1), (2, 1280, 1280, 13),
        (128, 1280, 1280, 6), (128, 1280, 5120, 1), (128, 10240, 1280, 1),
        (154, 320, 768, 10), (154, 640, 768, 10), (154, 1280, 768, 12),
        (512, 1280, 1280, 30), (512, 1280, 5120, 5), (512, 10240, 1280, 5),
        (2048, 640, 640, 30), (2048, 640, 2560, 5), (2048, 5120, 640, 5),
        (8192, 320, 320, 30), (8192, 320, 1280, 5), (8192, 2560, 320, 5),
    ],
    "sd15-b8": [
        (8, 320, 1280, 5), (8, 640, 1280, 5), (8, 1280, 320, 1), (8, 1280, 1280, 13),
        (512, 1280, 1280, 6), (512, 1280, 5120, 1), (512, 10240, 1280, 1),
        (616, 320, 768, 10), (616, 640, 768, 10), (616, 1280, 768, 12),
        (2048, 1280, 1280, 30), (2048, 1280, 5120, 5), (2048, 10240, 1280, 5),
        (8192, 640, 640, 30), (8192, 640, 2560, 5), (8192, 5120, 640, 5),
        (32768, 320, 320, 30), (32768, 320, 1280, 5), (32768, 2560, 320, 5),
    ],
    "ddpm-cifar10-b256": [
        (256, 128, 512, 5), (256, 256, 512, 17), (256, 512, 128, 1), (256, 512, 512, 1),
        (4096, 256, 256, 4), (16384, 256, 256, 12), (65536, 256, 256, 8),
    ],
}
# The embedded model (tcaq_kernels/models/ddpm-cifar10-small: channels 64/128/128/128, attention at 16×16), whose
# UNet step benchmarks/latency.py times: its Linear layers as (tokens per sample, N, K, count per UNet call),
# traced from the model (tests/triton/test_kernels_bench.py re-traces them) — not in the default `--models`.
_EMBEDDED_GEMMS = [(1, 64, 256, 5), (1, 128, 256, 17), (1, 256, 64, 1), (1, 256, 256, 1), (16, 128, 128, 4),
                   (256, 128, 128, 20)]
EMBEDDED = {"embedded-b64": 64, "embedded-b256": 256}
GEMM.update({name: [(B * L, N, K, n) for L, N, K, n in _EMBEDDED_GEMMS] for name, B in EMBEDDED.items()})
BATCH = {"sd15-b2": 2, "sd15-b8": 8, "ddpm-cifar10-b256": 256, **EMBEDDED}
DEFAULT_MODELS = ("sd15-b2", "sd15-b8", "ddpm-cifar10-b256")  # the sets


def _square_convs(B, rows):
    """(B, C, H, W, N, k, stride, (top, bottom, left, right), count) of rows (C, H = W, N, k, stride, count)
    padded k // 2 on every side."""
    return [(B, C, S, S, N, k, s, (k // 2,) * 4, n) for C, S, N, k, s, n in rows]


def _sd_convs(B):
    rows = [
        (4, 64, 320, 3, 1, 1), (320, 32, 640, 1, 1, 1), (320, 32, 640, 3, 1, 1), (320, 64, 4, 3, 1, 1),
        (320, 64, 320, 1, 1, 10), (320, 64, 320, 3, 1, 7), (320, 64, 320, 3, 2, 1),
        (640, 16, 1280, 1, 1, 1), (640, 16, 1280, 3, 1, 1), (640, 32, 640, 1, 1, 10),
        (640, 32, 640, 3, 1, 6), (640, 32, 640, 3, 2, 1), (640, 64, 320, 1, 1, 2), (640, 64, 320, 3, 1, 2),
        (640, 64, 640, 3, 1, 1), (960, 32, 640, 1, 1, 1), (960, 32, 640, 3, 1, 1), (960, 64, 320, 1, 1, 1),
        (960, 64, 320, 3, 1, 1), (1280, 8, 1280, 1, 1, 2), (1280, 8, 1280, 3, 1, 11),
        (1280, 16, 1280, 1, 1, 10), (1280, 16, 1280, 3, 1, 7), (1280, 16, 1280, 3, 2, 1),
        (1280, 32, 640, 1, 1, 1), (1280, 32, 640, 3, 1, 1), (1280, 32, 1280, 3, 1, 1),
        (1920, 16, 1280, 1, 1, 1), (1920, 16, 1280, 3, 1, 1), (1920, 32, 640, 1, 1, 1),
        (1920, 32, 640, 3, 1, 1), (2560, 8, 1280, 1, 1, 3), (2560, 8, 1280, 3, 1, 3),
        (2560, 16, 1280, 1, 1, 2), (2560, 16, 1280, 3, 1, 2),
    ]
    return _square_convs(B, rows)


def _ddpm_convs(B):
    rows = [
        (3, 32, 128, 3, 1, 1), (128, 16, 256, 1, 1, 1), (128, 16, 256, 3, 1, 1), (128, 32, 3, 3, 1, 1),
        (128, 32, 128, 3, 1, 7), (256, 4, 256, 3, 1, 11), (256, 8, 256, 3, 1, 8), (256, 16, 256, 3, 1, 7),
        (256, 32, 128, 1, 1, 2), (256, 32, 128, 3, 1, 2), (256, 32, 256, 3, 1, 1), (384, 16, 256, 1, 1, 1),
        (384, 16, 256, 3, 1, 1), (384, 32, 128, 1, 1, 1), (384, 32, 128, 3, 1, 1), (512, 4, 256, 1, 1, 3),
        (512, 4, 256, 3, 1, 3), (512, 8, 256, 1, 1, 3), (512, 8, 256, 3, 1, 3), (512, 16, 256, 1, 1, 2),
        (512, 16, 256, 3, 1, 2),
    ]
    convs = _square_convs(B, rows)
    # Downsample2D(padding=0): F.pad(x, (0, 1, 0, 1)) then 3×3 stride 2 — the pad fused as (0, 1, 0, 1).
    convs += [(B, C, S, S, C, 3, 2, (0, 1, 0, 1), 1) for C, S in ((128, 32), (256, 16), (256, 8))]
    return convs


def _embedded_convs(B):
    """The embedded model's convs (traced like `_EMBEDDED_GEMMS`; its downsamplers pad 1 on every side)."""
    rows = [
        (3, 32, 64, 3, 1, 1), (64, 16, 128, 1, 1, 1), (64, 16, 128, 3, 1, 1), (64, 32, 3, 3, 1, 1),
        (64, 32, 64, 3, 1, 7), (64, 32, 64, 3, 2, 1), (128, 4, 128, 3, 1, 11), (128, 8, 128, 3, 1, 8),
        (128, 8, 128, 3, 2, 1), (128, 16, 128, 3, 1, 7), (128, 16, 128, 3, 2, 1), (128, 32, 64, 1, 1, 2),
        (128, 32, 64, 3, 1, 2), (128, 32, 128, 3, 1, 1), (192, 16, 128, 1, 1, 1), (192, 16, 128, 3, 1, 1),
        (192, 32, 64, 1, 1, 1), (192, 32, 64, 3, 1, 1), (256, 4, 128, 1, 1, 3), (256, 4, 128, 3, 1, 3),
        (256, 8, 128, 1, 1, 3), (256, 8, 128, 3, 1, 3), (256, 16, 128, 1, 1, 2), (256, 16, 128, 3, 1, 2),
    ]
    return _square_convs(B, rows)


CONV = {"sd15-b2": _sd_convs(2), "sd15-b8": _sd_convs(8), "ddpm-cifar10-b256": _ddpm_convs(256),
        **{name: _embedded_convs(B) for name, B in EMBEDDED.items()}}

# ResnetBlock2D norms (norm1 and norm2 of every block): (C, H = W, count per UNet call). Up blocks'
# norm1 sees the concatenated skip input (e.g. SD 1280 + 1280 = 2560 channels at 8×8).
_SD_NORMS = [(320, 64, 7), (640, 64, 2), (960, 64, 1), (320, 32, 1), (640, 32, 6), (960, 32, 1), (1280, 32, 1),
             (1920, 32, 1), (640, 16, 1), (1280, 16, 6), (1920, 16, 1), (2560, 16, 2), (1280, 8, 11),
             (2560, 8, 3)]
_DDPM_NORMS = [(128, 32, 7), (256, 32, 2), (384, 32, 1), (128, 16, 1), (256, 16, 6), (384, 16, 1), (512, 16, 2),
               (256, 8, 7), (512, 8, 3), (256, 4, 11), (512, 4, 3)]
# The embedded model's GroupNorms on feature maps (ResnetBlock2D's two and the output norm; traced).
_EMBEDDED_NORMS = [(64, 16, 1), (64, 32, 8), (128, 4, 11), (128, 8, 7), (128, 16, 6), (128, 32, 2), (192, 16, 1),
                   (192, 32, 1), (256, 4, 3), (256, 8, 3), (256, 16, 2)]
NORM = {"sd15-b2": [(2, *n) for n in _SD_NORMS], "sd15-b8": [(8, *n) for n in _SD_NORMS],
        "ddpm-cifar10-b256": [(256, *n) for n in _DDPM_NORMS],
        **{name: [(B, *n) for n in _EMBEDDED_NORMS] for name, B in EMBEDDED.items()}}
NORM_GROUPS = 32


HBM_BYTES_PER_S = 3.0e12  # device-to-device copy measured on this H100 (DESIGN.md §4)
PEAK_OPS = {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12}  # dense tensor-core peaks


def bench(fn) -> tuple[float, float]:
    """(GPU ms, eager ms) of one call.

    GPU time: `fn` captured once in a CUDA graph, the graph replayed under `do_bench` (median; L2
    cleared before every replay), so host launch overhead is out and the data comes from HBM.
    Eager time: 50 back-to-back Python calls, host clock, synchronized: what a caller without CUDA
    graphs sees (the larger of the GPU time and the launch path's host time).
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    gpu_ms = triton.testing.do_bench(graph.replay, warmup=5, rep=25, return_mode="median")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    return gpu_ms, (time.perf_counter() - t0) * 1e3 / 50


def _widening(fn, on: bool):
    """`fn` run with the per-call widening of packed int4 weights (`widen.WIDEN`) on or off, whatever the
    environment says: the "-widen" rows on, the other W4 rows off (the kernels' in-loop widening)."""
    def call():
        before, widen.WIDEN = widen.WIDEN, on
        try:
            return fn()
        finally:
            widen.WIDEN = before
    return call


def floor_ms(bytes_moved: float, ops: float, kind: str) -> float:
    """Roofline floor: the larger of HBM time for the bytes that must move and tensor-core time."""
    return max(bytes_moved / HBM_BYTES_PER_S, ops / PEAK_OPS[kind]) * 1e3


def _tables(B, G=10, dev="cuda"):
    g = torch.Generator(device=dev).manual_seed(B)
    s_inv = torch.rand(G, device=dev, generator=g) * 20 + 5
    return dict(s_inv=s_inv, scale=1.0 / s_inv, zero=torch.randint(-20, 20, (G,), device=dev, dtype=torch.int32,
                                                                   generator=g),
                group=torch.randint(0, G, (B,), device=dev, dtype=torch.int32, generator=g))


def _best(kernels) -> str:
    """The config of whichever of `kernels` (autotuners whose `best_config` `_time_all` cleared) the impl ran."""
    c = next((k.best_config for k in kernels if getattr(k, "best_config", None) is not None), None)
    if c is None:  # none of them ran
        return "-"
    if "BLOCK_M" not in c.kwargs:
        return " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w{c.num_warps}"
    return "{}x{}x{} w{} s{}".format(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                     c.kwargs.get("STAGES", c.num_stages))


def run_gemm(model, shape, card, command):
    M, N, K, count = shape
    B = BATCH[model]
    t = _tables(B)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    a = torch.randint(-128, 128, (M, K), device="cuda", dtype=torch.int8)
    w8 = torch.randint(-128, 128, (N, K), device="cuda", dtype=torch.int8)
    w4 = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
    w_scale = torch.rand(N, device="cuda") * 1e-3
    ops8, ops4 = prepare_linear_weight(w8, 8), prepare_linear_weight(w4, 4)
    x8 = x.to(torch.float8_e4m3fn)
    wf8 = w.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    tab = (t["s_inv"], t["scale"], t["zero"], t["group"])

    ops = 2.0 * M * N * K
    out_b = 2 * M * N
    floors = {
        "cublas-bf16": floor_ms(2 * M * K + 2 * N * K + out_b, ops, "bf16"),
        "triton-w8a8": floor_ms(M * K + N * K + out_b, ops, "int8"),
        "triton-w4a8": floor_ms(M * K + N * K / 2 + out_b, ops, "int8"),
        "triton-w8a8-fused": floor_ms(2 * M * K + N * K + out_b, ops, "int8"),
        "triton-w4a8-fused": floor_ms(2 * M * K + N * K / 2 + out_b, ops, "int8"),
    }
    impls = {
        "cublas-bf16": (lambda: F.linear(x, w, bias), None),
        "int_mm": (lambda: torch._int_mm(a, w8.t()), None),
        "scaled_mm-fp8": (lambda: torch._scaled_mm(x8, wf8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                          None),
        "triton-w8a8": (lambda: qlinear(a, *ops8, w_scale, bias, *tab), _qgemm_kernel),
        "triton-w4a8": (_widening(lambda: qlinear(a, *ops4, w_scale, bias, *tab), False), _qgemm_kernel),
        "triton-w8a8-fused": (lambda: qlinear(x, *ops8, w_scale, bias, *tab), _qgemm_kernel),
        "triton-w4a8-fused": (_widening(lambda: qlinear(x, *ops4, w_scale, bias, *tab), False), _qgemm_kernel),
        "triton-w4a8-widen": (_widening(lambda: qlinear(a, *ops4, w_scale, bias, *tab), True), _qgemm_kernel),
        "triton-w4a8-widen-fused": (_widening(lambda: qlinear(x, *ops4, w_scale, bias, *tab), True),
                                    _qgemm_kernel),
    }
    floors["triton-w4a8-widen"] = floor_ms(M * K + N * K / 2 + 2 * N * K + out_b, ops, "int8")
    floors["triton-w4a8-widen-fused"] = floor_ms(2 * M * K + N * K / 2 + 2 * N * K + out_b, ops, "int8")
    if gemm_wgmma.supported(a, ops4[0]):  # the Gluon kernel (sm_90, M ≥ 64), launched as qgemm would, unsplit
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        tables, meta = output_quantizer(out, None, None, None, 8)
        tail = dict(HAS_BIAS=True, HAS_RES=False, SPLIT_K=1, **meta)
        layout = _row_layout(M, B)
        for bits, (w_op, w_sum) in ((8, ops8), (4, ops4)):
            for suffix, inp in (("", a), ("-fused", x)):
                name = f"gluon-w{bits}a8{suffix}"
                floors[name] = floors[f"triton-w{bits}a8{suffix}"]
                impls[name] = (lambda inp=inp, w_op=w_op, w_sum=w_sum: gemm_wgmma.launch(
                    inp, w_op, w_sum, w_scale, bias, out, out, out, None, t["s_inv"], t["scale"], t["zero"], t["group"],
                    tables, K, 1, *layout, 8, tail), gemm_wgmma._tuned)
    if K % 16 == 0 and N % 8 == 0 and _cutlass_available():  # csrc/sm90, its per-row tables made once per M
        z_row, s_row = cuda_ext.row_tables(M, t["scale"], t["zero"], t["group"], *_row_layout(M, B))
        out_c, bias32 = torch.empty(M, N, device="cuda", dtype=torch.bfloat16), bias.float()
        for tile in ("auto", "128x128", "64x128", "128x256"):
            name = "cutlass-w8a8" + ("" if tile == "auto" else f"-{tile}")
            impls[name] = (lambda tile=tile: torch.ops.tcaq_sm90.gemm_out(a, *ops8, w_scale, bias32, z_row, s_row,
                                                                         out_c, tile), None)
            floors[name] = floors["triton-w8a8"]
        if K % 32 == 0:  # the packed int4 weights widened in registers
            impls["cutlass-w4a8"] = (lambda: torch.ops.tcaq_sm90.gemm_out(a, *ops4, w_scale, bias32, z_row, s_row,
                                                                         out_c, "auto"), None)
            floors["cutlass-w4a8"] = floors["triton-w4a8"]
        if M % B == 0:  # the float input through the quantize kernel first: against "triton-w8a8-fused"
            xs = x.view(B, M // B, K)
            impls["cutlass-w8a8+quant"] = (lambda: torch.ops.tcaq_sm90.gemm_out(
                quantize_act(xs, t["s_inv"], t["zero"], t["group"]).view(M, K), *ops8, w_scale, bias32, z_row, s_row,
                out_c, "auto"), None)
            floors["cutlass-w8a8+quant"] = floors["triton-w8a8-fused"]
    return _time_all("gemm", model, f"{M}x{N}x{K}", count, ops, impls, floors, "cublas-bf16", card, command)


def _row_layout(M: int, B: int) -> tuple[int, int]:
    """(rows per sample, group stride) of an M-row GEMM over B samples: per sample where M splits evenly."""
    return (M // B, 1) if M % B == 0 else (M, 0)


@functools.cache
def _cutlass_available() -> bool:
    """Whether csrc/sm90's CUTLASS GEMM loads here (built or JIT-built once); says why once when it does not."""
    try:
        cuda_ext.load_sm90()
        return True
    except Exception as e:  # no sm_90, no headers, or a build error: the columns are left out, with the reason
        print(f"  cutlass-*: not run ({str(e).splitlines()[0][:160]})")
        return False


def split_k_shapes(model):
    """The model's GEMM shapes that the split-K heuristic splits on this card."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return [g for g in GEMM[model] if choose_split_k(g[0], g[1], g[2], sms) > 1]


def run_gemm_splitk(model, shape, card, command):
    """Triton GEMMs without (`split_k=1`) and with the heuristic's split-K, cuBLAS bf16 beside them."""
    M, N, K, count = shape
    t = _tables(BATCH[model] if M % BATCH[model] == 0 else 1)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    a = torch.randint(-128, 128, (M, K), device="cuda", dtype=torch.int8)
    w_scale = torch.rand(N, device="cuda") * 1e-3
    ops = {8: prepare_linear_weight(torch.randint(-128, 128, (N, K), device="cuda", dtype=torch.int8), 8),
           4: prepare_linear_weight(torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8), 4)}
    tab = (t["s_inv"], t["scale"], t["zero"], t["group"])
    chosen = choose_split_k(M, N, K, torch.cuda.get_device_properties(0).multi_processor_count)
    split = k_range_per_split(K, chosen)[1]
    impls = {"cublas-bf16": (lambda: F.linear(x, w, bias), None)}
    for name, inp, bits in (("w8a8", a, 8), ("w4a8", a, 4), ("w8a8-fused", x, 8)):
        # the heuristic's count passed explicitly: split_k=None splits only with TCAQ_AUTO_SPLIT_K=1
        for suffix, split_k in (("", 1), ("-splitk", chosen)):
            impls[f"triton-{name}{suffix}"] = (_widening(  # the W4 rows: in-loop widening
                lambda inp=inp, bits=bits, split_k=split_k: qlinear(inp, *ops[bits], w_scale, bias, *tab,
                                                                    split_k=split_k), False),
                _qgemm_kernel, f" split{split}" if split_k != 1 else "")
    return _time_all("gemm-splitk", model, f"{M}x{N}x{K}", count, 2.0 * M * N * K, impls, {}, "cublas-bf16", card,
                     command)


def run_norm(model, shape, card, command):
    """GroupNorm + SiLU (+ quantize) before a ResBlock conv: torch bf16 against the fused kernel."""
    B, C, S, count = shape
    t = _tables(B)
    x = torch.randn(B, C, S, S, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = (torch.rand(C, device="cuda") + 0.5).to(torch.bfloat16)
    b = (torch.randn(C, device="cuda") * 0.1).to(torch.bfloat16)
    r_inv = torch.rand(C, device="cuda") + 0.5
    gn = lambda: F.silu(F.group_norm(x, NORM_GROUPS, w, b, 1e-5))
    n = x.numel()
    one_pass = groupnorm.one_pass_tile(S * S, C, NORM_GROUPS) is not None
    floors = {"torch-bf16": floor_ms(2 * n + 2 * n, 0, "bf16"),  # read x, write y
              "triton-fused": floor_ms(2 * n * (1 if one_pass else 2) + n, 0, "int8"),  # x once or twice, codes
              "triton-fused-two-kernel": floor_ms(2 * n + 2 * n + n, 0, "int8"),
              "triton-fused-looped": floor_ms(2 * n + n, 0, "int8")}  # x from memory once if L2 holds the slices
    x3, out = x.permute(0, 2, 3, 1).reshape(B, S * S, C), torch.empty(B, S * S, C, dtype=torch.int8, device="cuda")
    impls = {
        "torch-bf16": (gn, None),
        "torch-bf16+quant": (lambda: quantize_act(gn(), t["s_inv"], t["zero"], t["group"], 8, r_inv, channel_dim=1),
                             None),
        # the launcher's path: one pass where a sample's group fits in registers (no autotuned config then)
        "triton-fused": (lambda: groupnorm_silu_quantize(x, w, b, NORM_GROUPS, 1e-5, t["s_inv"], t["zero"], t["group"],
                                                         8, r_inv), None if one_pass else _gn_silu_quantize_kernel),
        "triton-fused-two-kernel": (lambda: groupnorm.groupnorm_silu_quantize_bsc(
            x3, NORM_GROUPS, 1e-5, w, b, t["s_inv"], t["zero"], t["group"], 1, 8, r_inv, out, one_pass=False),
            _gn_silu_quantize_kernel),
        "triton-fused-looped": (lambda: groupnorm.groupnorm_silu_quantize_bsc(
            x3, NORM_GROUPS, 1e-5, w, b, t["s_inv"], t["zero"], t["group"], 1, 8, r_inv, out, looped=True), None),
    }
    return _time_all("groupnorm", model, f"B{B} C{C} {S}x{S} G{NORM_GROUPS}", count, 0.0, impls, floors, "torch-bf16",
                     card, command)


def _conv_inputs(shape):
    """Random inputs of one conv shape: bf16 x (channels_last) and cuDNN's view of it, bf16 weights,
    int8 codes, the int8 / int4 kernel operands, scales and tables."""
    B, C, H, W, N, k, stride, pads, count = shape
    top, bottom, left, right = pads
    x = torch.randn(B, C, H, W, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    # cuDNN gets the already padded input when the padding is asymmetric (DDPM's F.pad + conv).
    x_cudnn = F.pad(x, (left, right, top, bottom)).contiguous(memory_format=torch.channels_last) \
        if (top, left) != (bottom, right) else x
    w = (torch.randn(N, C, k, k, device="cuda") * (C * k * k) ** -0.5).to(torch.bfloat16)
    t = _tables(B)
    return SimpleNamespace(
        x=x, x_cudnn=x_cudnn, pad_cudnn=0 if x_cudnn is not x else top,
        w=w.contiguous(memory_format=torch.channels_last),
        bias=torch.randn(N, device="cuda", dtype=torch.bfloat16),
        codes=torch.randint(-128, 128, (B, H, W, C), device="cuda", dtype=torch.int8),
        ops={8: prepare_conv_weight(torch.randint(-128, 128, (N, C, k, k), device="cuda", dtype=torch.int8), 8, pads),
             4: prepare_conv_weight(torch.randint(-8, 8, (N, C, k, k), device="cuda", dtype=torch.int8), 4, pads)},
        w_scale=torch.rand(N, device="cuda") * 1e-3,
        tab=(t["s_inv"], t["scale"], t["zero"], t["group"]),
    )


def _conv_out_hw(shape) -> tuple[int, int]:
    """(OH, OW) of a conv shape (pads: top, bottom, left, right)."""
    B, C, H, W, N, k, stride, pads, count = shape
    return conv_output_size(H, W, k, k, stride, pads)


def _conv_geometry(shape):
    """(output pixels M = B·OH·OW, the row label) of a conv shape."""
    B, C, H, W, N, k, stride, pads, count = shape
    OH, OW = _conv_out_hw(shape)
    pad_s = "".join(map(str, pads)) if len(set(pads)) > 1 else pads[0]
    return B * OH * OW, f"B{B} C{C} {H}x{W} N{N} k{k} s{stride} p{pad_s}"


def _cudnn_tuned(fn):
    """fn with `torch.backends.cudnn.benchmark` on: cuDNN times its algorithms on the first call of a shape (the
    warm call before timing) and keeps the fastest, where the default picks one by heuristics."""
    def call():
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=False):
            return fn()
    return call


def run_conv(model, shape, card, command):
    B, C, H, W, N, k, stride, pads, count = shape
    M, label = _conv_geometry(shape)
    v = _conv_inputs(shape)
    pad = list(pads)
    ops = 2.0 * M * N * C * k * k
    act, wts, out_b = B * H * W * C, N * C * k * k, 2 * M * N
    floors = {
        "cudnn-bf16": floor_ms(2 * act + 2 * wts + out_b, ops, "bf16"),
        "triton-w8a8": floor_ms(act + wts + out_b, ops, "int8"),
        "triton-w4a8": floor_ms(act + wts / 2 + out_b, ops, "int8"),
        "triton-w8a8+quant": floor_ms(2 * act + act + act + wts + out_b, ops, "int8"),
    }
    w4_conv = lambda: qconv2d(v.codes, *v.ops[4], v.w_scale, v.bias, *v.tab, stride, pad)
    impls = {
        "cudnn-bf16": (lambda: F.conv2d(v.x_cudnn, v.w, v.bias, stride, v.pad_cudnn), None),
        "cudnn-bf16-tuned": (_cudnn_tuned(lambda: F.conv2d(v.x_cudnn, v.w, v.bias, stride, v.pad_cudnn)), None),
        "cudnn-bf16-tuned-nobias": (_cudnn_tuned(lambda: F.conv2d(v.x_cudnn, v.w, None, stride, v.pad_cudnn)), None),
        "triton-w8a8": (lambda: qconv2d(v.codes, *v.ops[8], v.w_scale, v.bias, *v.tab, stride, pad), _qconv_kernel),
        "triton-w4a8": (_widening(w4_conv, False), _qconv_kernel),
        "triton-w8a8+quant": (lambda: qconv2d(v.x, *v.ops[8], v.w_scale, v.bias, *v.tab, stride, pad), _qconv_kernel),
        "triton-w4a8-widen": (_widening(w4_conv, True), _qconv_kernel),
    }
    floors["triton-w4a8-widen"] = floor_ms(act + wts / 2 + 2 * wts + out_b, ops, "int8")
    w4_op = v.ops[4][0]
    if conv_wgmma.supported(v.codes, w4_op, M, C, w4_op):  # the Gluon conv (sm_90), launched as qconv would, unsplit
        out = torch.empty(B, N, *_conv_out_hw(shape), device="cuda", dtype=torch.bfloat16, memory_format=torch.channels_last)
        tables, meta = output_quantizer(out, None, None, None, 8)
        _, scale, zero, group = v.tab  # the conv takes codes: no s_inv
        tail = dict(KH=k, KW=k, STRIDE=stride, PADDED=any(pads), SPLIT_K=1, HAS_BIAS=True, HAS_RES=False, UP=1,
                    TWO_Q=False, **meta)
        for bits in (8, 4):
            floors[f"gluon-w{bits}a8"] = floors[f"triton-w{bits}a8"]
            impls[f"gluon-w{bits}a8"] = (lambda w_op=v.ops[bits][0], w_sum=v.ops[bits][1]: conv_wgmma.launch(
                v.codes, w_op, w_sum, v.w_scale, v.bias, out, out, out, scale, zero, group, tables, 1, pads, tail,
                (w_op, w_sum, scale, zero), C, H, W), conv_wgmma._tuned)
    return _time_all("conv", model, label, count, ops, impls, floors, "cudnn-bf16", card, command)


def _conv_split(shape) -> int:
    """The split count the heuristic picks for this conv shape on this card (what `split_k=None` uses
    with TCAQ_AUTO_SPLIT_K=1)."""
    B, C, H, W, N, k, stride, pads, count = shape
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return conv_split_k(None, _conv_geometry(shape)[0], N, C, k * k, sms)


def conv_split_k_shapes(model):
    """The model's conv shapes that the split-K heuristic splits on this card."""
    return [c for c in CONV[model] if _conv_split(c) > 1]


def run_conv_splitk(model, shape, card, command):
    """Triton convs without (`split_k=1`) and with the heuristic's split-K, cuDNN bf16 beside them."""
    B, C, H, W, N, k, stride, pads, count = shape
    M, label = _conv_geometry(shape)
    v = _conv_inputs(shape)
    impls = {"cudnn-bf16": (lambda: F.conv2d(v.x_cudnn, v.w, v.bias, stride, v.pad_cudnn), None)}
    for name, inp, bits in (("w8a8", v.codes, 8), ("w4a8", v.codes, 4), ("w8a8+quant", v.x, 8)):
        for suffix, split_k in (("", 1), ("-splitk", _conv_split(shape))):
            impls[f"triton-{name}{suffix}"] = (_widening(  # the W4 rows: in-loop widening
                lambda inp=inp, bits=bits, split_k=split_k: qconv2d(inp, *v.ops[bits], v.w_scale, v.bias, *v.tab,
                                                                    stride, list(pads), split_k=split_k), False),
                _qconv_kernel, f" split{split_k}" if split_k != 1 else "")
    return _time_all("conv-splitk", model, label, count, 2.0 * M * N * C * k * k, impls, {}, "cudnn-bf16", card,
                     command)


# Set by --shapes, --impls and --profile (main): which shapes and impls run, and whether they are profiled
# instead of timed.
ONLY_SHAPES: set = set()
ONLY_IMPLS: set = set()
PROFILE = False
SEEN_IMPLS: set = set()  # every impl a table offered, to name the --impls entries that matched none


def selected(impls: dict, base: str, only: set) -> dict:
    """The impls a run times: all, or those named in `only` — and always the baseline, which every ratio
    in the tables needs. A name in `only` that no table offers is a typo: `main` names it at the end."""
    return {k: v for k, v in impls.items() if not only or k in only or k == base}


def _profile_all(op, model, shape, impls):
    """Each impl called once more after its warm call (autotuning done), between cudaProfilerStart and
    cudaProfilerStop and inside an NVTX range "<op> <model> <shape> <impl>": `ncu --profile-from-start off`
    sees exactly these calls, in this order (printed), and nothing of the autotuning."""
    for impl, (fn, *_) in impls.items():
        try:
            fn()
            torch.cuda.synchronize()
        except (RuntimeError, ValueError) as e:
            print(f"  {op} {model} {shape} {impl}: not run ({str(e).splitlines()[0][:100]})")
            continue
        torch.cuda.profiler.start()
        with torch.cuda.nvtx.range(f"{op} {model} {shape} {impl}"):
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profiled: {op} {model} {shape} {impl}", flush=True)
    return []


# the kernels a Triton impl's launcher may route a call to besides its own (timed rows report the one that ran)
ROUTES = {_qgemm_kernel: (gemm_wgmma._tuned,), _qconv_kernel: (conv_wgmma._tuned,)}


def _time_all(op, model, shape, count, flops, impls, floors, base, card, command):
    if ONLY_SHAPES and shape not in ONLY_SHAPES:
        return []
    SEEN_IMPLS.update(impls)
    impls = selected(impls, base, ONLY_IMPLS)
    if PROFILE:
        return _profile_all(op, model, shape, impls)
    rows, base_ms = [], None
    for impl, (fn, kernel, *note) in impls.items():
        # the routes' kernels (a Triton impl may send a shape to the Gluon kernel): cleared, so that the config
        # reported is the one of this call, not a kernel's last from an earlier shape
        kernels = (kernel, *ROUTES.get(kernel, ())) if kernel is not None else ()
        for k in kernels:
            k.best_config = None
        try:
            fn()
            torch.cuda.synchronize()
            config = _best(kernels) + "".join(note) if kernel is not None else None
            ms, eager_ms = bench(fn)
        except (RuntimeError, ValueError) as e:  # e.g. _int_mm needs M > 16
            print(f"  {op} {model} {shape} {impl}: not run ({str(e).splitlines()[0][:100]})")
            continue
        if impl == base:
            base_ms = ms
        rows.append({"op": op, "model": model, "shape": shape, "count": count, "impl": impl, "ms": ms,
                     "tops": flops / ms / 1e9 if flops else None, "speedup_vs_bf16": None, "card": card, "command": command,
                     "config": config, "eager_ms": eager_ms, "floor_ms": floors.get(impl),
                     "torch": torch.__version__, "triton": triton.__version__})
    for r in rows:
        r["speedup_vs_bf16"] = base_ms / r["ms"] if base_ms else None
    line = " ".join(f"{r['impl']}={r['ms'] * 1e3:.1f}us" for r in rows)
    print(f"{op} {model} {shape}: {line}", flush=True)
    return rows


# op → (baseline impl, the impl whose floor, eager time and config the per-shape tables show)
OPS = {"gemm": ("cublas-bf16", "triton-w8a8"), "conv": ("cudnn-bf16", "triton-w8a8"),
       "groupnorm": ("torch-bf16", "triton-fused"), "gemm-splitk": ("cublas-bf16", "triton-w8a8-fused-splitk"),
       "conv-splitk": ("cudnn-bf16", "triton-w8a8-splitk"),
       "attention": ("sdpa-bf16", "triton-qattn-uniform")}  # attention rows: tests/triton/test_attention.py --bench


def summarize(rows, meta) -> str:
    """Markdown: per-shape tables, then medians of the speedups and count-weighted time ratios."""
    out = [f"# Kernel benchmarks\n\n{meta}\n"]
    for op, (base, main_impl) in OPS.items():
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["op"] == op))
        for model in dict.fromkeys(r["model"] for r in rows if r["op"] == op):
            sel = [r for r in rows if r["op"] == op and r["model"] == model]
            out.append(f"\n## {op} — {model} (µs, ×{base})\n")
            out.append("| shape | n | " + " | ".join(impls) + f" | {main_impl} floor | eager {main_impl} / {base} | "
                       f"config ({main_impl}) |")
            out.append("|" + "---|" * (len(impls) + 5))
            for shape in dict.fromkeys(r["shape"] for r in sel):
                cells = {r["impl"]: r for r in sel if r["shape"] == shape}
                row = [shape, str(next(iter(cells.values()))["count"])]
                for i in impls:
                    r = cells.get(i)
                    row.append("—" if r is None else f"{r['ms'] * 1e3:.1f} ({r['speedup_vs_bf16']:.2f}×)")
                mine, ref = cells.get(main_impl) or {}, cells.get(base) or {}
                row.append(f"{mine['floor_ms'] * 1e3:.1f}" if mine.get("floor_ms") else "—")
                row.append(f"{mine['eager_ms'] * 1e3:.0f} / {ref['eager_ms'] * 1e3:.0f}" if mine and ref else "—")
                row.append(mine.get("config") or "")
                out.append("| " + " | ".join(row) + " |")
    out.append("\n## Summary (median over the shapes of each set; weighted = Σ count·t_bf16 / Σ count·t)\n")
    out.append("| op | set | impl | median × bf16 | weighted × bf16 | median × int_mm | median eager × bf16 eager |")
    out.append("|---|---|---|---|---|---|---|")
    for op, (base_impl, _) in OPS.items():
        sets = [(m, [m]) for m in dict.fromkeys(r["model"] for r in rows if r["op"] == op)]
        sets.append(("sd15 (b2+b8)", ["sd15-b2", "sd15-b8"]))
        for name, models in sets:
            sel = [r for r in rows if r["op"] == op and r["model"] in models]
            for impl in dict.fromkeys(r["impl"] for r in sel):
                mine = {(r["model"], r["shape"]): r for r in sel if r["impl"] == impl}
                base = {(r["model"], r["shape"]): r for r in sel if r["impl"] == base_impl}
                intmm = {(r["model"], r["shape"]): r for r in sel if r["impl"] == "int_mm"}
                keys = [k for k in mine if k in base]
                if not keys:
                    continue
                med = statistics.median(mine[k]["speedup_vs_bf16"] for k in keys)
                wt = sum(base[k]["ms"] * base[k]["count"] for k in keys) / sum(mine[k]["ms"] * mine[k]["count"]
                                                                                 for k in keys)
                ik = [k for k in keys if k in intmm]
                vs_int = f"{statistics.median(intmm[k]['ms'] / mine[k]['ms'] for k in ik):.2f}" if ik else "—"
                eager = statistics.median(base[k]["eager_ms"] / mine[k]["eager_ms"] for k in keys)
                out.append(f"| {op} | {name} | {impl} | {med:.2f} | {wt:.2f} | {vs_int} | {eager:.2f} |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--ops", default="gemm,conv,groupnorm,gemm-splitk,conv-splitk")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"','-separated, of {', '.join(GEMM)} (the embedded-* sets: the model latency.py times)")
    p.add_argument("--shapes", default="", help="only these shape labels, ';'-separated as the tables print them "
                   "(e.g. '2x320x1280;B2 C320 64x64 N320 k3 s1 p1')")
    p.add_argument("--impls", default="", help="only these columns (','-separated, e.g. "
                   "'triton-w8a8,gluon-w8a8'); each table's baseline always runs")
    p.add_argument("--profile", action="store_true",
                   help="no timing and no results written: one call per impl between cudaProfilerStart/Stop, "
                        "for e.g. ncu --clock-control none --profile-from-start off --section SpeedOfLight "
                        "--section LaunchStats --section Occupancy --csv python benchmarks/kernels.py --profile …")
    p.add_argument("--render", action="store_true",
                   help="no GPU: rewrite --out/kernels.md from --out/kernels.json (e.g. after merging the attention "
                        "rows of tests/triton/test_attention.py --bench)")
    args = p.parse_args()
    unknown = [m for m in args.models.split(",") if m not in GEMM]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(GEMM)}")
    if args.render:
        from tcaq_kernels.atomic import atomic_write_text  # here: the stub package above has no atomic.py

        rows = json.loads((args.out / "kernels.json").read_text())
        meta = ("cards: " + ", ".join(dict.fromkeys(r["card"] for r in rows)) + "; "
                + ", ".join(dict.fromkeys(f"torch {r.get('torch', '?')}, triton {r.get('triton', '?')}" for r in rows))
                + "; commands: "
                + "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows)))
        atomic_write_text(args.out / "kernels.md", summarize(rows, meta))
        return None
    global ONLY_SHAPES, ONLY_IMPLS, PROFILE
    ONLY_SHAPES, PROFILE = {x.strip() for x in args.shapes.split(";") if x.strip()}, args.profile
    ONLY_IMPLS = {x.strip() for x in args.impls.split(",") if x.strip()}
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    command = "python " + " ".join(sys.argv)
    meta = (f"card: {card}; torch {torch.__version__}, triton {triton.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; command: `{command}`")
    print(meta, flush=True)
    # Rows of the ops not run now are kept from an earlier run in --out (each row names its command);
    # results are rewritten after every shape, so a run cut short still leaves its rows.
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels.json"
    ran = set(args.ops.split(","))
    rows = [r for r in json.loads(path.read_text()) if r["op"] not in ran] if path.exists() else []
    for model in args.models.split(","):
        for op, shapes, run in (("gemm", GEMM[model], run_gemm), ("conv", CONV[model], run_conv),
                                ("groupnorm", NORM[model], run_norm),
                                ("gemm-splitk", split_k_shapes(model), run_gemm_splitk),
                                ("conv-splitk", conv_split_k_shapes(model), run_conv_splitk)):
            if op not in ran:
                continue
            for shape in shapes:
                rows += run(model, shape, card, command)
                if not PROFILE:
                    path.write_text(json.dumps(rows, indent=1))
    if PROFILE:
        return _check_impls()
    meta = (f"card: {card}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}; commands: "
            + "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows)))
    md = summarize(rows, meta)
    (args.out / "kernels.md").write_text(md)
    print(md[md.index("## Summary"):])
    _check_impls()


def _check_impls() -> None:
    """After the run (its results written): the --impls entries no table offered, as an error."""
    unknown = ONLY_IMPLS - SEEN_IMPLS
    if unknown:
        raise SystemExit(f"--impls: no table offered {sorted(unknown)} (offered: {', '.join(sorted(SEEN_IMPLS))})")


if __name__ == "__main__":
    main()
