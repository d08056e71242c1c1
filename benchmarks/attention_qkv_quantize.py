"""The attention's q/k/v quantize kernel on the GPU: codes per program × warps on every SD-1.5 attention level.

Why: at the small SD-1.5 levels this kernel (`triton/attention.quantize_qkv`) took longer than bf16 SDPA's
whole attention (kernels.md), and its tile was picked by hand. Each shape is timed for every (codes per
program, warps) pair as a uniform layer runs it (int8 v operand and Σv, p_kinds 1), beside a graph holding
a lone 1 KiB memset: the floor any one-node graph replay measures here. CUDA-graph replays timed with
`triton.testing.do_bench` (median).

    PYTHONPATH=. python benchmarks/attention_qkv_quantize.py --out benchmarks/results
writes attention-qkv-quantize.json and .md (json rows: shape, then µs per variant).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from tcaq_kernels.atomic import atomic_write_json, atomic_write_text
from tcaq_kernels.triton import attention as A

CODES = (1024, 2048, 4096, 8192)
WARPS = (2, 4, 8)
# (B, heads, Lq, Lk, d): SD-1.5 at 512 px, batch 2, its four latent levels, self and cross (77 tokens)
SHAPES = [(2, 8, L, L if what == "self" else 77, d) for L, d in ((4096, 40), (1024, 80), (256, 160), (64, 160))
          for what in ("self", "cross")]


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return 1000 * triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")


def sweep(shape) -> dict:
    B, H, Lq, Lk, D = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    # diffusers' layout: [B, L, heads·d] memory viewed as [B, heads, L, d]
    mk = lambda L: torch.randn(B, L, H, D, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)
    q, k, v = mk(Lq), mk(Lk), mk(Lk)
    tab = lambda: (torch.rand(3, device="cuda", generator=gen) * 20 + 10, torch.zeros(3, dtype=torch.int32, device="cuda"))
    tq, tk, tv = tab(), tab(), tab()
    group = torch.randint(0, 3, (B,), device="cuda", dtype=torch.int32, generator=gen)
    row = {"shape": f"B{B} H{H} Lq{Lq} Lk{Lk} d{D}"}
    default = (A.QKV_CODES, A.QKV_WARPS)
    try:
        for codes in CODES:
            for warps in WARPS:
                A.QKV_CODES, A.QKV_WARPS = codes, warps
                row[f"{codes}c-w{warps}"] = graph_us(
                    lambda: A.quantize_qkv(q, k, v, tq, tk, tv, group, 1, (8, 8, 8), A.KINDS_UNIFORM))
    finally:
        A.QKV_CODES, A.QKV_WARPS = default
    row["memset-1KiB"] = graph_us(lambda: torch.zeros(256, dtype=torch.int32, device="cuda"))
    return row


def render(rows: list[dict], meta: str) -> str:
    cols = [k for k in rows[0] if k != "shape"]
    lines = ["# q/k/v quantize kernel: codes per program × warps", "", meta, "",
             "µs per call (CUDA-graph median); **bold**: fastest of the row; `memset-1KiB`: a graph of one tiny node.", "",
             "| shape | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for r in rows:
        best = min(r[c] for c in cols if c != "memset-1KiB")
        cells = [f"**{r[c]:.1f}**" if r[c] == best and c != "memset-1KiB" else f"{r[c]:.1f}" for c in cols]
        lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_qkv_quantize.py times CUDA kernels: no CUDA device here")
    rows = []
    for shape in SHAPES:
        rows.append(sweep(shape))
        print(json.dumps(rows[-1]), flush=True)
    meta = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; default "
            f"{A.QKV_CODES} codes, {A.QKV_WARPS} warps; `PYTHONPATH=. python benchmarks/attention_qkv_quantize.py`")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "attention-qkv-quantize.json", {"meta": meta, "rows": rows})
    atomic_write_text(args.out / "attention-qkv-quantize.md", render(rows, meta))


if __name__ == "__main__":
    main()
