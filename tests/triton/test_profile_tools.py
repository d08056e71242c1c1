"""The two tools behind the README's explanation of the kernel speeds: the Nsight Compute summary
(benchmarks/ncu_summary.py) and the sm_90 cross-compile report (benchmarks/kernel_asm.py), which is also
the CPU's only check of the Gluon kernels (gemm_wgmma.py, conv_wgmma.py)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tcaq_kernels.triton.gemm_wgmma import smem_bytes

ROOT = Path(__file__).resolve().parents[2]
HEADER = ('"ID","Kernel Name","Block Size","Grid Size","Section Name","Metric Name","Metric Unit","Metric Value",'
          '"Rule Name","Rule Type","Rule Description","Estimated Speedup"')


def _metric(kid, kernel, section, name, unit, value):
    return f'"{kid}","{kernel}","(128, 1, 1)","(7, 1, 1)","{section}","{name}","{unit}","{value}","","","",""'


def _rule(kid, kernel, name, speedup):
    return f'"{kid}","{kernel}","(128, 1, 1)","(7, 1, 1)","Launch","","","","{name}","OPT","why {name}","{speedup}"'


def _kernel(kid, kernel, duration_ns, sol_mem_pct):
    return [
        _metric(kid, kernel, "GPU Speed Of Light Throughput", "Duration", "ns", f"{duration_ns:,}"),
        _metric(kid, kernel, "GPU Speed Of Light Throughput", "Memory Throughput", "%", sol_mem_pct),
        _metric(kid, kernel, "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "12.5"),
        # a later section reuses the name in byte/s: the Speed-of-Light % must win
        _metric(kid, kernel, "Memory Workload Analysis", "Memory Throughput", "byte/s", "348,655,421,686.75"),
        _rule(kid, kernel, "SmallGrid", "40.5"),
        _rule(kid, kernel, "Occupancy", "87.5"),
    ]


def _log(labels, kernel_names):
    lines = ["==PROF== Connected", "card: NVIDIA H200; torch 2.11; command: `python benchmarks/kernels.py --profile`"]
    lines += [f"profiled: {label}" for label in labels] + [HEADER]
    for kid, name in enumerate(kernel_names):
        lines += _kernel(kid, name, 1500 * (kid + 1), f"{10 + kid}.0")
    return [line + "\n" for line in lines]


@pytest.fixture(scope="module")
def ncu(load_benchmark):
    return load_benchmark("ncu_summary")


def test_ncu_summary_pairs_each_call_with_the_kernels_it_launched(ncu):
    labels = ["conv sd15-b2 B2 C320 64x64 N320 k3 s1 p1 cudnn-bf16", "conv sd15-b2 B2 C320 64x64 N320 k3 s1 p1 triton-w8a8"]
    card, found, kernels = ncu.parse(_log(labels, ["xmma_fprop", "elementwise_bias", "_qconv_kernel"]))
    assert card.startswith("card: NVIDIA H200") and found == labels
    pairs = ncu.assign(found, kernels, ncu.LAUNCHES)  # cuDNN's conv with a bias: two kernels
    assert [(label.rsplit(" ", 1)[1], k["kernel"]) for label, k in pairs] == [
        ("cudnn-bf16", "xmma_fprop"), ("cudnn-bf16", "elementwise_bias"), ("triton-w8a8", "_qconv_kernel")]
    row = ncu._row(*pairs[2])
    assert row[:4] == ["B2 C320 64x64 N320 k3 s1 p1", "triton-w8a8", "_qconv_kernel", "(7, 1, 1) × (128, 1, 1)"]
    assert row[4] == "4.5"  # 4,500 ns
    assert row[6] == "12"  # the Speed-of-Light %, not the byte/s of the later section
    assert row[-1] == "Occupancy (87.5 %)"  # the hint with the largest estimated speedup
    table = ncu.render([("ncu_conv.log", card, pairs)])
    assert table.count("| B2 C320 64x64 N320 k3 s1 p1 |") == 3


def test_ncu_summary_refuses_a_kernel_count_that_does_not_add_up(ncu):
    card, labels, kernels = ncu.parse(_log(["gemm sd15-b2 2x320x1280 triton-w8a8"], ["quantize", "_qgemm_kernel"]))
    with pytest.raises(SystemExit, match="--launches"):
        ncu.assign(labels, kernels, ncu.LAUNCHES)
    assert len(ncu.assign(labels, kernels, {**ncu.LAUNCHES, "triton-w8a8": 2})) == 2


def test_kernel_asm_reports_what_the_gemm_compiles_to_on_hopper(tmp_path):
    """Cross-compiles for sm_90a on this CPU machine (Triton's bundled ptxas) in a process of its own:
    the tool switches Triton's interpreter off, which this test process needs on."""
    out = tmp_path / "asm.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_asm.py"), "--probe", "--shape", "64x96x256",
                    "--variants", "w8a8,w4a8,w8a8-wgmma,w4a8-fused-split-wgmma", "--conv", "2,64,9,7,40,3,1",
                    "--json", str(out)], check=True, capture_output=True, text=True,
                   timeout=600)
    rows = json.loads(out.read_text())
    probe = {r["variant"]: r for r in rows if r["shape"].startswith("probe")}
    assert sorted(probe) == ["bf16", "fp8", "int8"]
    assert any(".s32.s8.s8" in m and m.startswith("wgmma") for m in probe["int8"]["mma"])
    # The README's first reason for the GEMM speed: Triton 3.6 keeps one bf16/fp8 wgmma in flight but waits
    # on every int8 one. If this changes with a Triton upgrade, that explanation is out of date.
    assert (probe["bf16"]["max_wgmma_wait"], probe["fp8"]["max_wgmma_wait"], probe["int8"]["max_wgmma_wait"]) == (1, 1, 0)
    ours = [r for r in rows if r["shape"] == "64x96x256"]
    assert {r["variant"] for r in ours} == {"w8a8", "w4a8", "w8a8-wgmma", "w4a8-fused-split-wgmma"} and len(ours) >= 12
    convs = [r for r in rows if r["shape"].startswith("conv")]
    assert {r["variant"] for r in convs} == {"w8a8-conv-wgmma", "w4a8-conv-wgmma", "w4a8-conv-split-wgmma"}
    for r in [*convs, *(r for r in ours if r["variant"].endswith("-wgmma"))]:  # the point of the Gluon kernels
        assert r["max_wgmma_wait"] == 1 and r["cp_async"] and r["spill_store_bytes"] == 0, r
        # the MMA loop is the last loop: the epilogue is straight-line code (the conv's padding term was once a
        # per-tap loop after it, costing more instructions than the main loop)
        assert r["sass_loops"] and r["sass_loops"][-1]["mma"] and r["sass_tail"] > 0, r
    for r in (r for r in ours if r["variant"].endswith("-wgmma")):  # the prune's arithmetic is the compiler's
        bm, bn, bk, warps, stages = (int(v) for v in re.findall(r"\d+", r["config"]))
        config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": stages}, num_warps=warps)
        a_float = "-fused" in r["variant"]
        ring = smem_bytes(config, 2 if a_float else 1, r["variant"].startswith("w4"), a_float)
        assert r["shared_bytes"] == ring, r
    for r in ours:
        assert any(m.startswith("wgmma") for m in r["mma"]), r  # 64-row tiles and up use Hopper's MMA
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] > 0


def test_the_gluon_conv_steps_carry_no_division(tmp_path):
    """The Gluon conv's reduction runs as two loops — steps that copy a step ahead, then the ring's last
    steps, which copy nothing — and carries each step's (tap, channel block) from the one before instead of
    dividing it out of the step index (which compiled to MUFU.RCP and ~25 instructions a step): every config,
    int8 and int4 weights, split and not, N a tile multiple and not, sm_90a."""
    out = tmp_path / "conv.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_asm.py"), "--variants", "w8a8",
                    "--conv", "2,64,9,7,40,3,1", "--conv", "2,64,9,7,128,3,1", "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 3 * 6
    for r in rows:
        mma_loops = [loop for loop in r["sass_loops"] if loop["mma"]]
        assert len(mma_loops) == 2 and r["max_wgmma_wait"] == 1 and r["spill_store_bytes"] == 0, r
        assert all(loop["mufu"] == 0 for loop in mma_loops), r


def test_the_fast_silu_is_shorter(tmp_path):
    """The GPU's SiLU form (`numerics.silu`'s SILU_FAST) is there for fewer instructions in the fused
    GroupNorm: the embedded model's 32×32 level, both SiLU forms, sm_90a."""
    out = tmp_path / "gn.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_asm.py"), "--groupnorm", "1024,128,32",
                    "--json", str(out)], check=True, capture_output=True, text=True, timeout=600)
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    exact, fast = rows["gn-one-pass-silu-exact"], rows["gn-one-pass-silu-fast"]
    assert fast["spill_store_bytes"] == 0 and not fast["sass_loops"]
    assert fast["sass_tail"] < 0.9 * exact["sass_tail"], (exact["sass_tail"], fast["sass_tail"])
