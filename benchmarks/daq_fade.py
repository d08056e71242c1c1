"""Where does `qdiffusion+daq`'s W4A4 fade come from: the log2 maps alone, or log2 maps under reconstruction?

On the GPU (2k samples, 27 Nov) the fade follows the log2 kind: DAQ's per-group post-softmax sets forced
uniform scored 22.7 FID-ResNet56, forced log2 34.3 and grey, like `qdiffusion+daq` (48 % log2) — while on
the CPU with only the maps quantized log2 did not fade (benchmarks/results/attention_row_mass.md). This
calibrates the embedded model with the `qdiffusion+daq` preset on a CPU budget for each DAQ rule, with and
without block reconstruction, and compares same-seed samples with full precision (PSNR, fine-scale energy
ratio: < 1 is faded); the log2 state without reconstruction is evaluated once more with every log2 scale
at 1 (nothing clipped), to see whether the MSE-searched scale is what fades. CPU, tens of minutes:

    python benchmarks/daq_fade.py --bits W4A4 --out benchmarks/results
    python benchmarks/daq_fade.py --bits W4A4 --reconstruction-only --out benchmarks/results  # adds those rows
    python benchmarks/daq_fade.py --bits W4A4 --row-max --out benchmarks/results  # row-max maps (p_row_max)

`--row-max` calibrates with `p_row_max` (CalibState v4: the map quantized is exp(S − row max), normalised
after P·V) and adds its rows beside the softmax ones.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("tcaq_kernels") is None:
    sys.path.insert(0, str(REPO))

import tcaq_kernels  # noqa: E402
from tcaq_kernels.atomic import atomic_write_text  # noqa: E402
from tcaq_kernels.calib import MethodConfig, preset_config  # noqa: E402
from tcaq_kernels.calib.pipeline import calibrate_with_config  # noqa: E402
from tcaq_kernels.eval.fidelity import same_seed_fidelity  # noqa: E402
from tcaq_kernels.eval.loading import load_fp_unet, load_scheduler_config  # noqa: E402
from tcaq_kernels.quant.layers import quantizable_layers  # noqa: E402
from tcaq_kernels.sampling import make_scheduler  # noqa: E402

# a CPU budget: 16 trajectories of DDIM-50 (5 per group), 256 points, 150 steps per block
BUDGET = dict(num_samples=16, num_steps=50, batch_size=16, num_points=256, init_points=128, init_values=1 << 14,
              daq_values=8192, iters=150, recon_batch_size=16, progress=False)


def log2_scales(state) -> list[float]:
    return [float(p.scale[g]) for layer in state.layers.values() if layer.kind == "attention"
            for p in [layer.acts["p"]] for g, kind in enumerate(p.kind) if kind == "log2"]


def with_log2_scale_one(state):
    """The state with every log2 post-softmax set at scale 1 (levels 2^0 … 2^-L: no probability is clipped)."""
    state = copy.deepcopy(state)
    for layer in state.layers.values():
        if layer.kind == "attention":
            p = layer.acts["p"]
            p.scale = torch.where(torch.tensor([k == "log2" for k in p.kind]), torch.ones_like(p.scale), p.scale)
    return state


def evaluate(unet, scheduler, state, seeds, steps: int) -> dict:
    model = tcaq_kernels.convert(unet, state, backend="simulate")
    summary = same_seed_fidelity(unet, model, scheduler, seeds, num_steps=steps, progress=False).summary()
    scales = log2_scales(state)
    return {"psnr_db": summary["psnr_db"], "fine_energy_ratio": summary["fine_energy"]["ratio"],
            "log2_scale_median": float(np.median(scales)) if scales else None}


def run(bits: str, rule: str, reconstruct: bool, unet, scheduler, seeds, steps: int, scope: str = "all",
        row_max: bool = False) -> list[dict]:
    """One calibration; for log2 maps without reconstruction also its state with every log2 scale set to 1.
    `scope` "attention": every conv/linear stays float, only the attention processors are quantized;
    "no-attention": the attention processors (q, k, v, P) stay float, everything else is quantized."""
    kinds = quantizable_layers(unet)
    keep = {"attention": [n for n, k in kinds.items() if k != "attention"],
            "no-attention": [*MethodConfig().keep_float, *(n for n, k in kinds.items() if k == "attention")]}
    extra = {"keep_float": keep[scope]} if scope in keep else {}
    cfg = preset_config("qdiffusion+daq", **BUDGET, daq_rule=rule, reconstruct=reconstruct, p_row_max=row_max, **extra)
    start = time.perf_counter()
    state = calibrate_with_config(unet, scheduler, bits, cfg, "qdiffusion+daq")
    calib_s = time.perf_counter() - start
    kinds = [k for layer in state.layers.values() if layer.kind == "attention" for k in layer.acts["p"].kind]
    row = {"bits": bits, "scope": scope, "p_map": "row-max" if row_max else "softmax", "daq_rule": rule,
           "reconstruct": reconstruct, "log2_scale": "searched",
           "log2_share": kinds.count("log2") / len(kinds) if kinds else None, "calib_seconds": round(calib_s, 1)}
    rows = [{**row, **evaluate(unet, scheduler, state, seeds, steps)}]
    if "log2" in kinds and not reconstruct:
        rows.append({**row, "log2_scale": "1", **evaluate(unet, scheduler, with_log2_scale_one(state), seeds, steps)})
    return rows


def markdown(rows: list[dict], command: str, notes: list[str] = ()) -> str:
    """The table, then `notes` (the json's "notes": readings written by hand, kept across runs) as paragraphs."""
    lines = ["# `qdiffusion+daq` on a CPU budget: DAQ kind × block reconstruction", "",
             f"Embedded DDPM-CIFAR10 model; budget {json.dumps(BUDGET)}; same-seed samples against full precision. "
             f"Command: `{command}`.", "",
             "`scope` all: the preset's layers; attention: every conv/linear float, only q, k, v and P quantized; "
             "no-attention: q, k, v and P float, everything else quantized (the DAQ rule then has no map to act on).", "",
             "P map: the softmax, or exp(S − row max) normalised after P·V (`p_row_max`).", "",
             "| bits | scope | P map | DAQ rule | reconstruction | log2 share | log2 scale (median) | PSNR (dB) | "
             "fine-energy ratio | calibration (s) |",
             "| --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        scale = "—" if r["log2_scale_median"] is None else f"{r['log2_scale']} ({r['log2_scale_median']:.3g})"
        share = "—" if r["log2_share"] is None else f"{r['log2_share']:.2f}"
        lines.append(f"| {r['bits']} | {r.get('scope', 'all')} | {r.get('p_map', 'softmax')} | {r['daq_rule']} | "
                     f"{'yes' if r['reconstruct'] else 'no'} | "
                     f"{share} | {scale} | {r['psnr_db']:.2f} | {r['fine_energy_ratio']:.3f} | {r['calib_seconds']:.0f} |")
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--rules", nargs="*", default=["uniform", "log2"])
    p.add_argument("--scopes", nargs="*", default=["all", "attention", "no-attention"],
                   choices=["all", "attention", "no-attention"],
                   help="all: the preset's layers; attention: only the attention processors; no-attention: all but "
                        "them (both without reconstruction)")
    p.add_argument("--samples", type=int, default=16, help="same-seed samples compared with full precision")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of those samples")
    p.add_argument("--reconstruction-only", action="store_true",
                   help="run only the rows with block reconstruction and merge them into --out's daq_fade.json "
                        "(rows of the same bits, scope, rule, reconstruction and log2 scale replaced)")
    p.add_argument("--no-reconstruction", action="store_true", help="skip the rows with block reconstruction")
    p.add_argument("--row-max", action="store_true",
                   help="calibrate with p_row_max (row-max maps) and merge the rows into --out's daq_fade.json")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    unet = load_fp_unet().requires_grad_(False)
    scheduler = make_scheduler(load_scheduler_config())
    seeds = list(range(1000, 1000 + a.samples))
    rows = []
    runs = [(scope, rule, False) for scope in a.scopes if scope != "no-attention" for rule in a.rules]
    runs += [("no-attention", "uniform", False)] if "no-attention" in a.scopes else []
    runs += [("all", rule, True) for rule in a.rules if "all" in a.scopes]
    if a.reconstruction_only:
        runs = [r for r in runs if r[2]]
    if a.no_reconstruction:
        runs = [r for r in runs if not r[2]]
    command = "python benchmarks/daq_fade.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(a.out)
    merge = a.reconstruction_only or a.row_max
    earlier = json.loads((out / "daq_fade.json").read_text()) if merge else {}
    commands = [*(earlier.get("commands") or [earlier["command"]] if earlier else []), command]
    notes = earlier.get("notes", [])
    for scope, rule, reconstruct in runs:
        for row in run(a.bits, rule, reconstruct, unet, scheduler, seeds, a.steps, scope, a.row_max):
            rows.append(row)
            print(json.dumps(row), flush=True)
            rows_all = merged(earlier.get("rows", []), rows)
            # written after every row: a run stopped early keeps what it measured
            atomic_write_text(out / "daq_fade.json", json.dumps(
                {"command": commands[0], "commands": commands, "budget": BUDGET, "rows": rows_all, "notes": notes},
                indent=1))
            atomic_write_text(out / "daq_fade.md", markdown(rows_all, "`, `".join(dict.fromkeys(commands)), notes))
    return 0


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` with the rows of `new` appended, a new row replacing an old one of the same setting."""
    def key(r: dict) -> tuple:
        return (r["bits"], r.get("scope", "all"), r.get("p_map", "softmax"), r["daq_rule"], r["reconstruct"],
                r["log2_scale"])

    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


if __name__ == "__main__":
    sys.exit(main())
