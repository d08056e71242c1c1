"""What FID-ResNet56 measures in the quality table: fidelity to full precision, or fine-scale energy?

Why: at W4A8 the most faithful calibration measured (`tcaq@iters-3k`, 30.1 dB PSNR against full
precision) scored a worse FID-ResNet56 than two calibrations 5 dB less faithful whose samples carry a
quarter more fine-scale energy than full precision's; `minmax` W8A8, the least faithful W8A8 model,
scores better than full precision itself. This fits, per bit width over the 10,000-sample rows of
`benchmarks/results/quality.json`,

    log(FID / FID_fp) = a + c·log(fine-energy ratio)              ("fine")
    log(FID / FID_fp) = a + c·log(fine-energy ratio) + b·PSNR      ("fine + PSNR")

and reports each fit's R² and its leave-one-out error (the rows are few; a fit that only memorises them
predicts the held-out row badly). Reads the table only — seconds on a CPU:

    python benchmarks/fid_attribution.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("tcaq_kernels") is None:
    sys.path.insert(0, str(REPO))

from tcaq_kernels.atomic import atomic_write_text  # noqa: E402
from tcaq_kernels.eval.results import read_rows  # noqa: E402

MODELS = {"fine": ("log_fine",), "fine + PSNR": ("log_fine", "psnr")}


def usable(rows: list[dict], n_samples: int) -> tuple[float, dict[str, list[dict]]]:
    """The full-precision FID at `n_samples` and, per bit width, the quantized rows with FID, PSNR and fine energy."""
    fp = next(r["fid_resnet56"] for r in rows if r["preset"] == "fp" and r["n_samples"] == n_samples)
    by_bits: dict[str, list[dict]] = {}
    for r in rows:
        if r["n_samples"] == n_samples and r["bits"] != "fp" and r.get("fine_energy_ratio") and r.get("psnr_vs_fp"):
            by_bits.setdefault(r["bits"], []).append(r)
    return fp, by_bits


def design(rows: list[dict], terms: tuple[str, ...]) -> np.ndarray:
    cols = {"log_fine": [np.log(r["fine_energy_ratio"]) for r in rows], "psnr": [r["psnr_vs_fp"] for r in rows]}
    return np.column_stack([np.ones(len(rows)), *(cols[t] for t in terms)])


def fit(rows: list[dict], fp: float, terms: tuple[str, ...]) -> dict | None:
    """Least-squares fit of log(FID/fp) on `terms`; None when there are too few rows to hold one out."""
    X, y = design(rows, terms), np.log([r["fid_resnet56"] / fp for r in rows])
    if len(rows) < X.shape[1] + 2:
        return None
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - X @ coef) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    held_out = []
    for i in range(len(rows)):
        keep = np.arange(len(rows)) != i
        c = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
        held_out.append(float(X[i] @ c - y[i]))
    names = ("a", *("c" if t == "log_fine" else "b" for t in terms))
    return {"n": len(rows), "coef": dict(zip(names, map(float, coef))), "r2": r2,
            "loo_rms_pct": 100.0 * float(np.sqrt(np.mean(np.square(held_out))))}


def fine_for_target(result: dict, target: float) -> float | None:
    """The fine-energy ratio at which the "fine" fit puts FID at (1 + target)·FID_fp."""
    c, a = result["coef"]["c"], result["coef"]["a"]
    return float(np.exp((np.log1p(target) - a) / c)) if c else None


def analyse(rows: list[dict], n_samples: int = 10000) -> dict:
    fp, by_bits = usable(rows, n_samples)
    out = {"n_samples": n_samples, "fid_fp": fp, "bits": {}}
    for bits, rs in by_bits.items():
        fits = {name: fit(rs, fp, terms) for name, terms in MODELS.items()}
        out["bits"][bits] = {"rows": [{k: r[k] for k in ("preset", "fid_resnet56", "psnr_vs_fp", "fine_energy_ratio")}
                                      for r in sorted(rs, key=lambda r: r["fid_resnet56"])],
                             "fits": fits}
    return out


def markdown(result: dict, command: str) -> str:
    lines = ["# FID-ResNet56 against fidelity and fine-scale energy", "",
             f"Rows of `benchmarks/results/quality.json` with {result['n_samples']} samples, FID, PSNR against full "
             f"precision and the fine-energy ratio; full precision {result['fid_fp']:.3f}. Fits of log(FID / FID_fp); "
             f"c: FID's elasticity to the fine-energy ratio (−1: 1 % less fine energy, 1 % more FID), b: per dB PSNR; "
             f"LOO: RMS error of each row predicted by the fit of the others, in % of FID. Command: `{command}`.", "",
             "| bits | rows | fit | a | c (log fine) | b (per dB) | R² | LOO RMS |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for bits, rec in result["bits"].items():
        for name, f in rec["fits"].items():
            if f is None:
                continue
            b = f["coef"].get("b")
            lines.append(f"| {bits} | {f['n']} | {name} | {f['coef']['a']:+.3f} | {f['coef']['c']:+.2f} | "
                         f"{'—' if b is None else f'{b:+.4f}'} | {f['r2']:.2f} | {f['loo_rms_pct']:.1f} % |")
    lines.append("")
    for bits, rec in result["bits"].items():
        lines += [f"## {bits}", "", "| preset | FID | PSNR (dB) | fine × fp |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['preset']} | {r['fid_resnet56']:.3f} | {r['psnr_vs_fp']:.2f} | {r['fine_energy_ratio']:.3f} |"
                  for r in rec["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    p.add_argument("--n-samples", type=int, default=10000)
    p.add_argument("--out", required=True, help="folder for fid_attribution.json and .md")
    a = p.parse_args(argv)
    result = analyse(read_rows(Path(a.results)), a.n_samples)
    w8 = (result["bits"].get("W8A8") or {}).get("fits", {}).get("fine")
    if w8:
        result["w8a8_fine_ratio_for_plus_2pct"] = fine_for_target(w8, 0.02)
    command = "python benchmarks/fid_attribution.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(a.out)
    atomic_write_text(out / "fid_attribution.json", json.dumps({"command": command, **result}, indent=1))
    atomic_write_text(out / "fid_attribution.md", markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
