"""One markdown table per op from Nsight Compute's CSV of a `benchmarks/kernels.py --profile` run.

Why: the kernel targets say to report each miss "with the profile that explains it", and ncu's CSV
(one line per metric, ~50 per kernel) is unreadable as evidence. This keeps the few numbers that decide
where a GEMM/conv spends its time — grid against the 132 SMs (waves), registers and occupancy, SM and
memory throughput as % of peak — and ncu's own top hint, per (shape, impl).

The profiled run prints `profiled: OP MODEL SHAPE IMPL` after each impl's profiled call, and ncu prints the
kernels in launch order at exit; kernels are matched to those lines in order, taking LAUNCHES[impl] kernels
per call (1 unless listed: cuDNN's conv with a bias adds a bias kernel, `+quant` quantizes first). A count
that does not add up is an error, not a guess.

    ncu --clock-control none --profile-from-start off --csv --section SpeedOfLight --section LaunchStats \
        --section Occupancy --section MemoryWorkloadAnalysis \
        python benchmarks/kernels.py --profile --ops gemm --models sd15-b2 --shapes "…" > ncu_gemm.log
    python benchmarks/ncu_summary.py ncu_gemm.log ncu_conv.log --out benchmarks/results/profiles/ncu.md
"""
from __future__ import annotations

import argparse
import csv
import gzip
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tcaq_kernels.atomic import atomic_write_text  # noqa: E402

LAUNCHES = {"cudnn-bf16": 2, "triton-w8a8+quant": 2}
COLUMNS = [  # (header, ncu metric, formatter)
    ("µs", "Duration", lambda v: f"{_num(v) / 1e3:.1f}"),
    ("SM %", "Compute (SM) Throughput", lambda v: f"{_num(v):.0f}"),
    ("mem %", "Memory Throughput", lambda v: f"{_num(v):.0f}"),
    ("DRAM %", "DRAM Throughput", lambda v: f"{_num(v):.0f}"),
    ("waves", "Waves Per SM", lambda v: f"{_num(v):.2f}"),
    ("regs", "Registers Per Thread", lambda v: f"{_num(v):.0f}"),
    ("occupancy % (achieved / theoretical)", None, None),
    ("smem KB", "Dynamic Shared Memory Per Block", lambda v: f"{_num(v) / 1024:.0f}"),
    ("spill requests", "Local Memory Spilling Requests", lambda v: f"{_num(v):.0f}"),
]


def _num(v: str) -> float:
    return float(v.replace(",", ""))


def _open(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def parse(lines) -> tuple[str, list[str], list[dict]]:
    """(the run's card line, the profiled labels in order, one dict per kernel in launch order).

    A kernel dict holds its name, grid, block, its metric values by name (a name two sections share keeps the
    first section's: the Speed-of-Light %), and its OPT rules as (name, description, estimated speedup %)."""
    card, labels, header, kernels = "", [], None, {}
    for line in lines:
        if line.startswith("card:"):
            card = line.strip()
        elif line.startswith("profiled: "):
            labels.append(line[len("profiled: "):].strip())
        elif line.startswith('"'):
            row = next(csv.reader([line]))
            if header is None:
                header = row
                continue
            r = dict(zip(header, row))
            k = kernels.setdefault(r["ID"], {"kernel": r["Kernel Name"], "grid": r["Grid Size"],
                                             "block": r["Block Size"], "metrics": {}, "rules": []})
            if r["Metric Name"]:  # first wins: SpeedOfLight's "Memory Throughput" (%) before MemoryWorkloadAnalysis's (byte/s)
                k["metrics"].setdefault(r["Metric Name"], r["Metric Value"])
            if r["Rule Name"] and r["Rule Type"] == "OPT":
                rule = (r["Rule Name"], r["Rule Description"], r["Estimated Speedup"])
                if rule not in k["rules"]:
                    k["rules"].append(rule)
    return card, labels, [kernels[i] for i in sorted(kernels, key=int)]


def assign(labels: list[str], kernels: list[dict], launches: dict[str, int]) -> list[tuple[str, dict]]:
    """Pair kernels with the labels of the calls that launched them (see the module docstring)."""
    need = [launches.get(label.rsplit(" ", 1)[1], 1) for label in labels]
    if sum(need) != len(kernels):
        raise SystemExit(f"{len(labels)} profiled calls expect {sum(need)} kernels ({launches} per impl, else 1), "
                         f"ncu printed {len(kernels)}: pass --launches IMPL=N for the impl that differs")
    out, i = [], 0
    for label, n in zip(labels, need):
        out += [(label, k) for k in kernels[i:i + n]]
        i += n
    return out


def _row(label: str, k: dict) -> list[str]:
    m = k["metrics"]
    op, model, rest = label.split(" ", 2)
    shape, impl = rest.rsplit(" ", 1)
    cells = [shape, impl, re.sub(r"\(.*", "", k["kernel"])[:40], f"{k['grid']} × {k['block']}"]
    for head, metric, fmt in COLUMNS:
        if head.startswith("occupancy"):
            cells.append(f"{_num(m['Achieved Occupancy']):.0f} / {_num(m['Theoretical Occupancy']):.0f}"
                         if "Achieved Occupancy" in m else "—")
        else:
            cells.append(fmt(m[metric]) if metric in m else "—")
    top = max(k["rules"], key=lambda r: _num(r[2]) if r[2] else -1.0, default=None)
    cells.append(f"{top[0]} ({top[2]} %)" if top and top[2] else (top[0] if top else ""))
    return cells


def render(sources: list[tuple[str, str, list[tuple[str, dict]]]]) -> str:
    head = ["shape", "impl", "kernel", "grid × block", *[c[0] for c in COLUMNS], "ncu's top hint (est. speedup)"]
    parts = ["# Nsight Compute profile of the kernel benchmark shapes", "",
             "Made by `python benchmarks/ncu_summary.py` from the raw CSVs beside this file. One row per kernel "
             "launched by one call of each impl (after its warm-up and autotuning). Durations are ncu's, with its "
             "cache flush before each kernel (cold L2), so they are not the timings of kernels.md; % columns are "
             "of the card's peak; waves = blocks / (SMs × blocks resident per SM).", ""]
    for name, card, pairs in sources:
        parts += [f"## {name}", "", card, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        parts += ["| " + " | ".join(_row(label, k)) + " |" for label, k in pairs]
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path, help="ncu --csv output of kernels.py --profile (.log or .log.gz)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--launches", nargs="*", default=[], metavar="IMPL=N",
                   help="kernels one call of IMPL launches, where not the default table")
    a = p.parse_args(argv)
    launches = {**LAUNCHES, **{k: int(v) for k, v in (x.split("=", 1) for x in a.launches)}}
    sources = []
    for path in a.logs:
        with _open(path) as f:
            card, labels, kernels = parse(f)
        if not kernels:
            raise SystemExit(f"{path}: no ncu CSV rows (was ncu run with --csv, and did the profiled range launch kernels?)")
        sources.append((path.name, card, assign(labels, kernels, launches)))
    atomic_write_text(a.out, render(sources))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
