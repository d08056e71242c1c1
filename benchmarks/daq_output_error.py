"""What the post-softmax quantizer choice costs at the attention output, on the embedded model (CPU, ~1 min).

DAQ (tcaq_kernels/calib/daq.py) picks log2 or uniform per attention layer and timestep group by the
power-law test and the lower *entry* MSE of the map. The map is used only through P·V, and most of its
entries are tiny: a uniform grid rounds many of them to 0 (or up), so each row's mass Σ_j p̂_ij drifts
from 1 and the output shrinks or grows as a whole — an error the entry MSE barely sees. This script
captures P and V of every attention layer on full-precision DDIM trajectories and reports, per layer,
timestep third and bit width, for each candidate (uniform and log2, each with its MSE-searched scale):
the entry MSE, the relative P·V error ‖(P̂−P)V‖/‖PV‖, the mean row-mass error |Σ_j p̂_ij − 1| and its
signed mean (a bias every row shares scales the attention output), plus which candidate DAQ's rule picks
and which one has the lower output error.

    python benchmarks/daq_output_error.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("tcaq_kernels") is None:
    sys.path.insert(0, str(REPO))

from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from tcaq_kernels.atomic import atomic_write_text  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's attention helper
from attention_row_mass import stock_self_attention  # noqa: E402
from tcaq_kernels.calib.daq import decide  # noqa: E402
from tcaq_kernels.models import default_model_dir  # noqa: E402
from tcaq_kernels.quant.primitives import (  # noqa: E402
    dequantize_log2, dequantize_uniform, log2_scale_mse, qparams_mse, quantize_log2, quantize_uniform)


class CaptureProcessor:
    """Stock self-attention keeping P (every `row_stride`-th query row) and V of each call."""

    def __init__(self, store: list, step: list, row_stride: int = 8):
        self.store, self.step, self.row_stride = store, step, row_stride

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        return stock_self_attention(
            attn, hidden_states, lambda p, v: self.store.append((self.step[0], p[:, :: self.row_stride].clone(), v.clone())))


def capture(samples: int, steps: int, seed: int) -> dict[str, list]:
    d = default_model_dir()
    unet = UNet2DModel.from_pretrained(d / "unet").eval()
    sched = DDIMScheduler.from_pretrained(d / "scheduler")
    caps: dict[str, list] = {}
    step = [0]
    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            m.set_processor(CaptureProcessor(caps.setdefault(name, []), step))
    sched.set_timesteps(steps)
    x = torch.randn(samples, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                    generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            step[0] = i
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return caps


def candidates(sample: torch.Tensor, bits: int) -> dict:
    """The two families with the scales DAQ's search gives them."""
    su, zu = qparams_mse(sample, bits)
    sl = log2_scale_mse(sample, bits)
    return {"uniform": lambda t: dequantize_uniform(quantize_uniform(t, 1.0 / su, zu, bits), su, zu),
            "log2": lambda t: dequantize_log2(quantize_log2(t, 1.0 / sl, bits), sl, bits)}


def measure(caps: dict[str, list], steps: int, values: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    thirds = [(0, steps // 3), (steps // 3, 2 * steps // 3), (2 * steps // 3, steps)]
    rows = []
    for name, calls in caps.items():
        for lo, hi in thirds:
            P = torch.cat([p for s, p, _ in calls if lo <= s < hi])
            V = torch.cat([v for s, _, v in calls if lo <= s < hi])
            flat = P.flatten()
            sample = torch.cat([flat[torch.randperm(flat.numel(), generator=gen)[:values]], flat.max().view(1), flat.min().view(1)])
            ref = torch.bmm(P, V)
            for bits in (8, 6, 4):
                row = {"layer": name, "steps": f"{lo}-{hi}", "bits": bits}
                for kind, fq in candidates(sample, bits).items():
                    ph = fq(P)
                    row[kind] = {"entry_mse": float((ph - P).pow(2).mean()),
                                 "pv_rel_error": float((torch.bmm(ph, V) - ref).norm() / ref.norm()),
                                 "row_mass_error": float((ph.sum(-1) - 1).abs().mean()),
                                 "row_mass_bias": float((ph.sum(-1) - 1).mean())}
                row["daq_pick"] = decide(sample, bits, rule="llr+mse").kind
                row["lower_pv_error"] = min(("uniform", "log2"), key=lambda k: row[k]["pv_rel_error"])
                rows.append(row)
    return rows


def _spread(rows: list[dict], kind: str) -> str:
    bias = [r[kind]["row_mass_bias"] for r in rows]
    return f"{sum(bias) / len(bias):+.4f} ({min(bias):+.4f}…{max(bias):+.4f})"


def summary_lines(rows: list[dict]) -> list[str]:
    lines = ["| bits | maps | DAQ picks log2 | lower P·V error: log2 | P·V error, DAQ's pick (mean) | P·V error, lower of the two (mean) | "
             "P·V error, uniform always | row-mass error, DAQ's pick | row-mass error, uniform always | "
             "row-mass bias, log2 (mean, min…max) | row-mass bias, uniform (mean, min…max) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for bits in (8, 6, 4):
        sel = [r for r in rows if r["bits"] == bits]
        mean = lambda f: sum(f(r) for r in sel) / len(sel)  # noqa: E731
        lines.append(
            f"| {bits} | {len(sel)} | {sum(r['daq_pick'] == 'log2' for r in sel)} | {sum(r['lower_pv_error'] == 'log2' for r in sel)} | "
            f"{mean(lambda r: r[r['daq_pick']]['pv_rel_error']):.4f} | {mean(lambda r: min(r['uniform']['pv_rel_error'], r['log2']['pv_rel_error'])):.4f} | "
            f"{mean(lambda r: r['uniform']['pv_rel_error']):.4f} | {mean(lambda r: r[r['daq_pick']]['row_mass_error']):.4f} | "
            f"{mean(lambda r: r['uniform']['row_mass_error']):.4f} | {_spread(sel, 'log2')} | {_spread(sel, 'uniform')} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--values", type=int, default=20000, help="map values per decision (MethodConfig.daq_values)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for daq_output_error.json / .md (default: print only)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    rows = measure(capture(a.samples, a.steps, a.seed), a.steps, a.values, a.seed)
    cmd = " ".join(["python benchmarks/daq_output_error.py", *(argv if argv is not None else sys.argv[1:])])
    md = ["# Post-softmax quantizer: entry MSE against P·V output error", "",
          f"Embedded DDPM-CIFAR10 model, {a.samples} DDIM-{a.steps} full-precision trajectories (seed {a.seed}), every "
          f"attention layer × timestep third; each map quantized with both families at their MSE-searched scales. "
          f"Command: `{cmd}`.", "", *summary_lines(rows), "",
          "| layer | steps | bits | DAQ pick | uniform: entry MSE / P·V err / row-mass err | log2: entry MSE / P·V err / row-mass err |",
          "| --- | --- | ---: | --- | --- | --- |"]
    for r in rows:
        u, lg = r["uniform"], r["log2"]
        md.append(f"| {r['layer']} | {r['steps']} | {r['bits']} | {r['daq_pick']} | {u['entry_mse']:.2e} / {u['pv_rel_error']:.4f} / "
                  f"{u['row_mass_error']:.4f} | {lg['entry_mse']:.2e} / {lg['pv_rel_error']:.4f} / {lg['row_mass_error']:.4f} |")
    print("\n".join(summary_lines(rows)))
    if a.out:
        out = Path(a.out)
        atomic_write_text(out / "daq_output_error.json", json.dumps({"command": cmd, "rows": rows}, indent=1) + "\n")
        atomic_write_text(out / "daq_output_error.md", "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
