"""A/B of environment switches on the kernel benchmarks: `kernels.py` once per variant, each in its own process
(the switches are read at import), then every row's time under each variant beside the default's.

Why: experiments land on main behind off-by-default switches (TCAQ_GN_LOOPED, TCAQ_AUTO_SPLIT_K, …), and
making one the default needs its times beside the default's, same card, same call. The vendor rows (cuDNN,
cuBLAS) run in every process too: their ratios show how far two runs of the same code drift.

    python benchmarks/ab_env.py --out DIR --variant splitk:TCAQ_AUTO_SPLIT_K=1 \\
        --variant tldot:TCAQ_WGMMA=0 -- --ops conv --models sd15-b2 --impls triton-w8a8

A variant may also set PYTHONPATH to an older checkout of `tcaq_kernels` (`git archive REV tcaq_kernels`)
to time the code before a change beside it.

writes DIR/<name>/kernels.{json,md} for "default" and each variant, DIR/ab.json (the rows, each with its
"variant") and DIR/ab.md: per row the default's µs and each variant's with default / variant (> 1: the
variant is faster), then each (op, model, impl)'s median ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

KERNELS = Path(__file__).with_name("kernels.py")


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:ENV=value,ENV2=value' → (name, {ENV: value, ENV2: value})."""
    name, sep, assigns = text.partition(":")
    pairs = [a.partition("=") for a in assigns.split(",") if a]
    if not sep or not name or name == "default" or not pairs or any(not k or not eq for k, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"--variant wants NAME:ENV=VALUE[,ENV=VALUE…] (NAME not 'default'), "
                                         f"got {text!r}")
    return name, {k: v for k, _, v in pairs}


def _key(row: dict) -> tuple:
    return row["op"], row["model"], row["shape"], row["impl"]


def compare(default_rows: list[dict], variant_rows: dict[str, list[dict]]) -> str:
    """Markdown: each default row's µs beside every variant's (× = default / variant), then medians."""
    names = list(variant_rows)
    times = {name: {_key(r): r["ms"] for r in rows} for name, rows in variant_rows.items()}
    ratios = {}
    lines = ["| op | model | shape | impl | default µs | " + " | ".join(f"{n} µs (×)" for n in names) + " |",
             "|" + "---|" * (5 + len(names))]
    for row in default_rows:
        cells = []
        for name in names:
            ms = times[name].get(_key(row))
            if ms is None:
                cells.append("—")
                continue
            ratios.setdefault((row["op"], row["model"], row["impl"], name), []).append(row["ms"] / ms)
            cells.append(f"{ms * 1e3:.1f} ({row['ms'] / ms:.2f})")
        lines.append(f"| {row['op']} | {row['model']} | {row['shape']} | {row['impl']} | {row['ms'] * 1e3:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| op | model | impl | variant | median default / variant | min | max | rows |", "|---|---|---|---|---:|"
              "---:|---:|---:|"]
    for (op, model, impl, name), r in ratios.items():
        lines.append(f"| {op} | {model} | {impl} | {name} | {statistics.median(r):.3f} | {min(r):.2f} | "
                     f"{max(r):.2f} | {len(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("kernels_args", nargs=argparse.REMAINDER, help="after --: kernels.py's arguments")
    args = parser.parse_args(argv)
    rest = [a for a in args.kernels_args if a != "--"]
    if "--out" in rest:
        parser.error("kernels.py's --out is set per variant: leave it out")
    rows = {}
    for name, env in [("default", {}), *args.variant]:
        out = args.out / name
        cmd = [sys.executable, str(KERNELS), "--out", str(out), *rest]
        print(f"[{name}] {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, env={**os.environ, **env}, check=True)
        rows[name] = [dict(r, variant=name, env=env) for r in json.loads((out / "kernels.json").read_text())]
    default = rows.pop("default")
    (args.out / "ab.json").write_text(json.dumps(default + [r for v in rows.values() for r in v], indent=1))
    variants = "; ".join(f"{n}: {' '.join(f'{k}={v}' for k, v in env.items())}" for n, env in args.variant)
    (args.out / "ab.md").write_text(f"# A/B of environment switches\n\nkernels.py {' '.join(rest)}; {variants}\n\n"
                                    + compare(default, rows))
    print((args.out / "ab.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
